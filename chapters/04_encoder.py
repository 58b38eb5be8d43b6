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
# # The encoder
#
# Chapter 1 turned speech into 60 ms frames of 560 numbers, and chapter 3 built
# attention. This chapter puts them together into Paraformer's **encoder**: the network
# that reads the frames $X \in \mathbb{R}^{T \times 560}$ and writes one vector per frame,
# $H \in \mathbb{R}^{T \times D}$, for the predictor (chapter 5) and the decoder to use.
#
# Paraformer's encoder is a stack of **SAN-M** layers {cite:p}`gao2020sanm`: a Transformer
# encoder layer whose self-attention carries a small **memory block** (an FSMN, a
# depthwise convolution over time) on its values. Attention sees the whole utterance;
# the memory block adds the local context that speech is full of (a phone lasts a few
# frames) for a few thousand parameters.
#
# On top of the encoder sits a **CTC head** {cite:p}`graves2006ctc`: a linear layer that
# predicts, at every frame, a token or a *blank*. Paraformer trains it as an auxiliary
# loss; on its own it is already a complete recognizer. We derive its loss from scratch.
#
# ## Learning goals
#
# After this chapter you can
#
# - write the FSMN memory block, see its receptive field, and say why it must be masked
#   at the padding both before and after its convolution;
# - assemble the SAN-M layer (chapter 3's multi-head attention plus the memory block,
#   pre-LayerNorm, feed-forward) and the encoder, whose first layer maps the 560-d
#   input to the model width;
# - count the parameters of each part and measure how the forward time grows with
#   the input length, and so size an encoder that trains on a 2-core CPU;
# - derive the CTC loss (collapse, the extended label sequence, the forward algorithm in
#   log space) and check it against `torch.nn.functional.ctc_loss`;
# - decode a CTC output greedily.

# %%
# In Colab, install the book's package first:
# # !pip install -q "paraformer-edu[book] @ git+https://github.com/paraformer-edu/paraformer-edu"
# %matplotlib inline
import itertools
import math
import time
from dataclasses import asdict, replace

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F

import paraformer_edu
from paraformer_edu.display import book_style, print_table

book_style()
torch.manual_seed(0)
print("paraformer_edu", paraformer_edu.__version__)

# %% [markdown]
# ## The memory block (FSMN)
#
# A feedforward sequential memory network (FSMN) gives every frame a *memory* of its
# neighbours: a learned, per-channel weighted sum of the frames around it. SAN-M applies
# it to the values $V = X W^V$ of self-attention, in the symmetric form FunASR uses,
# with a window of $2N+1$ frames ($N = 5$: kernel size 11, 5 frames each side):
#
# $$
# m_t = v_t + \sum_{i=-N}^{N} a_i \odot v_{t+i}
# $$
#
# where $a_i \in \mathbb{R}^D$ are learned and $\odot$ multiplies channel by channel.
# That is a *depthwise* 1-d convolution (one filter per channel, `groups=D`, no bias)
# plus a skip connection. Batches are padded, so two details matter:
#
# - **mask before the convolution**: frames past the end of an utterance hold padding,
#   and the last $N$ valid frames would otherwise mix it into their memory;
# - **mask after it**: the convolution spreads valid frames into the padding; zeroing
#   the output there keeps padded frames at zero for everything downstream.
#
# With the padding mask $M_t \in \{0, 1\}$ (1 on valid frames) the block computes
# $m_t = M_t \big(M_t v_t + \sum_i a_i \odot M_{t+i} v_{t+i}\big)$.

# %%
#| default_exp encoder
#| export
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from paraformer_edu.attention import MultiHeadAttention, sinusoidal_positional_encoding

# %%
#| export
class FSMNMemory(nn.Module):
    """SAN-M's memory block: m = v + depthwise Conv1d(v) over time, masked at the padding."""

    def __init__(self, d_model: int, kernel_size: int = 11, shift: int = 0, dropout: float = 0.0):
        super().__init__()
        self.conv = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model, bias=False)
        left = (kernel_size - 1) // 2 + shift  # shift > 0 looks further into the past
        self.padding = (left, kernel_size - 1 - left)
        self.dropout = nn.Dropout(dropout)

    def forward(self, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Memory of the values v (B, T, D) given the padding mask (B, T), True on valid frames."""
        keep = mask.unsqueeze(-1).to(v.dtype)  # (B, T, 1)
        v = v * keep  # (B, T, D): padding cannot leak into valid frames
        m = self.conv(F.pad(v.transpose(1, 2), self.padding))  # (B, D, T)
        m = self.dropout(m.transpose(1, 2) + v)  # (B, T, D)
        return m * keep  # (B, T, D): valid frames cannot leak into padding


# %% [markdown]
# An independent reference, one frame at a time, straight from the equation, checks
# the convolution's orientation and padding (a padded batch of two utterances):

# %%
def fsmn_reference(block, v, lengths):
    """The memory m_t = v_t + sum_i a_i * v_{t+i}, looping over frames of each utterance."""
    a = block.conv.weight[:, 0, :]  # (D, K): the filter a_i of every channel
    left = block.padding[0]
    m = torch.zeros_like(v)  # (B, T, D)
    for b, length in enumerate(lengths.tolist()):
        for t in range(length):
            for j in range(a.size(1)):
                if 0 <= t + j - left < length:
                    m[b, t] += a[:, j] * v[b, t + j - left]  # (D,)
            m[b, t] += v[b, t]  # (D,)
    return m


block = FSMNMemory(d_model=8, kernel_size=11)
v = torch.randn(2, 20, 8)  # (B, T, D)
lengths = torch.tensor([20, 13])  # (B,)
mask = torch.arange(20) < lengths[:, None]  # (B, T)
with torch.no_grad():
    diff = (block(v, mask) - fsmn_reference(block, v, lengths)).abs().max().item()  # scalar
print(f"FSMN block vs frame-by-frame reference: max abs diff {diff:.0e}")
assert diff < 1e-6

# %% [markdown]
# And why the first mask matters: fill the second utterance's padding with garbage and
# compare with the same convolution applied without masks. Without them, the garbage
# reaches the memory of the last $N = 5$ valid frames.

# %%
garbage = torch.where(mask[..., None], v, torch.full_like(v, 100.0))  # (B, T, D)
with torch.no_grad():
    # (B, T, D)
    unmasked = block.conv(F.pad(garbage.transpose(1, 2), block.padding)).transpose(1, 2) + garbage
    masked = block(garbage, mask)  # (B, T, D)
    clean = block(v, mask)  # (B, T, D)
changed = lambda m: [t for t in range(13) if not torch.allclose(m[1, t], clean[1, t], atol=1e-5)]
print("valid frames of utterance 2 changed by the garbage:")
print("  without masks:", ", ".join(map(str, changed(unmasked))) or "none")
print("  with masks:   ", ", ".join(map(str, changed(masked))) or "none")
assert changed(unmasked) == [8, 9, 10, 11, 12] and changed(masked) == []

# %% [markdown]
# **What a frame remembers.** Send an impulse (one frame set to 1) through a stack of
# blocks (one channel, random filters) and colour the frames it reaches (white: not
# reached). Each block widens the window by $2N = 10$ frames: through six layers a
# frame's memory alone spans $6 \cdot 10 + 1 = 61$ frames, 3.7 seconds at 60 ms.
# (Attention, meanwhile, sees the whole utterance from the first layer.) The right
# panel shows the masks at work in an utterance of 61 frames: an impulse in the last
# valid frame enters the memory of the five frames before it (and its own, through the
# skip connection $v_t$), and nothing reaches the padding.

# %% mystnb={"figure": {"caption": "Left: an impulse at frame 40 after one to six stacked FSMN blocks; each block widens the reach by 10 frames, to 61 frames after six. Right: an impulse in the last valid frame of a 61-frame utterance reaches the five frames before it and none of the padding.", "name": "fig-ch04-fsmn-reach"}, "image": {"alt": "Left, a heat map shaped like a triangle that widens downwards from frame 40 over six rows of blocks. Right, a stem plot that is zero everywhere except frames 55 to 60, with the padding after frame 60 shaded grey and flat."}}
torch.manual_seed(0)
blocks = [FSMNMemory(d_model=1, kernel_size=11) for _ in range(6)]
T = 80
impulse = torch.zeros(1, T, 1)  # (B, T, D)
impulse[0, 40] = 1.0
mask = torch.ones(1, T, dtype=torch.bool)  # (B, T)
spread = []
with torch.no_grad():
    x = impulse
    for blk in blocks:
        x = blk(x, mask)  # (B, T, D)
        spread.append(x[0, :, 0].abs())  # (T,)
    short = torch.arange(T)[None] < 61  # (B, T): an utterance of 61 frames
    end = torch.zeros(1, T, 1)  # (B, T, D)
    end[0, 60] = 1.0
    at_end = blocks[0](end, short)[0, :, 0]  # (T,)

reach = torch.stack(spread)  # (L, T): |memory| after 1..6 blocks
fig, axes = plt.subplots(1, 2, figsize=(10, 3), layout="constrained")
image = axes[0].imshow(
    reach.log10().clamp(min=-6).masked_fill(reach == 0, float("nan")).numpy(),
    aspect="auto",
    cmap="viridis",
    extent=(-0.5, T - 0.5, 6.5, 0.5),
)
fig.colorbar(image, ax=axes[0], label="log10 |memory| (white: 0)")
axes[0].set(
    title="Impulse at frame 40 through stacked FSMN blocks",
    xlabel="frame (60 ms)",
    ylabel="blocks passed",
    xlim=(5, 75),
)
axes[1].stem(at_end.numpy(), basefmt=" ")
axes[1].axvspan(60.5, T, color="0.85", label="padding")
axes[1].set(
    title="Impulse at the last valid frame (61 frames)",
    xlabel="frame (60 ms)",
    ylabel="memory $m_t$ (one channel)",
)
axes[1].legend(loc="upper left")
plt.show()
width = [int((s > 0).sum()) for s in spread]
print_table([["blocks", *range(1, 7)], ["frames reached", *width]])
print("memory that leaks into the padding:", float(at_end[61:].abs().sum()))

# %% [markdown]
# ## SAN-M: self-attention with a memory
#
# A SAN-M self-attention layer computes queries, keys and values from its input $X$,
# runs chapter 3's multi-head attention, and adds the memory of the values
# {cite:p}`gao2020sanm`:
#
# $$
# \operatorname{SANM}(X) = \operatorname{MultiHead}(Q, K, V) + \operatorname{FSMN}(V),
# \qquad Q = XW^Q,\; K = XW^K,\; V = XW^V
# $$
#
# The memory is added *after* the attention's output projection $W^O$ and is not
# projected itself. Attention gives every frame a content-based view of the whole
# utterance; the memory gives it a fixed, position-based view of its neighbourhood,
# for $D \cdot 11$ parameters (2,112 at $D = 192$, against $4D^2 \approx 147{,}000$ for
# the attention's projections). Keys at padded frames are masked, as in chapter 3.
#
# The input width $d_\text{in}$ may differ from the model width $D$: the encoder's first
# layer reads the 560-d features directly and its projections $W^Q, W^K, W^V$ map them
# to $D$. With `kernel_size=0` there is no memory block, and the layer is a plain
# Transformer self-attention: the comparison we need later.
#
# In code, SAN-M *is* chapter 3's `MultiHeadAttention` (its projections, head
# splitting, scaling and masked softmax, through its `attend` step) with the memory
# added: the subclass computes $V$ once, hands it to both, and returns the attention
# weights too, so that chapter 8 can read them without computing them again.

# %%
#| export
class SANMAttention(MultiHeadAttention):
    """SAN-M self-attention: chapter 3's multi-head attention plus an FSMN memory of V."""

    def __init__(
        self,
        d_in: int,
        d_model: int,
        n_heads: int,
        kernel_size: int = 11,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
    ):
        super().__init__(d_model, n_heads, attention_dropout, d_in=d_in)
        self.memory = FSMNMemory(d_model, kernel_size, dropout=dropout) if kernel_size > 0 else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SANM(X): x (B, T, d_in), padding mask (B, T) -> (B, T, D), weights (B, h, T, T)."""
        v = self.linear_v(x)  # (B, T, D)
        # (B, T, D)
        y, weights = self.attend(self.linear_q(x), self.linear_k(x), v, mask[:, None, None, :])
        if self.memory is not None:
            y = y + self.memory(v, mask)  # (B, T, D)
        return y, weights


# %% [markdown]
# ## The encoder layer
#
# Around the attention sits the usual Transformer machinery, with the LayerNorm
# *before* each sub-layer (pre-LN, easier to train without a long warm-up) and a
# position-wise feed-forward network $\operatorname{FFN}(x) = W_2 \operatorname{ReLU}(W_1 x + b_1) + b_2$
# of width $d_\text{ffn} = 4D$:
#
# $$
# Y = X + \operatorname{SANM}(\operatorname{LN}(X)), \qquad
# Z = Y + \operatorname{FFN}(\operatorname{LN}(Y))
# $$
#
# (dropout on each sub-layer's output in training). The first layer cannot add its
# 560-d input to a $D$-wide output, so, as in FunASR, it has **no residual** around its
# attention: $Y = \operatorname{SANM}(\operatorname{LN}(X))$. Its projections do the
# work of an input layer. (The alternative, a `Linear(560, D)` in front of identical
# layers, costs about the same; we follow the reference implementation.)

# %%
#| export
class FeedForward(nn.Module):
    """Position-wise feed-forward network W2 ReLU(W1 x + b1) + b2."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float = 0.0):
        super().__init__()
        self.w_1 = nn.Linear(d_model, d_ffn)
        self.w_2 = nn.Linear(d_ffn, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """FFN(x) for x (B, T, D)."""
        return self.w_2(self.dropout(torch.relu(self.w_1(x))))  # (B, T, D)


class SANMEncoderLayer(nn.Module):
    """Pre-LN SAN-M encoder layer; no residual around the attention when d_in != d_model."""

    def __init__(
        self,
        d_in: int,
        d_model: int,
        n_heads: int,
        d_ffn: int,
        kernel_size: int = 11,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_in)
        self.self_attn = SANMAttention(d_in, d_model, n_heads, kernel_size, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.feed_forward = FeedForward(d_model, d_ffn, dropout)
        self.dropout = nn.Dropout(dropout)
        self.residual = d_in == d_model

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One layer: x (B, T, d_in), mask (B, T) -> (B, T, D)."""
        y = self.dropout(self.self_attn(self.norm1(x), mask)[0])  # (B, T, D)
        x = x + y if self.residual else y  # (B, T, D)
        return x + self.dropout(self.feed_forward(self.norm2(x)))  # (B, T, D)


# %% [markdown]
# **A Transformer layer beside it.** With `kernel_size=0` the same class is a pre-LN
# Transformer encoder layer, which PyTorch implements too: copy the weights into
# `torch.nn.TransformerEncoderLayer(norm_first=True)` and the outputs agree. The SAN-M
# layer with the same weights differs by exactly its memory term (checked here after
# the attention sub-layer, where the memory enters).

# %%
torch.manual_seed(0)
d, h, f = 16, 4, 64
ours = SANMEncoderLayer(d, d, h, f, kernel_size=0, dropout=0.0).eval()
ref = nn.TransformerEncoderLayer(d, h, f, dropout=0.0, batch_first=True, norm_first=True).eval()
with torch.no_grad():
    attn = ours.self_attn
    ref.self_attn.in_proj_weight.copy_(
        torch.cat([attn.linear_q.weight, attn.linear_k.weight, attn.linear_v.weight])
    )
    ref.self_attn.in_proj_bias.copy_(
        torch.cat([attn.linear_q.bias, attn.linear_k.bias, attn.linear_v.bias])
    )
    ref.self_attn.out_proj.load_state_dict(attn.linear_out.state_dict())
    ref.linear1.load_state_dict(ours.feed_forward.w_1.state_dict())
    ref.linear2.load_state_dict(ours.feed_forward.w_2.state_dict())
    ref.norm1.load_state_dict(ours.norm1.state_dict())
    ref.norm2.load_state_dict(ours.norm2.state_dict())

    x = torch.randn(3, 12, d)  # (B, T, D)
    lengths = torch.tensor([12, 9, 5])  # (B,)
    mask = torch.arange(12) < lengths[:, None]  # (B, T)
    valid = mask[..., None]  # (B, T, 1)
    diff = ((ours(x, mask) - ref(x, src_key_padding_mask=~mask)) * valid).abs().max().item()
    print(f"kernel_size=0 vs torch.nn.TransformerEncoderLayer: max abs diff {diff:.0e}")
    assert diff < 1e-5

    sanm = SANMAttention(d, d, h, kernel_size=11)
    plain = SANMAttention(d, d, h, kernel_size=0)
    plain.load_state_dict(sanm.state_dict(), strict=False)  # the same projections, no memory
    memory = sanm.memory(sanm.linear_v(x), mask)  # (B, T, D)
    diff = (sanm(x, mask)[0] - plain(x, mask)[0] - memory).abs().max().item()
    print(f"SAN-M attention - plain attention - FSMN(V): max abs diff {diff:.0e}")
    assert diff < 1e-5

# %% [markdown]
# ## The encoder
#
# The encoder takes chapter 1's features, 60 ms low-frame-rate frames of 560 numbers
# (7 stacked 80-d fbank frames) normalised by the global CMVN. As in FunASR, it scales
# them by $\sqrt{D}$ and adds sinusoidal positions of the input width. We use chapter
# 3's `sinusoidal_positional_encoding` (sines and cosines interleaved, positions
# from 0); FunASR's `SinusoidalPositionEncoder` puts all the sines before all the cosines,
# uses the frequencies $10000^{-i/(D/2-1)}$ and counts positions from 1, an encoding of
# the same kind but not the same numbers, so its weights would not fit ours:
#
# $$
# X'_t = \sqrt{D}\, X_t + \operatorname{PE}_t
# $$
#
# then runs $L$ layers and a final LayerNorm. Because a LayerNorm comes first in layer
# 0, the scale is not a gain: $\operatorname{LN}(\sqrt{D}\,x + p) \approx
# \operatorname{LN}(x + p / \sqrt{D})$, so it sets how loudly the positions speak
# relative to the features (at $D = 192$, about $1/14$). Output frames past an
# utterance's length are set to zero, and the lengths pass through unchanged (LFR already
# did the subsampling).
#
# The book's default sizes are below; the section on size and speed explains them.

# %%
#| export
@dataclass(frozen=True)
class EncoderConfig:
    """Sizes of the SAN-M encoder; defaults sized for a 2-core CPU (chapter 7 sets the book's)."""

    d_input: int = 560  # LFR features: 7 stacked 80-d fbank frames
    d_model: int = 192
    n_heads: int = 4
    n_layers: int = 6
    d_ffn: int = 768  # 4 * d_model
    kernel_size: int = 11  # FSMN memory: 5 frames each side; 0 = plain Transformer layers
    dropout: float = 0.1


class SANMEncoder(nn.Module):
    """Paraformer's encoder: scaled input + positions, SAN-M layers, final LayerNorm."""

    def __init__(self, config: EncoderConfig = EncoderConfig()):
        super().__init__()
        self.config = c = config
        self.layers = nn.ModuleList(
            SANMEncoderLayer(
                c.d_input if i == 0 else c.d_model,
                c.d_model,
                c.n_heads,
                c.d_ffn,
                c.kernel_size,
                c.dropout,
            )
            for i in range(c.n_layers)
        )
        self.after_norm = nn.LayerNorm(c.d_model)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode features x (B, T, d_input) with lengths (B,) into h (B, T, D) and lengths."""
        mask = torch.arange(x.size(1), device=x.device) < lengths[:, None]  # (B, T)
        x = x.masked_fill(~mask[..., None], 0.0)  # (B, T, d_input): whatever the padding held
        pe = sinusoidal_positional_encoding(x.size(1), x.size(2)).to(x)  # (T, d_input): chapter 3
        x = x * math.sqrt(self.config.d_model) + pe  # (B, T, d_input)
        for layer in self.layers:
            x = layer(x, mask)  # (B, T, D)
        h = self.after_norm(x).masked_fill(~mask[..., None], 0.0)  # (B, T, D)
        return h, lengths


# %%
torch.manual_seed(0)
config = EncoderConfig()
encoder = SANMEncoder(config).eval()
print("EncoderConfig():")
print_table([asdict(config)])
x = torch.randn(4, 50, config.d_input)  # (B, T, 560): stands in for chapter 1's features
lengths = torch.tensor([50, 41, 30, 7])  # (B,)
with torch.no_grad():
    h, h_lengths = encoder(x, lengths)  # (B, T, D), (B,)
print(
    f"features {tuple(x.shape)} -> h {tuple(h.shape)}, "
    f"lengths {', '.join(map(str, h_lengths.tolist()))}"
)

# %% [markdown]
# Two properties a padded batch must have, checked on the untrained encoder in
# evaluation mode (dropout off): each utterance encodes the same alone as in the batch,
# and the values in the padding do not matter (fill it with large garbage: the valid
# outputs do not move, the padded ones stay zero). The FSMN masks and the attention's
# key mask are what make both true.

# %%
with torch.no_grad():
    alone = [
        encoder(x[b : b + 1, :n], lengths[b : b + 1])[0][0] for b, n in enumerate(lengths.tolist())
    ]
    diff = max((h[b, :n] - alone[b]).abs().max().item() for b, n in enumerate(lengths.tolist()))
    print(f"batched vs one at a time: max abs diff {diff:.0e}")
    assert diff < 1e-5

    mask = torch.arange(50) < lengths[:, None]  # (B, T)
    # (B, T, 560)
    garbage = x.masked_fill(~mask[..., None], 1e4) + 100 * torch.randn_like(x) * ~mask[..., None]
    h_garbage, _ = encoder(garbage, lengths)  # (B, T, D)
    diff = (h_garbage - h).abs().max().item()
    print(f"garbage in the padding: max abs change of the outputs {diff:.0e}")
    assert diff < 1e-5

# %% [markdown]
# ## CTC: a loss without alignments
#
# The encoder emits $T$ frames; the transcript has $U$ tokens, $U < T$, and nobody told
# us which frames belong to which token. Connectionist temporal classification
# {cite:p}`graves2006ctc` sidesteps the question: the model predicts, at every frame,
# a distribution over the vocabulary plus one extra symbol, the **blank** `_` ("no new
# token here"). A frame-level path $\pi \in \{\_, \ldots\}^T$ maps to a transcript by
# the **collapse** $\mathcal{B}$: merge repeated symbols, then drop the blanks. With
# the alphabet $\{\_, E, R, O\}$:
#
# $$
# \mathcal{B}(\texttt{\_ER\_RRR\_ORR}) = \texttt{ERROR}
# $$
#
# The blank between the two `R`s is what keeps them apart: `_ERRRRR_ORR` collapses to
# `EROR`.

# %%
#| export
def ctc_collapse(path: list[int], blank: int = 0) -> list[int]:
    """The CTC collapse B: merge repeated symbols, then drop blanks."""
    merged = [s for i, s in enumerate(path) if i == 0 or s != path[i - 1]]
    return [s for s in merged if s != blank]


# %%
alphabet = "_ERO"  # blank is symbol 0
encode = lambda text: [alphabet.index(c) for c in text]
decode = lambda ids: "".join(alphabet[i] for i in ids)
for path in ["_ER_RRR_ORR", "EERRR_ROOR_", "_ERRRRR_ORR", "ER_ROR"]:
    print(f"{path:>12} -> {decode(ctc_collapse(encode(path)))}")
assert decode(ctc_collapse(encode("_ER_RRR_ORR"))) == "ERROR"

# %% [markdown]
# CTC assumes the frames are conditionally independent given the input, so a path has
# probability $\prod_t p_t(\pi_t)$, where $p_t$ is the softmax output at frame $t$.
# The probability of a transcript $y$ sums over every path that collapses to it, and
# the loss is its negative log:
#
# $$
# P(y \mid X) = \sum_{\pi \in \mathcal{B}^{-1}(y)} \prod_{t=1}^{T} p_t(\pi_t),
# \qquad \mathcal{L}_\text{CTC} = -\log P(y \mid X)
# $$
#
# For a tiny case we can enumerate all $4^T$ paths: with $T = 7$ frames, there are
# 16,384 of them.

# %%
def ctc_brute_force(log_probs, target, blank=0):
    """-log P(y|X) by enumerating every path (tiny T and V only)."""
    T, V = log_probs.shape
    total, count = torch.tensor(0.0, dtype=log_probs.dtype), 0
    for path in itertools.product(range(V), repeat=T):
        if ctc_collapse(list(path), blank) == target:
            total = total + log_probs[torch.arange(T), list(path)].sum().exp()  # scalar
            count += 1
    return -total.log(), count


torch.manual_seed(0)
log_probs = torch.randn(7, 4, dtype=torch.float64).log_softmax(-1)  # (T, V)
brute, n_paths = ctc_brute_force(log_probs, encode("ERROR"))
print(f"{n_paths} of {4**7} paths collapse to ERROR; -log P = {brute.item():.6f}")

# %% [markdown]
# Enumeration grows as $V^T$; the **forward algorithm** does the same sum in
# $O(T \cdot U)$. Write the target with a blank before, between and after its tokens,
# the **extended label sequence** $y'$ of length $S = 2U + 1$:
# `ERROR` $\to$ `_E_R_R_O_R_`. Every valid path walks through $y'$ from left to right,
# one state per frame: it stays, moves one state on, or skips a blank, a skip
# being allowed only into a token that differs from the token two states back (the
# blank between the two `R`s cannot be skipped). The forward variable
# $\alpha_t(s)$, the total probability of all path prefixes that end in state $s$ at
# frame $t$, obeys
#
# $$
# \alpha_t(s) = \Big(\alpha_{t-1}(s) + \alpha_{t-1}(s-1)
#   + [\,y'_s \ne \_ \,\wedge\, y'_s \ne y'_{s-2}\,]\; \alpha_{t-1}(s-2)\Big)\, p_t(y'_s)
# $$
#
# starting from $\alpha_1(1) = p_1(\_)$, $\alpha_1(2) = p_1(y_1)$, and a path must end
# in the last token or the final blank: $P(y \mid X) = \alpha_T(S) + \alpha_T(S-1)$.
# Products of hundreds of probabilities underflow, so we work with $\log \alpha$:
# products become sums and sums become `logsumexp`.

# %%
#| export
def extend_with_blanks(target: torch.Tensor, blank: int = 0) -> torch.Tensor:
    """The extended label sequence y' = (_, y1, _, y2, ..., yU, _) of length 2U+1."""
    ext = torch.full((2 * len(target) + 1,), blank, dtype=torch.long)  # (S,)
    ext[1::2] = target  # (S,)
    return ext


def ctc_trellis(log_probs: torch.Tensor, target: torch.Tensor, blank: int = 0) -> torch.Tensor:
    """The forward variables log alpha_t(s) of one utterance: log_probs (T, V) -> (T, S)."""
    ext = extend_with_blanks(target, blank)  # (S,)
    emit = log_probs[:, ext]  # (T, S): log p_t(y'_s)
    can_skip = torch.zeros(len(ext), dtype=torch.bool)  # (S,)
    can_skip[2:] = (ext[2:] != blank) & (ext[2:] != ext[:-2])
    alpha = torch.full_like(emit, -math.inf)  # (T, S)
    alpha[0, :2] = emit[0, :2]
    for t in range(1, len(emit)):
        stay = alpha[t - 1]  # (S,)
        step = F.pad(alpha[t - 1, :-1], (1, 0), value=-math.inf)  # (S,): from s-1
        skip = F.pad(alpha[t - 1, :-2], (2, 0), value=-math.inf)  # (S,): from s-2
        skip = skip.masked_fill(~can_skip, -math.inf)  # (S,)
        alpha[t] = torch.logsumexp(torch.stack([stay, step, skip]), 0) + emit[t]  # (S,)
    return alpha


# %%
alpha = ctc_trellis(log_probs, torch.tensor(encode("ERROR")))  # (T, S)
forward = -torch.logaddexp(alpha[-1, -1], alpha[-1, -2])  # scalar
library = F.ctc_loss(
    log_probs[:, None],
    torch.tensor([encode("ERROR")]),  # (T, B=1, V) layout
    torch.tensor([7]),
    torch.tensor([5]),
    reduction="sum",
)
print(
    f"brute force {brute.item():.6f} | forward algorithm {forward.item():.6f} | "
    f"F.ctc_loss {library.item():.6f}"
)
diff = max(abs(forward - brute).item(), abs(forward - library).item())
print(f"max abs diff {diff:.0e}")
assert diff < 1e-9

# %% [markdown]
# The same recursion with every probability set to 1 *counts* the paths (a check on the
# transition rule, not only on the arithmetic), and on a longer utterance the trellis
# shows where the probability flows. Below, 11 frames whose outputs favour the path
# `_ER_RRR_ORR`: the bright cells follow it, and the cells a valid path can never reach
# (top right, bottom left) stay empty.

# %% mystnb={"figure": {"caption": "The CTC trellis of `ERROR` over 11 frames whose outputs favour the path `_ER_RRR_ORR`: colour is the log forward variable $\\log \\alpha_t(s)$, white marks states no valid path reaches, and the white line is the favoured path.", "name": "fig-ch04-ctc-trellis"}, "image": {"alt": "A heat map of frames against the 11 states of the extended label sequence; a bright band climbs from bottom left to top right along a white path line, and the top-left and bottom-right corners are empty."}}
# (T, S)
counted = ctc_trellis(torch.zeros(7, 4, dtype=torch.float64), torch.tensor(encode("ERROR")))
n_counted = round(torch.logaddexp(counted[-1, -1], counted[-1, -2]).exp().item())
print("paths counted by the recursion:", n_counted)
assert n_counted == n_paths

torch.manual_seed(0)
path = encode("_ER_RRR_ORR")
logits = 0.5 * torch.randn(11, 4) + 3 * F.one_hot(torch.tensor(path), 4)  # (T, V)
alpha = ctc_trellis(logits.log_softmax(-1), torch.tensor(encode("ERROR")))  # (T, S)
states = [0, 1, 3, 4, 5, 5, 5, 6, 7, 9, 9]  # where `_ER_RRR_ORR` sits in `_E_R_R_O_R_`

fig, ax = plt.subplots(figsize=(6, 4))
image = ax.imshow(
    alpha.T.masked_fill(alpha.T.isinf(), float("nan")).numpy(),
    origin="lower",
    cmap="viridis",
    aspect="auto",
)
ax.plot(range(11), states, "w.-", label="path _ER_RRR_ORR")
ax.set_yticks(range(11), list("_E_R_R_O_R_"))
ax.set_xticks(range(11), list("_ER_RRR_ORR"))
ax.set(
    xlabel="frame t (the path's symbol)",
    ylabel="state s of y'",
    title=r"CTC trellis: $\log \alpha_t(s)$",
)
fig.colorbar(image, ax=ax, label=r"$\log \alpha_t(s)$ (nats; white: unreachable)")
ax.legend(loc="upper left", facecolor="0.6")  # top left: unreachable states, no data
plt.show()

# %% [markdown]
# **The batched loss.** Training needs the loss of a padded batch: log-probabilities
# $(B, T, V)$ with lengths $T_b$, and padded targets $(B, U)$ with lengths $U_b$. The
# recursion runs over time once for the whole batch, vectorised over utterances and
# states; an utterance's $\alpha$ stops changing after its last frame, and its end
# states $2U_b$ and $2U_b - 1$ are picked per utterance. Two practical details: a large
# negative number stands in for $\log 0$ (a true $-\infty$ makes `logsumexp`'s gradient
# `nan` on unreachable states), and the reductions follow `F.ctc_loss` (`"mean"` divides
# each loss by its target length, then averages over the batch). Unlike `F.ctc_loss`,
# which wants $(T, B, V)$, ours takes the batch-first layout the encoder produces.

# %%
#| export
_LOG_ZERO = -1e30  # log 0 that keeps gradients finite


def ctc_loss(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    input_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int = 0,
    reduction: str = "mean",
) -> torch.Tensor:
    """CTC loss by the forward algorithm in log space; log_probs (B, T, V), targets (B, U)."""
    B, T, V = log_probs.shape
    valid = torch.arange(targets.size(1), device=targets.device) < target_lengths[:, None]  # (B, U)
    # (B, S)
    ext = torch.full((B, 2 * targets.size(1) + 1), blank, dtype=torch.long, device=targets.device)
    ext[:, 1::2] = targets.masked_fill(~valid, blank)  # (B, S)
    can_skip = F.pad((ext[:, 2:] != blank) & (ext[:, 2:] != ext[:, :-2]), (2, 0))  # (B, S)
    emit = log_probs.gather(2, ext.unsqueeze(1).expand(B, T, -1))  # (B, T, S)
    alpha = F.pad(emit[:, 0, :2], (0, ext.size(1) - 2), value=_LOG_ZERO)  # (B, S)
    for t in range(1, T):
        step = F.pad(alpha[:, :-1], (1, 0), value=_LOG_ZERO)  # (B, S)
        # (B, S)
        skip = F.pad(alpha[:, :-2], (2, 0), value=_LOG_ZERO).masked_fill(~can_skip, _LOG_ZERO)
        new = torch.logsumexp(torch.stack([alpha, step, skip]), 0) + emit[:, t]  # (B, S)
        alpha = torch.where((t < input_lengths)[:, None], new, alpha)  # (B, S)
    end = 2 * target_lengths[:, None]  # (B, 1)
    last = alpha.gather(1, end).squeeze(1)  # (B,)
    # (B,)
    before = (
        alpha.gather(1, (end - 1).clamp(min=0))
        .squeeze(1)
        .masked_fill(target_lengths == 0, _LOG_ZERO)
    )
    loss = -torch.logaddexp(last, before)  # (B,)
    loss = loss.masked_fill(loss > -_LOG_ZERO / 2, math.inf)  # (B,): no valid path
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return (loss / target_lengths.clamp(min=1)).mean()


# %% [markdown]
# Check it against `F.ctc_loss` on random logits: batches with padding in both the frames
# and the targets, an empty target, repeated tokens, every reduction, and the gradients.
# One subtlety: compare the gradients with respect to the **logits**. PyTorch's
# `ctc_loss` backward returns a gradient for `log_probs` that is only correct once it has
# gone back through a `log_softmax` (its formula folds in the softmax); after the
# `log_softmax` the two agree exactly.

# %%
def compare_with_torch(seed, B=5, T=40, V=7, U=12, dtype=torch.float64):
    """Largest |ours - F.ctc_loss| over the three reductions, for loss and logit gradients."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype, requires_grad=True)  # (B, T, V)
    input_lengths = torch.randint(T // 2, T + 1, (B,), generator=g)  # (B,)
    input_lengths[0] = T
    # (B,)
    target_lengths = torch.randint(0, U + 1, (B,), generator=g).clamp(max=input_lengths // 2)
    targets = torch.randint(1, V, (B, U), generator=g)  # (B, U), padded with random tokens
    targets[1, :4] = torch.tensor([3, 3, 3, 3])  # repeats need blanks between them
    worst = 0.0
    for reduction in ["none", "sum", "mean"]:
        log_probs = logits.log_softmax(-1)  # (B, T, V)
        ours = ctc_loss(log_probs, targets, input_lengths, target_lengths, reduction=reduction)
        (g_ours,) = torch.autograd.grad(ours.sum(), logits)  # (B, T, V)
        log_probs = logits.log_softmax(-1)  # (B, T, V)
        ref = F.ctc_loss(
            log_probs.transpose(0, 1), targets, input_lengths, target_lengths, reduction=reduction
        )
        (g_ref,) = torch.autograd.grad(ref.sum(), logits)  # (B, T, V)
        worst = max(worst, (ours - ref).abs().max().item(), (g_ours - g_ref).abs().max().item())
    return worst


diff64 = max(compare_with_torch(seed) for seed in range(10))
diff32 = max(compare_with_torch(seed, dtype=torch.float32) for seed in range(10))
print(
    f"10 random batches, 3 reductions, losses and gradients: max abs diff {diff64:.0e} (float64), "
    f"{diff32:.0e} (float32)"
)
assert diff64 < 1e-10 and diff32 < 1e-4

# %% [markdown]
# ## The CTC head and greedy decoding
#
# The CTC head is one linear layer from the encoder width to the vocabulary (the blank
# included, at index 0), followed by a log-softmax:
#
# $$
# \log p_t = \operatorname{log\,softmax}(W h_t + b), \qquad W \in \mathbb{R}^{V \times D}
# $$
#
# Our `ctc_loss` equals PyTorch's, so for training the head uses `F.ctc_loss`, whose
# C++ kernel is much faster than a Python loop over frames; `zero_infinity=True` turns
# the loss of an utterance too short for its transcript into 0 instead of `inf`.

# %%
#| export
class CTCHead(nn.Module):
    """Linear map from encoder states to per-frame log-probabilities over tokens and blank."""

    def __init__(self, d_model: int, vocab_size: int, blank: int = 0):
        super().__init__()
        self.linear = nn.Linear(d_model, vocab_size)
        self.blank = blank

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (B, T, V) for encoder states h (B, T, D)."""
        return self.linear(h).log_softmax(-1)  # (B, T, V)

    def loss(
        self,
        h: torch.Tensor,
        lengths: torch.Tensor,
        targets: torch.Tensor,
        target_lengths: torch.Tensor,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """CTC loss of padded targets (B, U) given encoder states h (B, T, D) and lengths (B,)."""
        log_probs = self(h).transpose(0, 1)  # (T, B, V): the layout F.ctc_loss wants
        return F.ctc_loss(
            log_probs,
            targets,
            lengths,
            target_lengths,
            blank=self.blank,
            reduction=reduction,
            zero_infinity=True,
        )


# %% [markdown]
# **Greedy decoding** takes the most likely symbol at every frame and collapses the
# path: $\hat{y} = \mathcal{B}(\arg\max_k p_1(k), \ldots, \arg\max_k p_T(k))$. It is not
# the most likely *transcript* (that would sum over paths, as the loss does), but for a
# trained model whose frames are confident it is close, and it costs one `argmax`.

# %%
#| export
def ctc_greedy_decode(
    log_probs: torch.Tensor, lengths: torch.Tensor, blank: int = 0
) -> list[list[int]]:
    """Best symbol per frame, collapsed: log_probs (B, T, V), lengths (B,) -> ids per utterance."""
    best = log_probs.argmax(-1)  # (B, T)
    return [ctc_collapse(best[b, :n].tolist(), blank) for b, n in enumerate(lengths.tolist())]


# %%
paths = torch.tensor([encode("_ER_RRR_ORR"), encode("OO__RR_E_EE")])  # (B, T)
frames = F.one_hot(paths, 4).float().log_softmax(-1)  # (B, T, V): each frame favours one symbol
hypotheses = ctc_greedy_decode(frames, torch.tensor([11, 9]))  # the second: 2 padded frames
print("greedy decoding:", ", ".join(decode(ids) for ids in hypotheses))
assert [decode(ids) for ids in hypotheses] == ["ERROR", "ORE"]

# %% [markdown]
# ## Real speech through the encoder
#
# Until now the inputs were random numbers. Here are real ones: chapter 1's corpus and
# front end (fbank, LFR, CMVN with the training set's statistics), chapter 2's BPE
# tokenizer (200 tokens, the blank at index 0), and chapter 1's `collate`, which pads a
# few dev utterances into a batch with their lengths.

# %%
from paraformer_edu.corpus import build_corpus
from paraformer_edu.dataset import SpeechDataset, collate
from paraformer_edu.features import Frontend
from paraformer_edu.tokenizer import default_tokenizer

manifests = build_corpus()  # {split: manifest}: synthesised once (1-2 min), then cached
frontend = Frontend.fit(manifests["train"])  # fbank -> LFR -> CMVN, statistics of the training set
tokenizer = default_tokenizer(manifests["train"])  # chapter 2: BPE on the training transcripts
dev = SpeechDataset(manifests["dev"], frontend, encode=tokenizer.encode)
batch = collate([dev[i] for i in range(4)])
X, X_lengths = batch["features"], batch["feature_lengths"]  # (B, T, 560), (B,)
Y, Y_lengths = batch["targets"], batch["target_lengths"]  # (B, U), (B,)
print(f"features {tuple(X.shape)}, targets {tuple(Y.shape)}, vocabulary {tokenizer.vocab_size}")
for text, n, u in zip(batch["texts"], X_lengths.tolist(), Y_lengths.tolist()):
    print(f"{n:>4} frames = {n * frontend.frame_seconds:.2f} s, {u:>2} tokens: {text}")

# %% [markdown]
# The encoder of the previous section (untrained, evaluation mode) reads the batch. The
# padded-batch property holds on real features too. The figure shows the first
# utterance's input and output on the batch's time axis: 560 feature rows (seven stacked
# 80-bin fbank frames, ticks every 80: each black block, one slot tall, is a single
# 10 ms frame of espeak's digital silence inside a stack), the $D = 192$ rows of the
# untrained encoder's output, which shows little structure yet, and zeros in the
# padding after the utterance's last frame.

# %% mystnb={"figure": {"caption": "The first dev utterance of the batch on the batch's time axis: its 560 input features (seven stacked 80-bin fbank frames, after CMVN) and the 192 channels of the untrained encoder's output, both zero in the padding after the dashed line.", "name": "fig-ch04-real-features"}, "image": {"alt": "Two stacked heat maps sharing a frame axis. Top, 560 feature channels with structure over the first 24 frames and a few black vertical blocks of silence; bottom, 192 output channels with little structure. Both are a flat colour after the dashed line at frame 24."}}
with torch.no_grad():
    H, H_lengths = encoder(X, X_lengths)  # (B, T, D), (B,)
    alone = [
        encoder(X[b : b + 1, :n], X_lengths[b : b + 1])[0][0]
        for b, n in enumerate(X_lengths.tolist())
    ]
diff = max((H[b, :n] - alone[b]).abs().max().item() for b, n in enumerate(X_lengths.tolist()))
print(f"h {tuple(H.shape)}, lengths {', '.join(map(str, H_lengths.tolist()))}")
print(f"real batch vs one utterance at a time: max abs diff {diff:.0e}")
assert diff < 1e-4 and torch.equal(H_lengths, X_lengths)

b = 0
fig, axes = plt.subplots(
    2,
    1,
    figsize=(9, 5),
    sharex=True,
    layout="constrained",
    gridspec_kw={"height_ratios": [3, 1.4]},
)
for ax, data, title in [
    (axes[0], X[b], "input: LFR + CMVN features (560)"),
    (axes[1], H[b], "encoder output h (192)"),
]:
    image = ax.imshow(
        data.T.numpy(),
        origin="lower",
        aspect="auto",
        cmap="magma",
        vmin=-3,
        vmax=3,
        interpolation="nearest",
        extent=(-0.5, X.size(1) - 0.5, -0.5, data.size(1) - 0.5),
    )
    ax.axvline(X_lengths[b].item() - 0.5, color="w", ls="--", lw=1)
    ax.set(title=title, ylabel="channel")
axes[0].set_yticks([80 * k for k in range(8)])
axes[1].set_xlabel(
    f"frame (60 ms); dashed: the end of utterance {b} ({X_lengths[b].item()} frames), "
    f"padding after it"
)
fig.colorbar(image, ax=axes, shrink=0.8, label="value (unitless, clipped to ±3)")
plt.show()

# %% [markdown]
# **CTC on real tensors.** A CTC head for the 200-token vocabulary gives the untrained
# encoder's log-probabilities, and our `ctc_loss` and `F.ctc_loss` (through `CTCHead.loss`)
# agree on the padded batch, here exactly (the check allows float32 rounding, a
# relative $10^{-5}$). (The losses are large: an untrained head spreads its probability
# over all 200 tokens at every frame.)

# %%
torch.manual_seed(0)
head = CTCHead(config.d_model, tokenizer.vocab_size, blank=tokenizer.blank_id)
with torch.no_grad():
    log_probs = head(H)  # (B, T, V)
    # (B,)
    ours = ctc_loss(log_probs, Y, X_lengths, Y_lengths, blank=tokenizer.blank_id, reduction="none")
    library = head.loss(H, X_lengths, Y, Y_lengths, reduction="none")  # (B,): F.ctc_loss
diff = (ours - library).abs().max().item()
relative = diff / library.abs().max().item()
print_table(
    zip(range(len(ours)), ours.tolist(), library.tolist()),
    ["utterance", "CTC loss, ours", "F.ctc_loss"],
    formats={"CTC loss, ours": ".0f", "F.ctc_loss": ".0f"},
)
print(f"ours vs F.ctc_loss on the real batch: max abs diff {diff:.1e} (relative {relative:.0e})")
assert diff / library.abs().max().item() < 1e-5

# %% [markdown]
# **Does CTC fit this corpus?** A CTC path needs one frame per token plus one blank
# between equal neighbours (exercise 3). The front end and the tokenizer tell us both
# counts for all 8,000 training utterances without reading the audio (the frame count
# follows from the duration):

# %%
train = SpeechDataset(manifests["train"], frontend)
train_frames = torch.tensor(train.lengths)  # (N,): frames per utterance, from the durations
train_tokens = [tokenizer.encode(entry["text"]) for entry in train.entries]  # N lists of ids
repeats = torch.tensor([sum(p == q for p, q in zip(y[:-1], y[1:])) for y in train_tokens])  # (N,)
U_train = torch.tensor([len(y) for y in train_tokens])  # (N,)
frames_needed = (U_train + repeats) / train_frames  # (N,): the share of its frames a path needs
T_median, U_median = int(train_frames.median()), int(U_train.median())
print(
    f"{len(train_frames):,} training utterances: "
    f"median {T_median} frames ({T_median * 0.06:.1f} s), median {U_median} tokens"
)
print(
    f"tokens (+ blanks between repeats) per frame: mean {frames_needed.mean():.2f}, "
    f"99th percentile {frames_needed.quantile(0.99):.2f}, max {frames_needed.max():.2f}"
)
assert frames_needed.max() < 1

# %% [markdown]
# Every training utterance leaves CTC room: on average a path needs less than half of
# the frames, the densest utterance four fifths of them. That is the reason for BPE
# units at 60 ms frames: English *characters* run at about one per frame (chapter 1),
# more than CTC can emit on many utterances (exercise 3).

# %% [markdown]
# ## Size and speed
#
# **Where the parameters are.** A helper sums the parameters of each part: the
# attention's four projections, the FSMN memory, the feed-forward network, the
# LayerNorms, and the CTC head. The same encoder with `kernel_size=0` (Transformer
# layers) sits beside it for comparison.

# %%
#| export
def count_parameters(module: nn.Module, contains: str = "") -> int:
    """Number of parameters of a module whose name contains a substring ("" counts all)."""
    return sum(p.numel() for name, p in module.named_parameters() if contains in name)


# %%
vocab_size = tokenizer.vocab_size  # chapter 2's BPE vocabulary, the blank included
encoder = SANMEncoder(EncoderConfig())
transformer = SANMEncoder(EncoderConfig(kernel_size=0))
head = CTCHead(EncoderConfig().d_model, vocab_size)
parts = {
    "attention Q, K, V, out": "self_attn.linear",
    "FSMN memory": "memory",
    "feed-forward": "feed_forward",
    "LayerNorms": "norm",
}
rows = [
    [
        part,
        count_parameters(encoder.layers[0], key),
        count_parameters(encoder.layers[1], key),
        count_parameters(encoder, key),
        count_parameters(transformer, key),
    ]
    for part, key in parts.items()
]
n_head = count_parameters(head)
rows.append([f"CTC head (V={vocab_size})", None, None, n_head, n_head])
total, total_t = (
    count_parameters(encoder) + count_parameters(head),
    count_parameters(transformer) + count_parameters(head),
)
layer_totals = [count_parameters(encoder.layers[0]), count_parameters(encoder.layers[1])]
rows.append(["total", *layer_totals, total, total_t])
headers = ["part", "layer 0", "layer 1..5", "SAN-M", "Transformer"]
print_table(rows, headers, formats={h: "," for h in headers[1:]})
print(f"the memory blocks add {count_parameters(encoder, 'memory') / total_t:.2%} to the model")

# %% [markdown]
# **How the forward time grows with the input.** Self-attention compares every frame
# with every other one, $O(T^2 D)$; the projections, the memory and the feed-forward
# network are linear in $T$. At 60 ms per frame, typical utterances (a few seconds,
# well under 100 frames) sit in the linear regime; the quadratic term shows only for
# long inputs. The cell below times one utterance (batch 1, evaluation mode, no
# gradients) at lengths from 1.5 to 48 seconds on this machine's CPU, then the dev set's
# real utterances as they come, each alone, to place the corpus on the curve. Timings
# vary from run to run and machine to machine, so the cell's output is not checked
# (`NBVAL_IGNORE_OUTPUT`).

# %%
def time_forward(model, T, B=1, repeats=5, x=None):
    """Best wall time (s) of a few forward passes on B utterances of T frames (random unless x)."""
    x = torch.randn(B, T, model.config.d_input) if x is None else x  # (B, T, 560)
    lengths = torch.full((x.size(0),), x.size(1))  # (B,)
    times = []
    with torch.inference_mode():
        model(x, lengths)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(x, lengths)
            times.append(time.perf_counter() - start)
    return min(times)  # the least disturbed by whatever else runs on the machine


# %%
# NBVAL_IGNORE_OUTPUT
torch.manual_seed(0)
frames = [25, 50, 100, 200, 400, 800]
models = {
    "SAN-M": SANMEncoder(EncoderConfig()).eval(),
    "Transformer": SANMEncoder(EncoderConfig(kernel_size=0)).eval(),
}
for model in models.values():
    time_forward(model, 100)  # warm-up: the first calls pay for memory allocation
seconds = {name: [] for name in models}
for T in frames:
    for name, model in models.items():  # alternate, so both see the same machine state
        seconds[name].append(time_forward(model, T))
headers = ["frames", "audio (s)", "SAN-M (ms)", "Transformer (ms)", "SAN-M RTF"]
print_table(
    [
        [T, T * 0.06, 1000 * sanm, 1000 * plain, sanm / (T * 0.06)]
        for T, sanm, plain in zip(frames, seconds["SAN-M"], seconds["Transformer"])
    ],
    headers,
    formats=dict(zip(headers[1:], [".1f", ".1f", ".1f", ".4f"])),
)
real = [dev[i]["features"] for i in range(0, len(dev), 10)]  # (T_b, 560): 30 dev utterances
real_frames = [x.size(0) for x in real]
real_seconds = [time_forward(models["SAN-M"], x.size(0), x=x[None], repeats=3) for x in real]
rtf = sum(real_seconds) / (sum(real_frames) * 0.06)
print(
    f"{len(real)} dev utterances of {min(real_frames)}-{max(real_frames)} frames, one at a time:\n"
    f"  {1000 * sum(real_seconds) / len(real):.1f} ms each on average, real-time factor {rtf:.4f}"
)

# %% mystnb={"figure": {"caption": "Forward time of the untrained encoder on one utterance against its length, on a log-log scale: SAN-M and Transformer layers, a line linear in the length through the 3 s point, and the dev set's real utterances. Timings vary between runs and machines.", "name": "fig-ch04-forward-time"}, "image": {"alt": "A log-log plot of forward time in milliseconds against audio length from 1.5 to 48 seconds. Two rising curves stay close to the dotted linear line up to about 12 seconds and bend upwards beyond; crosses for dev utterances cluster between 1 and 4 seconds."}}
# NBVAL_IGNORE_OUTPUT
fig, ax = plt.subplots(figsize=(6, 3.5))
audio = [T * 0.06 for T in frames]
for name, times in seconds.items():
    ax.plot(audio, [1000 * t for t in times], "o-", label=name)
linear = [1000 * seconds["SAN-M"][1] * a / audio[1] for a in audio]
ax.plot(audio, linear, "k:", label="linear in T (from 3 s)")
ax.plot(
    [T * 0.06 for T in real_frames],
    [1000 * t for t in real_seconds],
    "x",
    color="C0",
    alpha=0.6,
    label="SAN-M, dev utterances",
)
ax.set(
    xscale="log",
    yscale="log",
    xlabel="audio length (s)",
    ylabel="forward time (ms)",
    title="Encoder forward time, batch 1, CPU",
)
ax.set_xticks(audio, [f"{a:g}" for a in audio])
ax.minorticks_off()
ax.legend(loc="lower right")  # the long, slow inputs sit top right
plt.show()

# %% [markdown]
# **Can it train on a 2-core CPU?** What limits the book is training: a forward pass,
# a backward pass (about twice the forward) and an optimiser step per batch, thousands
# of times. The cell below times one training step of the encoder and CTC head on a
# batch of 16 utterances of the training set's median length, for a few sizes. Our prototype (a
# 6-layer, $D = 192$ Transformer encoder with CTC, about 2.8 M parameters) reached a
# usable character error rate on about five hours of synthetic speech in 10 to 20
# minutes on this kind of machine; a model twice the size would need twice the time for
# the same number of updates.

# %%
def time_training_step(config, vocab_size, B=16, T=60, U=30, repeats=3):
    """Best wall time (s) of a few training steps (forward, CTC loss, backward, Adam)."""
    model, head = SANMEncoder(config).train(), CTCHead(config.d_model, vocab_size)
    optimizer = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-3)
    x, lengths = torch.randn(B, T, config.d_input), torch.full((B,), T)  # (B, T, 560), (B,)
    # (B, U), (B,)
    targets, target_lengths = torch.randint(1, vocab_size, (B, U)), torch.full((B,), U)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        h, h_lengths = model(x, lengths)  # (B, T, D)
        loss = head.loss(h, h_lengths, targets, target_lengths)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return min(times[1:])  # the first step allocates: skip it


# %%
# NBVAL_IGNORE_OUTPUT
torch.manual_seed(0)
sizes = {
    "small: 6 x 144": EncoderConfig(d_model=144, d_ffn=576),
    "default: 6 x 192": EncoderConfig(),
    "default, no dropout": EncoderConfig(dropout=0.0),
    "larger: 8 x 256": EncoderConfig(d_model=256, d_ffn=1024, n_layers=8),
}
rows = []
for name, cfg in sizes.items():
    step = time_training_step(cfg, vocab_size, T=T_median, U=U_median)
    n = count_parameters(SANMEncoder(cfg)) + cfg.d_model * vocab_size + vocab_size
    rows.append([name, n, 1000 * step, 16 / step])
print_table(
    rows,
    ["encoder", "parameters", "step (ms)", "utterances/s"],
    formats={"parameters": ",", "step (ms)": ".0f", "utterances/s": ".0f"},
)

# %% [markdown]
# ## Summary
#
# - The **FSMN memory block** adds to each value vector a learned per-channel weighted
#   sum of its neighbours, $m_t = v_t + \sum_{i=-5}^{5} a_i \odot v_{t+i}$: a depthwise
#   convolution without bias. It is masked before the convolution (padding must not
#   reach valid frames) and after it (valid frames must not leak into padding). Each
#   layer widens its window by 10 frames (0.6 s).
# - A **SAN-M layer** is pre-LN multi-head self-attention plus the memory of its values,
#   then a pre-LN feed-forward network. The encoder scales its 560-d LFR input by
#   $\sqrt{D}$, adds sinusoidal positions, and lets the first layer's projections map
#   560 to $D$ without a residual, as FunASR does. We use SAN-M because it is
#   Paraformer's encoder and because the memory buys local context for 0.4% of the
#   parameters; with `kernel_size=0` the same code is a Transformer encoder.
# - The book's default, `EncoderConfig()`: 6 layers, $D = 192$, 4 heads, feed-forward
#   768, kernel 11, dropout 0.1, about 2.9 M parameters with its CTC head; small enough
#   to train on a 2-core CPU, and its forward time is linear in the input length for
#   utterances of usual length.
# - **CTC** sums over all frame-level paths that collapse to the transcript. The forward
#   algorithm over the extended label sequence $y'$ does it in $O(TU)$, in log space;
#   ours equals `F.ctc_loss` in value and gradient. **Greedy decoding** takes the best
#   symbol per frame and collapses.
# - On **real speech** (chapter 1's features, chapter 2's BPE targets) the encoder maps
#   a padded batch (B, T, 560) to (B, T, 192) exactly as it maps each utterance alone,
#   our CTC loss equals `F.ctc_loss` on it, and every training utterance leaves CTC
#   room: BPE tokens need 45% of the 60 ms frames on average, at most 82%. A
#   dev utterance of a few seconds takes a few milliseconds to encode on a CPU.
#
# In `paraformer_edu.encoder`: `EncoderConfig`, `SANMEncoder`, `SANMEncoderLayer`,
# `SANMAttention`, `FSMNMemory`, `FeedForward`, `CTCHead`, `ctc_loss`, `ctc_trellis`,
# `extend_with_blanks`, `ctc_collapse`, `ctc_greedy_decode`, `count_parameters`.
# Chapter 5 reads the encoder's output $H$ with the CIF predictor to decide how many
# tokens the utterance holds, and where.
#
# ## Exercises
#
# 1. **The best path.** Replace `logsumexp` by `max` in the recursion and keep, for each
#    state, where its best predecessor was (stay, step or skip). Tracing back from the
#    better of the two end states gives the single most likely path, the Viterbi
#    alignment that forced aligners use. Find it for the trellis example above: which
#    path is it, and what does it collapse to?

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
def ctc_viterbi(log_probs, target, blank=0):
    """Most likely path through the CTC trellis, as the state index s of y' at every frame."""
    ext = extend_with_blanks(target, blank)  # (S,)
    emit = log_probs[:, ext]  # (T, S)
    can_skip = torch.zeros(len(ext), dtype=torch.bool)  # (S,)
    can_skip[2:] = (ext[2:] != blank) & (ext[2:] != ext[:-2])
    score = torch.full_like(emit, -math.inf)  # (T, S)
    back = torch.zeros(emit.shape, dtype=torch.long)  # (T, S): 0 stay, 1 step, 2 skip
    score[0, :2] = emit[0, :2]
    for t in range(1, len(emit)):
        step = F.pad(score[t - 1, :-1], (1, 0), value=-math.inf)  # (S,)
        # (S,)
        skip = F.pad(score[t - 1, :-2], (2, 0), value=-math.inf).masked_fill(~can_skip, -math.inf)
        best, back[t] = torch.stack([score[t - 1], step, skip]).max(0)  # (S,), (S,)
        score[t] = best + emit[t]  # (S,)
    s = len(ext) - 1 if score[-1, -1] >= score[-1, -2] else len(ext) - 2
    states = [s]
    for t in range(len(emit) - 1, 0, -1):
        s -= back[t, s].item()
        states.append(s)
    return states[::-1]


best_states = ctc_viterbi(logits.log_softmax(-1), torch.tensor(encode("ERROR")))
best_path = extend_with_blanks(torch.tensor(encode("ERROR")))[best_states].tolist()
print("best path", decode(best_path), "-> collapses to", decode(ctc_collapse(best_path)))
assert best_states == states and decode(ctc_collapse(best_path)) == "ERROR"

# %% [markdown]
# 2. **A memory that only looks back.** A streaming recognizer cannot wait for future
#    frames. `FSMNMemory(..., shift=s)` moves the window $s$ frames into the past (FunASR
#    calls it `sanm_shfit`). Choose the shift that makes an 11-frame memory causal, and
#    check with an impulse at frame 40 which frames' memories it reaches. Is the
#    encoder then causal?

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
causal = FSMNMemory(d_model=1, kernel_size=11, shift=5)  # window: 10 frames back, 0 ahead
print("padding (left, right):", causal.padding)
impulse = torch.zeros(1, 80, 1)  # (B, T, D)
impulse[0, 40] = 1.0
with torch.no_grad():
    reached = (
        causal(impulse, torch.ones(1, 80, dtype=torch.bool))[0, :, 0].nonzero().flatten().tolist()
    )
print("frames whose memory holds frame 40:", ", ".join(map(str, reached)))
assert reached == list(range(40, 51))
# Frames 40..50 remember frame 40, no earlier frame does: the memory is causal. The
# encoder is not: its self-attention still sees the whole utterance. A streaming
# encoder also needs a causal (or chunk-wise) attention mask.

# %% [markdown]
# 3. **How fast can CTC talk?** A path for $y$ needs one frame per token, plus one blank
#    between every two equal neighbours: at least $U + r$ frames, with $r$ the number of
#    adjacent repeats. Write `min_frames(y)`, and check that `ctc_loss` (and
#    `F.ctc_loss`) is finite with $T = U + r$ frames and infinite with one frame fewer,
#    for `ERROR` and a few random targets. At 60 ms per frame, what is the highest token
#    rate CTC can follow? English runs about 16 characters per second (spaces included).

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
def min_frames(target):
    """Fewest frames a CTC path for target needs: one per token, a blank per adjacent repeat."""
    return len(target) + sum(a == b for a, b in zip(target[:-1], target[1:]))


torch.manual_seed(0)
targets = [encode("ERROR")] + [torch.randint(1, 4, (n,)).tolist() for n in (3, 6, 9)]
for target in targets:
    n = min_frames(target)
    for T in (n - 1, n):
        log_probs = torch.randn(1, T, 4).log_softmax(-1)  # (B, T, V)
        args = (torch.tensor([target]), torch.tensor([T]), torch.tensor([len(target)]))
        ours = ctc_loss(log_probs, *args, reduction="sum").item()
        ref = F.ctc_loss(log_probs.transpose(0, 1), *args, reduction="sum").item()
        assert math.isinf(ours) == math.isinf(ref) == (T < n)
    print(f"{decode(target):<10} U={len(target)} needs {n} frames")
print(f"at most {1 / 0.06:.1f} tokens per second at 60 ms frames")
# One token per frame at most: 16.7 tokens/s, and fewer when tokens repeat. English
# characters (about 16/s) sit right at the limit, which is why the book recognises
# BPE units (about 7/s) at 60 ms frames.
