"""Paraformer against CTC and AR, and the Paraformer's ablations, trained and measured in one run (chapter 12).

    python benchmarks/bench_why_nar.py                                  # every system, 5 minutes each
    python benchmarks/bench_why_nar.py --minutes 10 --systems Paraformer CTC AR
    python benchmarks/bench_why_nar.py --steps 400                      # a budget of steps instead

Each system is trained from the same seed on chapter 7's live-run recipe (configs/paraformer.yaml)
by chapter 12's BaselineTrainer, for the same budget, then scored on the test and test-voices splits
(greedy; the AR model also with a beam of 4) and timed decoding 48 test utterances (features
computed beforehand) at batch 1 and 16. The speed ratios compare decoders timed in this run. It
prints one table and writes the figures to --out (benchmarks/results/why_nar.json by default, the
file chapter 12 shows). Timings depend on the machine and what else runs on it: not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from paraformer_edu.baselines import BaselineTrainer, decode_seconds
from paraformer_edu.config import load_config
from paraformer_edu.dataset import SpeechDataset
from paraformer_edu.training import evaluate

ROOT = Path(__file__).resolve().parent.parent
# name: (model kind, model settings changed)
SYSTEMS = {
    "Paraformer": ("paraformer", {}),
    "CTC": ("ctc", {}),
    "AR": ("ar", {}),
    "Paraformer-v2": ("paraformer-v2", {}),
    "Paraformer, no GLM": ("paraformer", {"glm_lambda": 0.0}),
    "Paraformer, no CTC loss": ("paraformer", {"ctc_weight": 0.0}),
    "Paraformer, characters": ("paraformer", {"vocab_size": 32}),  # no BPE merge: 28 letters + specials
    "Paraformer, 40 ms frames": ("paraformer", {"frame_shift": 0.04, "d_input": 400}),  # LFR 5/4
}
# data.max_frames counts encoder frames: 1.5 times as many 40-ms frames hold the same audio
MAX_FRAMES_SCALE = {"Paraformer, 40 ms frames": 1.5}


def run_config(config, name: str, budget: dict):
    """The recipe with a system's model settings, the same audio per batch, and the run's budget."""
    change = SYSTEMS[name][1]
    encoder = replace(config.model.encoder, **{k: v for k, v in change.items() if k == "d_input"})
    model = replace(config.model, encoder=encoder, **{k: v for k, v in change.items() if k != "d_input"})
    data = replace(config.data, max_frames=round(config.data.max_frames * MAX_FRAMES_SCALE.get(name, 1)))
    return replace(config, model=model, data=data, training=replace(config.training, **budget))


def measure(name: str, trainer, beams=(1,)) -> dict:
    """Parameters, training time, test and test-voices scores, RTF at batch 1 and 16 per beam."""
    model, tokenizer, frontend = trainer.model, trainer.tokenizer, trainer.frontend
    tests = {s: SpeechDataset(trainer.manifests[s], frontend, tokenizer.encode) for s in ("test", "test-voices")}
    subset = [tests["test"][i]["features"] for i in range(48)]  # (T', D) each
    audio = sum(tests["test"].entries[i]["duration"] for i in range(48))
    row = {"system": name, "parameters": sum(p.numel() for p in model.parameters()), "steps": trainer.step,
           "train_minutes": trainer.train_seconds / 60, "decoders": {}}
    for beam in beams:
        search = None if beam == 1 else beam
        got = {s: evaluate(model, d, tokenizer, search=search) for s, d in tests.items()}
        row["decoders"][f"beam {beam}"] = {
            "test_cer": got["test"]["cer"], "test_wer": got["test"]["wer"],
            "voices_cer": got["test-voices"]["cer"], "voices_wer": got["test-voices"]["wer"],
            **{f"rtf_b{b}": decode_seconds(model, subset, b, search) / audio for b in (1, 16)}}
    return row


def print_table(rows: list) -> None:
    """One line per system and decoder, with speed ratios to AR greedy and AR beam 4 when measured."""
    ar = {d: r["decoders"][d] for r in rows if r["system"] == "AR" for d in r["decoders"]}
    print(f"{'system':26} {'decoder':7} {'params':>7} {'steps':>6} {'min':>5} {'test CER':>9} {'test WER':>9} "
          f"{'voices CER':>10} {'RTF b1':>8} {'RTF b16':>8} {'b1 ARg/x':>8} {'b1 ARb/x':>8} {'b16 ARg/x':>9} "
          f"{'b16 ARb/x':>9}")
    for r in rows:
        for decoder, d in r["decoders"].items():
            ratios = [ar[a][f"rtf_b{b}"] / d[f"rtf_b{b}"] if a in ar else float("nan")
                      for b in (1, 16) for a in ("beam 1", "beam 4")]
            print(f"{r['system']:26} {decoder:7} {r['parameters'] / 1e6:6.2f}M {r['steps']:6d} "
                  f"{r['train_minutes']:5.1f} {d['test_cer']:9.1%} {d['test_wer']:9.1%} {d['voices_cer']:10.1%} "
                  f"{d['rtf_b1']:8.4f} {d['rtf_b16']:8.4f} {ratios[0]:8.1f} {ratios[1]:8.1f} {ratios[2]:9.1f} "
                  f"{ratios[3]:9.1f}")


def main() -> None:
    """Train and measure every system asked for, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS), metavar="NAME")
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget of each system")
    parser.add_argument("--steps", type=int, default=0, help="a budget of steps instead of minutes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "why_nar.json")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-why-nar")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(ROOT / "configs" / "paraformer.yaml", [f"training.threads={args.threads}"])
    budget = {"max_minutes": 0, "max_steps": args.steps} if args.steps else {"max_minutes": args.minutes,
                                                                             "max_steps": 0}
    rows, start = [], time.perf_counter()
    for name in args.systems:
        folder = args.runs / name.replace(" ", "_").replace(",", "")
        shutil.rmtree(folder, ignore_errors=True)  # a fresh run each time
        kind = SYSTEMS[name][0]
        trainer = BaselineTrainer(run_config(config, name, budget), folder, kind)
        trainer.train()
        rows.append(measure(name, trainer, (1, 4) if kind == "ar" else (1,)))
        print(f"{name}: {trainer.step} steps, test CER {rows[-1]['decoders']['beam 1']['test_cer']:.1%}", flush=True)
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"budget": budget, "machine": f"{platform.machine()} CPU, {args.threads} threads",
                                    "hours": (time.perf_counter() - start) / 3600, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
