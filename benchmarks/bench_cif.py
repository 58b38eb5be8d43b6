"""Speed of three CIF implementations on CPU: the paper's loop, the vectorised `cif`, torch-cif.

    python benchmarks/bench_cif.py                 # 2 threads, D = 192
    python benchmarks/bench_cif.py --threads 1 --dim 512

Two passes are timed, as they are used:
- forward: inference, with the tail rule (ours: tail_threshold 0.45; torch-cif: tail_thres 0.55);
- forward + backward: training, weights scaled to target lengths (torch-cif: eps 0).
Each time is the best of a few calls (ms; more calls for the smallest size); the ratios compare times measured in the same
run. The loop runs only where it finishes in seconds (B x T <= 8,000). Not a test: timings
depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch_cif import cif_function

from paraformer_edu.predictor import cif, cif_loop

SIZES = [(1, 100), (16, 500), (32, 1000)]
LOOP_MAX_FRAMES = 8_000


def torch_cif(h, alphas, lengths, tail_threshold=0.0, target_lengths=None):
    """torch-cif's cif_function called with the same meaning as ours (see chapter 5)."""
    padding = torch.arange(h.size(1)) >= lengths[:, None]  # (B, T)
    if target_lengths is not None:
        out = cif_function(h, alphas, padding_mask=padding, target_lengths=target_lengths, eps=0.0)
    else:
        out = cif_function(h, alphas, tail_thres=1.0 - tail_threshold, padding_mask=padding)
    return out["cif_out"][0], out["cif_lengths"][0], None


IMPLEMENTATIONS = {"loop": cif_loop, "vectorised": cif, "torch-cif": torch_cif}


def inputs(B: int, T: int, D: int, seed: int = 0):
    """Random encoder states (B, T, D), weights (B, T) with lengths (B,) and targets (B,)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g)  # (B, T, D)
    alphas = torch.rand(B, T, generator=g) * 0.8  # (B, T): about 0.4 tokens per frame
    lengths = torch.full((B,), T)  # (B,)
    lengths[1:] = torch.randint(T // 2, T + 1, (B - 1,), generator=g)  # padding in all but the first
    alphas = alphas.masked_fill(torch.arange(T) >= lengths[:, None], 0.0)  # (B, T)
    targets = torch.round(alphas.sum(1) * 1.1).long().clamp(min=1)  # (B,): the predictor is 10% short
    return h, alphas, lengths, targets


def best_ms(fn, repeats: int) -> float:
    """Best wall time (ms) of `repeats` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def time_one(name: str, B: int, T: int, D: int, backward: bool, repeats: int) -> float:
    """Best time (ms) of one implementation, forward (inference) or forward + backward (training)."""
    fn = IMPLEMENTATIONS[name]
    h, alphas, lengths, targets = inputs(B, T, D)
    h.requires_grad_(backward)
    alphas.requires_grad_(backward)

    def run():
        if backward:
            embeds = fn(h, alphas, lengths, target_lengths=targets)[0]  # (B, N, D)
            embeds.sum().backward()
        else:
            with torch.no_grad():
                fn(h, alphas, lengths, tail_threshold=0.45)
    return best_ms(run, 2 if name == "loop" else (4 * repeats if B * T <= 1000 else repeats))


def benchmark(sizes=SIZES, D: int = 192, repeats: int = 5) -> list[dict]:
    """Rows {B, T, pass, loop, vectorised, torch-cif} of best times in ms (None: not run)."""
    rows = []
    for B, T in sizes:
        for backward in (False, True):
            row = {"B": B, "T": T, "pass": "fwd+bwd" if backward else "forward"}
            for name in IMPLEMENTATIONS:  # alternate implementations within a size: same machine state
                run_it = name != "loop" or B * T <= LOOP_MAX_FRAMES
                row[name] = time_one(name, B, T, D, backward, repeats) if run_it else None
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """A plain-text table of times and ratios."""
    lines = [f"{'B x T':>10}  {'pass':<8}{'loop ms':>10}{'vectorised ms':>15}{'torch-cif ms':>14}"
             f"{'loop/vec':>10}{'torch-cif/vec':>15}"]
    for r in rows:
        loop = f"{r['loop']:>10.1f}" if r["loop"] is not None else f"{'-':>10}"
        ratio = f"{r['loop'] / r['vectorised']:>10.0f}" if r["loop"] is not None else f"{'-':>10}"
        lines.append(f"{str(r['B']) + ' x ' + str(r['T']):>10}  {r['pass']:<8}{loop}{r['vectorised']:>15.2f}"
                     f"{r['torch-cif']:>14.2f}{ratio}{r['torch-cif'] / r['vectorised']:>15.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--dim", type=int, default=192, help="encoder width D (default 192, the book's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (best is kept)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, D = {args.dim}, best of "
          f"{args.repeats} (loop: 2); forward = inference with tail, fwd+bwd = training with targets")
    print(format_table(benchmark(D=args.dim, repeats=args.repeats)))


if __name__ == "__main__":
    main()
