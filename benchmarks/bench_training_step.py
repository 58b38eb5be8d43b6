"""Speed of one Paraformer training step on CPU: the code's defaults against chapter 7's recipe.

    python benchmarks/bench_training_step.py              # 2 threads, a batch of the book corpus
    python benchmarks/bench_training_step.py --threads 1 --steps 10

The same batch (the first of the recipe's sampler, at most `data.max_frames` padded frames) is
trained on by a fresh model of each configuration: forward, backward and Adam's step. Each time is
the median of `--steps` steps after one warm-up step; the speed ratios compare times measured in
this run. Chapter 7 shows the same comparison once; this script is where its speed goal lives
(the recipe's step should be at least 1.5x faster than the defaults'), and the cost of bfloat16
autocast (`training.precision=bfloat16`) on this CPU. Not a test: timings depend
on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from paraformer_edu.config import load_config
from paraformer_edu.model import Paraformer, ParaformerConfig
from paraformer_edu.training import Trainer, autocast

ROOT = Path(__file__).resolve().parent.parent
GOAL = 1.5  # the recipe's step at least this much faster than the defaults'


def step_times(model_config: ParaformerConfig, batch: dict, steps: int, precision: str = "float32") -> list[float]:
    """Wall times (s) of `steps` training steps of a fresh model on one batch, after one warm-up step."""
    torch.manual_seed(0)
    model = Paraformer(model_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    args = (batch["features"], batch["feature_lengths"], batch["targets"], batch["target_lengths"])
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        with autocast(torch.device("cpu"), precision):  # training.precision (chapter 7)
            loss = model(*args)["loss"]
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    """Print one line per configuration and the ratio to the defaults."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(ROOT / "configs" / "paraformer.yaml", ["training.eval_utterances=1"])
    batch = next(Trainer(config, ROOT / "runs" / "bench").batches())
    defaults = ParaformerConfig(vocab_size=config.model.vocab_size)
    variants = {"code defaults (192 x 6), dropout 0.1": defaults,
                "same, dropout 0": replace(defaults, encoder=replace(defaults.encoder, dropout=0.0), decoder_dropout=0.0),
                "the recipe (144 x 4), dropout 0": config.model}
    print(f"batch {tuple(batch['features'].shape)}, {args.threads} threads, median of {args.steps} steps")
    medians = {name: statistics.median(step_times(c, batch, args.steps)) for name, c in variants.items()}
    # mixed precision: what training.precision=bfloat16 would cost or save on this CPU
    medians["the recipe, bfloat16 autocast"] = statistics.median(
        step_times(config.model, batch, args.steps, "bfloat16"))
    first = next(iter(medians.values()))
    for name, seconds in medians.items():
        print(f"{name:<38} {1000 * seconds:8.0f} ms/step   {first / seconds:4.1f}x the defaults' speed")
    ratio = first / medians["the recipe (144 x 4), dropout 0"]
    print(f"goal: the recipe >= {GOAL}x the defaults' speed: {'met' if ratio >= GOAL else 'NOT met'} ({ratio:.1f}x)")
    bf16 = medians["the recipe (144 x 4), dropout 0"] / medians["the recipe, bfloat16 autocast"]
    advice = "training.precision=bfloat16 opts in" if bf16 > 1 else "keep float32 (training.precision=auto)"
    print(f"bfloat16 autocast on this CPU: {bf16:.2f}x float32's speed "
          f"({'faster' if bf16 > 1 else 'slower'} here: {advice})")


if __name__ == "__main__":
    main()
