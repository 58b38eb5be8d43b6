"""The training levers of issue 11, each measured against chapter 7's live recipe in one run.

    python benchmarks/bench_levers.py                       # every lever, 5 minutes each
    python benchmarks/bench_levers.py --minutes 10 --levers "live recipe" "phoneme CTC, layer 2 (0.3)"

Every run starts from the same seed on configs/paraformer.yaml (144 x 4 on the book corpus) and
changes one thing: the model's width and depth, SpecAugment (off in the live run: it starts at step
4,000), the peak learning rate or the schedule's shape, an auxiliary phoneme CTC loss on the middle
encoder layer (chapter 7's training.phoneme_ctc: the phonemes espeak-ng gives each sentence), and,
for the live recipe's own run, checkpoint averaging (the mean of its final weights and the last four
kept every 100 steps); a second seed of the live recipe shows what chance alone moves.
Each is trained for the same wall-clock budget (evaluations included, as in the live run), then
scored greedily on the test and test-voices splits. It prints one table and writes the figures to
--out (benchmarks/results/levers.json, the file chapter 7 shows). Timings depend on the machine
and on what else runs on it: not a test.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from paraformer_edu import training
from paraformer_edu.config import load_config
from paraformer_edu.dataset import SpeechDataset
from paraformer_edu.features import SpecAugment
from paraformer_edu.training import Trainer, evaluate

ROOT = Path(__file__).resolve().parent.parent
# name: {"encoder": encoder settings, "data": data settings, "training": training settings, extras}
LEVERS = {
    "live recipe": {"average": (5, 100)},  # the last 5 of weights kept every 100 steps
    "live recipe, seed 1": {"training": {"seed": 1}},  # what another seed changes: the noise
    "deeper: 144 x 6": {"encoder": {"n_layers": 6}},
    "wider and deeper: 192 x 6": {"encoder": {"d_model": 192, "n_layers": 6, "d_ffn": 768}},
    "SpecAugment from step 0": {"data": {"spec_augment_from": 0}},
    "SpecAugment x2, from step 0": {"data": {"spec_augment_from": 0}, "spec_strength": 2},
    "peak LR 1e-3": {"training": {"lr": 1e-3}},
    "peak LR 4e-3": {"training": {"lr": 4e-3}},
    "cosine decay to 0": {"schedule": "cosine"},
    "phoneme CTC, layer 2 (0.3)": {"training": {"phoneme_ctc": 0.3}},  # chapter 7's PhonemeCTC
}


def cosine_lr(total_steps: int):
    """Linear warm-up to the peak, then half a cosine down to 0 at total_steps."""

    def lr(step, peak_lr, warmup_steps):
        """The learning rate of a step (the signature of training.warmup_lr)."""
        s = max(step, 1)
        if s < warmup_steps:
            return peak_lr * s / warmup_steps
        done = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        return peak_lr * 0.5 * (1 + math.cos(math.pi * done))

    return lr


def keep_snapshots(trainer: Trainer, every: int) -> list:
    """Make the trainer keep a copy of its weights every `every` steps; the list they go to."""
    snapshots, train_step = [], trainer.train_step

    def step_and_keep(batch):
        """The trainer's step, then a copy of the weights if the step is a multiple of `every`."""
        out = train_step(batch)
        if trainer.step % every == 0:
            snapshots.append(copy.deepcopy(trainer.model.state_dict()))
        return out

    trainer.train_step = step_and_keep
    return snapshots


def average(states: list[dict]) -> dict:
    """The element-wise mean of several state dicts of one model."""
    return {k: sum(s[k].float() for s in states) / len(states) for k in states[0]}


def run_config(config, lever: dict, budget: dict):
    """The live recipe with one lever changed, and the run's budget."""
    encoder = replace(config.model.encoder, **lever.get("encoder", {}))
    ffn = {"decoder_ffn": encoder.d_ffn}  # the decoder follows the encoder's width
    model = replace(config.model, encoder=encoder, **ffn)
    data = replace(config.data, **lever.get("data", {}))
    return replace(config, model=model, data=data,
                   training=replace(config.training, **lever.get("training", {}), **budget))


def score(trainer: Trainer) -> dict:
    """CER and WER on test and test-voices (greedy)."""
    tests = {s: SpeechDataset(trainer.manifests[s], trainer.frontend, trainer.tokenizer.encode)
             for s in ("test", "test-voices")}
    got = {s: evaluate(trainer.model, d, trainer.tokenizer) for s, d in tests.items()}
    return {"test_cer": got["test"]["cer"], "test_wer": got["test"]["wer"],
            "voices_cer": got["test-voices"]["cer"], "voices_wer": got["test-voices"]["wer"]}


def measure(name: str, config, budget: dict, folder: Path, live_steps: int | None) -> dict:
    """Train one lever's run and score it (and, for the live recipe, its averaged weights)."""
    lever = LEVERS[name]
    trainer = Trainer(run_config(config, lever, budget), folder)
    if "spec_strength" in lever:
        k = lever["spec_strength"]
        trainer.train_set.spec_augment = SpecAugment(2 * k, 15, 2 * k, 6, 0.1 * k)
    snapshots = keep_snapshots(trainer, lever["average"][1]) if "average" in lever else None
    schedule = training.warmup_lr
    if lever.get("schedule") == "cosine":
        training.warmup_lr = cosine_lr(live_steps)  # the live recipe's steps in the same budget
    try:
        trainer.train()
    finally:
        training.warmup_lr = schedule
    params = sum(p.numel() for p in trainer.model.parameters())  # the phoneme head is not the model's
    row = {"lever": name, "parameters": params, "steps": trainer.step,
           "train_minutes": trainer.train_seconds / 60,
           "steps_per_hour": trainer.step / max(1e-9, trainer.train_seconds) * 3600, **score(trainer)}
    if snapshots:
        n, every = lever["average"]
        if trainer.step % every:  # the final weights are the last of the mean
            snapshots.append(copy.deepcopy(trainer.model.state_dict()))
        trainer.model.load_state_dict(average(snapshots[-n:]))
        row["averaged"] = {"checkpoints": n, "every": every, "last_step": trainer.step,
                           **score(trainer)}
    return row


def print_table(rows: list) -> None:
    """One line per lever, with the change in test CER from the live recipe."""
    base = next((r["test_cer"] for r in rows if r["lever"] == "live recipe"), float("nan"))
    print(f"{'lever':32} {'params':>7} {'steps':>6} {'steps/h':>8} {'test CER':>9} {'change':>7} "
          f"{'test WER':>9} {'voices CER':>10}")
    for r in rows:
        lines = [(r["lever"], r)] + ([(f"  + average of last {r['averaged']['checkpoints']}", r["averaged"])]
                                     if "averaged" in r else [])
        for label, s in lines:
            print(f"{label:32} {r['parameters'] / 1e6:6.2f}M {r['steps']:6d} {r['steps_per_hour']:8.0f} "
                  f"{s['test_cer']:9.1%} {100 * (s['test_cer'] - base):+7.1f} {s['test_wer']:9.1%} "
                  f"{s['voices_cer']:10.1%}")


def main() -> None:
    """Train and score every lever asked for, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS), metavar="NAME")
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget of each run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "levers.json")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-levers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(ROOT / "configs" / "paraformer.yaml", [f"training.threads={args.threads}"])
    budget = {"max_minutes": args.minutes, "max_steps": 0}
    # rows of an earlier run are kept unless measured again (same budget only)
    earlier = json.loads(args.out.read_text()) if args.out.exists() else {"budget": budget, "rows": []}
    kept = {r["lever"]: r for r in earlier["rows"]} if earlier["budget"] == budget else {}
    carried = earlier.get("hours", 0) if kept else 0
    live_steps = kept["live recipe"]["steps"] if "live recipe" in kept else None
    if "cosine decay to 0" in args.levers and "live recipe" not in args.levers and live_steps is None:
        parser.error("the cosine schedule ends where the live recipe's run ends: measure both")
    start = time.perf_counter()
    for name in sorted(args.levers, key=lambda n: n != "live recipe"):  # the live recipe first
        folder = args.runs / name.replace(" ", "_").replace(",", "").replace(":", "")
        shutil.rmtree(folder, ignore_errors=True)  # a fresh run each time
        kept[name] = measure(name, config, budget, folder, live_steps)
        live_steps = kept["live recipe"]["steps"] if "live recipe" in kept else live_steps
        print(f"{name}: {kept[name]['steps']} steps, test CER {kept[name]['test_cer']:.1%}", flush=True)
    rows = [kept[name] for name in LEVERS if name in kept]
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"budget": budget, "machine": f"{platform.machine()} CPU, {args.threads} threads",
                                    "hours": carried + (time.perf_counter() - start) / 3600, "rows": rows},
                                   indent=1) + "\n")


if __name__ == "__main__":
    main()
