# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The predictor: continuous integrate-and-fire
#
# The encoder of chapter 4 writes one vector per 60 ms frame, $H \in \mathbb{R}^{T \times D}$.
# A non-autoregressive decoder wants something else: one vector per *token*, all at once,
# and so it must first know **how many tokens** the utterance holds. Paraformer gets both
# from a small **predictor** built on *continuous integrate-and-fire* (CIF)
# {cite:p}`dong2020cif`. A tiny network gives every frame a weight $\alpha_t \in (0, 1)$,
# "how much of a token this frame carries". Walking along the frames, CIF adds the
# weights up like a neuron integrating its input; whenever the sum reaches a threshold
# $\beta = 1$ it **fires** a token whose embedding is the weighted sum of the frames
# it integrated. The number of tokens is about $\sum_t \alpha_t$, and the token
# embeddings $E_{ac}$ (B, N, D) are what the decoder of chapter 6 reads.
#
# CIF is simple to write as a loop over frames and fiddly to write fast. The loop is
# slow (in FunASR it was the bottleneck of the exported ONNX model, which is why a
# vectorised `cif_v1` was added in June 2024, [PR #1791](https://github.com/modelscope/FunASR/pull/1791)),
# and fast versions in the wild have had bugs: ten days later FunASR
# [rolled that version back](https://github.com/modelscope/FunASR/commit/362eed972c885bd3526b75df6e1527925abe06c2)
# over a training bug (its token count and its embeddings disagreed by one, a `floor`
# against a `round`), and switched it on again in December 2024 once fixed; and its
# timestamps once passed CIF's peaks where its weights belonged
# ([issue #3723](https://github.com/modelscope/FunASR/issues/3723)). So we write CIF three
# ways and show that they agree.
#
# ## Learning goals
#
# After this chapter you can
#
# - compute CIF by hand on a handful of frames (accumulator, fire, the split of a
#   frame's weight between two tokens) and write it as the paper's loop;
# - write a vectorised CIF from a float64 cumulative sum, including frames whose weight
#   crosses more than one firing boundary, and check it against the loop and against the
#   PyPI package `torch-cif` (and say where their conventions differ);
# - train the predictor: scale the weights to the target length so it fires exactly
#   $|y|$ times, and learn the length with the quantity (MAE) loss;
# - decode the length at inference with FunASR's tail rule, and know what it does for
#   sums like 2.999999 and 3.000001; then integrate the weights scaled to that length,
#   as in training;
# - turn firing positions into token timestamps;
# - train the predictor on real speech and measure how well it counts tokens;
# - measure how fast each version is.

# %%
# In Colab, install the book's package first:
# # !pip install -q "paraformer-edu[book] @ git+https://github.com/paraformer-edu/paraformer-edu"
# %matplotlib inline
import math
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch_cif import cif_function

import paraformer_edu
from paraformer_edu.display import book_style, print_table

book_style()
torch.manual_seed(0)
print("paraformer_edu", paraformer_edu.__version__)

# %% [markdown]
# ## Integrate and fire, by hand
#
# Take eight frames with weights $\alpha = (0.3, 0.5, 0.4, 0.9, 0.1, 0.2, 0.5, 0.7)$ and
# the threshold $\beta = 1$. An accumulator $a$ starts at 0. Frame by frame
# {cite:p}`dong2020cif`:
#
# $$
# a_t = a_{t-1} + \alpha_t .
# $$
#
# While $a_t < \beta$ nothing happens: the frame's weight joins the token being built,
# whose embedding so far is $c = \sum \alpha_t h_t$. When $a_t \ge \beta$ the token is
# complete and CIF **fires**. The frame's weight is split in two: the part
# $\alpha_{t1} = \beta - a_{t-1}$ completes the current token, the rest
# $\alpha_{t2} = \alpha_t - \alpha_{t1}$ starts the next one:
#
# $$
# e_i = c + \alpha_{t1} h_t, \qquad c \leftarrow \alpha_{t2} h_t, \qquad a_t \leftarrow \alpha_{t2}.
# $$
#
# Every token is a weighted sum of consecutive frames whose weights add up to exactly
# $\beta$. The table follows the example; check a few lines by hand.

# %%
def max_abs_diff(a, b):
    """Largest absolute difference of two tensors of the same shape (0 if empty)."""
    return (a - b).abs().max().item() if a.numel() else 0.0


alpha_example = torch.tensor([0.3, 0.5, 0.4, 0.9, 0.1, 0.2, 0.5, 0.7])  # (T,)


def cif_trace(alpha, beta=1.0):
    """The loop's rows: t, alpha_t, a_{t-1}, a_{t-1} + alpha_t, token fired, alpha_t1, alpha_t2."""
    rows, a, token = [], 0.0, 0
    for t, w in enumerate(alpha.tolist()):
        if a + w >= beta:
            rows.append((t, w, a, a + w, token, beta - a, w - (beta - a)))
            a, token = w - (beta - a), token + 1
        else:
            rows.append((t, w, a, a + w, None, None, None))
            a += w
    return rows


headers = ["t", "alpha_t", "a_(t-1)", "a+alpha", "fires", "alpha_t1", "alpha_t2"]
print_table(
    [
        (t, w, before, after, None if token is None else f"token {token}", part, rest)
        for t, w, before, after, token, part, rest in cif_trace(alpha_example)
    ],
    headers,
    formats={h: ".1f" for h in headers if h.startswith("a")},
)
print(f"sum of alpha = {alpha_example.sum():.1f}: 3 tokens fired, 0.6 left over at the end")

# %% [markdown]
# Three tokens fire, at frames 2, 3 and 7, and a weight of 0.6 is left over: a fourth
# token that never reached the threshold. What to do with it is the *tail* question we
# come back to below. The plot shows the same story: the accumulator climbs, drops by
# $\beta$ at each fire, and the running sum $\sum_{s \le t} \alpha_s$ fires each time it
# crosses a whole number.

# %% mystnb={"figure": {"caption": "Integrate and fire on the eight example weights. Left: the weights, the accumulator before and after each frame, and the three fires where it reaches $\\beta = 1$. Right: the same fires are where the running sum of the weights crosses 1, 2 and 3.", "name": "fig-ch05-cif"}, "image": {"alt": "Left, bars of eight frame weights with an orange step line for the accumulator and red triangles above frames 2, 3 and 7 where it passes the dotted line at 1. Right, a rising line of the running sum with red triangles at frames 2, 3 and 7 where it crosses the dotted lines at 1, 2 and 3."}}
a_plus, a_after, a = [], [], 0.0
for w in alpha_example.tolist():
    a_plus.append(a + w)  # a_{t-1} + alpha_t: fires when it reaches beta = 1
    a = a + w - (1.0 if a + w >= 1.0 else 0.0)
    a_after.append(a)
fire_frames = [row[0] for row in cif_trace(alpha_example) if row[4] is not None]
t = torch.arange(len(alpha_example))  # (T,)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), layout="constrained")
axes[0].bar(t, alpha_example, color="C0", alpha=0.5, label=r"$\alpha_t$")
axes[0].plot(t, a_plus, "o", color="C1", label=r"$a_{t-1} + \alpha_t$")
axes[0].step(t, a_after, where="mid", color="C1", lw=1, label="accumulator after firing")
axes[0].plot(fire_frames, [a_plus[f] for f in fire_frames], "rv", markersize=9, label="fire")
axes[0].axhline(1.0, color="0.5", ls=":", lw=1)
axes[0].set(
    xlabel="frame t",
    ylabel="weight (tokens)",
    title=r"Integrate and fire ($\beta = 1$)",
    ylim=(0, 2.1),
)
axes[0].legend(loc="upper left", ncol=2)
axes[1].plot(t, alpha_example.cumsum(0), "o-", color="C2", label=r"$\sum_{s \leq t} \alpha_s$")
for k in (1, 2, 3):
    axes[1].axhline(k, color="0.5", ls=":", lw=1)
axes[1].plot(fire_frames, alpha_example.cumsum(0)[fire_frames], "rv", markersize=9, label="fire")
axes[1].set(
    xlabel="frame t",
    ylabel="running sum (tokens)",
    title="The same fires: the running sum crosses 1, 2, 3",
    yticks=[0, 1, 2, 3],
)
axes[1].legend(loc="upper left")
plt.show()

# %% [markdown]
# ## Way 1: the paper's loop
#
# The loop below is the paper's recipe for one utterance, with one generalisation: a
# frame whose weight is large enough can complete a token *and* a whole next one
# ($a_{t-1} + \alpha_t \ge 2\beta$). With sigmoid weights and $\beta = 1$ that cannot
# happen, but it does at training time, where the weights are scaled up to the target
# length (next sections), and with a threshold $\beta < 1$. The `while` fires as many
# times as needed; the reference must be complete. The accumulator is kept in float64,
# like the running sum of the vectorised version below, so that both decide alike on a
# frame that ends within float32 rounding of a boundary. The function also returns what
# is left at the end: the partial embedding $c$ and its weight $a$.

# %%
#| default_exp predictor
#| export
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

# %%
#| export
def integrate_and_fire(h: torch.Tensor, alpha: torch.Tensor, beta: float = 1.0):
    """The paper's loop, one utterance: h (T, D), alpha (T,) -> embeddings, fires, leftover c, a."""
    alpha = alpha.double()  # (T,): accumulate in float64
    a = alpha.new_zeros(())  # weight integrated into the current token
    c = h.new_zeros(h.size(1))  # (D,): its embedding so far
    embeddings, fires = [], []
    for t in range(alpha.size(0)):
        rest = alpha[t]  # weight of frame t not handed out yet
        while a + rest >= beta:  # the token is complete: fire (again, if rest is large)
            part = beta - a  # alpha_t1: the share of frame t that completes it
            embeddings.append(c + part * h[t])  # (D,)
            fires.append(t)
            a, c, rest = alpha.new_zeros(()), h.new_zeros(h.size(1)), rest - part
        a = a + rest  # alpha_t2 starts the next token
        c = c + rest * h[t]  # (D,)
    return embeddings, fires, c, a


# %% [markdown]
# With $h_t$ the $t$-th unit vector ($H = I$), each embedding is the row of weights the
# token took from each frame, so we can read the loop's result directly:

# %%
embeddings, fires, c, a = integrate_and_fire(torch.eye(8), alpha_example)
print("fire frames:", ", ".join(map(str, fires)))
print("weight each token took from each frame t:")
print_table(
    [[f"token {k}", *e.tolist(), e.sum().item()] for k, e in enumerate(embeddings)]
    + [["left over", *c.tolist(), float(a)]],
    ["", *[f"t={t}" for t in range(8)], "sum"],
    formats={j: ".2f" for j in range(1, 10)},
)
assert fires == [2, 3, 7] and all(abs(e.sum() - 1.0) < 1e-6 for e in embeddings)

# %% [markdown]
# A batch adds three things around this loop, each a convention we have to fix before
# comparing implementations:
#
# - **padding**: utterance $b$ has `lengths[b]` valid frames; frames past it are ignored;
# - **training** (`target_lengths` given): the weights are rescaled so that they add up
#   to $\beta |y|$ and the loop returns exactly $|y|$ tokens (see *Training* below);
# - **inference** (`tail_threshold` $\tau > 0$): FunASR appends one more frame with
#   weight $\tau = 0.45$ and a zero vector, so that a leftover of at least
#   $\beta - \tau = 0.55$ still fires (see *Inference* below).
#
# The result is padded: embeddings (B, N, D), token counts (B,), and the fire frame of
# each token (B, N), with -1 past the end.

# %%
#| export
def _pad_tokens(tokens: list, h: torch.Tensor):
    """Stack per-utterance (embeddings, fires) lists into (B, N, D), (B,), (B, N) tensors."""
    N = max([len(e) for e, _ in tokens], default=0)
    embeds = (
        torch.stack(
            [
                F.pad(torch.stack(e), (0, 0, 0, N - len(e))) if e else h.new_zeros(N, h.size(2))
                # (B, N, D)
                for e, _ in tokens
            ]
        )
        if tokens
        else h.new_zeros(0, N, h.size(2))
    )
    fires = torch.tensor([f + [-1] * (N - len(f)) for _, f in tokens], dtype=torch.long).view(
        len(tokens), N
    )
    counts = torch.tensor([len(e) for e, _ in tokens], dtype=torch.long, device=h.device)  # (B,)
    return embeds, counts, fires.to(h.device)


def cif_loop(
    h: torch.Tensor,
    alphas: torch.Tensor,
    lengths: torch.Tensor | None = None,
    beta: float = 1.0,
    tail_threshold: float = 0.0,
    target_lengths: torch.Tensor | None = None,
):
    """Reference CIF (a loop): h (B, T, D), alphas (B, T) -> embeds (B, N, D), N (B,), fires."""
    B, T, D = h.shape
    lengths = torch.full((B,), T) if lengths is None else lengths
    tokens = []
    for b in range(B):
        L = int(lengths[b])
        hb, alpha = h[b, :L], alphas[b, :L].double()  # (L, D), (L,)
        if target_lengths is not None:  # training: scale the weights to beta * |y|
            n, total = int(target_lengths[b]), alpha.sum()
            alpha = alpha * (beta * n / total) if total > 0 else torch.zeros_like(alpha)  # (L,)
        elif tail_threshold > 0:  # inference: a tail frame of weight tau and h = 0
            hb = torch.cat([hb, hb.new_zeros(1, D)])  # (L + 1, D)
            alpha = torch.cat([alpha, alpha.new_full((1,), tail_threshold)])  # (L + 1,)
        embeddings, fires, c, _ = integrate_and_fire(hb, alpha, beta)
        if target_lengths is not None:  # rounding can leave the last token a hair short of beta
            last = int(alpha.nonzero().max()) if bool(alpha.any()) else L
            while len(embeddings) < n:
                embeddings, fires, c = embeddings + [c], fires + [last], torch.zeros_like(c)
            embeddings, fires = embeddings[:n], fires[:n]
        tokens.append((embeddings, fires))
    return _pad_tokens(tokens, h)


# %% [markdown]
# ## Way 2: vectorised, from a cumulative sum
#
# The loop visits frames one by one in Python, several tensor operations per frame and
# per utterance. That adds up: in the prototype behind this book, the loop made
# Paraformer's decoding at batch 1 two and a half times slower than plain CTC decoding. The right panel of the plot above shows the way
# out. Measure everything in units of $\beta$ along the **running token count**
#
# $$
# C_t = \frac{1}{\beta} \sum_{s \le t} \alpha_s, \qquad C_0 = 0 .
# $$
#
# Frame $t$ covers the interval $[C_{t-1}, C_t]$ of that axis, token $k$ (counting
# from 0) the interval $[k, k+1]$. The weight frame $t$ gives token $k$ is $\beta$ times
# the length of their overlap, and the token fires at the first frame where $C_t$
# reaches $k+1$:
#
# $$
# w_{k,t} = \beta \max\!\big(0,\ \min(C_t, k+1) - \max(C_{t-1}, k)\big), \qquad
# e_k = \sum_t w_{k,t}\, h_t, \qquad f_k = \min\{t : C_t \ge k + 1\}.
# $$
#
# No accumulator, no loop: a frame crossing several boundaries simply overlaps several
# tokens. $C$ is computed in **float64**: in float32 the sum of 20,000 weights near
# 8,000 has a spacing of $2^{-10}$ and firing decisions drift (we measure it below).
# As a first check, the dense matrix $W = (w_{k,t})$ for the example is the table the
# loop printed:

# %%
def cif_weights_dense(alpha, beta=1.0):
    """The dense CIF weights W (K, T) of one utterance, K = ceil(sum(alpha) / beta) tokens."""
    C = F.pad(alpha.double().cumsum(0) / beta, (1, 0))  # (T + 1,): C_0 = 0, ..., C_T
    k = torch.arange(math.ceil(C[-1].item()), dtype=torch.float64)[:, None]  # (K, 1)
    overlap = torch.minimum(C[1:], k + 1) - torch.maximum(C[:-1], k)  # (K, T)
    return beta * overlap.clamp(min=0)  # (K, T)


W = cif_weights_dense(alpha_example)  # (K, T)
print_table(
    [[f"token {k}", *row] for k, row in enumerate(W.tolist())],
    ["", *[f"t={t}" for t in range(W.size(1))]],
    formats={j: ".2f" for j in range(1, W.size(1) + 1)},
)
diff = max_abs_diff(W[:3].float(), torch.stack(embeddings))
print(f"max abs diff, dense W vs the loop: {diff:.1e}")
assert diff < 1e-6

# %% [markdown]
# The dense form costs $O(K T D)$, mostly multiplying zeros: each token overlaps only a
# few frames. The fast form cuts the $C$ axis into **pieces** at every frame boundary
# $C_t$ and every token boundary $k$; each piece belongs to one frame and one token,
# and there are at most $T + K$ of them:
#
# - each frame's first piece starts at $C_{t-1}$, in token $j_t = \lfloor C_{t-1} \rfloor$,
#   and has weight $\beta(\min(C_t, j_t + 1) - C_{t-1})$: one `index_add` of all frames
#   into their tokens;
# - each token $k \ge 1$ has one piece starting exactly at its boundary $k$, inside frame
#   $f_{k-1}$ (where token $k-1$ fired), of weight $\beta(\min(C_{f_{k-1}}, k + 1) - k)$: a
#   gather. A frame that crosses several boundaries gives one such piece to each.
#
# The fire frames $f_k$ come from `torch.searchsorted` on the sorted $C$. Padding frames
# get weight 0, so $C$ stays flat there. Tokens the caller does not want (past $N_b$)
# go to a discard row. The count $N_b$ and the two modes live in `cif_count`.

# %%
#| export
def cif_count(
    alphas: torch.Tensor,
    lengths: torch.Tensor | None = None,
    beta: float = 1.0,
    tail_threshold: float = 0.0,
    target_lengths: torch.Tensor | None = None,
):
    """Running count C (B, T + 1), float64, C[:, t] = sum(alphas[:, :t]) / beta; counts N (B,)."""
    B, T = alphas.shape
    lengths = (
        torch.full((B,), T, device=alphas.device) if lengths is None else lengths.to(alphas.device)
    )
    valid = torch.arange(T, device=alphas.device) < lengths[:, None]  # (B, T)
    S = F.pad(alphas.masked_fill(~valid, 0.0).double().cumsum(1), (1, 0))  # (B, T + 1)
    total = S[:, -1:]  # (B, 1)
    if target_lengths is not None:  # training: C ends exactly at |y| (total / total == 1 in IEEE)
        N = target_lengths.to(alphas.device).long()  # (B,)
        C = S / total.masked_fill(total == 0, 1.0) * N[:, None]  # (B, T + 1)
    else:  # inference: complete tokens, plus the tail rule
        C = S / beta  # (B, T + 1)
        N = torch.floor((total[:, 0] + tail_threshold) / beta).long()  # (B,)
    return C, N


def _frame_pieces(h: torch.Tensor, C: torch.Tensor, N: torch.Tensor, beta: float) -> torch.Tensor:
    """Each frame's first piece, from C_{t-1} to its token's end, summed per token: (B, K, D)."""
    B, T, D = h.shape
    K = int(N.max())
    j = C[:, :-1].floor()  # (B, T): the token each frame starts in
    w = (torch.minimum(C[:, 1:], j + 1) - C[:, :-1]) * beta  # (B, T): its weight there
    row = torch.arange(B, device=h.device)[:, None]  # (B, 1)
    # (B*T,): B*K = discard
    index = torch.where(j < N[:, None], row * K + j.long(), B * K).flatten()
    pieces = (w.to(h.dtype)[..., None] * h).flatten(0, 1)  # (B*T, D)
    return h.new_zeros(B * K + 1, D).index_add(0, index, pieces)[:-1].view(B, K, D)  # (B, K, D)


def _boundary_pieces(
    h: torch.Tensor, C: torch.Tensor, N: torch.Tensor, fires: torch.Tensor, beta: float
) -> torch.Tensor:
    """Each token's piece that starts at its boundary k, inside frame fires[k - 1]: (B, K, D)."""
    B, T, D = h.shape
    K = fires.size(1)
    k = torch.arange(1, K, dtype=C.dtype, device=h.device)  # (K - 1,)
    f = fires[:, :-1].clamp(max=T - 1)  # (B, K - 1): where boundary k lies
    u = (torch.minimum(C[:, 1:].gather(1, f), k + 1) - k).clamp(min=0) * beta  # (B, K - 1)
    u = u.masked_fill(k >= N[:, None], 0.0)  # (B, K - 1)
    row = torch.arange(B, device=h.device)[:, None]  # (B, 1)
    hf = h.flatten(0, 1).index_select(0, (row * T + f).flatten()).view(B, K - 1, D)  # (B, K - 1, D)
    return F.pad(u.to(h.dtype)[..., None] * hf, (0, 0, 1, 0))  # (B, K, D): token 0 has none

# %% [markdown]
# `cif` puts the pieces together: the count, the frame pieces, the corrections at the
# boundaries, and the tail rule at inference.

# %%
#| export
def cif(
    h: torch.Tensor,
    alphas: torch.Tensor,
    lengths: torch.Tensor | None = None,
    beta: float = 1.0,
    tail_threshold: float = 0.0,
    target_lengths: torch.Tensor | None = None,
):
    """Vectorised CIF, same arguments and results as cif_loop: embeds (B, N, D), N, fires."""
    B, T, D = h.shape
    lengths = (
        torch.full((B,), T, device=h.device) if lengths is None else lengths.to(h.device).long()
    )
    C, N = cif_count(alphas, lengths, beta, tail_threshold, target_lengths)  # (B, T + 1), (B,)
    K = int(N.max()) if B else 0
    if K == 0:
        return h.new_zeros(B, 0, D), N, torch.zeros(B, 0, dtype=torch.long, device=h.device)
    k = torch.arange(K, dtype=C.dtype, device=h.device)  # (K,)
    fires = torch.searchsorted(C[:, 1:].contiguous(), (k + 1).expand(B, K).contiguous())  # (B, K)
    embeds = _frame_pieces(h, C, N, beta) + _boundary_pieces(h, C, N, fires, beta)  # (B, K, D)
    tail = k + 1 > C[:, -1:]  # (B, K): completed only by the tail frame
    fires = torch.where(tail, lengths[:, None], fires).masked_fill(k >= N[:, None], -1)  # (B, K)
    return embeds, N, fires


# %% [markdown]
# **Check: loop and vectorised agree.** A random batch with padding (one utterance has
# no frames at all), three thresholds $\beta$ (with $\beta = 0.5$ and weights up to 1, a
# frame can cross two boundaries), in the three modes: plain, with the inference tail,
# and with training targets (scaled weights above 1 cross several boundaries). We
# compare the embeddings, the counts, the fire frames, and the gradients with respect to
# both $h$ and $\alpha$ of a random function of the output.

# %%
def random_batch(B=6, T=40, D=8, scale=0.8, seed=0):
    """Random encoder states (B, T, D), weights (B, T) and lengths (B,) with padding."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g)  # (B, T, D)
    alphas = torch.rand(B, T, generator=g) * scale  # (B, T)
    lengths = torch.randint(1, T + 1, (B,), generator=g)  # (B,)
    lengths[0], lengths[-1] = T, 0  # the longest, and an utterance of padding only
    return h, alphas, lengths


def compare(fn_a, fn_b, h, alphas, lengths, **kw):
    """Max abs diffs (embeddings, gradients) of two CIFs; asserts equal counts and fire frames."""
    results = []
    for fn in (fn_a, fn_b):
        hh, aa = h.clone().requires_grad_(), alphas.clone().requires_grad_()  # (B, T, D), (B, T)
        embeds, n, fires = fn(hh, aa, lengths, **kw)
        probe = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(1))  # (B, N, D)
        (embeds * probe).sum().backward()  # gradients of a random function of the output
        results.append((embeds.detach(), n, fires, hh.grad, aa.grad))
    (ea, na, fa, gha, gaa), (eb, nb, fb, ghb, gab) = results
    assert torch.equal(na, nb), (na, nb)
    assert fa is None or fb is None or torch.equal(fa, fb), (fa, fb)
    return max_abs_diff(ea, eb), max(max_abs_diff(gha, ghb), max_abs_diff(gaa, gab))


worst_e = worst_g = 0.0
for beta, scale in [(1.0, 0.8), (0.7, 0.9), (0.5, 1.0)]:
    for seed in range(3):
        h, alphas, lengths = random_batch(scale=scale, seed=seed)
        targets = torch.randint(1, 25, (h.size(0),), generator=torch.Generator().manual_seed(seed))
        for kw in (dict(), dict(tail_threshold=0.45 * beta), dict(target_lengths=targets)):
            e, g = compare(cif_loop, cif, h, alphas, lengths, beta=beta, **kw)
            worst_e, worst_g = max(worst_e, e), max(worst_g, g)
print("loop vs vectorised, 27 batches: same counts and fire frames;")
print(f"  max abs diff {worst_e:.0e} (embeddings), {worst_g:.0e} (gradients)")
assert worst_e < 1e-5 and worst_g < 1e-5

# %% [markdown]
# ## Way 3: the `torch-cif` package
#
# The PyPI package `torch-cif` implements parallel CIF with `scatter_add` and a short
# loop for multi-boundary frames. Its entry point is
# `cif_function(inputs, alpha, beta=1.0, tail_thres=0.5, padding_mask=None,
# target_lengths=None, eps=1e-4, unbound_alpha=False)`, and it returns a dict of
# *lists* of tensors: `cif_out[0]` (B, N, C), `cif_lengths[0]` (B,), `alpha_sum[0]`,
# `tail_weights[0]`, and the scatter indices and weights it used. Reading its source
# shows four differences of convention:
#
# - **padding mask**: `True` marks *padding* (we pass lengths);
# - **training**: it scales the weights to $\beta|y| + \epsilon$ with $\epsilon = 10^{-4}$
#   (so that the last token surely fires); the surplus $\epsilon$ lands in the slot after
#   the last token. We scale to exactly $\beta |y|$, so we pass `eps=0` to compare;
# - **tail**: it never appends a frame. It computes the leftover weight $r$ of the
#   unfinished token and emits that token when $r \ge$ `tail_thres`, **rescaled** to full
#   weight by $\beta / r$. FunASR's rule ($r + \tau \ge \beta$, embedding left as it is)
#   is the same decision with `tail_thres` $= \beta - \tau = 0.55$, and the embedding
#   differs by the factor $\beta / r$, which we undo to compare;
# - **precision**: it casts $\alpha$ to float32 and sums in float32, so its weights
#   carry float32 rounding of the running sum (differences of order $10^{-5}$ at a few
#   hundred frames, more on long inputs).
#
# The adapter below calls it with our conventions.

# %%
def cif_torch_cif(h, alphas, lengths, beta=1.0, tail_threshold=0.0, target_lengths=None):
    """torch-cif's cif_function with our conventions: embeds (B, N, D), N (B,), fires None."""
    padding = torch.arange(h.size(1)) >= lengths[:, None]  # (B, T): True = padding
    if target_lengths is not None:
        out = cif_function(
            h, alphas, beta=beta, padding_mask=padding, target_lengths=target_lengths, eps=0.0
        )
        return out["cif_out"][0], out["cif_lengths"][0], None
    # it compares the leftover itself
    tail = beta - tail_threshold if tail_threshold > 0 else math.inf
    out = cif_function(h, alphas, beta=beta, tail_thres=tail, padding_mask=padding)
    embeds, N = out["cif_out"][0], out["cif_lengths"][0]  # (B, N, D), (B,)
    # (B,): leftover weight of the unfinished token (a constant, as in torch-cif)
    r = out["tail_weights"][0].detach()
    extended = (N > 0) & (r >= tail)  # (B,): utterances whose last token is the rescaled tail
    undo = torch.ones(embeds.shape[:2], dtype=embeds.dtype)  # (B, N)
    undo[extended, N[extended] - 1] = (r[extended] / beta).to(embeds.dtype)
    return embeds * undo[..., None], N, None


# %%
worst_e = worst_g = 0.0
for beta, scale in [(1.0, 0.8), (0.5, 1.0)]:
    for seed in range(3):
        h, alphas, lengths = random_batch(T=200, scale=scale, seed=seed)
        lengths[-1] = 7  # torch-cif rejects an utterance of padding only
        targets = torch.randint(1, 120, (h.size(0),), generator=torch.Generator().manual_seed(seed))
        for kw in (dict(), dict(tail_threshold=0.45 * beta), dict(target_lengths=targets)):
            e, g = compare(cif, cif_torch_cif, h, alphas, lengths, beta=beta, **kw)
            worst_e, worst_g = max(worst_e, e), max(worst_g, g)
print("vectorised vs torch-cif, 18 batches of 200 frames: same counts;")
print(f"  max abs diff {worst_e:.0e} (embeddings), {worst_g:.0e} (gradients)")
assert worst_e < 1e-4 and worst_g < 1e-4

# %% [markdown]
# The three ways agree: the loop and the vectorised version to float32 rounding of the
# embeddings, `torch-cif` to the float32 rounding of its running sum. (Fire frames are
# not compared with `torch-cif`: it does not return them.)
#
# **Long inputs.** An hour-long recording is what makes the running sum large. On
# 20,000 frames (20 minutes at 60 ms) with weights near 0.4, $\sum \alpha$ reaches
# about 8,000, where float32 can only tell apart steps of $2^{-10} \approx 0.001$:

# %%
g = torch.Generator().manual_seed(0)
h_long, alphas_long = (
    torch.randn(1, 20_000, 4, generator=g),
    torch.rand(1, 20_000, generator=g) * 0.8,
)
lengths_long = torch.tensor([20_000])
e_loop, n_loop, f_loop = cif_loop(h_long, alphas_long, lengths_long)
e_vec, n_vec, f_vec = cif(h_long, alphas_long, lengths_long)
e_tc, n_tc, _ = cif_torch_cif(h_long, alphas_long, lengths_long)
C32 = F.pad(alphas_long[0].cumsum(0), (1, 0))  # (T + 1,): the running sum in float32
f32 = torch.nonzero(C32[1:].floor() > C32[:-1].floor()).flatten()  # fire frames it implies
print(f"tokens: loop {n_loop.item()}, vectorised {n_vec.item()}, torch-cif {n_tc.item()}")
print(
    f"loop vs vectorised: same fire frames {torch.equal(f_loop, f_vec)}, "
    f"max abs diff {max_abs_diff(e_loop, e_vec):.1e}"
)
print(f"loop vs torch-cif: max abs diff {max_abs_diff(e_loop, e_tc):.1e}")
moved = (f32 != f_loop[0]).sum().item()
print(f"a float32 running sum puts {moved} of {len(f32)} fires on another frame")
assert torch.equal(f_loop, f_vec) and max_abs_diff(e_loop, e_vec) < 1e-5

# %% [markdown]
# The float64 running sum keeps the vectorised version equal to the loop (whose
# accumulator never grows past $\beta$, so it cannot drift) over 20,000 frames. In
# float32 a handful of fires move to a neighbouring frame and the embeddings differ at
# the $10^{-3}$ level: harmless for training, visible in timestamps of long audio.

# %% [markdown]
# ## The predictor network
#
# Where do the weights come from? In Paraformer {cite:p}`gao2022paraformer` a small
# network reads the encoder output; in its reference implementation, FunASR
# {cite:p}`gao2023funasr`, that is a 1-d convolution over time (kernel 3, so each weight
# sees its two neighbours), a ReLU, a linear map to one number, and a sigmoid:
#
# $$
# \alpha_t = \sigma\big(w^\top \mathrm{ReLU}(\mathrm{Conv1d}_3(H))_t + b\big) \in (0, 1),
# \qquad \alpha_t = 0 \text{ on padding}.
# $$
#
# We zero the padding of $H$ *before* the convolution too, so that the last valid
# frame's weight does not depend on how much padding its batch has. `CifPredictor`
# returns the embeddings with their counts, the (unscaled) weights and the fire
# frames. With `target_lengths` it works in training mode; otherwise it counts the
# tokens with the tail rule and integrates the weights scaled to that count (both
# explained below, in "Inference: the tail").

# %%
#| export
class CifOutput(NamedTuple):
    """What the CIF predictor returns."""

    embeds: torch.Tensor  # (B, N, D) acoustic embeddings E_ac, zero past each count
    token_lengths: torch.Tensor  # (B,) number of tokens N
    alphas: torch.Tensor  # (B, T) weights before any scaling: their sum is the predicted length
    # (B, N) frame where each token fired (lengths[b]: the tail frame), -1 past N
    fires: torch.Tensor


class CifPredictor(nn.Module):
    """Paraformer's predictor: weights alpha from encoder states, then integrate-and-fire."""

    def __init__(
        self, d_model: int, beta: float = 1.0, tail_threshold: float = 0.45, rescale: bool = True
    ):
        super().__init__()
        self.conv = nn.Conv1d(d_model, d_model, kernel_size=3, padding=1)
        self.linear = nn.Linear(d_model, 1)
        self.beta, self.tail_threshold = beta, tail_threshold
        self.rescale = rescale  # inference: integrate the weights scaled to the count

    def weights(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The weights alpha (B, T) of encoder states h (B, T, D); 0 on padding."""
        valid = torch.arange(h.size(1), device=h.device) < lengths[:, None]  # (B, T)
        # (B, D, T): Conv1d wants channels first
        x = h.masked_fill(~valid[..., None], 0.0).transpose(1, 2)
        x = torch.relu(self.conv(x)).transpose(1, 2)  # (B, T, D)
        return torch.sigmoid(self.linear(x)).squeeze(-1).masked_fill(~valid, 0.0)  # (B, T)

    def forward(
        self, h: torch.Tensor, lengths: torch.Tensor, target_lengths: torch.Tensor | None = None
    ) -> CifOutput:
        """Integrate h (B, T, D) into |y| tokens given target_lengths (B,), else the tail rule's."""
        alphas = self.weights(h, lengths)  # (B, T)
        tail = 0.0 if target_lengths is not None else self.tail_threshold
        if target_lengths is None and self.rescale:  # count first, then integrate as in training
            tail, target_lengths = 0.0, cif_count(alphas, lengths, self.beta, tail)[1]  # (B,)
        embeds, token_lengths, fires = cif(h, alphas, lengths, self.beta, tail, target_lengths)
        return CifOutput(embeds, token_lengths, alphas, fires)


# %%
torch.manual_seed(0)
predictor = CifPredictor(d_model=192)
h, lengths = torch.randn(3, 50, 192), torch.tensor([50, 31, 12])  # (B, T, D), (B,)
out = predictor(h, lengths)
print(f"parameters: {sum(p.numel() for p in predictor.parameters()):,}")
print(
    f"alphas {tuple(out.alphas.shape)} -> embeds {tuple(out.embeds.shape)}, "
    f"tokens {', '.join(map(str, out.token_lengths.tolist()))}"
)
alone = predictor.weights(h[2:, :12], lengths[2:])  # (1, 12): the short utterance without padding
diff = max_abs_diff(alone, out.alphas[2:, :12])
print(f"weights of the short utterance, alone vs in the batch: max abs diff {diff:.1e}")
assert diff < 1e-6 and (out.alphas[1, 31:] == 0).all()

# %% [markdown]
# An untrained predictor gives every frame a weight near $\sigma(\cdot) \approx 0.5$,
# so it predicts about half a token per frame. Learning the right rate is the job of
# the next section.

# %% [markdown]
# ## Training: scaled weights and the quantity loss
#
# At training time we know the target $y$. Two things happen
# {cite:p}`dong2020cif,gao2022paraformer`:
#
# 1. The **quantity loss** teaches the predicted length $\sum_t \alpha_t$ (unscaled)
#    to match the target length:
#    $\mathcal{L}_{\mathrm{MAE}} = \big|\,|y| - \sum_t \alpha_t\,\big|$, averaged over
#    the batch.
# 2. For the integration, the weights are **scaled** to the target length,
#    $\alpha'_t = \alpha_t \cdot \beta|y| / \sum_s \alpha_s$, so that CIF produces
#    exactly $|y|$ embeddings and the decoder's outputs line up with the targets, even
#    while the predicted length is still wrong.
#
# Step 2 has a trap: in floating point, the scaled weights rarely sum to exactly
# $|y|$. When they end a hair below it, the last token never reaches $\beta$ and does
# not fire. How often, if we scale in float32 and then run CIF without a target?

# %%
g = torch.Generator().manual_seed(0)
alphas_many = torch.rand(1000, 300, generator=g) * 0.8  # (B, T)
targets_many = torch.randint(20, 120, (1000,), generator=g)  # (B,)
scale = (targets_many / alphas_many.double().sum(1)).float()  # (B,): exact sum, then float32
scaled = alphas_many * scale[:, None]  # (B, T), float32
_, n_naive = cif_count(scaled)  # counts a CIF without target would produce
print(
    f"scaled in float32, then counted: {(n_naive < targets_many).float().mean():.1%} "
    f"of 1000 utterances fire one token too few"
)
C, n_exact = cif_count(alphas_many, target_lengths=targets_many)
exact = torch.equal(C[:, -1], targets_many.double())
print(f"cif_count with target_lengths: C ends at |y| exactly for all: {exact}")
assert torch.equal(n_exact, targets_many) and torch.equal(C[:, -1], targets_many.double())

# %% [markdown]
# About half of the utterances lose their last token. An implementation that sizes its
# output with $\mathrm{round}(\sum \alpha')$ and pads (FunASR's loop `cif` does) then
# hands the decoder a zero vector for that token. We avoid the trap by construction:
# `cif_count` scales the *running sum*, $C'_t = (S_t / S_T)\,|y|$ with $S_t$ the float64
# cumulative sum, and since $S_T / S_T$ is exactly 1 in IEEE arithmetic, $C'_T = |y|$
# exactly. The loop, which adds weights one at a time, cannot promise that; it emits
# its leftover as the last token when it is short of one (its weight is then
# $\beta - 10^{-15}$ or so), which is why the two agree.
#
# Scaling weights up can push one above $\beta$: with $|y|$ larger than the number of
# frames, or a predictor that still underestimates. Then one frame fires more than once:

# %%
h_small = torch.eye(3)[None]  # (B, T, D): h_t = unit vectors, so embeddings show the weights
alphas_small = torch.tensor([[0.5, 0.2, 0.3]])  # (B, T): sums to 1
for name, fn in [("loop", cif_loop), ("vectorised", cif)]:
    e, n, f = fn(h_small, alphas_small, target_lengths=torch.tensor([4]))
    fired = ", ".join(map(str, f[0].tolist()))
    print(f"{name}: {n.item()} tokens fired at frames {fired}; weights per token:")
    print_table(
        [[f"token {k}", *row] for k, row in enumerate(e[0].tolist())],
        ["", "t=0", "t=1", "t=2"],
        formats={j: ".3f" for j in (1, 2, 3)},
    )
e_tc, n_tc, _ = cif_torch_cif(
    h_small, alphas_small, torch.tensor([3]), target_lengths=torch.tensor([4])
)
print(f"torch-cif: max abs diff to the vectorised version {max_abs_diff(e_tc, e):.1e}")
assert torch.equal(f[0], torch.tensor([0, 1, 2, 2])) and max_abs_diff(e_tc, e) < 1e-6

# %% [markdown]
# Scaled to $|y| = 4$, the weights become $(2, 0.8, 1.2)$: frame 0 alone makes
# token 0 and token 1, frame 2 completes token 2 and then token 3.
#
# The quantity loss is an L1 loss on the unscaled sum. Its gradient with respect to
# each $\alpha_t$ is the same, $\pm 1/B$: it says "more" or "fewer", never *where*.
# Where the tokens go is learned through the embeddings, from the decoder's loss (and
# from a CTC loss on the encoder).

# %%
#| export
def quantity_loss(alphas: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    """The quantity (MAE) loss: batch mean of |sum_t alpha_t - |y||, on unscaled alphas (B, T)."""
    return (alphas.sum(1) - target_lengths.to(alphas.dtype)).abs().mean()


# %%
alphas_q = torch.tensor([[0.6, 0.7, 0.9, 0.0], [0.2, 0.3, 0.1, 0.2]], requires_grad=True)  # (B, T)
loss = quantity_loss(alphas_q, torch.tensor([2, 1]))
loss.backward()
ref = F.l1_loss(alphas_q.detach().sum(1), torch.tensor([2.0, 1.0]))
print(f"quantity loss {loss.item():.2f} (F.l1_loss: {ref.item():.2f}); gradient per frame:")
print_table(
    [[f"utterance {b}", *row] for b, row in enumerate(alphas_q.grad.tolist())],
    ["", *[f"t={t}" for t in range(alphas_q.size(1))]],
    formats={j: "+.2f" for j in range(1, alphas_q.size(1) + 1)},
)
assert abs(loss.item() - ref.item()) < 1e-6

# %% [markdown]
# The padding frame of the first utterance gets a gradient too; it does not matter,
# since the predictor multiplies it by zero.

# %% [markdown]
# ## Inference: the tail
#
# At inference there is no target: the count is what the weights say. Summing to
# $3.6$ as in our example, three tokens fire and a leftover of $0.6$ remains. Is it a
# fourth token whose frames were cut short at the end of the audio, or noise? FunASR's
# answer: append one more frame with weight $\tau = 0.45$ and a zero vector $h$, then
# integrate as usual. The leftover $r$ fires if $r + \tau \ge \beta$, that is
# $r \ge 0.55$, and its embedding keeps its partial weight $r$ (the zero vector adds
# nothing). The count is therefore
#
# $$
# \hat N = \left\lfloor \frac{\sum_t \alpha_t + \tau}{\beta} \right\rfloor
# \qquad (\beta = 1:\ \text{round } \textstyle\sum_t \alpha_t \text{ up from } .55 \text{, down below}),
# $$
#
# and the extra token fires on the tail frame, index `lengths[b]`. A table of edge
# cases, each computed by the loop, the vectorised version and torch-cif:

# %%
def edge_alphas(total, T=6):
    """T weights in (0, 1) that sum to total (in float64)."""
    return torch.full((1, T), total / T, dtype=torch.float64)  # (B, T)


cases = {
    "all zero": torch.zeros(1, 6),
    "one frame, 0.7": torch.tensor([[0.7]]),
    "one frame, 0.5": torch.tensor([[0.5]]),
    "sum 2.999999": edge_alphas(2.999999),
    "sum 3.000001": edge_alphas(3.000001),
    "sum 3.549": edge_alphas(3.549),
    "sum 3.551": edge_alphas(3.551),
}
rows = []
for name, al in cases.items():
    # (B, T, D), (B,)
    hh, L = torch.randn(1, al.size(1), 4, dtype=al.dtype), torch.tensor([al.size(1)])
    n0 = cif(hh, al, L)[1].item()
    e1, n1, f1 = cif(hh, al, L, tail_threshold=0.45)
    e2, n2, f2 = cif_loop(hh, al, L, tail_threshold=0.45)
    n3 = cif_torch_cif(hh, al.float(), L, tail_threshold=0.45)[1].item()
    assert n1.item() == n2.item() == n3 and torch.equal(f1, f2) and max_abs_diff(e1, e2) < 1e-6
    rows.append([name, n0, n1.item(), n3, ", ".join(map(str, f1[0].tolist())) or "none"])
print_table(rows, ["weights", "no tail", "tail 0.45", "torch-cif", "fire frames with tail"])
e_pad, n_pad, f_pad = cif(
    torch.randn(2, 5, 4), torch.rand(2, 5), torch.tensor([5, 0]), tail_threshold=0.45
)
print(
    f"padding only (length 0) in a batch: {n_pad[1].item()} tokens, "
    f"fires {', '.join(map(str, f_pad[1].tolist()))}"
)
assert n_pad[1] == 0 and (e_pad[1] == 0).all()

# %% [markdown]
# Read the table as the rules it tests:
#
# - no weight, no token: all-zero weights (and an utterance of padding only) give
#   $\hat N = 0$; the tail alone ($0.45 < \beta$) never fires;
# - a single frame of weight 0.7 gives one token (on the tail frame, index 1); 0.5
#   gives none;
# - without the tail, the count is $\lfloor \sum \alpha \rfloor$, so 2.999999 gives 2
#   tokens and 3.000001 gives 3: a millionth decides. With the tail both give 3
#   ($\lfloor 3.449999 \rfloor = \lfloor 3.450001 \rfloor = 3$), which is the point of
#   it: a predictor trained to sum to integers lands near them, on either side. Only the
#   fire frame of the third token differs: the last real frame (5) for 3.000001, the tail
#   frame (6) for 2.999999;
# - the decision moves to $.55$: 3.549 gives 3 tokens, 3.551 gives 4, the 4th on the
#   tail frame 6.
#
# `torch-cif` with `tail_thres=0.55` counts the same. (Its tail embedding is rescaled
# by $1/r$; ours keeps the partial weight, as FunASR's does.)

# %% [markdown]
# ### Count first, then integrate as in training
#
# The tail rule decides *how many* tokens there are. How the frames are shared among
# them is a second choice. Integrating the raw weights, as the paper and FunASR do at
# inference, puts each boundary where the running sum of the raw weights crosses an
# integer, and gives the tail's token only its partial weight $r$. The decoder never saw
# such embeddings in training: there the weights were scaled to sum to $|y|$, so every
# token integrated exactly $\beta$ and the last one ended on the last frame. Once the
# count $\hat N$ is known, inference can integrate the same way: scale the weights to
# sum to $\hat N$, which is `cif` with `target_lengths` $= \hat N$,
#
# $$
# \alpha'_t = \alpha_t \cdot \frac{\beta \hat N}{\sum_s \alpha_s}.
# $$
#
# The count stays the same; only the embeddings and the fire frames move. On two
# utterances whose weights sum to 3.6 and 2.6 (with $h_t$ unit vectors again, so each
# embedding shows the weights it integrated):

# %%
alphas_r = torch.tensor(
    [[0.3, 0.5, 0.4, 0.6, 0.2, 0.5, 0.4, 0.7], [0.6, 0.5, 0.6, 0.5, 0.3, 0.1, 0.0, 0.0]]
)  # (B, T): sums 3.6 and 2.6
lengths_r = torch.tensor([8, 6])  # (B,)
h_r = torch.eye(8).expand(2, 8, 8)  # (B, T, D): h_t = unit vectors
e_raw, n_raw, f_raw = cif(h_r, alphas_r, lengths_r, tail_threshold=0.45)  # the paper's inference
e_sc, n_sc, f_sc = cif(h_r, alphas_r, lengths_r, target_lengths=n_raw)  # scaled to N-hat
rows = []
for b in range(2):
    for k in range(n_raw[b]):
        raw, scaled = e_raw[b, k].sum().item(), e_sc[b, k].sum().item()
        rows.append(
            [f"utterance {b}, token {k}", raw, f_raw[b, k].item(), scaled, f_sc[b, k].item()]
        )
print_table(
    rows,
    ["", "raw weight", "raw fire", "scaled weight", "scaled fire"],
    {"raw weight": ".2f", "scaled weight": ".2f"},
)
valid = torch.arange(e_sc.size(1)) < n_sc[:, None]  # (B, N): the tokens that exist
assert torch.equal(n_raw, n_sc)  # the same count
assert torch.allclose(e_sc.sum(-1)[valid], torch.ones(int(valid.sum())))  # each weighs beta
assert abs(e_raw[0, 3].sum() - 0.6) < 1e-6  # the paper's tail token: only r = 0.6

# %% [markdown]
# Scaled, every token weighs exactly $\beta = 1$, and the last one fires on the last
# real frame instead of the tail frame (index 8 for the first utterance, 6 for the
# second). This is what `CifPredictor` does at inference by default (`rescale=True`),
# checked here against `cif` with the count as target on the untrained predictor
# above. It is our choice, not the paper's: `CifPredictor(..., rescale=False)`
# integrates the raw weights as FunASR does. Whether it pays can only be measured on a
# trained model; chapter 8 does, on the book's model.

# %%
h_p, lengths_p = torch.randn(3, 50, 192), torch.tensor([50, 31, 12])  # (B, T, D), (B,)
out_scaled = predictor(h_p, lengths_p)  # the default: counted, then scaled
predictor.rescale = False
out_raw = predictor(h_p, lengths_p)  # the paper's inference
predictor.rescale = True
by_hand = cif(h_p, out_raw.alphas, lengths_p, target_lengths=out_raw.token_lengths)[0]
diff = max_abs_diff(out_scaled.embeds, by_hand)
print(
    f"counts {out_scaled.token_lengths.tolist()} both ways; "
    f"CifPredictor against cif scaled to the count: max abs diff {diff:.1e}"
)
assert torch.equal(out_scaled.token_lengths, out_raw.token_lengths) and diff < 1e-6

# %% [markdown]
# ## Timestamps
#
# A token fires at the frame where its weight completes, so the fire frames $f_k$ are
# an alignment for free: at 60 ms per frame (LFR with stride 6), frame $f$ covers
# $[0.06 f, 0.06 (f + 1))$ seconds. We give token $k$ the frames from the one after
# the previous token fired up to its own fire frame, $f_{k-1} + 1, \dots, f_k$ (from
# frame 0 for the first token). Two tokens fired in the same frame share it, and a
# token fired by the tail frame ends with the audio. Mind the argument: it is the fire
# **frames**, not the weights (a version of FunASR once passed the one for the other
# and produced wrong timestamps without any error).

# %%
#| export
def cif_timestamps(
    fires: torch.Tensor,
    token_lengths: torch.Tensor,
    lengths: torch.Tensor,
    frame_shift: float = 0.06,
) -> list[list[tuple[float, float]]]:
    """(start, end) in seconds of each token, from fire frames (B, N), counts N and lengths."""
    if fires.is_floating_point():
        raise TypeError("cif_timestamps takes fire frames (integers), not weights")
    # (B, N): the tail frame is the last one
    f = torch.minimum(fires, lengths[:, None].to(fires) - 1)
    previous = F.pad(f[:, :-1] + 1, (1, 0))  # (B, N): the frame after the previous fire, 0 first
    start = torch.minimum(previous, f)  # (B, N): tokens fired in one frame share it
    stamps = []
    for b in range(fires.size(0)):
        n = int(token_lengths[b])
        stamps.append(
            [
                (round(s * frame_shift, 3), round((e + 1) * frame_shift, 3))
                for s, e in zip(start[b, :n].tolist(), f[b, :n].tolist())
            ]
        )
    return stamps


# %% [markdown]
# **Check on a constructed case.** Weights of exactly 1 at frames 3, 9 and 15 fire there
# and nowhere else. A second utterance of 8 frames fires at frames 5 and 6 and ends on
# a tail token (its weights sum to 2.7):

# %%
alphas_ts = torch.zeros(2, 20)  # (B, T)
alphas_ts[0, [3, 9, 15]] = 1.0
# sums 2.7: tokens at 5, 6 and the tail
alphas_ts[1, [2, 5, 6, 7]] = torch.tensor([0.9, 0.3, 0.9, 0.6])
lengths_ts = torch.tensor([20, 8])
_, n_ts, f_ts = cif(torch.randn(2, 20, 4), alphas_ts, lengths_ts, tail_threshold=0.45)
stamps = cif_timestamps(f_ts, n_ts, lengths_ts)
for b in range(2):
    frames_b = ", ".join(map(str, f_ts[b, : n_ts[b]].tolist()))
    spans = ", ".join(f"{start:.2f}-{end:.2f}" for start, end in stamps[b])
    print(f"fire frames {frames_b} -> {spans} s")
assert stamps[0] == [(0.0, 0.24), (0.24, 0.6), (0.6, 0.96)]
assert stamps[1] == [(0.0, 0.36), (0.36, 0.42), (0.42, 0.48)]

# %% [markdown]
# The first token of the second utterance starts at 0 although nothing happens before
# frame 2: a token begins where the previous one ended, so silence before it is counted
# in (exercise 3 trims it with the weights).

# %% [markdown]
# ## On real encoder output
#
# Everything so far ran on random weights. On speech, the weights come from the
# predictor network reading a trained encoder, and the question that matters is whether
# $\sum_t \alpha_t$ learns the number of tokens. We train, inside this chapter, a
# small model on chapter 1's corpus: chapter 4's encoder with its CTC head, and the
# predictor, with the loss
#
# $$
# \mathcal{L} = \mathcal{L}_{\mathrm{CTC}} + \mathcal{L}_{\mathrm{MAE}}
# $$
#
# (Paraformer adds the decoder's cross-entropy, chapter 6). The budget is a minute or so
# of a 2-core CPU, so the data is small: the first 1,000 training utterances (35 minutes
# of speech) and the 300 dev utterances for the evaluation, tokenised with chapter 2's
# BPE (200 tokens), read through chapter 1's `SpeechDataset` (cached features, CMVN
# measured by `Frontend.fit` on exactly those 1,000 utterances).

# %%
from paraformer_edu.corpus import build_corpus
from paraformer_edu.dataset import BucketBatchSampler, SpeechDataset, collate
from paraformer_edu.encoder import CTCHead, EncoderConfig, SANMEncoder
from paraformer_edu.features import Frontend
from paraformer_edu.tokenizer import default_tokenizer

manifests = build_corpus()  # {split: manifest}: synthesised once (1-2 min), then cached
tokenizer = default_tokenizer(manifests["train"])  # chapter 2: BPE on the training transcripts
# CMVN of the first 1,000 utterances
frontend = Frontend.fit(manifests["train"], max_utterances=1000)
train_set = SpeechDataset(manifests["train"], frontend, tokenizer.encode)
dev_set = SpeechDataset(manifests["dev"], frontend, tokenizer.encode)
train_items = [train_set[i] for i in range(1000)]  # dicts: features (T_b, 560), targets (U_b,), ...
dev_items = [dev_set[i] for i in range(len(dev_set))]
train_entries, dev_entries = train_set.entries[:1000], dev_set.entries
X_train, Y_train = [it["features"] for it in train_items], [it["targets"] for it in train_items]
X_dev, Y_dev = [it["features"] for it in dev_items], [it["targets"] for it in dev_items]
T_dev = torch.tensor([len(x) for x in X_dev])  # (N,)
U_dev = torch.tensor([len(y) for y in Y_dev])  # (N,)
hours = sum(e["duration"] for e in train_entries) / 3600
print(
    f"train: {len(X_train)} utterances, {hours:.2f} h, {sum(len(x) for x in X_train):,} frames, "
    f"{sum(len(y) for y in Y_train):,} tokens"
)
print(
    f"dev: {len(X_dev)} utterances, tokens per utterance {U_dev.min()}-{U_dev.max()}, "
    f"tokens per frame mean {(U_dev / T_dev).mean():.2f}, max {(U_dev / T_dev).max():.2f}"
)

# %% [markdown]
# Two helpers: the weights $\alpha$ of the dev set (in evaluation mode, batches of 50),
# whose sums are the predicted lengths, and their error statistics against the true token counts:
# the mean error (the bias), the mean absolute error (what the quantity loss
# minimises), the same relative to the length, and how often the count of inference,
# $\lfloor \sum_t \alpha_t + 0.45 \rfloor$, is exactly right.

# %%
def predict_alphas(encoder, predictor, items, batch_size=50):
    """The weights alpha (N, T_max) of N dataset items, in evaluation mode; 0 on padding."""
    encoder.eval(), predictor.eval()
    T_max, chunks = max(len(it["features"]) for it in items), []
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            batch = collate(items[i : i + batch_size])  # features (B, T, 560), feature_lengths (B,)
            h, h_lengths = encoder(batch["features"], batch["feature_lengths"])  # (B, T, D), (B,)
            alphas = predictor.weights(h, h_lengths)  # (B, T)
            chunks.append(F.pad(alphas, (0, T_max - alphas.size(1))))  # (B, T_max)
    return torch.cat(chunks)  # (N, T_max)


def length_errors(predicted, true):
    """Statistics of predicted lengths (N,) against true token counts (N,)."""
    error = predicted.double() - true  # (N,)
    count = torch.floor(predicted.double() + 0.45)  # (N,): the count at inference (tail rule)
    return {
        "mean error": error.mean().item(),
        "mean abs error": error.abs().mean().item(),
        "relative abs error": (error.abs() / true).mean().item(),
        "exact count": (count == true).double().mean().item(),
    }

# %% [markdown]
# The model: an encoder of 4 layers of width 144 (chapter 4's SAN-M layers; less than half
# the cost per step of the book's default), its CTC head and the predictor. Before any
# training we record its predicted lengths, and a baseline that knows only the average
# rate: the training set's tokens per frame times each utterance's number of frames.
# A predictor has to beat that baseline to have learned anything about the utterance
# in front of it.

# %%
torch.manual_seed(0)
config = EncoderConfig(d_model=144, d_ffn=576, n_layers=4)
encoder = SANMEncoder(config)
ctc_head = CTCHead(config.d_model, tokenizer.vocab_size, blank=tokenizer.blank_id)
predictor = CifPredictor(config.d_model)
n_parameters = sum(p.numel() for m in (encoder, ctc_head, predictor) for p in m.parameters())
print(
    f"parameters: {n_parameters:,} (predictor {sum(p.numel() for p in predictor.parameters()):,})"
)

alphas_before = predict_alphas(encoder, predictor, dev_items)  # (N, T_max)
lengths_before = alphas_before.sum(1)  # (N,)
rate = sum(len(y) for y in Y_train) / sum(len(x) for x in X_train)  # tokens per frame in training
lengths_baseline = rate * T_dev  # (N,)
print(
    f"untrained: mean alpha {(lengths_before / T_dev).mean():.2f} per frame; "
    f"training set: {rate:.2f} tokens per frame"
)

# %% [markdown]
# **Training.** Adam with a peak learning rate of $2 \cdot 10^{-3}$, warmed up over 50
# steps and decayed linearly to 0 at step 500, gradients clipped at norm 5, batches of
# at most 1,200 padded frames (about 30 utterances) from chapter 1's
# `BucketBatchSampler` in a seeded order. Each step runs the predictor as in training,
# with the target lengths (the embeddings are what chapter 6's decoder will read; here
# nothing reads them). The printed losses and times depend on the machine (floating-point
# rounding, amplified over 500 steps), so the output of this cell and the next are not
# checked; their assertions are.

# %%
# NBVAL_IGNORE_OUTPUT
steps, peak_lr, warmup = 500, 2e-3, 50
parameters = [*encoder.parameters(), *ctc_head.parameters(), *predictor.parameters()]
optimizer = torch.optim.Adam(parameters, lr=peak_lr)
schedule = torch.optim.lr_scheduler.LambdaLR(
    optimizer, lambda s: min((s + 1) / warmup, 1 - s / steps)
)
sampler = BucketBatchSampler([len(x) for x in X_train], max_frames=1200, seed=0)
encoder.train(), predictor.train()
step, epoch, start = 0, 0, time.perf_counter()
while step < steps:
    sampler.set_epoch(epoch)
    for batch in sampler:
        if step == steps:
            break
        b = collate([train_items[i] for i in batch], tokenizer.pad_id)
        x, x_lengths = b["features"], b["feature_lengths"]  # (B, T, 560), (B,)
        y, y_lengths = b["targets"], b["target_lengths"]  # (B, U), (B,)
        h, h_lengths = encoder(x, x_lengths)  # (B, T, D), (B,)
        loss_ctc = ctc_head.loss(h, h_lengths, y, y_lengths)
        out = predictor(h, h_lengths, target_lengths=y_lengths)  # embeds (B, U, D), alphas (B, T)
        loss_mae = quantity_loss(out.alphas, y_lengths)
        optimizer.zero_grad()
        (loss_ctc + loss_mae).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 5.0)
        optimizer.step()
        schedule.step()
        step += 1
        if step % 100 == 0:
            print(
                f"step {step:>3} (epoch {epoch}): CTC {loss_ctc.item():.2f}, "
                f"quantity {loss_mae.item():.2f}, {time.perf_counter() - start:.0f} s"
            )
    epoch += 1
alphas_after = predict_alphas(encoder, predictor, dev_items)  # (N, T_max)
lengths_after = alphas_after.sum(1)  # (N,)

# %%
# NBVAL_IGNORE_OUTPUT
rows = {
    "untrained": length_errors(lengths_before, U_dev),
    "average rate (baseline)": length_errors(lengths_baseline, U_dev),
    "trained (500 steps)": length_errors(lengths_after, U_dev),
}
print(f"{len(U_dev)} dev utterances, {U_dev.double().mean():.1f} tokens on average")
print_table(
    [{"predicted length": name, **r} for name, r in rows.items()],
    formats={
        "mean error": "+.2f",
        "mean abs error": ".2f",
        "relative abs error": ".1%",
        "exact count": ".1%",
    },
)
before, baseline, after = (rows[k]["mean abs error"] for k in rows)
print(
    f"mean abs error: trained / untrained {after / before:.2f}, "
    f"trained / baseline {after / baseline:.2f}"
)
assert (
    after < 0.85 * before
    and after < 0.92 * baseline
    and abs(rows["trained (500 steps)"]["mean error"]) < 1.5
)

# %% mystnb={"figure": {"caption": "Predicted against true token counts of the 300 dev utterances, before (left) and after (right) 500 training steps, with the average-rate baseline in grey; the dotted diagonal is a perfect count.", "name": "fig-ch05-lengths"}, "image": {"alt": "Two scatter plots of predicted length against the true number of tokens, both clustered along the dotted diagonal; the blue predictor points lie a little below it in the left panel and centred on it in the right panel."}}
fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True, sharey=True, layout="constrained")
top = int(U_dev.max()) + 5
for ax, predicted, title in [
    (axes[0], lengths_before, "untrained"),
    (axes[1], lengths_after, "trained, 500 steps"),
]:
    ax.plot(U_dev, lengths_baseline, ".", color="0.7", label="average rate x frames (baseline)")
    ax.plot(U_dev, predicted, ".", color="C0", label=r"predictor, $\sum_t \alpha_t$")
    ax.plot([0, top], [0, top], "k:", lw=1)
    ax.set(
        title=f"{title}: mean abs error {length_errors(predicted, U_dev)['mean abs error']:.1f}",
        xlabel="true number of tokens |y|",
        xlim=(0, top),
        ylim=(0, top),
    )
axes[0].set_ylabel("predicted length (tokens)")
axes[0].legend(loc="upper left")  # above the diagonal: no data
plt.show()

# %% [markdown]
# Read the table with the baseline in mind. The untrained predictor's weights are
# sigmoids near 0.44, close to this corpus's rate of about 0.45 BPE tokens per frame by
# luck of the initialisation; its error (about 2.4 tokens, 15% of the length) is
# partly a bias (it undercounts by 0.8 tokens). The average-rate baseline halves the
# bias and still misses by about 2.2 tokens: utterances are spoken at different rates
# (120-175 words per minute) and their words split into different numbers of BPE
# tokens. After a minute or so of training the predictor has lost its bias and gets
# under the baseline (about 1.9 tokens, 12%; 0.88 times the baseline's error): it has
# begun to hear how much text there is, not only how long the audio lasts. It is still
# far from the exact count that a decoder needs (the last column: right in fewer than
# one utterance in five). In our prototype the quantity loss reached 0.84 tokens only
# after 20 minutes of full Paraformer training: the count learns slowly, and its errors
# become whole inserted or deleted tokens.
#
# **Timestamps on known audio.** espeak reports when each word starts, so the corpus
# carries true word times (chapter 1). Word-initial BPE tokens (those starting with
# `▁`) should start with their word. Forcing the true count (training mode, so that the
# tokens line up with the transcript), we compare the starts that `cif_timestamps`
# gives with espeak's, for the trained weights and for weights spread evenly over the
# frames:

# %%
# NBVAL_IGNORE_OUTPUT
from paraformer_edu.tokenizer import WORD_BOUNDARY


def word_start_errors(alphas, lengths):
    """|start - espeak's start| (s) of every dev word whose tokens line up, from CIF fire frames."""
    # (N,), (N, U)
    _, n, fires = cif(alphas.new_zeros(*alphas.shape, 1), alphas, lengths, target_lengths=U_dev)
    errors = []
    for entry, y, stamps in zip(dev_entries, Y_dev, cif_timestamps(fires, n, lengths)):
        starts = [
            start
            for (start, _), t in zip(stamps, y.tolist())
            if tokenizer.tokens[t].startswith(WORD_BOUNDARY)
        ]
        words = [start for _, start in entry["words"]]
        if len(starts) == len(words):
            errors += [abs(a - b) for a, b in zip(starts, words)]
    return torch.tensor(errors)  # (W,)


valid_dev = (torch.arange(alphas_after.size(1)) < T_dev[:, None]).float()  # (N, T_max)
trained_errors = word_start_errors(alphas_after, T_dev)  # (W,)
even_errors = word_start_errors(valid_dev, T_dev)  # (W,)
print(
    f"{len(trained_errors):,} words: start time off by {1000 * trained_errors.mean():.0f} ms "
    f"on average (trained weights), {1000 * even_errors.mean():.0f} ms (even weights)"
)
assert len(trained_errors) > 1000 and trained_errors.mean() < 0.2

# %% [markdown]
# Both are off by about one and a half frames (about 90 ms), the trained weights hardly
# better than even ones.
# The quantity loss tells the predictor how *many* tokens, never *where* (its gradient
# is the same at every frame), so after this training the weights are nearly flat.
# The figure shows one dev utterance: the weights rise and fall a little, the fires
# march along at an almost even pace. Where the tokens go is learned from the decoder's
# loss, which needs the right token in the right embedding: chapter 6.

# %% mystnb={"figure": {"caption": "The trained predictor's weights on the first dev utterance, its fires (red) and espeak's word starts (dotted): the weights are nearly flat and the fires march along at an almost even pace.", "name": "fig-ch05-timestamps"}, "image": {"alt": "Bars of frame weights between about 0.3 and 0.6 over 1.4 seconds, red triangles at nearly even intervals above them, and dotted vertical lines labelled with the words That, was, narrow and escape."}}
i = 0
entry, T_i = dev_entries[i], int(T_dev[i])
_, n_i, fires_i = cif(
    torch.zeros(1, T_i, 1), alphas_after[i : i + 1, :T_i], T_dev[i : i + 1], tail_threshold=0.45
)
seconds = torch.arange(T_i) * 0.06  # (T,)
fig, ax = plt.subplots(figsize=(10, 3), layout="constrained")
ax.bar(seconds + 0.03, alphas_after[i, :T_i], width=0.05, color="C0", label=r"$\alpha_t$ (trained)")
ax.plot(0.06 * fires_i[0, : n_i[0]] + 0.03, [1.02] * int(n_i[0]), "rv", markersize=5, label="fire")
for word, start in entry["words"]:
    ax.axvline(start, color="0.4", ls=":", lw=1)
    ax.text(start + 0.01, 1.1, word, fontsize=8, rotation=30)
ax.set(
    xlabel="time (s); dotted: espeak's word starts",
    ylabel=r"weight $\alpha_t$ (tokens)",
    ylim=(0, 1.35),
    xlim=(0, T_i * 0.06),
    title=f"{n_i[0].item()} tokens predicted, {len(Y_dev[i])} in the transcript",
)
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
plt.show()

# %% [markdown]
# ## How fast?
#
# The cell below times the three versions on random inputs of the width of the book's
# encoder ($D = 192$) on this machine's CPU, as they are used: the forward pass at
# inference (with the tail) and forward plus backward in training (with targets), best
# of a few runs. `benchmarks/bench_cif.py` in the repository prints the same table
# with a larger size. Timings vary between runs and machines, so the output is not
# checked (`NBVAL_IGNORE_OUTPUT`).

# %%
def best_time(fn, repeats=5):
    """Best wall time (ms) of a few calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def time_cif(fn, B, T, D=192, training=False):
    """Best time (ms) of one CIF call on B random utterances of T frames (training: + backward)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, D, generator=g).requires_grad_(training)  # (B, T, D)
    alphas = (torch.rand(B, T, generator=g) * 0.8).requires_grad_(training)  # (B, T)
    lengths, targets = torch.full((B,), T), torch.round(alphas.detach().sum(1)).long()  # (B,), (B,)

    def run():
        if training:
            fn(h, alphas, lengths, target_lengths=targets)[0].sum().backward()
        else:
            with torch.no_grad():
                fn(h, alphas, lengths, tail_threshold=0.45)

    return best_time(run, repeats=2 if fn is cif_loop else (20 if B * T <= 1000 else 5))


# %%
# NBVAL_IGNORE_OUTPUT
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
sizes = [(1, 100), (16, 500)]
fns = {"loop": cif_loop, "vectorised": cif, "torch-cif": cif_torch_cif}
timings = {
    (name, size, tr): time_cif(fn, *size, training=tr)
    for size in sizes
    for tr in (False, True)
    for name, fn in fns.items()
}
rows = []
for B, T in sizes:
    for tr in (False, True):
        lp, vec, tc = (timings[(name, (B, T), tr)] for name in fns)
        rows.append([f"{B} x {T}", "fwd+bwd" if tr else "forward", lp, vec, tc, lp / vec, tc / vec])
headers = ["B x T", "pass", "loop (ms)", "vectorised (ms)", "torch-cif (ms)"]
headers += ["loop / vec", "torch-cif / vec"]
print_table(rows, headers, formats=dict(zip(headers[2:], [".1f", ".2f", ".2f", ".0f", ".1f"])))

# %% mystnb={"figure": {"caption": "Time of one CIF call on CPU for the loop, the vectorised version and torch-cif, at inference and in training, on one utterance of 100 frames and on 16 of 500 (log scale). Timings vary between runs and machines.", "name": "fig-ch05-speed"}, "image": {"alt": "Grouped bars on a log scale for four cases. The loop bar is the tallest in every group, up to about a second for 16 by 500 in training; the vectorised and torch-cif bars stay between a fraction of a millisecond and about ten milliseconds."}}
# NBVAL_IGNORE_OUTPUT
fig, ax = plt.subplots(figsize=(8, 3), layout="constrained")
labels = [
    f"{B}x{T}\n{'training, fwd+bwd' if tr else 'inference, fwd'}"
    for (B, T) in sizes
    for tr in (False, True)
]
for i, name in enumerate(fns):
    values = [timings[(name, size, tr)] for size in sizes for tr in (False, True)]
    ax.bar([x + 0.27 * (i - 1) for x in range(len(labels))], values, width=0.27, label=name)
ax.set_xticks(range(len(labels)), labels)
ax.set(
    yscale="log",
    xlabel="batch (B x T frames) and pass",
    ylabel="time (ms, log scale)",
    title="CIF on CPU, D = 192",
)
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
plt.show()

# %% [markdown]
# On one short utterance the vectorised version and `torch-cif` take under a
# millisecond and the loop a few milliseconds, only ten to twenty times slower; at that
# size the fixed cost of launching a few dozen small tensor operations dominates, and
# `torch-cif` and ours are within a factor of two of each other (either may win). The
# loop's cost grows with the $B \times T$ Python iterations, though: at 16 utterances of
# 500 frames it is one to two hundred times slower than the vectorised version. There,
# ours is three to four times faster than `torch-cif` at inference and one and a half
# to two times as fast in training: it moves the $(B, T, D)$ frames once
# with an `index_add` and gathers only one frame per token, where `torch-cif` scatters
# every frame twice.

# %% [markdown]
# ## Summary
#
# - CIF turns per-frame weights $\alpha_t$ into tokens: accumulate, fire at $\beta$,
#   split the firing frame's weight between the token it completes and the next one.
#   Each token is a weighted sum of consecutive frames with weights adding up to $\beta$;
#   the count is about $\sum_t \alpha_t$.
# - The paper's **loop** (`integrate_and_fire`, `cif_loop`) is the reference; it fires
#   more than once in a frame when needed. The **vectorised** `cif` works on the running
#   count $C_t = \sum_{s \le t} \alpha_s / \beta$ in float64: token $k$ takes from frame
#   $t$ the overlap of $[C_{t-1}, C_t]$ with $[k, k+1]$; fire frames come from
#   `searchsorted`. It equals the loop (and `torch-cif`, up to its float32 running
#   sum) in embeddings, counts, fire frames and gradients, and is orders of magnitude
#   faster.
# - `CifPredictor`: Conv1d(k=3) - ReLU - Linear - sigmoid, masked. **Training**: the
#   quantity loss $|\,|y| - \sum \alpha_t|$ on unscaled weights; the weights scaled to
#   $\beta|y|$ for integration, done on the running sum so that exactly $|y|$ tokens come
#   out. **Inference**: FunASR's tail frame ($\tau = 0.45$) counts,
#   $\hat N = \lfloor \sum_t \alpha_t + 0.45 \rfloor$ for $\beta = 1$; then, our choice
#   (`rescale=True`), the weights scaled to $\beta \hat N$ are integrated, as in training.
# - `cif_timestamps` turns fire frames into token times, 60 ms per frame.
# - On real speech, a small encoder with CTC and the predictor, trained for a minute
#   or so on 1,000 utterances, brings the length error of the dev set under
#   that of the average rate (about 1.9 tokens against 2.2; 2.4 untrained). The weights
#   stay nearly flat: the quantity loss teaches how many tokens, not where, and the
#   timestamps are no better than even spacing until the decoder's loss (chapter 6)
#   shapes them.
#
# In `paraformer_edu.predictor`: `CifPredictor`, `CifOutput`, `cif`, `cif_count`,
# `cif_loop`, `integrate_and_fire`, `quantity_loss`, `cif_timestamps`. Chapter 6 feeds
# the embeddings $E_{ac}$ to the parallel decoder.
#
# ## Exercises
#
# 1. **Streaming CIF.** A streaming recognizer sees the audio in chunks. Run
#    `integrate_and_fire` chunk by chunk, carrying the leftover $(c, a)$ from one chunk
#    to the next, and check that the tokens are those of the whole utterance. Which
#    token can you not emit before the last chunk arrives?

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
def integrate_and_fire_chunks(h, alpha, chunk, beta=1.0):
    """integrate_and_fire over chunks of frames, carrying the partial token (c, a) across."""
    embeddings, fires, c, a = [], [], h.new_zeros(h.size(1)), 0.0
    for start in range(0, h.size(0), chunk):
        # prepend the carried partial token as a pseudo-frame of weight a and vector c / a
        hc = torch.cat([(c / a if a > 0 else c)[None], h[start : start + chunk]])  # (1 + chunk, D)
        ac = torch.cat(
            [torch.tensor([float(a)], dtype=torch.float64), alpha[start : start + chunk].double()]
        )
        e, f, c, a = integrate_and_fire(hc, ac, beta)
        embeddings += e
        fires += [start + t - 1 for t in f]  # pseudo-frame is index 0
        a = float(a)
    return embeddings, fires, c, a


g = torch.Generator().manual_seed(0)
h_s, alpha_s = torch.randn(50, 4, generator=g), torch.rand(50, generator=g) * 0.8  # (T, D), (T,)
whole = integrate_and_fire(h_s, alpha_s)
for chunk in (7, 10, 16):
    parts = integrate_and_fire_chunks(h_s, alpha_s, chunk)
    diff = max_abs_diff(torch.stack(whole[0]), torch.stack(parts[0]))
    assert parts[1] == whole[1] and diff < 1e-5
    print(
        f"chunks of {chunk:>2}: {len(parts[0])} tokens, same fire frames, max abs diff {diff:.0e}"
    )
# The leftover of the last chunk is the tail: whether it becomes a token (r >= 0.55)
# is only known once the audio has ended.

# %% [markdown]
# 2. **How many tokens per frame can CIF emit?** With $\beta = 1$ and sigmoid weights
#    $\alpha_t < 1$, what is the largest count $\hat N$ for $T$ frames, with and without
#    the tail? And in training, what happens to the scaled weights when a target has
#    more tokens than the utterance has frames, as English characters at 60 ms often do
#    (chapter 2)? Check your answer with `cif_count` and `cif`.

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
T_max = 10
# (B, T): the largest sigmoid weights
almost_one = torch.full((1, T_max), 1 - 1e-6, dtype=torch.float64)
print(
    "most tokens from",
    T_max,
    "frames: no tail",
    cif_count(almost_one)[1].item(),
    "| tail",
    cif_count(almost_one, tail_threshold=0.45)[1].item(),
)
e, n, f = cif(torch.randn(1, T_max, 4), torch.rand(1, T_max), target_lengths=torch.tensor([15]))
fired = ", ".join(map(str, f[0].tolist()))
print(f"15 targets on 10 frames: {n.item()} tokens, fire frames {fired}")
assert (
    cif_count(almost_one)[1].item() == T_max - 1
    and cif_count(almost_one, tail_threshold=0.45)[1].item() == T_max
)
# At inference, at most one token per frame: T - 1 without the tail (the sum stays below T),
# T with it. In training the scaled weights average 1.5 per frame and some frames fire
# twice: the decoder gets 15 embeddings, but the predictor is asked for a rate it can never
# produce at inference, so its quantity loss cannot reach 0. Hence a slower unit (BPE) or
# shorter frames.

# %% [markdown]
# 3. **Timestamps without the silence.** `cif_timestamps` starts each token right after
#    the previous fire, so a pause is counted into the next token. Using the weights,
#    start each token instead at the first of its frames whose weight is at least
#    $0.05$ (keep the fire frame as the end). Apply it to the second constructed
#    utterance above.

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
def cif_timestamps_trimmed(
    alphas, fires, token_lengths, lengths, frame_shift=0.06, min_weight=0.05
):
    """Like cif_timestamps, but each token starts at its first frame with alpha >= min_weight."""
    # (first frame, end frame)
    spans = cif_timestamps(fires, token_lengths, lengths, frame_shift=1.0)
    stamps = []
    for b, row in enumerate(spans):
        stamps.append([])
        for first, end in row:
            heavy = [t for t in range(int(first), int(end)) if alphas[b, t] >= min_weight]
            start = heavy[0] if heavy else int(end) - 1
            stamps[b].append((round(start * frame_shift, 3), round(end * frame_shift, 3)))
    return stamps


trimmed = cif_timestamps_trimmed(alphas_ts, f_ts, n_ts, lengths_ts)
print(", ".join(f"{start:.2f}-{end:.2f}" for start, end in trimmed[1]), "s")
assert trimmed[1] == [(0.12, 0.36), (0.36, 0.42), (0.42, 0.48)]
