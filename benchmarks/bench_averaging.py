"""Checkpoint averaging in the long regime: a run's last checkpoints, alone and averaged.

    python benchmarks/bench_averaging.py runs/book/checkpoints/step-*.pt
    python benchmarks/bench_averaging.py runs/book/checkpoints/step-*.pt --max-k 4 --utterances 300

Chapter 7's five-minute benchmark (bench_levers.py) measured averaging where the learning rate
is still high. This one measures it where FunASR uses it, at the end of a long run: it scores
each checkpoint given (in step order) and the mean of the last k of them (k = 2..max-k, written
with paraformer_edu.average_checkpoints) greedily on the dev, test and test-voices splits of the
checkpoints' corpus. It prints a table and writes the figures to --out
(benchmarks/results/averaging.json, which chapter 7 shows). Not a test: it needs a trained run.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import torch

from paraformer_edu.checkpoint import average_checkpoints, load_checkpoint, model_from_checkpoint
from paraformer_edu.corpus import build_corpus, corpus_config
from paraformer_edu.dataset import SpeechDataset
from paraformer_edu.training import evaluate

ROOT = Path(__file__).resolve().parent.parent
SPLITS = ("dev", "test", "test-voices")


def score(path: Path, utterances: int, manifests: dict | None = None) -> tuple[dict, dict]:
    """Greedy CER and WER of one checkpoint on each split; the scores and the manifests."""
    model, tokenizer, frontend, config = model_from_checkpoint(load_checkpoint(path))
    manifests = manifests or build_corpus(corpus_config(config.data.corpus), splits=SPLITS)
    scores = {}
    for split in SPLITS:
        dataset = SpeechDataset(manifests[split], frontend, tokenizer.encode)
        got = evaluate(model, dataset, tokenizer, utterances)
        scores[split] = {"cer": got["cer"], "wer": got["wer"]}
    return scores, manifests


def step_of(path: Path) -> int:
    """The training step a checkpoint was written at (a model checkpoint's, or a latest.pt's)."""
    payload = load_checkpoint(path)
    return payload.get("step", payload.get("trainer", {}).get("step", 0))


def main() -> None:
    """Score the checkpoints and the averages of the last k, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="one run's checkpoints, in step order")
    parser.add_argument("--max-k", type=int, default=5, help="average the last 2..max-k checkpoints")
    parser.add_argument("--utterances", type=int, default=500, help="utterances scored per split")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "averaging.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = {path: step_of(path) for path in args.checkpoints}  # each file read once for its step
    paths = sorted(args.checkpoints, key=steps.get)
    rows, manifests = [], None
    for path in paths:
        scores, manifests = score(path, args.utterances, manifests)
        rows.append({"checkpoint": path.name, "step": steps[path], **scores})
        print(f"{path.name}: dev CER {scores['dev']['cer']:.2%}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        for k in range(2, min(args.max_k, len(paths)) + 1):
            mean = Path(folder) / f"last-{k}.pt"
            average_checkpoints(paths[-k:], mean)
            scores, _ = score(mean, args.utterances, manifests)
            rows.append({"checkpoint": f"average of the last {k}", "step": steps[paths[-1]], "k": k,
                         **scores})
            print(f"average of the last {k}: dev CER {scores['dev']['cer']:.2%}", flush=True)
    print(f"{'checkpoint':28} " + " ".join(f"{s + ' CER':>16} {s + ' WER':>16}" for s in SPLITS))
    for r in rows:
        print(f"{r['checkpoint']:28} " + " ".join(f"{r[s]['cer']:16.2%} {r[s]['wer']:16.2%}" for s in SPLITS))
    config = load_checkpoint(paths[-1])["config"]  # the corpus's name, for the record
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "corpus": config["data"]["corpus"], "utterances": args.utterances,
        "machine": f"{platform.machine()} CPU, {args.threads} threads",
        "steps": [r["step"] for r in rows if "k" not in r], "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
