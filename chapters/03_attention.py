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
# # Attention
#
# Paraformer is a Transformer: most of its work across frames and tokens is done by
# **attention** {cite:p}`vaswani2017attention`. The encoder's self-attention lets each
# 60 ms frame gather information from the whole utterance (chapter 4); the decoder's
# cross-attention lets each token's embedding read the encoder frames it needs. Unlike
# an autoregressive Transformer decoder, Paraformer's decoder needs no causal mask: all
# tokens are decoded at once, so each may look at all the others.
#
# This chapter builds attention from its equation, in a few short functions, and checks
# every piece against PyTorch's own implementations.
#
# ## Learning goals
#
# After this chapter you can
#
# - write scaled dot-product attention, $\operatorname{softmax}(QK^\top/\sqrt{d_k} + M)\,V$,
#   and say why the scale $1/\sqrt{d_k}$ is there;
# - build padding masks from sequence lengths and causal masks, and make a sequence
#   with no valid key produce zeros instead of `nan`;
# - assemble multi-head attention from its projections $W^Q, W^K, W^V, W^O$ and show it
#   equals `torch.nn.MultiheadAttention`, forward and gradients;
# - compute sinusoidal positional encodings and explain why attention needs them;
# - read an attention heat map, on a toy lookup and on a spoken sentence;
# - predict how the time and memory of attention grow with the sequence length.

# %%
# In Colab, install the book's package first:
# # !pip install -q "paraformer-edu[book] @ git+https://github.com/paraformer-edu/paraformer-edu"
# %matplotlib inline
import math
import time

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.colors import ListedColormap

import paraformer_edu
from paraformer_edu.display import book_style, listen

book_style()
torch.manual_seed(0)
print("paraformer_edu", paraformer_edu.__version__)

# %% [markdown]
# ## Attention as a soft lookup
#
# A Python dictionary maps a query to the value of the *one* key equal to it. Attention
# is a soft version of that lookup: it compares a query $q$ with every key $k_j$, turns
# the similarities into weights that sum to one, and returns the weighted average of the
# values $v_j$. Similarity is the dot product; stacking $T_q$ queries, $T_k$ keys and
# values as rows of matrices $Q \in \mathbb{R}^{T_q \times d_k}$,
# $K \in \mathbb{R}^{T_k \times d_k}$, $V \in \mathbb{R}^{T_k \times d_v}$, all lookups
# happen in two matrix products {cite:p}`vaswani2017attention`:
#
# $$
# \operatorname{Attention}(Q, K, V) = \operatorname{softmax}\!\left(\frac{QK^\top}{\sqrt{d_k}}\right) V,
# \qquad
# \operatorname{softmax}(s)_j = \frac{e^{s_j}}{\sum_{j'} e^{s_{j'}}}
# $$
#
# The softmax runs over the keys (each row of the $T_q \times T_k$ score matrix sums to
# one). Any leading batch or head dimensions just come along.

# %%
def attention(Q, K, V):
    """softmax(Q K^T / sqrt(d_k)) V, without masks; returns the output and the weights."""
    scores = Q @ K.transpose(-2, -1) / math.sqrt(Q.size(-1))  # (..., T_q, T_k)
    weights = scores.softmax(dim=-1)  # (..., T_q, T_k): each row sums to 1
    return weights @ V, weights  # (..., T_q, d_v), (..., T_q, T_k)


# %% [markdown]
# **A lookup you can reason about.** Six "words" get random keys ($d_k = 16$); the word
# *the* occurs twice, with the same key. Each query is built from the keys: a noisy copy
# of one key, the sum of two keys, the zero vector. Before looking at the heat map,
# predict each row: a copy of *cat*'s key should put almost all its weight on *cat*;
# *the* has two identical keys, so it should split its weight between them; *cat + mat*
# matches both; the zero query has the same score (0) for every key, so its weights
# are uniform, $1/6$ each. The values are the positions $0, \ldots, 5$, so the output is
# the position the query "reads", on average.

# %% mystnb={"figure": {"caption": "Attention weights of the toy lookup: each row is a query, each column a key, and each row sums to one. *cat* and *mat* pick their own key, *the* splits its weight between its two equal keys, *cat + mat* between *cat* and *mat*, and the zero query spreads it evenly.", "name": "fig-ch03-toy-lookup"}, "image": {"alt": "A 5 by 6 heat map of attention weights with the value written in each cell: cells near 1 where the queries cat and mat meet their own keys, about 0.5 on the two keys of the word the for the query the, the weight of cat plus mat split between cat and mat, and 0.17 everywhere for the zero query."}}
torch.manual_seed(0)
words = ["the", "cat", "sat", "on", "the", "mat"]
embedding = {w: 1.5 * torch.randn(16) for w in dict.fromkeys(words)}  # (d_k,) per distinct word
K = torch.stack([embedding[w] for w in words])  # (T_k, d_k)
V = torch.arange(6.0)[:, None]  # (T_k, 1): the value of key j is its position j
# (d_k,) each
queries = {
    "cat": embedding["cat"] + 0.3 * torch.randn(16),
    "mat": embedding["mat"] + 0.3 * torch.randn(16),
    "the": embedding["the"] + 0.3 * torch.randn(16),
    "cat + mat": embedding["cat"] + embedding["mat"],
    "zero": torch.zeros(16),
}
Q = torch.stack(list(queries.values()))  # (T_q, d_k)
out, weights = attention(Q, K, V)  # (T_q, 1), (T_q, T_k)

fig, ax = plt.subplots(figsize=(5.5, 3.5))
image = ax.imshow(weights.numpy(), cmap="viridis", vmin=0, vmax=1)
ax.set_xticks(range(6), [f"{j}: {w}" for j, w in enumerate(words)], rotation=30)
ax.set_yticks(range(len(queries)), list(queries))
for i in range(len(queries)):
    for j in range(6):
        ax.text(
            j,
            i,
            f"{weights[i, j]:.2f}",
            ha="center",
            va="center",
            fontsize=8,
            color="black" if weights[i, j] > 0.5 else "white",
        )
ax.set(xlabel="key", ylabel="query", title="Attention weights of a toy lookup")
fig.colorbar(image, ax=ax, label="attention weight")
plt.show()

# %%
for name, o in zip(queries, out[:, 0].tolist()):
    print(f"query {name!r:>12} reads position {o:.2f}")

# %% [markdown]
# The rows match the predictions: *cat* and *mat* read their own positions (1 and 5),
# *the* splits its weight between positions 0 and 4 and reads their average, 2; *cat + mat*
# splits its weight between 1 and 5 (not quite evenly: *mat*'s random key happens to be
# a little longer, so its dot product with the query is larger) and reads 3.4; the zero
# query reads the average position, 2.5.
#
# **Why divide by $\sqrt{d_k}$?** If the entries of $q$ and $k$ are independent with
# mean 0 and variance 1, the dot product $q \cdot k = \sum_{i=1}^{d_k} q_i k_i$ has
# variance $d_k$. With wide heads the scores would spread over tens of units, the
# softmax would put almost all its weight on one key, and its gradient would almost
# vanish. Dividing by $\sqrt{d_k}$ brings the variance back to 1 whatever the width:

# %%
g = torch.Generator().manual_seed(0)
for d_k in [16, 64, 256]:
    # (N, d_k) each
    q, k = torch.randn(10_000, d_k, generator=g), torch.randn(10_000, d_k, generator=g)
    dots = (q * k).sum(-1)  # (N,): one dot product per pair
    print(
        f"d_k = {d_k:>3}: std of q.k = {dots.std():5.1f} (sqrt(d_k) = {math.sqrt(d_k):4.1f}), "
        f"after the scale: {(dots / math.sqrt(d_k)).std():.1f}"
    )

# %% [markdown]
# **Check against PyTorch.** `torch.nn.functional.scaled_dot_product_attention` computes
# the same function (with fused kernels). Compare the outputs and, with a random
# upstream gradient, the gradients with respect to $Q$, $K$ and $V$, on a batch of
# 2 sequences and 4 heads:

# %%
def max_diff(a, b):
    """Largest absolute difference between two tensors, or two lists of tensors."""
    if isinstance(a, torch.Tensor):
        a, b = [a], [b]
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def compare_with_sdpa(fn, B=2, H=4, T_q=5, T_k=7, d_k=8, mask=None, seed=0):
    """Max abs diffs (forward; grads of Q, K, V) between fn and F.scaled_dot_product_attention."""
    g = torch.Generator().manual_seed(seed)
    # (B, H, T, d_k)
    Q, K, V = (torch.randn(B, H, T, d_k, generator=g).requires_grad_() for T in (T_q, T_k, T_k))
    # (B, H, T_q, d_k): a random upstream gradient
    grad_out = torch.randn(B, H, T_q, d_k, generator=g)
    out = fn(Q, K, V) if mask is None else fn(Q, K, V, mask)  # (B, H, T_q, d_k)
    grads = torch.autograd.grad(out, (Q, K, V), grad_out)  # (B, H, T, d_k) each
    ref = F.scaled_dot_product_attention(Q, K, V, attn_mask=mask)  # (B, H, T_q, d_k)
    ref_grads = torch.autograd.grad(ref, (Q, K, V), grad_out)  # (B, H, T, d_k) each
    return max_diff(out, ref), max_diff(grads, ref_grads)


forward, backward = compare_with_sdpa(lambda Q, K, V: attention(Q, K, V)[0])
print(
    f"attention vs F.scaled_dot_product_attention: max abs diff {forward:.0e} (forward), "
    f"{backward:.0e} (gradients)"
)
assert forward < 1e-6 and backward < 1e-5
# the worst cases, for the closing note
reference_diffs = {"F.scaled_dot_product_attention": (forward, backward)}

# %% [markdown]
# ## Masks
#
# Two situations need to forbid some (query, key) pairs.
#
# - **Padding.** A batch holds utterances of different lengths, padded to the longest.
#   No query may attend to a padded key: its value is garbage, and the result would
#   depend on how much padding the batch happened to have.
# - **Causality.** An autoregressive decoder predicts token $t$ from tokens $< t$;
#   in training it sees the whole target, so query $t$ must not attend to keys $s > t$.
#   (Paraformer's parallel decoder does not need this mask; the autoregressive baseline
#   of a later chapter does.)
#
# Both are a boolean mask, True where a query may attend to a key, and enter the
# equation as an additive matrix $M$ with $M_{ij} = 0$ where allowed and $-\infty$
# where not: $e^{-\infty} = 0$, so forbidden keys get weight exactly 0 and the others
# share the whole weight.
#
# $$
# \operatorname{Attention}(Q, K, V, M) = \operatorname{softmax}\!\left(\frac{QK^\top}{\sqrt{d_k}} + M\right) V
# $$
#
# A padding mask comes from the lengths; a causal mask is a lower triangle:

# %%
#| default_exp attention
#| export
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# %%
#| export
def padding_mask(lengths: torch.Tensor, max_length: int | None = None) -> torch.Tensor:
    """Boolean mask (B, T), True on the first lengths[b] positions of sequence b."""
    T = int(lengths.max()) if max_length is None else max_length
    return torch.arange(T, device=lengths.device) < lengths[:, None]  # (B, T)


def causal_mask(T: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean mask (T, T), True where query t may attend to key s, that is s <= t."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)


# %% [markdown]
# The key padding mask $(B, T_k)$ applies to every query, so it broadcasts as
# $(B, 1, T_k)$ over the query axis; the causal mask $(T, T)$ broadcasts over the batch;
# combined, they are their logical *and*. For a batch with lengths 5, 3 and 0 (dark:
# the query may attend to the key):

# %%
lengths = torch.tensor([5, 3, 0])  # (B,)
key_mask = padding_mask(lengths)  # (B, T)
print(key_mask.int())

# %% mystnb={"figure": {"caption": "Masks over (query, key) pairs, grey where the query may attend to the key: a padding mask for a sequence of length 3, a causal mask, both combined, and the padding mask of an empty sequence, which allows nothing.", "name": "fig-ch03-masks"}, "image": {"alt": "Four 5 by 5 grids: the first three columns grey; a grey lower triangle; the lower triangle cut to the first three columns; and an all-white grid."}}
combined = key_mask[:, None, :] & causal_mask(5)  # (B, T_q, T_k)
panels = {
    "padding, length 3": key_mask[1, None, :].expand(5, 5),
    "causal": causal_mask(5),
    "padding & causal, length 3": combined[1],
    "padding, length 0": key_mask[2, None, :].expand(5, 5),
}
fig, axes = plt.subplots(1, 4, figsize=(11, 3), layout="constrained")
allowed = ListedColormap(["white", "0.375"])  # forbidden, allowed
for ax, (title, m) in zip(axes, panels.items()):
    image = ax.imshow(m.numpy(), cmap=allowed, vmin=0, vmax=1)
    ax.set(title=title, xlabel="key", ylabel="query", xticks=range(5), yticks=range(5))
bar = fig.colorbar(image, ax=axes, ticks=[0.25, 0.75], shrink=0.8, label="may attend")
bar.ax.set_yticklabels(["no", "yes"])
plt.show()

# %% [markdown]
# The last panel is a trap. A sequence of length 0 (an empty utterance, or a batch
# slot kept for padding) has no valid key at all: every score of its rows is $-\infty$,
# and the softmax computes $e^{-\infty} / \sum e^{-\infty} = 0/0 = $ `nan`. One `nan`
# in a batch spreads to the whole loss and to every parameter at the next step.
# `torch.nn.MultiheadAttention` falls into it:

# %%
torch.manual_seed(0)
mha = nn.MultiheadAttention(8, 2, batch_first=True)
x = torch.randn(2, 4, 8)  # (B, T, D)
mask = padding_mask(torch.tensor([4, 0]), 4)  # (B, T): the second sequence is empty
y, _ = mha(x, x, x, key_padding_mask=~mask)  # (B, T, D): torch's mask is True on *padding*
print(
    "nn.MultiheadAttention, empty sequence: nan in the output:",
    y[1].isnan().any().item(),
    "| in the valid sequence:",
    y[0].isnan().any().item(),
)

# %% [markdown]
# We define the behaviour instead: **a query with no valid key gets all-zero weights,
# and so a zero output.** Two changes to the equation's recipe do it:
#
# 1. fill forbidden scores with the most negative *finite* number instead of
#    $-\infty$: a row with no valid key then gets a finite (uniform) softmax, and
#    everywhere else $e^{\text{min} - \max_j s_j}$ is exactly 0 in floating point, so
#    nothing changes;
# 2. set the weights of forbidden keys to 0 after the softmax, which zeroes those
#    uniform rows.
#
# The gradients stay finite too, and zero for such rows: the zeroed weights do not
# depend on the scores. (The same two steps are in FunASR's attention.) This is the
# function the package exports; `dropout`, used in training, randomly zeroes weights.

# %%
#| export
def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(d_k) + M) v; mask is boolean, True where a query may attend to a key."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (..., T_q, T_k)
    if mask is not None:
        # (..., T_q, T_k): M = -inf, finitely
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1)  # (..., T_q, T_k)
    if mask is not None:
        weights = weights.masked_fill(~mask, 0.0)  # (..., T_q, T_k): no valid key -> all zeros
    if dropout > 0.0:
        weights = F.dropout(weights, dropout)  # (..., T_q, T_k)
    return weights @ v, weights  # (..., T_q, d_v), (..., T_q, T_k)


# %% [markdown]
# Without a mask it is the function of the first section. With masks, compare it with
# PyTorch again: a padding mask (lengths 7 and 4 for the keys), a causal mask, and both.
# Every query here has at least one valid key, so the reference is well defined.

# %%
def our_sdpa(Q, K, V, mask=None):
    """The exported function, output only."""
    return scaled_dot_product_attention(Q, K, V, mask)[0]


pad = padding_mask(torch.tensor([7, 4]))[:, None, None, :]  # (B, 1, 1, T_k)
masks = {
    "no mask": None,
    "padding": pad,
    "causal": causal_mask(7),
    "padding & causal": pad & causal_mask(7),
}
worst_forward, worst_backward = reference_diffs["F.scaled_dot_product_attention"]
for name, mask in masks.items():
    forward, backward = compare_with_sdpa(our_sdpa, T_q=7, T_k=7, mask=mask)
    worst_forward, worst_backward = max(worst_forward, forward), max(worst_backward, backward)
    print(f"{name:>16}: max abs diff {forward:.0e} (forward), {backward:.0e} (gradients)")
assert worst_forward < 1e-6 and worst_backward < 1e-5
reference_diffs["F.scaled_dot_product_attention"] = (worst_forward, worst_backward)

# %% [markdown]
# And the empty sequence: the batch of the trap above, in our function. Its output and
# the gradients reaching $Q, K, V$ are zero and finite; the other sequence's output
# does not notice.

# %%
g = torch.Generator().manual_seed(0)
Q, K, V = (torch.randn(2, 4, 8, generator=g).requires_grad_() for _ in range(3))  # (B, T, d_k) each
mask = padding_mask(torch.tensor([4, 0]), 4)[:, None, :]  # (B, 1, T_k)
out, weights = scaled_dot_product_attention(Q, K, V, mask)  # (B, T_q, d_v), (B, T_q, T_k)
out.sum().backward()
print(
    "empty sequence: output all zero:",
    bool((out[1] == 0).all()),
    "| weights all zero:",
    bool((weights[1] == 0).all()),
)
print(
    "nan anywhere in the outputs or gradients:",
    any(t.isnan().any().item() for t in (out, Q.grad, K.grad, V.grad)),
)
print(
    "gradient of the empty sequence's queries and keys all zero:",
    bool((Q.grad[1] == 0).all() and (K.grad[1] == 0).all()),
)
assert (out[1] == 0).all() and not out.isnan().any() and not Q.grad.isnan().any()
assert max_diff(out[0], attention(Q[0], K[0], V[0])[0]) < 1e-6

# %% [markdown]
# ## Attention on speech
#
# What does attention find in speech? In a trained encoder the projections $W^Q$ and
# $W^K$ (next section) are learned, and decide which aspects of two frames to compare.
# Before any training, the simplest choice is to compare the frames themselves: every
# frame is a query and a key. Take an utterance of chapter 1's corpus in which a word
# occurs twice, and its features from chapter 1's front end: 60 ms frames of 560 numbers
# (7 stacked log-mel frames, normalised with the training set's mean and variance).
# Listen for the repeated word:

# %%
from paraformer_edu.audio import load_audio
from paraformer_edu.corpus import build_corpus, read_manifest
from paraformer_edu.features import Frontend, fbank

manifests = build_corpus()  # {split: manifest}: synthesised once (1-2 min), then cached
frontend = Frontend.fit(manifests["train"])  # fbank -> LFR -> CMVN, statistics of the training set


def repeated_word(entry):
    """A word of 4 or more letters that occurs at least twice in a manifest entry, or None."""
    words = [w.lower() for w, _ in entry["words"]]
    return next((w for w in words if len(w) >= 4 and words.count(w) > 1), None)


entry = next(
    e
    for split in ("dev", "test")
    for e in read_manifest(manifests[split])
    if 2.5 < e["duration"] < 5 and repeated_word(e)
)  # held-out speech, a few seconds long
wave = load_audio(entry["audio_filepath"])  # (N,): 16 kHz
X = frontend(wave)  # (T, 560): 60 ms frames
spectrogram = fbank(wave)  # (6 T, 80): 10 ms frames, for the picture
print(
    f"{entry['duration']:.1f} s, {X.size(0)} frames of 60 ms; {repeated_word(entry)!r} occurs twice"
)
listen(wave, f"voice {entry['voice']}: {entry['text']!r}")

# %% [markdown]
# We normalise each frame to unit length, so that the score of two frames is their
# cosine similarity, times a sharpness $\beta$:
#
# $$
# s_{ts} = \beta \, \frac{x_t \cdot x_s}{\lVert x_t \rVert \, \lVert x_s \rVert}, \qquad \beta = 10
# $$
#
# (The raw dot product would favour the frames with the largest norms, whatever they
# sound like: after CMVN, the digital silences between espeak's words are such frames.)
# Our function divides by $\sqrt{d_k} = \sqrt{560}$, so the queries are multiplied by
# $\beta\sqrt{560}$. A frame is always most similar to itself and to its neighbours,
# which overlap it in time; to see what it attends to *elsewhere*, a second run masks
# the keys within 2 frames (120 ms) of the query: a mask is any pattern of allowed
# pairs, not only padding or causality. Then a number: how much of the attention of the
# first occurrence's frames goes to the frames of the second one, and back?

# %%
T, frame = X.size(0), frontend.frame_seconds  # T frames of 0.06 s
U = X / X.norm(dim=-1, keepdim=True)  # (T, 560): unit-length frames
beta = 10.0  # sharpness
t = torch.arange(T)  # (T,)
far = (t[:, None] - t[None, :]).abs() > 2  # (T, T): True where the key is more than 2 frames away
_, weights_all = scaled_dot_product_attention(beta * math.sqrt(U.size(-1)) * U, U, U)  # (T, T)
_, weights_far = scaled_dot_product_attention(beta * math.sqrt(U.size(-1)) * U, U, U, far)  # (T, T)

starts = [s for _, s in entry["words"]] + [entry["duration"]]  # word start times (s), then the end
spans = [
    (w.lower(), round(a / frame), round(b / frame))
    for (w, _), a, b in zip(entry["words"], starts, starts[1:])
]
# frames of each
(_, a0, a1), (_, b0, b1) = [span for span in spans if span[0] == repeated_word(entry)][:2]
there = weights_far[a0:a1, b0:b1].sum(-1).mean().item()  # first occurrence -> second
back = weights_far[b0:b1, a0:a1].sum(-1).mean().item()  # second -> first
uniform = (b1 - b0) / T  # the share of equal weights on every key
print(
    f"all keys: each frame gives itself {weights_all.diagonal().mean():.0%} "
    "of its attention on average"
)
print(
    f"keys beyond 120 ms: the frames of the first {repeated_word(entry)!r} give {there:.0%} "
    f"of their attention\nto the {b1 - b0} frames of the second one, which give {back:.0%} back "
    f"(equal weights: about {uniform:.0%})"
)
assert min(there, back) > 2 * uniform  # more than twice what equal weights would give

# %% mystnb={"figure": {"caption": "Self-attention of the utterance's 60 ms frames with cosine similarity as the score ($\\beta = 10$): to all keys (left) and to the keys more than 120 ms away (right). Above, the log-mel spectrogram on the same time axis, with the two occurrences of the repeated word boxed; the word labels sit at the centres of the words.", "name": "fig-ch03-speech-attention"}, "image": {"alt": "Two attention maps under two copies of a spectrogram. The left map is bright along its diagonal; in the right map, where the diagonal is masked, two short bright stripes parallel to the diagonal join the two boxed occurrences of the word revolution."}}
seconds = T * frame
# labels at the centre of each word, tick marks at the word starts
centres = [(a + b) / 2 for a, b in zip(starts, starts[1:])]
labels = [w for w, _ in entry["words"]]
fig, axes = plt.subplots(
    2,
    2,
    figsize=(11, 7),
    sharex=True,
    sharey="row",
    layout="constrained",
    gridspec_kw={"height_ratios": [1, 3]},
)
for col, (title, w) in enumerate(
    [("all keys", weights_all), ("keys more than 2 frames (120 ms) away", weights_far)]
):
    spectrogram_image = axes[0, col].imshow(
        spectrogram.T.numpy(),
        origin="lower",
        aspect="auto",
        cmap="magma",
        extent=(0, spectrogram.size(0) * 0.01, 0, 80),
        vmin=spectrogram.quantile(0.05).item(),
    )
    for start, end in [(a0, a1), (b0, b1)]:  # the repeated word, boxed
        axes[0, col].axvspan(start * frame, end * frame, fill=False, edgecolor="white", lw=1.5)
    axes[0, col].set_title(f"log-mel spectrogram and attention weights,\n{title}", fontsize=10)
    weights_image = axes[1, col].imshow(
        w.numpy(),
        aspect="auto",
        cmap="viridis",
        vmin=0,
        vmax=1,
        extent=(-frame / 2, seconds - frame / 2, seconds - frame / 2, -frame / 2),
    )
    axes[1, col].set_xticks(centres, labels, rotation=90, fontsize=8)
    axes[1, col].set_yticks(centres, labels, fontsize=8)
    axes[1, col].set_xticks(starts[:-1], minor=True)
    axes[1, col].set_yticks(starts[:-1], minor=True)
    axes[0, col].tick_params(axis="x", which="major", length=0)  # word labels: no tick marks
    axes[1, col].tick_params(which="major", length=0)
    axes[1, col].tick_params(which="minor", length=4)
    axes[1, col].set_xlabel("key frame (ticks: word starts)")
axes[0, 0].set_ylabel("mel bin")
axes[1, 0].set_ylabel("query frame")
fig.colorbar(spectrogram_image, ax=axes[0, 1], label="log energy (ln)")
fig.colorbar(weights_image, ax=axes[1, 1], label="attention weight")
plt.show()

# %% [markdown]
# Read the maps row by row, a query frame at a time, with the spectrogram above them on
# the same time axis. With all keys (left) the diagonal dominates: speech changes
# little from one 60 ms frame to the next, and each frame is most like itself. With the
# neighbourhood masked (right), the brightest marks are two short stripes parallel to
# the diagonal, where the rows of one boxed word meet the columns of the other: the two
# occurrences of the word attend to each other, frame by frame, in step, because they
# unfold at the same pace. The corners pair the silence before the first word with the
# silence after the last. Other, weaker marks pair single frames that happen to be
# alike. A trained head does the same thing with learned $W^Q, W^K$: it can choose what
# "alike" means (the same phone, the same speaker, the next syllable) and so what each
# frame gathers from the whole utterance.

# %% [markdown]
# ## Multi-head attention
#
# A single attention compares queries and keys in one way. **Multi-head attention**
# runs $h$ of them side by side, each on its own learned projection of the inputs into
# a space of width $d_k = D / h$, and mixes their outputs with one more projection
# $W^O$ {cite:p}`vaswani2017attention`:
#
# $$
# \operatorname{MultiHead}(Q, K, V) = \operatorname{Concat}(\mathrm{head}_1, \ldots, \mathrm{head}_h)\, W^O,
# \qquad
# \mathrm{head}_i = \operatorname{Attention}(Q W_i^Q, K W_i^K, V W_i^V)
# $$
#
# with $W_i^Q, W_i^K, W_i^V \in \mathbb{R}^{D \times d_k}$ and
# $W^O \in \mathbb{R}^{h d_k \times D}$ (we take $d_v = d_k$). One head can follow the
# neighbouring frames while another follows frames of the same sound elsewhere in the
# utterance, as the two occurrences of a word did above; the cost is the same as one
# head of width $D$.
#
# In code, the $h$ matrices $W_i^Q$ side by side are one `nn.Linear(D, D)`, `linear_q`
# (with a bias, as in most implementations); its output $(B, T, D)$ is reshaped into
# $(B, h, T, d_k)$ and every head runs in the same batched matrix product. In
# **self-attention** query, key and value are the same sequence $X$; in
# **cross-attention** (Paraformer's decoder) the queries come from one sequence and the
# keys and values from another, so $T_q \ne T_k$ in general.
#
# The four projections are public attributes (`linear_q`, `linear_k`, `linear_v`,
# `linear_out`), and `split_heads` / `merge_heads` are methods, so that chapter 4's
# SAN-M attention can add its memory block to the values $V W^V$. `d_in` lets the
# inputs be wider than the model (the encoder's first layer reads 560-d features).
# The forward pass takes a key padding mask $(B, T_k)$ and, optionally, an
# attention mask ($(T_q, T_k)$ or $(B, T_q, T_k)$, e.g. causal), both True where allowed,
# and returns the output with the attention weights of every head, which a later chapter
# visualises. Rows of padded *queries* are computed like any other; the layers after
# attention ignore them.

# %%
#| export
class MultiHeadAttention(nn.Module):
    """Multi-head attention: heads Attention(Q W_i^Q, K W_i^K, V W_i^V), concatenated, times W^O."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, d_in: int | None = None):
        super().__init__()
        assert d_model % n_heads == 0, "d_model must be a multiple of n_heads"
        d_in = d_model if d_in is None else d_in
        self.n_heads, self.d_k, self.dropout = n_heads, d_model // n_heads, dropout
        self.linear_q = nn.Linear(d_in, d_model)  # W^Q of all heads, side by side
        self.linear_k = nn.Linear(d_in, d_model)  # W^K
        self.linear_v = nn.Linear(d_in, d_model)  # W^V
        self.linear_out = nn.Linear(d_model, d_model)  # W^O

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, h * d_k) -> (B, h, T, d_k)."""
        return x.unflatten(-1, (self.n_heads, self.d_k)).transpose(1, 2)  # (B, h, T, d_k)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, T, d_k) -> (B, T, h * d_k): the concatenation of the heads."""
        return x.transpose(1, 2).flatten(2)  # (B, T, h * d_k)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query (B, T_q, d_in), key, value (B, T_k, d_in) -> (B, T_q, D), (B, h, T_q, T_k)."""
        mask = _combine_masks(key_mask, attn_mask)  # (B, 1, T_q or 1, T_k) or None
        return self.attend(self.linear_q(query), self.linear_k(key), self.linear_v(value), mask)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Heads of projected q (B, T_q, D), k, v (B, T_k, D), then W^O -> (B, T_q, D), weights."""
        dropout = self.dropout if self.training else 0.0
        heads, weights = scaled_dot_product_attention(
            self.split_heads(q),
            self.split_heads(k),
            self.split_heads(v),
            # (B, h, T_q, d_k), (B, h, T_q, T_k)
            mask,
            dropout,
        )
        return self.linear_out(self.merge_heads(heads)), weights  # (B, T_q, D), (B, h, T_q, T_k)

# %% [markdown]
# The key padding mask of a batch, `(B, T_k)`, and an attention mask such as the causal
# one, `(T_q, T_k)`, become one boolean mask that broadcasts over the heads.

# %%
#| export
def _combine_masks(
    key_mask: torch.Tensor | None, attn_mask: torch.Tensor | None
) -> torch.Tensor | None:
    """Key padding mask (B, T_k) and attention mask (T_q, T_k) or (B, T_q, T_k) as one mask."""
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, T_k)
    if attn_mask is not None:
        # (B, 1, T_q, T_k) or (T_q, T_k)
        attn_mask = attn_mask[:, None] if attn_mask.dim() == 3 else attn_mask
        mask = attn_mask if mask is None else mask & attn_mask  # (B, 1, T_q, T_k)
    return mask


# %% [markdown]
# **Check against `torch.nn.MultiheadAttention`.** PyTorch stores $W^Q, W^K, W^V$ as one
# matrix `in_proj_weight` of shape $(3D, D)$ and $W^O$ as `out_proj`; copy ours into it
# and compare the outputs, the per-head attention weights, and the gradients with
# respect to the inputs *and* every parameter. PyTorch's masks mean the opposite of
# ours (True on what is *forbidden*), hence the `~`. The cases: self-attention without a
# mask, with a key padding mask, with padding and a causal mask, and cross-attention
# from 5 queries to 9 keys with padding.

# %%
def copy_to_torch(mha: MultiHeadAttention) -> nn.MultiheadAttention:
    """An nn.MultiheadAttention holding the same weights as ours."""
    ref = nn.MultiheadAttention(mha.linear_out.out_features, mha.n_heads, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(
            torch.cat([mha.linear_q.weight, mha.linear_k.weight, mha.linear_v.weight])
        )
        ref.in_proj_bias.copy_(torch.cat([mha.linear_q.bias, mha.linear_k.bias, mha.linear_v.bias]))
        ref.out_proj.load_state_dict(mha.linear_out.state_dict())
    return ref


def compare_with_torch_mha(mha, query, key, key_lengths=None, attn_mask=None):
    """Max abs diffs from nn.MultiheadAttention: output and weights; gradients of everything."""
    ref = copy_to_torch(mha)
    key_mask = None if key_lengths is None else padding_mask(key_lengths, key.size(1))  # (B, T_k)
    query, key = query.clone().requires_grad_(), key.clone().requires_grad_()
    out, weights = mha(query, key, key, key_mask, attn_mask)  # (B, T_q, D), (B, h, T_q, T_k)
    grads = torch.autograd.grad(out.square().sum(), [query, key] + list(mha.parameters()))
    out_ref, weights_ref = ref(
        query,
        key,
        key,
        need_weights=True,
        average_attn_weights=False,
        key_padding_mask=None if key_mask is None else ~key_mask,
        attn_mask=None if attn_mask is None else ~attn_mask,
    )
    grads_ref = torch.autograd.grad(out_ref.square().sum(), [query, key] + list(ref.parameters()))
    # in_proj_weight and in_proj_bias hold W^Q, W^K, W^V stacked
    (W, b), D = grads_ref[2:4], out.size(-1)
    grads_ref = (
        list(grads_ref[:2])
        + [W[:D], b[:D], W[D : 2 * D], b[D : 2 * D], W[2 * D :], b[2 * D :]]
        + list(grads_ref[4:])
    )
    return max_diff([out, weights], [out_ref, weights_ref]), max_diff(grads, grads_ref)


torch.manual_seed(0)
mha = MultiHeadAttention(d_model=16, n_heads=4)
x, memory = torch.randn(3, 7, 16), torch.randn(3, 9, 16)  # (B, T, D), (B, T_k, D)
lengths = torch.tensor([7, 5, 2])  # (B,)
cases = {
    "self, no mask": (x, x, None, None),
    "self, padding": (x, x, lengths, None),
    "self, padding & causal": (x, x, lengths, causal_mask(7)),
    "cross 5 -> 9, padding": (x[:, :5], memory, torch.tensor([9, 6, 3]), None),
}
worst_forward, worst_backward = 0.0, 0.0
for name, (query, key, key_lengths, attn_mask) in cases.items():
    forward, backward = compare_with_torch_mha(mha, query, key, key_lengths, attn_mask)
    worst_forward, worst_backward = max(worst_forward, forward), max(worst_backward, backward)
    print(f"{name:>22}: max abs diff {forward:.0e} (output, weights), {backward:.0e} (gradients)")
assert worst_forward < 1e-5 and worst_backward < 1e-5
reference_diffs["nn.MultiheadAttention"] = (worst_forward, worst_backward)

# %% [markdown]
# **Padding must not matter.** Attention over a padded batch must give each sequence
# exactly what it gets alone, without padding: the key mask is what guarantees it.
# For self-attention (each sequence attends to itself) and cross-attention (each
# sequence of 5 queries attends to its own memory of length 9, 6 or 3):

# %%
with torch.no_grad():
    y, _ = mha(x, x, x, padding_mask(lengths, 7))  # (B, T, D)
    self_diff = max_diff(
        [y[b, :n] for b, n in enumerate(lengths.tolist())],
        [
            mha(x[b : b + 1, :n], x[b : b + 1, :n], x[b : b + 1, :n])[0][0]
            for b, n in enumerate(lengths.tolist())
        ],
    )
    memory_lengths = torch.tensor([9, 6, 3])  # (B,)
    y, _ = mha(x[:, :5], memory, memory, padding_mask(memory_lengths, 9))  # (B, 5, D)
    cross_diff = max_diff(
        [y[b] for b in range(3)],
        [
            mha(x[b : b + 1, :5], memory[b : b + 1, :n], memory[b : b + 1, :n])[0][0]
            for b, n in enumerate(memory_lengths.tolist())
        ],
    )
print(
    f"batched vs alone: max abs diff {self_diff:.0e} (self-attention), "
    f"{cross_diff:.0e} (cross-attention)"
)
assert self_diff < 1e-6 and cross_diff < 1e-6

# %% [markdown]
# And an empty sequence in a batch: its heads output zeros, so the layer outputs
# $0 \cdot W^O + b^O = b^O$ at each of its queries, a constant that carries no
# information, with no `nan` anywhere, forward or backward.

# %%
xg = x.clone().requires_grad_()  # (B, T, D)
y, weights = mha(xg, xg, xg, padding_mask(torch.tensor([7, 0, 2]), 7))  # (B, T, D), (B, h, T, T)
y.square().sum().backward()
print(
    "empty sequence: weights all zero:",
    bool((weights[1] == 0).all()),
    "| output = the bias b^O:",
    bool((y[1] == mha.linear_out.bias).all()),
)
print(
    "nan in the output, the input gradient or a parameter gradient:",
    any(t.isnan().any().item() for t in [y, xg.grad] + [p.grad for p in mha.parameters()]),
)
assert (weights[1] == 0).all() and not y.isnan().any() and not xg.grad.isnan().any()

# %% [markdown]
# ## Positional encoding
#
# Attention has no idea of order. Permute the frames of an utterance and the output
# frames come out permuted the same way, with the same values (exercise 1 checks it):
# to self-attention, an utterance is a *set* of frames. Speech is not a set. The
# Transformer therefore adds to each input vector $x_t$ a **positional encoding**
# $\mathrm{PE}_t \in \mathbb{R}^D$, a pattern that depends only on the position $t$
# {cite:p}`vaswani2017attention`:
#
# $$
# \mathrm{PE}_{t, 2i} = \sin\!\left(\frac{t}{10000^{2i/D}}\right), \qquad
# \mathrm{PE}_{t, 2i+1} = \cos\!\left(\frac{t}{10000^{2i/D}}\right), \qquad i = 0, \ldots, D/2 - 1
# $$
#
# Each pair of channels $(2i, 2i+1)$ is a point turning on a circle at angular
# frequency $\omega_i = 10000^{-2i/D}$: from one turn per $2\pi \approx 6$ positions
# ($i = 0$) down to one turn per $2\pi \cdot 10000$ positions. Like the digits of a
# clock, the fast pairs tell neighbouring frames apart and the slow ones tell where in
# a long utterance a frame is. Because a shift by $k$ positions turns every circle by a
# fixed angle $\omega_i k$, $\mathrm{PE}_{t+k}$ is a linear function of $\mathrm{PE}_t$
# (exercise 3), which makes relative positions easy for the projections to use.
# (FunASR's encoder uses a variant of the same idea: all the sines before all the
# cosines, frequencies $10000^{-i/(D/2-1)}$ so that the slowest is exactly $1/10000$,
# and positions counted from 1.)

# %%
#| export
def sinusoidal_positional_encoding(length: int, d_model: int) -> torch.Tensor:
    """PE (T, D): PE[t, 2i] = sin(t / 10000^(2i/D)), PE[t, 2i+1] = cos(t / 10000^(2i/D))."""
    assert d_model % 2 == 0, "d_model must be even"
    t = torch.arange(length, dtype=torch.float64)[:, None]  # (T, 1)
    omega = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (D/2,)
    pe = torch.zeros(length, d_model, dtype=torch.float64)  # (T, D)
    pe[:, 0::2] = torch.sin(t * omega)  # (T, D/2)
    pe[:, 1::2] = torch.cos(t * omega)  # (T, D/2)
    return pe.float()  # (T, D): computed in float64 so that long inputs stay exact


# %% [markdown]
# A check of every value against the formula, evaluated one number at a time with
# Python's `math`, then the encoding of 120 positions (7.2 s at 60 ms per frame) at
# $D = 64$. Left: the fast channels on the left change from position to position, the
# slow ones on the right barely move. Middle: a few channels as functions of $t$.
# Right: the similarity $\mathrm{PE}_t \cdot \mathrm{PE}_s$ of every pair of positions
# depends only on $|t - s|$ (the bands), and is largest for nearby positions.

# %%
pe = sinusoidal_positional_encoding(120, 64)  # (T, D)
formula = torch.tensor(
    [
        [
            math.sin(t / 10000 ** (c / 64)) if c % 2 == 0 else math.cos(t / 10000 ** ((c - 1) / 64))
            for c in range(64)
        ]
        for t in range(120)
    ]
)  # (T, D)
diff = max_diff(pe, formula)
print(f"positional encoding vs the formula: max abs diff {diff:.0e}")
assert diff < 1e-6

# %% mystnb={"figure": {"caption": "Sinusoidal positional encoding of 120 positions at $D = 64$. Left: the encoding, fast channels on the left, slow ones on the right. Middle: four channels as functions of the position. Right: the dot product of the encodings of every two positions, which depends only on their distance.", "name": "fig-ch03-positional-encoding"}, "image": {"alt": "Three panels: a red and blue striped heat map whose stripes widen from left to right; four sine-like curves of decreasing frequency; and a square heat map that is brightest along its diagonal, with bands parallel to it."}}
fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), layout="constrained")
image = axes[0].imshow(pe.numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1)
axes[0].set(title="PE (T, D)", xlabel="channel c", ylabel="position t")
fig.colorbar(image, ax=axes[0], label=r"PE$_{t,c}$")
for c in [0, 8, 16, 24]:
    axes[1].plot(pe[:, c].numpy(), label=f"{c}")
axes[1].set(title="Some channels", xlabel="position t", ylabel=r"PE$_{t,c}$")
axes[1].legend(title="channel c", loc="upper left", bbox_to_anchor=(1.01, 1))
image = axes[2].imshow((pe @ pe.T).numpy(), cmap="viridis")
axes[2].set(title=r"PE$_t \cdot$ PE$_s$", xlabel="position s", ylabel="position t")
fig.colorbar(image, ax=axes[2], label="dot product")
plt.show()

# %% [markdown]
# ## The cost of attention
#
# Self-attention over $T$ frames computes a $T \times T$ score matrix per head: the time
# grows as $O(T^2 d_k)$ per head and the memory as $O(T^2)$, where everything else in a
# Transformer layer is linear in $T$. At 60 ms per frame, a 6 s utterance has 100 frames
# and the matrix is tiny; a 2-minute recording has 2,000 frames and 4 million scores
# per head.
#
# **Memory** is computed here, not sampled: the score tensor of a batch has
# $B \cdot h \cdot T^2$ float32 entries of 4 bytes. We also *measure* what matters in
# training, the memory that autograd keeps for the backward pass, by summing the sizes
# of the tensors it saves (a `torch.autograd.graph.saved_tensors_hooks` sees each one).
# For comparison, PyTorch's fused `F.scaled_dot_product_attention` (a FlashAttention-style
# kernel) never stores the $T \times T$ matrix: it processes keys in blocks with a
# running softmax, and its backward pass recomputes the weights.

# %%
def saved_for_backward(fn, *inputs):
    """Bytes of the distinct tensors autograd saves for the backward pass of fn(*inputs)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(storages.values())


def attention_memory(T, B=1, h=4, d_k=48):
    """Bytes of the scores, and saved for backward by ours (no mask, mask) and the fused kernel."""
    # (B, h, T, d_k) each
    q, k, v = (torch.randn(B, h, T, d_k, requires_grad=True) for _ in range(3))
    mask = padding_mask(torch.full((B,), T))[:, None, None, :]  # (B, 1, 1, T): a key padding mask
    saved = saved_for_backward(lambda: scaled_dot_product_attention(q, k, v)[0])
    saved_masked = saved_for_backward(lambda: scaled_dot_product_attention(q, k, v, mask)[0])
    fused = saved_for_backward(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    return B * h * T * T * 4, saved, saved_masked, fused


MB = 2**20
lengths_T = [64, 128, 256, 512, 1024, 2048, 4096]
memory = {T: attention_memory(T) for T in lengths_T}
print("self-attention, B = 1, h = 4, d_k = 48 (the book's encoder: D = 192); memory in MiB")
print(f"{'':>15}{'score tensor':>14}{'saved for backward':>38}")
print(f"{'T':>6}{'seconds':>9}{'B*h*T*T*4':>14}{'ours':>10}{'ours, mask':>14}{'fused, mask':>14}")
for T, (scores, saved, saved_masked, fused) in memory.items():
    print(
        f"{T:>6}{T * 0.06:>9.1f}{scores / MB:>14.2f}{saved / MB:>10.2f}"
        f"{saved_masked / MB:>14.2f}{fused / MB:>14.2f}"
    )
scores, _, saved_masked, _ = memory[2048]
print(
    f"T = 2048 with a mask, 6 layers, batch 32: {6 * 32 * saved_masked / 2**30:.1f} GiB "
    "for attention alone"
)
assert all(saved_masked > 2 * scores for scores, _, saved_masked, _ in memory.values())  # quadratic
assert memory[2048][3] < memory[2048][0] / 10  # the fused kernel: linear

# %% [markdown]
# Our function keeps the attention weights for its backward pass (one tensor the size
# of the scores, used by both the softmax and the product with $V$) and $Q$, $K$, $V$.
# With a mask it keeps a second one: the weights before and after zeroing the masked
# keys. The fused kernel keeps only its inputs, its output and one number per query:
# linear in $T$.
#
# **Time**, measured on this machine's CPU (the best of a few runs of the forward pass,
# without gradients): the numbers change from run to run and machine to machine, so the
# cell's output is not checked (`NBVAL_IGNORE_OUTPUT`).

# %%
# NBVAL_IGNORE_OUTPUT
def time_attention(fn, T, B=1, h=4, d_k=48, repeats=3):
    """Best wall time (s) of fn(q, k, v) on random (B, h, T, d_k) inputs."""
    q, k, v = (torch.randn(B, h, T, d_k) for _ in range(3))  # (B, h, T, d_k) each
    times = []
    with torch.inference_mode():
        fn(q, k, v)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            fn(q, k, v)
            times.append(time.perf_counter() - start)
    return min(times)


timing = {
    T: (time_attention(our_sdpa, T), time_attention(F.scaled_dot_product_attention, T))
    for T in lengths_T
}
print(f"{'T':>6}{'ours (ms)':>11}{'fused (ms)':>12}{'ours / fused':>14}")
for T, (t_ours, t_fused) in timing.items():
    print(f"{T:>6}{t_ours * 1e3:>11.2f}{t_fused * 1e3:>12.2f}{t_ours / t_fused:>14.1f}")
ratio = timing[4096][0] / timing[2048][0]
print(f"doubling T from 2048 to 4096 multiplies our time by {ratio:.1f} (quadratic: 4)")

# %% mystnb={"figure": {"caption": "Forward time of self-attention on this machine's CPU against the sequence length, for our function and PyTorch's fused kernel, with a $T^2$ line for comparison (log-log axes).", "name": "fig-ch03-attention-time"}, "image": {"alt": "A log-log plot of forward time in milliseconds against sequence length from 64 to 4096 frames, for our function and the fused kernel, with a dotted T squared line for comparison."}}
fig, ax = plt.subplots(figsize=(7, 3.2))
ax.loglog(lengths_T, [timing[T][0] * 1e3 for T in lengths_T], "o-", label="ours")
ax.loglog(lengths_T, [timing[T][1] * 1e3 for T in lengths_T], "s-", label="fused (F.sdpa)")
ax.loglog(
    lengths_T,
    [timing[4096][0] * 1e3 * (T / 4096) ** 2 for T in lengths_T],
    "k:",
    label=r"$\propto T^2$",
)
ax.set(title="Forward time, CPU", xlabel="sequence length T (frames)", ylabel="forward time (ms)")
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
plt.show()

# %% mystnb={"figure": {"caption": "Memory of self-attention against the sequence length (log-log axes): the score tensor and what autograd saves for the backward pass, by our function without and with a mask, and by PyTorch's fused kernel with a mask.", "name": "fig-ch03-attention-memory"}, "image": {"alt": "A log-log plot of MiB against sequence length: the score tensor and our function's saved memory grow as T squared, the masked one highest, while the fused kernel's line grows linearly and ends far below."}}
fig, ax = plt.subplots(figsize=(7, 3.2))
ax.loglog(
    lengths_T, [memory[T][0] / MB for T in lengths_T], "k:", label=r"score tensor $B h T^2 \cdot 4$"
)
for i, (marker, name) in enumerate([("o-", "ours"), ("^-", "ours, mask"), ("s-", "fused, mask")]):
    saved_mib = [memory[T][i + 1] / MB for T in lengths_T]
    ax.loglog(lengths_T, saved_mib, marker, label=f"saved for backward: {name}")
ax.set(title="Memory", xlabel="sequence length T (frames)", ylabel="memory (MiB)")
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
plt.show()

# %% [markdown]
# For the utterances of this book (a few seconds, under 100 frames) neither cost
# matters, and the explicit weights are worth having: they are what we plot. For long
# recordings, the quadratic memory is the reason production systems use fused kernels,
# and the reason long audio is cut into segments before recognition.
#
# ## Closing note: how close to PyTorch
#
# Every check of this chapter against PyTorch's own attention, in one place: the
# largest absolute difference over all the cases above (with and without padding and
# causal masks; self- and cross-attention), for the forward pass (outputs and, for
# `nn.MultiheadAttention`, the per-head weights) and for the gradients (with respect to
# $Q, K, V$; for the layer, to its inputs and every parameter). All are float32 rounding
# errors.

# %%
print(f"{'ours vs':>32}{'forward':>10}{'gradients':>11}")
for reference, (forward, backward) in reference_diffs.items():
    print(f"{reference:>32}{forward:>10.0e}{backward:>11.0e}")
assert all(forward < 1e-5 and backward < 1e-5 for forward, backward in reference_diffs.values())

# %% [markdown]
# ## Summary
#
# - Attention is a soft lookup:
#   $\operatorname{softmax}(QK^\top/\sqrt{d_k} + M)\,V$. The scale keeps the scores'
#   variance at 1 whatever the width $d_k$; the mask $M$ ($0$ or $-\infty$) removes
#   padded keys and, for an autoregressive decoder, future ones.
# - `padding_mask(lengths)` and `causal_mask(T)` are boolean, True where attention is
#   allowed. A query with no valid key gets zero weights and a zero output (a finite
#   fill value, then zeroed weights), where `nn.MultiheadAttention` returns `nan`.
# - `MultiHeadAttention` runs $h$ heads on learned projections
#   (`linear_q`, `linear_k`, `linear_v`, `linear_out`), for self- and
#   cross-attention, and returns the weights of every head. It equals
#   `nn.MultiheadAttention` with copied weights, forward and gradients, with and without
#   masks, and a padded batch gives each sequence what it gets alone. The largest
#   differences from PyTorch's two references are float32 rounding (closing note).
# - On speech features, even without learned projections, attention finds structure:
#   frames attend to their neighbours and to frames of the same sound elsewhere, such
#   as a word spoken twice.
# - Attention ignores order; `sinusoidal_positional_encoding(T, D)` adds it back, one
#   rotating pair of channels per frequency.
# - Its time and memory grow as $T^2$: negligible for short utterances, the limit for
#   long ones; fused kernels avoid storing the $T \times T$ weights.
#
# ## Exercises
#
# 1. **Attention sees a set.** Show that self-attention without positional encoding is
#    *permutation-equivariant*: permuting the input frames permutes the output frames
#    the same way. Then add `sinusoidal_positional_encoding` to the inputs and show that
#    it no longer is.
# 2. **Without the scale.** For random queries and keys with unit-variance entries,
#    measure the average largest attention weight of a row ($T_k = 50$ keys) as $d_k$
#    grows from 4 to 1024, with and without the $1/\sqrt{d_k}$. What happens to the
#    softmax without it, and what would that do to the gradients?
# 3. **Relative positions are linear.** Find the matrix $M_k$ with
#    $\mathrm{PE}_{t+k} = \mathrm{PE}_t\, M_k$ for every $t$ (hint: each pair of
#    channels turns by the angle $\omega_i k$; use $\sin(a+b)$ and $\cos(a+b)$) and check
#    it numerically for $k = 5$.
# 4. **Sharpness.** In the speech example, compute the share of attention the frames of
#    the first occurrence give to the second one for $\beta = 2, 5, 10, 20, 50$, with all
#    keys and with the neighbourhood masked. Why does the share with all keys fall for
#    large $\beta$, while the masked share keeps growing? What does $\beta$ correspond
#    to in a trained model?

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
# Solution 1: permute the frames of a sequence, with and without positional encoding.
torch.manual_seed(0)
mha = MultiHeadAttention(d_model=16, n_heads=4).eval()
x = torch.randn(1, 10, 16)  # (B, T, D)
perm = torch.randperm(10)  # a new order of the frames
with torch.no_grad():
    y = mha(x, x, x)[0]  # (B, T, D)
    y_perm = mha(x[:, perm], x[:, perm], x[:, perm])[0]  # (B, T, D)
    print("without PE, f(x[perm]) == f(x)[perm]:", torch.allclose(y_perm, y[:, perm], atol=1e-6))
    x_pe, x_perm_pe = (
        x + sinusoidal_positional_encoding(10, 16),
        x[:, perm] + sinusoidal_positional_encoding(10, 16),
    )
    y, y_perm = mha(x_pe, x_pe, x_pe)[0], mha(x_perm_pe, x_perm_pe, x_perm_pe)[0]  # (B, T, D) each
    print("with PE,    f(x[perm]) == f(x)[perm]:", torch.allclose(y_perm, y[:, perm], atol=1e-6))

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
# Solution 2: without the scale the softmax saturates (one key takes all the weight);
# its gradient w (1 - w) then vanishes, and training through it stalls.
g = torch.Generator().manual_seed(0)
print(f"{'d_k':>6}{'largest weight, scaled':>24}{'unscaled':>10}")
for d_k in [4, 16, 64, 256, 1024]:
    # (N, 1, d_k), (N, T_k, d_k)
    q, k = torch.randn(200, 1, d_k, generator=g), torch.randn(200, 50, d_k, generator=g)
    scores = (q @ k.transpose(-2, -1))[:, 0]  # (N, T_k)
    scaled = (scores / math.sqrt(d_k)).softmax(-1).max(-1).values.mean()  # scalar
    unscaled = scores.softmax(-1).max(-1).values.mean()  # scalar
    print(f"{d_k:>6}{scaled:>24.2f}{unscaled:>10.2f}")

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
# Solution 3: M_k is block-diagonal, one 2x2 rotation per pair of channels:
# [sin(a + b), cos(a + b)] = [sin a, cos a] @ [[cos b, -sin b], [sin b, cos b]]
# with a = w t, b = w k.
D, k = 64, 5
omega = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
M = torch.zeros(D, D, dtype=torch.float64)  # (D, D)
M[0::2, 0::2] = torch.diag(torch.cos(omega * k))  # (D/2, D/2)
M[0::2, 1::2] = torch.diag(-torch.sin(omega * k))  # (D/2, D/2)
M[1::2, 0::2] = torch.diag(torch.sin(omega * k))  # (D/2, D/2)
M[1::2, 1::2] = torch.diag(torch.cos(omega * k))  # (D/2, D/2)
pe = sinusoidal_positional_encoding(200, D).double()  # (T, D)
diff = max_diff(pe[:-k] @ M, pe[k:])
print(f"PE[t + {k}] vs PE[t] @ M_{k}, t = 0..194: max abs diff < 1e-6: {diff < 1e-6}")

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
# Solution 4: a larger beta sharpens every row. With all keys, the weight then flows to
# the diagonal (a frame is most like itself), so the share of the other occurrence
# shrinks; with the neighbourhood masked, the other occurrence holds the closest frames
# left, and its share keeps growing. In a trained model, beta is the
# size of W^Q and W^K: the projections learn how sharp each head is.
print(f"{'beta':>6}{'all keys':>10}{'masked':>8}")
for sharpness in [2.0, 5.0, 10.0, 20.0, 50.0]:
    shares = []
    for mask in [None, far]:
        # (T, T)
        _, w = scaled_dot_product_attention(sharpness * math.sqrt(U.size(-1)) * U, U, U, mask)
        shares.append(w[a0:a1, b0:b1].sum(-1).mean().item())
    print(f"{sharpness:>6.0f}{shares[0]:>10.0%}{shares[1]:>8.0%}")
