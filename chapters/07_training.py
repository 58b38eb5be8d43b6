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
# # Training the model
#
# Chapter 6 put the model together and showed that it can learn three utterances by
# heart. This chapter trains it on the whole corpus, on a laptop CPU, until it
# transcribes sentences it has never heard. Four things besides the model are needed,
# and each is built and checked here:
#
# - a **metric**: the character and word error rates (CER, WER) from an edit distance
#   written in the chapter, checked against `torchaudio` and `jiwer`;
# - a **recipe** written down as a YAML file, which every run reads and every
#   checkpoint stores, with dotted overrides from the command line;
# - a **training loop**: length-bucketed batches of cached features with SpecAugment,
#   Adam with warm-up, gradient clipping, each loss part logged, dev-set evaluations,
#   best and latest checkpoints, and a resume that continues exactly as if the run had
#   never stopped;
# - **checkpoints** that load safely (`torch.load(..., weights_only=True)`) and refuse,
#   with a clear message, to load into a model of another configuration.
#
# Then the live run: ten minutes of training on two CPU cores, its curves, and its
# error rates on the held-out splits; and the book's model, a larger model trained by
# a recipe of its own, for longer and on more speech, and committed to the repository,
# which later chapters load.
#
# ## Learning goals
#
# After this chapter you can
#
# - compute CER and WER by hand, with the substitution / deletion / insertion table of
#   one utterance, and check them against `jiwer` and `torchaudio.functional.edit_distance`;
# - write a training recipe as a configuration file and override any setting
#   (`training.lr=3e-4`) without touching code;
# - explain each part of Paraformer's loss while it trains: the decoder's cross-entropy,
#   the predictor's quantity loss, the encoder's CTC loss, and the GLM sampler's share;
# - save a checkpoint that resumes a run bit for bit, and prove it;
# - train a Paraformer that transcribes unseen sentences, and use it from Python
#   (`paraformer_edu.load_model(path).transcribe("speech.wav")`) and from the command line.

# %%
#| default_exp training
# In Colab, clone the repository first (this chapter reads its recipe, configs/, and the
# book's model, models/):
# # !git clone -q --depth 1 https://github.com/paraformer-edu/paraformer-edu
# # !pip install -q -e "./paraformer-edu[book]"
# # %cd paraformer-edu
# %matplotlib inline
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import jiwer
import matplotlib.pyplot as plt
import torch
import torchaudio

import paraformer_edu
from paraformer_edu.corpus import build_corpus, read_manifest
from paraformer_edu.display import book_style, listen, print_table
from paraformer_edu.tokenizer import default_tokenizer

book_style()
torch.manual_seed(0)
torch.set_num_threads(2)
print("paraformer_edu", paraformer_edu.__version__)

# %% [markdown]
# ## Measuring errors: the edit distance, CER and WER
#
# A recogniser's output is scored against the reference transcript by the **edit
# distance** (Levenshtein distance): the fewest substitutions $S$, deletions $D$ and
# insertions $I$ that turn the reference into the hypothesis. The table $D_{i,j}$ of the
# distances between the first $i$ reference units and the first $j$ hypothesis units
# obeys
#
# $$
# D_{i,0} = i, \quad D_{0,j} = j, \quad
# D_{i,j} = \min\bigl(D_{i-1,j-1} + [r_i \ne h_j],\; D_{i-1,j} + 1,\; D_{i,j-1} + 1\bigr),
# $$
#
# and the error rate over a test set is the total number of edits divided by the total
# number of reference units $N$:
#
# $$
# \text{ER} = \frac{S + D + I}{N}.
# $$
#
# With characters as units it is the **character error rate** (CER; spaces count, as in
# `jiwer.cer`), with words the **word error rate** (WER). Both can exceed 100%: a
# hypothesis can insert without limit. Walking the table back from its corner gives
# one alignment of minimum cost, which says which edit happened where.


# %%
#| export metrics
from typing import NamedTuple, Sequence


class Alignment(NamedTuple):
    """An edit-distance alignment: one (operation, reference unit, hypothesis unit) per step."""

    # op: "=" match, "S" substitution, "D" deletion, "I" insertion
    steps: list[tuple[str, str | None, str | None]]

    def counts(self) -> dict[str, int]:
        """Matches, substitutions, deletions and insertions of the alignment."""
        return {op: sum(step[0] == op for step in self.steps) for op in "=SDI"}


def edit_table(ref: Sequence, hyp: Sequence) -> list[list[int]]:
    """Levenshtein table D[i][j]: edits that turn ref[:i] into hyp[:j] (unit costs)."""
    D = [[j for j in range(len(hyp) + 1)]]
    for i in range(1, len(ref) + 1):
        row = [i]
        for j in range(1, len(hyp) + 1):
            row.append(
                min(
                    D[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]),  # match or substitution
                    D[i - 1][j] + 1,  # deletion of ref[i-1]
                    row[j - 1] + 1,
                )
            )  # insertion of hyp[j-1]
        D.append(row)
    return D

# %% [markdown]
# Walking the table back from its corner, preferring a match or substitution, then a
# deletion, then an insertion, gives one alignment of minimum cost:

# %%
#| export metrics
def align(ref: Sequence, hyp: Sequence) -> Alignment:
    """A minimum-edit alignment of hyp to ref, by walking the edit table back from its corner."""
    D, i, j, steps = edit_table(ref, hyp), len(ref), len(hyp), []
    while i > 0 or j > 0:
        if i > 0 and j > 0 and D[i][j] == D[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]):
            steps.append(("=" if ref[i - 1] == hyp[j - 1] else "S", ref[i - 1], hyp[j - 1]))
            i, j = i - 1, j - 1
        elif i > 0 and D[i][j] == D[i - 1][j] + 1:
            steps.append(("D", ref[i - 1], None))
            i -= 1
        else:
            steps.append(("I", None, hyp[j - 1]))
            j -= 1
    return Alignment(steps[::-1])


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Fewest substitutions, deletions and insertions that turn ref into hyp (two table rows)."""
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i]
        for j, h in enumerate(hyp, 1):
            current.append(min(previous[j - 1] + (r != h), previous[j] + 1, current[j - 1] + 1))
        previous = current
    return previous[-1]

# %% [markdown]
# Over a test set the edits are summed before dividing: a long utterance counts more
# than a short one, as in `jiwer`.

# %%
#| export metrics
def _corpus_rate(references: Sequence[str], hypotheses: Sequence[str], split) -> float:
    """Edits over all utterances divided by the reference units over all utterances."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    units = sum(len(split(ref)) for ref in references)
    if units == 0:
        raise ValueError(
            "the references are empty: an error rate needs at least one reference unit"
        )
    return sum(edit_distance(split(r), split(h)) for r, h in zip(references, hypotheses)) / units


def cer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Character error rate over a corpus: spaces count as characters (as in jiwer.cer)."""
    return _corpus_rate(references, hypotheses, list)


def wer(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Word error rate over a corpus: words are split at whitespace."""
    return _corpus_rate(references, hypotheses, str.split)


def sentence_accuracy(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Share of utterances recognised exactly."""
    if not references:
        raise ValueError("no utterances")
    return sum(r == h for r, h in zip(references, hypotheses, strict=True)) / len(references)

# %% [markdown]
# One example, with the table the edit distance fills in, and the alignment read back
# from it:

# %%
ref, hyp = "the cat sat", "a cat sat down"
table = edit_table(ref.split(), hyp.split())
print("      " + "".join(f"{w:>6}" for w in ["-", *hyp.split()]))
for word, row in zip(["-", *ref.split()], table):
    print(f"{word:>6}" + "".join(f"{d:>6}" for d in row))
alignment = align(ref.split(), hyp.split())
print()
print(f"{'op':<4}{'reference':<12}{'hypothesis':<12}")
for op, r, h in alignment.steps:
    print(f"{op:<4}{r or '-':<12}{h or '-':<12}")
print(
    ", ".join(f"{op} {n}" for op, n in alignment.counts().items()),
    f"-> WER {wer([ref], [hyp]):.3f}",
)
assert alignment.counts() == {"=": 2, "S": 1, "D": 0, "I": 1} and wer([ref], [hyp]) == 2 / 3

# %% [markdown]
# The same on characters: "the" against "a" costs three edits (one substitution and
# two deletions), and the appended " down" five insertions.

# %%
counts = align(list(ref), list(hyp)).counts()
print(
    ", ".join(f"{op} {n}" for op, n in counts.items()),
    f"-> CER {cer([ref], [hyp]):.3f} = {counts['S'] + counts['D'] + counts['I']} / {len(ref)}",
)
assert counts["S"] + counts["D"] + counts["I"] == edit_distance(ref, hyp) == 8

# %% [markdown]
# **Check against the references.** `torchaudio.functional.edit_distance` computes the
# distance of two sequences, and `jiwer` the corpus-level WER and CER. On 300 random
# pairs of sentences from the corpus, with random edits applied, all agree exactly:

# %%
manifests = build_corpus()
texts = [paraformer_edu.normalize_text(e["text"]) for e in read_manifest(manifests["dev"])]
g = torch.Generator().manual_seed(0)


def corrupt(text: str) -> str:
    """The text with a few random character substitutions, deletions and insertions."""
    chars = list(text)
    for _ in range(int(torch.randint(0, 6, (1,), generator=g))):
        i, kind = (
            int(torch.randint(0, len(chars), (1,), generator=g)),
            int(torch.randint(0, 3, (1,), generator=g)),
        )
        letter = "abcdefghijklmnopqrstuvwxyz "[int(torch.randint(0, 27, (1,), generator=g))]
        chars[i : i + 1] = [letter] if kind == 0 else [] if kind == 1 else [letter, chars[i]]
    return " ".join("".join(chars).split()) or "a"


hyps = [corrupt(t) for t in texts]
ours_distance = [edit_distance(r, h) for r, h in zip(texts, hyps)]
torchaudio_distance = [torchaudio.functional.edit_distance(r, h) for r, h in zip(texts, hyps)]
words_distance = [edit_distance(r.split(), h.split()) for r, h in zip(texts, hyps)]
torchaudio_words = [
    torchaudio.functional.edit_distance(r.split(), h.split()) for r, h in zip(texts, hyps)
]
char_diffs = sum(a != b for a, b in zip(ours_distance, torchaudio_distance))
word_diffs = sum(a != b for a, b in zip(words_distance, torchaudio_words))
print(
    f"edit distance vs torchaudio: {char_diffs} differences "
    f"in {len(texts)} pairs (characters), {word_diffs} (words)"
)
print(f"CER ours {cer(texts, hyps):.6f} | jiwer {jiwer.cer(texts, hyps):.6f}")
print(f"WER ours {wer(texts, hyps):.6f} | jiwer {jiwer.wer(texts, hyps):.6f}")
assert ours_distance == torchaudio_distance and words_distance == torchaudio_words
assert (
    abs(cer(texts, hyps) - jiwer.cer(texts, hyps)) < 1e-12
    and abs(wer(texts, hyps) - jiwer.wer(texts, hyps)) < 1e-12
)

# %% [markdown]
# We report a third number beside CER and WER, the **sentence accuracy**: the share of
# utterances recognised exactly. It is harsh (one wrong letter fails a sentence), and it
# shows what an error rate hides: whether the errors are spread thin or piled up.

# %% [markdown]
# ## The recipe as a file
#
# A training run is decided by some forty numbers: the model's sizes (chapter 6's
# `ParaformerConfig`, with chapter 4's `EncoderConfig` inside), the data (which corpus,
# how many frames per batch, SpecAugment) and the optimisation (learning rate, warm-up,
# clipping, budget). We keep them in one frozen dataclass, `Config`, with three
# sections, read from a YAML file in which every key is optional (a missing key takes
# its default) and every key can be overridden from the command line as
# `section.key=value`. A misspelt key or a value of the wrong type is refused by name,
# not silently ignored: a typo in `training.lr` must not train with the default.


# %%
#| export config
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from paraformer_edu.corpus import CORPUS_CONFIGS, build_corpus, corpus_config
from paraformer_edu.model import ParaformerConfig


@dataclass(frozen=True)
class DataConfig:
    """Which corpus, tokenizer and batches to train on."""

    # a name of paraformer_edu.corpus.CORPUS_CONFIGS, or a folder holding train.jsonl and
    # dev.jsonl (chapter 11 writes them from real corpora)
    corpus: str = "book"
    max_frames: int = 4000  # padded encoder frames per batch (about 60 utterances of 4 s)
    accumulate: int = 1  # pieces a batch is split into, one after the other (chapter 11)
    features_on_disk: bool = False  # memory-mapped features, for corpora larger than memory
    spec_augment: bool = True
    # the step from which SpecAugment is applied (early steps learn faster without)
    spec_augment_from: int = 0
    cmvn_utterances: int = 1000  # training utterances whose features give the CMVN statistics


def training_manifests(corpus: str) -> dict:
    """{split: manifest} of a corpus name (synthesised, cached) or a folder of JSON lines."""
    folder = Path(corpus)
    if corpus not in CORPUS_CONFIGS and folder.is_dir():
        missing = [s for s in ("train", "dev") if not (folder / f"{s}.jsonl").exists()]
        if missing:
            raise ValueError(f"{folder} has no {', '.join(missing)}.jsonl (chapter 11: prepare)")
        return {p.stem: p for p in sorted(folder.glob("*.jsonl"))}
    return build_corpus(corpus_config(corpus))

# %% [markdown]
# The optimisation and the budget:

# %%
#| export config
@dataclass(frozen=True)
class TrainingConfig:
    """The optimiser, its schedule and the budget of a training run."""

    lr: float = 2e-3  # peak learning rate, reached at the end of the warm-up
    warmup_steps: int = 300
    grad_clip: float = 5.0
    max_minutes: float = 10.0  # wall-time budget of the training loop; 0 = none
    max_steps: int = 0  # step budget; 0 = none (the run stops at the first budget reached)
    eval_every: int = 250  # steps between dev evaluations (and checkpoints)
    eval_utterances: int = 300  # dev utterances scored at each evaluation
    log_every: int = 25  # steps between log lines
    seed: int = 0
    device: str = "auto"  # auto = cuda when available, else cpu
    threads: int = 2  # CPU threads (torch.set_num_threads)
    precision: str = "auto"  # auto = bfloat16 autocast on a GPU that has it, else float32
    phoneme_ctc: float = 0.0  # weight of the auxiliary phoneme CTC loss; 0 = none
    phoneme_layer: int = 0  # the encoder layer it reads, 1..n_layers; 0 = the middle one
    keep_checkpoints: int = 0  # keep the weights of the last N evaluations, to average; 0 = none


@dataclass(frozen=True)
class Config:
    """A whole training recipe: model, data and training settings."""

    model: ParaformerConfig = field(default_factory=ParaformerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

# %% [markdown]
# Building a `Config` from a nested dict is where mistakes are caught: a key that no
# dataclass field has, or a value of the wrong type, names the setting and what it
# should be. YAML 1.1 reads `3e-4` (no dot) as a string, so a float setting also accepts
# a numeric string.

# %%
#| export config
def _build(cls, values: dict, prefix: str = ""):
    """An instance of dataclass cls from a nested dict; unknown keys and wrong types refused."""
    if not isinstance(values, dict):
        raise ValueError(
            f"setting {prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown setting {prefix}{unknown[0]}; the settings of "
            f"{prefix.rstrip('.') or 'the config'} are: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in values.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, value, f"{prefix}{name}.")
        elif kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            # YAML 1.1 reads 3e-4 (no dot) as a string
            kwargs[name] = _as_float(value, f"{prefix}{name}")
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"setting {prefix}{name} must be {kind.__name__}, got {value!r}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _as_float(value, name: str) -> float:
    """A float setting from an int or a numeric string."""
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"setting {name} must be float, got {value!r}") from None

# %% [markdown]
# Overrides are dotted paths, `section.key=value`, the value read as YAML; the flat
# view of a configuration uses the same paths.

# %%
#| export config
def config_to_dict(config) -> dict:
    """The nested dict (YAML-ready) of a configuration."""
    return dataclasses.asdict(config)


def flat_settings(values: dict, prefix: str = "") -> dict:
    """The dotted settings of a nested dict: {'model.encoder.n_layers': 4, ...}."""
    flat = {}
    for key, value in values.items():
        flat.update(
            flat_settings(value, f"{prefix}{key}.")
            if isinstance(value, dict)
            else {prefix + key: value}
        )
    return flat


def apply_override(values: dict, override: str) -> dict:
    """Set one dotted 'section.key=value' (the value read as YAML) in a nested dict, in place."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ValueError(
            f"override {override!r} is not of the form section.key=value (e.g. training.lr=3e-4)"
        )
    *path, last = key.strip().split(".")
    node = values
    for part in path:
        node = node.setdefault(part, {})
    node[last] = yaml.safe_load(text)
    return values

# %% [markdown]
# Loading is then: the defaults, the file merged over them, the overrides on top, and
# one `_build` that checks everything.

# %%
#| export config
def load_config(path=None, overrides=()) -> Config:
    """The configuration of a YAML file (missing keys: defaults), dotted overrides applied."""
    values = config_to_dict(Config())
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        _merge(values, loaded)
    for override in overrides:
        apply_override(values, override)
    return _build(Config, values)


def _merge(base: dict, update: dict) -> None:
    """Merge the nested dict update into base, in place."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def config_from_dict(values: dict) -> Config:
    """A configuration from a nested dict, as written by config_to_dict."""
    return _build(Config, values)


def save_config(config: Config, path) -> None:
    """Write a configuration as YAML."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))

# %% [markdown]
# The chapter's recipe, the one the live run below trains with, lives in
# `configs/paraformer.yaml` (the book's model has a recipe of its own, shown later).
# It is read with an override, the way
# `python -m paraformer_edu train --override training.lr=3e-4` reads it:

# %%
ROOT = Path(paraformer_edu.__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "paraformer.yaml"
config = load_config(RECIPE)
tweaked = load_config(RECIPE, ["training.lr=3e-4", "model.encoder.n_layers=6"])
print(
    "lr",
    config.training.lr,
    "->",
    tweaked.training.lr,
    "| encoder layers",
    config.model.encoder.n_layers,
    "->",
    tweaked.model.encoder.n_layers,
)

defaults, recipe = flat_settings(config_to_dict(Config())), flat_settings(config_to_dict(config))
print("\nwhere the recipe differs from the code's defaults:")
changed = [key for key, value in recipe.items() if defaults[key] != value]
print_table(
    [(key, str(defaults[key]), str(recipe[key])) for key in changed],
    ["setting", "default", "recipe"],
)
print()
for bad in ["training.lr=fast", "training.lrate=3e-4", "model.encoder.n_layers=4.5", "training.lr"]:
    try:
        load_config(RECIPE, [bad])
    except ValueError as error:
        print(textwrap.fill(f"{bad!r:30} -> {error}", 100, subsequent_indent=" " * 34))
    else:
        raise AssertionError(f"{bad} was accepted")

# %% [markdown]
# ## Feeding the model fast: cached features
#
# On two CPU cores every second spent outside the model is a second not spent
# learning. Computing fbank and LFR for every utterance every time it is drawn would
# repeat the same work every epoch, so chapter 1's `SpeechDataset` reads the features
# that `cached_features` computed once per manifest and keeps as float16 (a float16
# log-mel energy is exact to about 0.01, far below what SpecAugment or the model's
# first layer notices). CMVN and SpecAugment stay on the fly: CMVN is one subtraction
# and division, and SpecAugment must draw new masks every epoch, from a generator
# seeded by (seed, epoch, utterance), so an epoch's augmented batches are the same in
# an interrupted and an uninterrupted run. The trainer needs a few small helpers
# besides: which device to use, moving a batch there, the front end's frame stacking
# (chapter 1's LFR, implied by the model's input size and frame shift: 7 mel frames
# every 60 ms give the encoder's 560 inputs), and the number format of the forward
# pass. On a GPU with bfloat16 (`training.precision: auto`), the forward pass
# runs under `torch.autocast`: matrix products in bfloat16, which a GPU's tensor cores
# run much faster than float32, while the weights, the optimiser and the gradients stay
# in float32. On a CPU, `auto` keeps float32: bfloat16 is slower than float32 on many
# CPUs and faster on those with bfloat16 matrix units (AMX), so measure before you opt in
# with `training.precision: bfloat16` (`python benchmarks/bench_training_step.py` prints
# the ratio on yours).

# %%
#| export
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from paraformer_edu.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from paraformer_edu.config import (
    Config,
    config_from_dict,
    config_to_dict,
    flat_settings,
    save_config,
    training_manifests,
)
from paraformer_edu.dataset import BucketBatchSampler, SpeechDataset, collate
from paraformer_edu.features import N_MELS, Frontend, SpecAugment
from paraformer_edu.inference import Recognizer
from paraformer_edu.metrics import cer, sentence_accuracy, wer
from paraformer_edu.model import Paraformer, ParaformerConfig
from paraformer_edu.phonemes import PhonemeCTC
from paraformer_edu.tokenizer import default_tokenizer


def choose_device(name: str = "auto") -> torch.device:
    """The device a setting names: 'auto' is cuda when available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def move_batch(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors on device."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def frame_settings(model: ParaformerConfig) -> dict:
    """The LFR stacking (lfr_m, lfr_n) that a model's input size and frame shift imply."""
    lfr_m, rest = divmod(model.encoder.d_input, N_MELS)  # mel frames stacked into one
    lfr_n = round(model.frame_shift / 0.01)  # 10-ms frames skipped between stacks
    if rest or lfr_m < 1 or lfr_n < 1 or not math.isclose(lfr_n * 0.01, model.frame_shift):
        raise ValueError(
            f"model.encoder.d_input={model.encoder.d_input} must be a multiple of {N_MELS} "
            f"and model.frame_shift={model.frame_shift} a multiple of 0.01 s "
            "(LFR stacks d_input / 80 mel frames every frame_shift): 560 and 0.06, 400 and 0.04"
        )
    return {"lfr_m": lfr_m, "lfr_n": lfr_n}


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """The forward pass's number format: 'auto' is bfloat16 on a GPU that has it, else float32."""
    if precision not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"training.precision={precision!r}: choose auto, float32 or bfloat16")
    if precision == "auto":  # bfloat16 in hardware: compute capability 8 (Ampere) or later
        cuda_bf16 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
        return "bfloat16" if cuda_bf16 else "float32"
    return precision


def autocast(device: torch.device, precision: str):
    """Mixed precision for the forward pass: bfloat16 matrix products if precision is 'bfloat16'."""
    enabled = precision == "bfloat16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)

# %% [markdown]
# The first call computes and stores the features of the training set (chapter 1
# already did, if it ran on this machine); every later call, in every later chapter,
# reads them back. The CMVN statistics come from the cached features of the first
# 1,000 training utterances, as in chapter 1:

# %%
start = time.perf_counter()
train_raw = paraformer_edu.features.cached_features(manifests["train"], paraformer_edu.Frontend())
first = time.perf_counter() - start
start = time.perf_counter()
train_raw = paraformer_edu.features.cached_features(manifests["train"], paraformer_edu.Frontend())
again = time.perf_counter() - start
frontend = paraformer_edu.Frontend.fit(manifests["train"])
wave = paraformer_edu.load_audio(read_manifest(manifests["train"])[0]["audio_filepath"])
diff = (frontend.raw(wave) - train_raw[0].float()).abs().max().item()
print(
    f"{len(train_raw)} utterances, {sum(len(x) for x in train_raw)} frames, "
    f"{sum(x.numel() for x in train_raw) * 2 / 2**20:.0f} MiB as float16"
)
print(f"cached features vs computed now: max abs diff {diff:.3f} (float16 rounding)")
assert diff < 0.02

# %%
# NBVAL_IGNORE_OUTPUT
print(
    f"features of the training set: {first:.1f} s (computed, or read if an earlier run cached them)"
)
print(f"read back in {again:.1f} s")

# %% [markdown]
# ## The learning rate: warm-up, then decay
#
# Transformers trained with Adam from a random start diverge if the first steps are
# large: the attention and LayerNorm statistics are not yet settled. The schedule of
# the Transformer paper {cite:p}`vaswani2017attention`, which FunASR keeps, rises
# linearly for $W$ warm-up steps and then decays as $1/\sqrt{s}$. Written with the peak
# learning rate $\eta$ reached at step $W$:
#
# $$
# \eta_s = \eta \, W^{0.5} \min\bigl(s^{-0.5},\; s \, W^{-1.5}\bigr).
# $$


# %%
#| export
def warmup_lr(step: int, peak_lr: float, warmup_steps: int) -> float:
    """Noam schedule: linear warm-up to peak_lr at step W, then decay as 1/sqrt(step)."""
    s = max(step, 1)
    return peak_lr * min(s / warmup_steps, math.sqrt(warmup_steps / s))


# %% mystnb={"figure": {"caption": "The learning rate of `warmup_lr` with a peak of 0.002 and 300 warm-up steps: a linear rise up to the dashed line, then a decay as 1/sqrt(step).", "name": "fig-ch07-warmup-lr"}, "image": {"alt": "A line chart of the learning rate against the training step: a straight rise from 0 to 0.002 at step 300, then a smooth fall to about 0.0005 at step 5,000."}}
steps = range(1, 5001)
fig, ax = plt.subplots(figsize=(6, 2.6))
ax.plot(steps, [warmup_lr(s, 2e-3, 300) for s in steps])
ax.axvline(300, color="gray", lw=0.8, ls="--")
ax.set(
    xlabel="training step",
    ylabel="learning rate",
    title="Warm-up to 2e-3 at step 300, then 1/sqrt(step)",
)
plt.tight_layout()
plt.show()
assert warmup_lr(300, 2e-3, 300) == 2e-3 and warmup_lr(1200, 2e-3, 300) == 1e-3
print(
    "peak at the end of the warm-up:",
    warmup_lr(300, 2e-3, 300),
    "| four times later, half of it:",
    warmup_lr(1200, 2e-3, 300),
)

# %% [markdown]
# ## Checkpoints
#
# A checkpoint is a plain dictionary of tensors, strings and numbers: the weights, the
# configuration as a nested dict, the vocabulary lines (chapter 2's file format) and the
# CMVN statistics, so that one file is all a user needs to transcribe. It is written to a
# temporary name and renamed, so an interrupted save never leaves a half-written file,
# and it is read with `torch.load(..., weights_only=True)`, which refuses to run code
# from the file. The book's committed model stores its weights in float16 (half the
# size; the model is rebuilt in float32 on loading).
#
# Loading checks what a user gets wrong: a file that is not a checkpoint, a truncated
# one, a model configuration other than the checkpoint's (resuming with a changed
# `model.encoder.n_layers`, say), weights that do not fit the model their own
# configuration describes (a checkpoint of another version of the code). Each gets a
# message that says what is wrong and what to do.


# %%
#| export checkpoint
import importlib.metadata
import os
from pathlib import Path

import torch

from paraformer_edu.config import Config, config_from_dict, config_to_dict, flat_settings
from paraformer_edu.features import Frontend
from paraformer_edu.model import Paraformer
from paraformer_edu.tokenizer import BPETokenizer, CharTokenizer

CHECKPOINT_FORMAT = "paraformer-edu checkpoint 1"


def _package_version() -> str:
    """The installed version of paraformer-edu, recorded in every checkpoint."""
    try:
        return importlib.metadata.version("paraformer-edu")
    # run from a source tree that was never installed
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message says why and what to do."""

# %% [markdown]
# Saving writes everything a user needs into one dictionary, atomically:

# %%
#| export checkpoint
def save_checkpoint(
    path,
    model: Paraformer,
    tokenizer,
    frontend: Frontend,
    config: Config,
    half: bool = False,
    **extra,
) -> None:
    """Write weights, configuration, vocabulary, CMVN statistics (and extra state) atomically."""
    weights = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    payload = {
        "format": CHECKPOINT_FORMAT,
        "package_version": _package_version(),
        "config": config_to_dict(config),
        "tokenizer": type(tokenizer).__name__,
        "vocab": tokenizer.vocab_lines(),
        "frontend": _frontend_state(frontend),
        "model": weights,
        **extra,
    }
    _save_atomically(payload, path)


def _save_atomically(payload: dict, path) -> None:
    """torch.save to a temporary name, then rename: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    torch.save(payload, partial)
    partial.replace(path)  # atomic: an interrupted save never leaves a corrupted checkpoint


def _frontend_state(frontend: Frontend) -> dict:
    """What rebuilds the front end: its sizes and the CMVN statistics."""
    return {
        "n_mels": frontend.n_mels,
        "lfr_m": frontend.lfr_m,
        "lfr_n": frontend.lfr_n,
        "cmvn_mean": frontend.cmvn.mean.clone(),
        "cmvn_std": frontend.cmvn.std.clone(),
    }


# %%
#| export checkpoint
def load_checkpoint(path) -> dict:
    """Read a checkpoint safely (weights_only: no code is run) and check that it is one of ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        if f.read(2) != b"PK":  # torch.save writes a zip archive
            raise CheckpointError(
                f"{path}: not a readable paraformer_edu checkpoint (not a PyTorch file at all)"
            )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    # UnpicklingError, RuntimeError, EOFError, KeyError...: a damaged or unsafe file
    except Exception as error:
        why = (
            "it holds objects other than tensors, refused for safety"
            if "Weights only" in str(error)
            else "the file is damaged: truncated, or modified after saving"
        )
        raise CheckpointError(
            f"{path}: not a readable paraformer_edu checkpoint ({why}); "
            "save it again with paraformer_edu.checkpoint.save_checkpoint"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path}: expected a {CHECKPOINT_FORMAT!r} file, found {found!r}; "
            "save checkpoints with paraformer_edu.checkpoint.save_checkpoint"
        )
    return payload


def tokenizer_from_lines(kind: str, lines: list[str]):
    """The tokenizer of a checkpoint, from its class name and vocabulary lines."""
    classes = {"BPETokenizer": BPETokenizer, "CharTokenizer": CharTokenizer}
    if kind not in classes:
        raise CheckpointError(
            f"unknown tokenizer {kind!r} in the checkpoint; expected one of {sorted(classes)}"
        )
    try:
        return classes[kind].from_lines(lines, source="the checkpoint's vocabulary")
    except ValueError as error:
        raise CheckpointError(str(error)) from None

# %% [markdown]
# Rebuilding the model checks the configuration, the vocabulary and the shape of every
# tensor before loading a single weight:

# %%
#| export checkpoint
def model_from_checkpoint(payload: dict, config: Config | None = None, model_class=None):
    """(model, tokenizer, frontend, config) from a checkpoint; config, if given, must match it."""
    kind = payload.get("kind", "paraformer")  # chapter 12's baselines record theirs
    if model_class is None and kind != "paraformer":
        raise CheckpointError(
            f"the checkpoint holds a {kind!r} model (chapter 12), not a Paraformer: load it with "
            "paraformer_edu.baselines.load_baseline, or evaluate it with --decoder"
        )
    stored = config_from_dict(payload["config"])
    if config is not None and config.model != stored.model:
        theirs, ours = flat_settings(config_to_dict(stored)), flat_settings(config_to_dict(config))
        ours = {k: v for k, v in ours.items() if k.startswith("model.")}
        diffs = [
            f"{k}: checkpoint {theirs[k]!r}, config {ours[k]!r}"
            for k in ours
            if theirs[k] != ours[k]
        ]
        raise CheckpointError(
            "the checkpoint was trained with another model configuration ("
            + "; ".join(diffs)
            + "). Use the checkpoint's own configuration, or train a new model."
        )
    tokenizer = tokenizer_from_lines(payload["tokenizer"], payload["vocab"])
    if tokenizer.vocab_size != stored.model.vocab_size:
        raise CheckpointError(
            f"the checkpoint's vocabulary has {tokenizer.vocab_size} tokens but its model "
            f"{stored.model.vocab_size}: the file is inconsistent"
        )
    model = (model_class or Paraformer)(stored.model)
    weights, expected = payload["model"], model.state_dict()
    misfits = [
        f"{k}: checkpoint {tuple(weights[k].shape) if k in weights else 'missing'}, model "
        f"{tuple(expected[k].shape) if k in expected else 'none'}"
        for k in sorted(set(weights) | set(expected))
        if k not in weights or k not in expected or weights[k].shape != expected[k].shape
    ]
    if misfits:
        raise CheckpointError(
            f"the checkpoint's weights do not fit the model its configuration describes "
            f"({len(misfits)} tensors, e.g. {misfits[0]}): it was written by another version "
            f"of the code (checkpoint: paraformer_edu {payload.get('package_version')}, installed: "
            f"{_package_version()})"
        )
    model.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    )
    f = payload["frontend"]
    frontend = Frontend(f["n_mels"], f["lfr_m"], f["lfr_n"])
    frontend.cmvn.mean.copy_(f["cmvn_mean"])
    frontend.cmvn.std.copy_(f["cmvn_std"])
    return model.eval(), tokenizer, frontend, stored

# %% [markdown]
# **Averaging checkpoints.** Late in a long run the learning rate is small and the
# weights wander around a minimum rather than descend into it. The mean of the last
# $K$ checkpoints,
#
# $$\bar\theta = \frac{1}{K} \sum_{k=1}^{K} \theta_k,$$
#
# sits nearer its centre than any one of them (FunASR and ESPnet release such averages).
# `training.keep_checkpoints: K` keeps the model weights of the last $K$ evaluations in
# `checkpoints/step-N.pt`; `average_checkpoints` (and `python -m paraformer_edu average`)
# writes their mean as a new checkpoint. Only checkpoints of one model can be averaged:
# the same configuration, vocabulary and CMVN statistics, which it checks first. The
# section "What pays" below measures whether it helps.

# %%
#| export checkpoint
def average_checkpoints(paths: list, out) -> dict:
    """Write the mean of several checkpoints' weights (one model's) to `out`; its payload."""
    if len(paths) < 2:
        raise CheckpointError(f"averaging needs two or more checkpoints, got {len(paths)}")
    payloads = [load_checkpoint(p) for p in paths]
    first = payloads[0]
    for path, other in zip(paths[1:], payloads[1:]):
        if not _same_model(first, other):
            raise CheckpointError(
                f"{path} and {paths[0]} hold different models (configuration, vocabulary, "
                "CMVN statistics or weight shapes): average checkpoints of one run"
            )
    n = len(payloads)  # the mean in float32, whatever precision the checkpoints store:
    weights = {k: sum(p["model"][k].float() for p in payloads) / n for k in first["model"]}
    last = payloads[-1]
    keep = ("format", "package_version", "config", "tokenizer", "vocab", "frontend", "kind")
    payload = {k: v for k, v in last.items() if k in keep}
    step = last.get("step", last.get("trainer", {}).get("step"))  # a model's, or a latest.pt's
    payload |= {"model": weights, "step": step, "averaged_from": [str(p) for p in paths]}
    _save_atomically(payload, out)
    return payload


def _same_model(a: dict, b: dict) -> bool:
    """Whether two checkpoints hold one model: configuration, vocabulary, CMVN, weight shapes."""
    shapes = [{k: v.shape for k, v in p["model"].items()} for p in (a, b)]
    return (
        a["config"]["model"] == b["config"]["model"]
        and a["vocab"] == b["vocab"]
        and a.get("kind", "paraformer") == b.get("kind", "paraformer")
        and all(torch.equal(a["frontend"][k], b["frontend"][k]) for k in ("cmvn_mean", "cmvn_std"))
        and shapes[0] == shapes[1]
    )

# %% [markdown]
# ## A second teacher for the encoder: phonemes
#
# The encoder learns from two signals: the decoder's cross-entropy, which reaches it
# through the predictor and the cross-attention, and the CTC loss on its output. Both
# speak in BPE units, whose spelling English pronounces loosely ("though", "through",
# "tough"). The synthesizer knows more than the spelling: espeak-ng can say which
# phonemes it speaks for a sentence (`espeak_TextToPhonemes`). An auxiliary CTC loss
# on an intermediate encoder layer $k$ asks that layer to predict them, a clean
# acoustic target that costs one small linear layer and is dropped after training:
#
# $$
# \mathcal{L}_\text{train} = \mathcal{L} + w_\text{ph}\,
#   \mathcal{L}_\text{CTC}\!\left(\text{softmax}(W\,\text{LN}(h^{(k)})),\ \text{phonemes}(y)\right)
# $$
#
# The lower layers learn the sounds; the layers above $k$ are left free to turn them
# into spelling. This is the intermediate-CTC idea of Lee and Watanabe (2021) with
# phonemes as its targets. The phonemes are espeak-ng's American English ones (IPA,
# stress marks dropped) whatever the voice's accent, so the targets are the words'
# dictionary pronunciation; any English transcript has them, a real corpus's too.

# %%
#| export phonemes
import ctypes
import functools

import torch
import torch.nn.functional as F
from torch import nn

from paraformer_edu.synthesis import _get_espeak
from paraformer_edu.tokenizer import normalize_text

# espeak-ng's en-us phonemes, most frequent first in WordNet's 33,239 example sentences
PHONEMES = (
    "n ɪ t ə s d ɹ l k ð z m ʌ ɛ p æ v iː h f w ɚ eɪ b ɐ aɪ i ᵻ uː ʃ oʊ ɑː ŋ ɡ ɾ ɜː əl j "
    "ɔːɹ dʒ ɔː aʊ ʊ tʃ ɑːɹ ɔ θ ɛɹ iə ɔɪ ɪɹ ʊɹ ʒ aɪɚ aɪə n̩ ʔ x r"
).split()
PHONEME_IDS = {p: i for i, p in enumerate(PHONEMES, start=1)}  # 0 is CTC's blank
OTHER_PHONEME = len(PHONEMES) + 1  # the id of a phoneme not in the list


@functools.cache
def espeak_phonemes(text: str) -> tuple[str, ...]:
    """The phonemes espeak-ng (en-us) speaks for text: IPA, one string each, no stress marks."""
    lib = _get_espeak().lib
    lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
    lib.espeak_TextToPhonemes.argtypes = [
        ctypes.POINTER(ctypes.c_char_p),
        ctypes.c_int,
        ctypes.c_int,
    ]
    lib.espeak_SetVoiceByName(b"en-us")
    buffer, phonemes = ctypes.c_char_p(text.encode()), []
    while buffer.value:  # one clause per call; the pointer moves on to the next
        # espeakCHARS_UTF8 = 1; mode: 2 = IPA, bits 8-23 the separator between phonemes
        clause = lib.espeak_TextToPhonemes(ctypes.byref(buffer), 1, 2 | ord(" ") << 8)
        phonemes += clause.decode().translate(str.maketrans("", "", "ˈˌ")).split()
    return tuple(phonemes)


def phoneme_targets(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """CTC targets of transcripts: the phoneme ids, concatenated (sum U,), and lengths (B,)."""
    spoken = [normalize_text(t) for t in texts]  # as the tokenizer reads them: no capitals
    ids = [[PHONEME_IDS.get(p, OTHER_PHONEME) for p in espeak_phonemes(t)] for t in spoken]
    flat = torch.tensor([i for row in ids for i in row], dtype=torch.long)  # (sum U,)
    return flat, torch.tensor([len(row) for row in ids], dtype=torch.long)  # (B,)

# %% [markdown]
# What espeak-ng says, and how well the list covers the book corpus's training
# sentences:

# %%
sentence = "She opened the window to let the fresh air in."
print(" ".join(espeak_phonemes(sentence)))
train_texts = [e["text"] for e in read_manifest(manifests["train"])]
flat, lengths = phoneme_targets(train_texts)  # (sum U,), (B,)
other = (flat == OTHER_PHONEME).float().mean().item()
per_second = lengths.sum().item() / sum(e["duration"] for e in read_manifest(manifests["train"]))
print(
    f"{len(train_texts)} training sentences: {len(flat)} phonemes, "
    f"{len(set(flat.tolist()))} kinds, outside the list {other:.3%}; {per_second:.1f} per second"
)
rows = flat.split(lengths.tolist())  # one (U_i,) per utterance
need = torch.tensor([len(r) + int((r[1:] == r[:-1]).sum()) for r in rows])  # (B,): a repeat
# needs a blank between; the encoder has one frame per 60 ms
frames = torch.tensor([e["duration"] / 0.06 for e in read_manifest(manifests["train"])])  # (B,)
short = (need > frames).float().mean().item()
print(f"CTC needs {need.sum() / frames.sum():.0%} of the frames; too few frames: {short:.2%}")
assert other < 1e-4 and short < 0.01

# %% [markdown]
# The head is a layer norm and a linear layer on the output of encoder layer $k$
# (counted from 1; 0 picks the middle one), which it reads through a forward hook, so
# the encoder's code does not change and the model a checkpoint stores is the same
# with or without it. The trainer owns the head, trains it with the model and leaves
# it out of `best.pt`: inference never runs it.

# %%
#| export phonemes
class PhonemeCTC(nn.Module):
    """A CTC head on encoder layer k that predicts the phonemes of the transcript."""

    def __init__(self, encoder: nn.Module, layer: int = 0):
        super().__init__()
        n = len(encoder.layers)
        k = layer or max(1, n // 2)  # 0: the middle layer
        if not 1 <= k <= n:
            raise ValueError(
                f"training.phoneme_layer={layer}: the encoder has {n} layers; "
                f"choose 1..{n}, or 0 for the middle one"
            )
        d = encoder.config.d_model
        self.k, self.norm, self.proj = k, nn.LayerNorm(d), nn.Linear(d, OTHER_PHONEME + 1)
        self.hidden = None
        # self.hook.remove() detaches the head from the encoder
        self.hook = encoder.layers[k - 1].register_forward_hook(self._keep)

    def _keep(self, module, args, out) -> None:
        """The forward hook: keep layer k's output (B, T, D) of a training pass."""
        self.hidden = out if module.training else None

    def loss(self, h_lengths: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """CTC loss of the phonemes of texts on the kept layer output (the encoder ran first)."""
        if self.hidden is None:
            raise RuntimeError(
                "PhonemeCTC.loss reads a training-mode pass of the encoder: run it first"
            )
        targets, lengths = phoneme_targets(texts)  # (sum U,), (B,)
        log_probs = self.proj(self.norm(self.hidden)).float().log_softmax(-1)  # (B, T, P)
        self.hidden = None
        return F.ctc_loss(
            log_probs.transpose(0, 1),  # (T, B, P)
            targets.to(log_probs.device),
            h_lengths,
            lengths.to(log_probs.device),
            zero_infinity=True,
        )

# %% [markdown]
# **Checks.** The hook keeps exactly what the first $k$ layers compute, and the phoneme
# loss trains those layers only: its gradient reaches layer $k$ and none above it.

# %%
from paraformer_edu.encoder import EncoderConfig, SANMEncoder

torch.manual_seed(0)
tiny_config = EncoderConfig(d_model=64, n_heads=2, n_layers=4, d_ffn=128, dropout=0.0)
tiny_encoder = SANMEncoder(tiny_config).train()
head = PhonemeCTC(tiny_encoder)  # the middle: layer 2
x, x_lengths = torch.randn(2, 50, 560), torch.tensor([50, 41])  # (B, T, 560), (B,)
tiny_encoder(x, x_lengths)
mask = torch.arange(50) < x_lengths[:, None]  # (B, T)
y = x.masked_fill(~mask[..., None], 0.0) * math.sqrt(64)  # (B, T, 560): the encoder's input
y = y + paraformer_edu.sinusoidal_positional_encoding(50, 560)
for layer in tiny_encoder.layers[: head.k]:
    y = layer(y, mask)  # (B, T, D)
kept = head.hidden  # (B, T, D)
print(f"kept output equals the first {head.k} layers': {torch.equal(kept, y)}")
loss = head.loss(x_lengths, ["the fresh air", "she opened the window"])
loss.backward()
reached = [any(p.grad is not None for p in layer.parameters()) for layer in tiny_encoder.layers]
print(f"phoneme CTC loss {loss.item():.2f}; gradient reaches layers {reached}")
assert torch.equal(kept, y) and reached == [True, True, False, False]

# %% [markdown]
# ## The trainer
#
# Everything a run needs is built from the configuration: the corpus and its
# manifests (chapter 1), the BPE tokenizer trained on the training transcripts
# (chapter 2), the cached features with CMVN, the length-bucketed batch sampler
# (at most `max_frames` padded frames per batch, so a batch of short utterances holds
# more of them), the model (chapter 6) and Adam with $\beta_2 = 0.98$ as in the
# Transformer recipe.
#
# One **training step** is chapter 6's forward pass, which returns the total loss
#
# $$
# \mathcal{L} = (1 - w_\text{ctc})\,\mathcal{L}_\text{CE} + w_\text{ctc}\,\mathcal{L}_\text{CTC}
#   + w_\text{MAE}\,\mathcal{L}_\text{MAE}
# $$
#
# and each of its parts (with `training.phoneme_ctc` set, the previous section's phoneme
# loss is added with that weight; Adam trains its head with the model, and `latest.pt`,
# not `best.pt`, stores it); then the backward pass, the gradients clipped to a global
# norm of 5 (a bad batch early on must not throw the weights away), and Adam's step with
# the scheduled learning rate. Every `log_every` steps the trainer writes the mean of each
# part, the first-pass accuracy, the GLM sampler's share of replaced tokens and the
# predictor's length error to `train_log.jsonl`; every `eval_every` steps it
# recognises the dev set (inference path: the predictor counts, the decoder reads),
# logs CER, WER, sentence accuracy and how often the token count is exact, and writes
# two checkpoints: `latest.pt` (everything needed to resume) and `best.pt` (the weights
# with the lowest dev CER so far).
#
# **Resuming exactly.** A resumed run must continue as if it had never stopped: same
# batches, same dropout masks, same GLM choices, same learning rate. So `latest.pt`
# holds, besides the weights, the optimiser's moments, the step, the epoch and the
# position inside it, and every random state: PyTorch's global generator (dropout) and
# the GLM sampler's. The batch order is a function of (seed, epoch) and SpecAugment's
# masks of (seed, epoch, utterance), so they need no state at all. A batch is drawn
# only when it is about to be trained on, so a run stopped by its time budget skips
# nothing when resumed.


# %%
#| export
@torch.no_grad()
def evaluate(
    model: Paraformer,
    dataset: SpeechDataset,
    tokenizer,
    max_utterances: int | None = None,
    max_frames: int = 8000,
    device: torch.device = torch.device("cpu"),
    search=None,
) -> dict:
    """CER, WER, sentence accuracy and token-count errors on (the first utterances of) a dataset."""
    was_training = model.training
    n = len(dataset) if max_utterances is None else min(max_utterances, len(dataset))
    items = [dataset[i] for i in range(n)]
    recognizer = Recognizer(model, tokenizer, dataset.frontend, device=device, search=search)
    start = time.perf_counter()
    transcripts = recognizer.recognize_features([it["features"] for it in items], max_frames)
    seconds = time.perf_counter() - start
    model.train(was_training)
    # the normalised transcripts
    references = [tokenizer.decode(it["targets"].tolist()) for it in items]
    hypotheses = [t.text for t in transcripts]
    length_errors = [len(t.tokens) - len(it["targets"]) for t, it in zip(transcripts, items)]
    audio_seconds = sum(dataset.entries[i]["duration"] for i in range(n))
    return {
        "cer": cer(references, hypotheses),
        "wer": wer(references, hypotheses),
        "sentence_accuracy": sentence_accuracy(references, hypotheses),
        "utterances": n,
        "length_exact": sum(e == 0 for e in length_errors) / n,
        "length_mae": sum(abs(e) for e in length_errors) / n,
        "rtf_model": seconds / audio_seconds,
        "references": references,
        "hypotheses": hypotheses,
    }


# %% [markdown]
# A class this size reads better in steps. The chapter writes the `Trainer` the way d2l
# does: the class with its constructor first, then its other methods in cells of their
# own, each attached to the class by `add_to_class` (in the package, the exporter writes
# them into the class body).

# %%
def add_to_class(cls):
    """Attach the decorated function to cls as a method; its name keeps its old value (or None)."""
    name = lambda method: getattr(method, "__func__", method).__name__  # noqa: E731
    return lambda method: setattr(cls, name(method), method) or globals().get(name(method))


# %% [markdown]
# The trainer is built up in steps. First what it holds: the data (chapter 1's
# `SpeechDataset` on cached features, CMVN fitted on the first training utterances,
# SpecAugment for the training set only), the tokenizer, the model, Adam, and the
# random state of the run. A run can also start from the weights of a checkpoint, the
# book's committed model say (`init`): its vocabulary and CMVN come with it, the
# optimiser and the warm-up start afresh, and its model configuration must be the
# recipe's. The trainer changes no global setting of the process that uses it: its
# thread count (on a CPU) and its random generator are switched in only while it
# trains or evaluates (`_scope`), and the caller's are put back afterwards.

# %%
#| export
class Trainer:
    """Trains a Paraformer: batches, warm-up, clipping, dev evaluations, checkpoints, resume."""

    kind = "paraformer"  # recorded in its checkpoints (chapter 12 trains other models)

    def __init__(self, config: Config, out_dir, manifests: dict | None = None, init=None):
        self.config, self.out_dir, t = config, Path(out_dir), config.training
        disk = config.data.features_on_disk
        self.device = choose_device(t.device)
        self.precision = resolve_precision(self.device, t.precision)
        if config.data.accumulate != 1 and type(self) is Trainer:
            raise ValueError("data.accumulate needs paraformer_edu.distributed (chapter 11)")
        if t.phoneme_ctc and type(self) is not Trainer:
            raise ValueError(
                "training.phoneme_ctc: only chapter 7's Trainer trains it; set it to 0"
            )
        self.manifests = manifests or training_manifests(config.data.corpus)
        # same model config
        start = model_from_checkpoint(load_checkpoint(init), config) if init else None
        self.tokenizer = (
            start[1]
            if start
            else default_tokenizer(self.manifests["train"], config.model.vocab_size)
        )
        if self.tokenizer.vocab_size != config.model.vocab_size:
            raise ValueError(
                f"BPE stopped at {self.tokenizer.vocab_size} tokens (the corpus ran out of pairs) "
                f"but model.vocab_size is {config.model.vocab_size}: "
                "choose a smaller model.vocab_size"
            )
        self.frontend = (
            start[2]
            if start
            else Frontend.fit(
                self.manifests["train"],
                config.data.cmvn_utterances,
                disk,
                **frame_settings(config.model),
            )
        )
        augment = SpecAugment() if config.data.spec_augment else None
        self.train_set = SpeechDataset(
            self.manifests["train"], self.frontend, self.tokenizer.encode, augment, t.seed, disk
        )
        self.dev_set = SpeechDataset(self.manifests["dev"], self.frontend, self.tokenizer.encode)
        self.sampler = BucketBatchSampler(
            self.train_set.lengths, config.data.max_frames, seed=t.seed
        )
        # devices whose generator the run owns
        self.cuda = [self.device] if self.device.type == "cuda" else []
        # the initial weights, the global generators untouched
        with torch.random.fork_rng(devices=self.cuda):
            torch.manual_seed(t.seed)
            self.model = Paraformer(config.model).to(self.device)
            # init: the checkpoint's weights, vocabulary and CMVN; a new optimiser and warm-up
            if start:
                self.model.load_state_dict(start[0].state_dict())
            # the auxiliary phoneme head: trained with the model, not part of it
            self.phoneme_ctc = (
                PhonemeCTC(self.model.encoder, t.phoneme_layer).to(self.device)
                if t.phoneme_ctc
                else None
            )
            self.rng_state = torch.get_rng_state()  # the run's own generators: dropout
            self.cuda_rng_state = torch.cuda.get_rng_state(self.device) if self.cuda else None
        head = [] if self.phoneme_ctc is None else list(self.phoneme_ctc.parameters())
        self.optimizer = torch.optim.Adam(
            [*self.model.parameters(), *head], lr=t.lr, betas=(0.9, 0.98), eps=1e-9
        )
        self.generator = torch.Generator().manual_seed(t.seed)  # the GLM sampler's choices
        self.step, self.epoch, self.batch_in_epoch, self.train_seconds = 0, 0, 0, 0.0
        self.log: list[dict] = []
        self.best_cer = math.inf

# %% [markdown]
# `_scope` is where the trainer's own thread count and random generators are switched
# in, and the caller's put back.


# %%
#| export
@add_to_class(Trainer)
@contextlib.contextmanager
def _scope(self):
    """The run's CPU threads and random generator while inside; the caller's restored after."""
    threads = torch.get_num_threads()
    if self.device.type == "cpu":
        torch.set_num_threads(self.config.training.threads)
    with torch.random.fork_rng(devices=self.cuda):
        torch.set_rng_state(self.rng_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_rng_state, self.device)
        try:
            yield
        finally:
            self.rng_state = torch.get_rng_state()
            self.cuda_rng_state = torch.cuda.get_rng_state(self.device) if self.cuda else None
            torch.set_num_threads(threads)


# %% [markdown]
# One training step, as described above, and the stream of batches: the rest of the
# current epoch, then the following epochs, each in the order its (seed, epoch) gives.

# %%
#| export
@add_to_class(Trainer)
def train_step(self, batch: dict) -> dict:
    """One optimiser step: forward (all loss parts), backward, clip, warm-up learning rate."""
    t = self.config.training
    self.step += 1
    lr = warmup_lr(self.step, t.lr, t.warmup_steps)
    for group in self.optimizer.param_groups:
        group["lr"] = lr
    b = move_batch(batch, self.device)
    with autocast(self.device, self.precision):
        out = self.model(
            b["features"], b["feature_lengths"], b["targets"], b["target_lengths"], self.generator
        )
        if self.phoneme_ctc is not None:  # the head read encoder layer k in the forward pass
            out["loss_phoneme"] = self.phoneme_ctc.loss(b["feature_lengths"], batch["texts"])
            out["loss"] = out["loss"] + t.phoneme_ctc * out["loss_phoneme"]
    self.optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    parameters = self.optimizer.param_groups[0]["params"]  # the model's and the head's
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, t.grad_clip)
    self.optimizer.step()
    return {
        "step": self.step,
        "lr": lr,
        "grad_norm": float(grad_norm),
        "utterances": len(batch["texts"]),
        **{k: float(v.detach()) for k, v in out.items()},
    }


@add_to_class(Trainer)
def batches(self):
    """The remaining batches of the current epoch, then of the following ones, forever."""
    while True:
        self.sampler.set_epoch(self.epoch)
        self.train_set.epoch = self.epoch
        for indices in self.sampler.batches()[self.batch_in_epoch :]:
            self.batch_in_epoch += 1
            # a function of the step
            self.train_set.augment = self.step >= self.config.data.spec_augment_from
            yield collate([self.train_set[i] for i in indices])
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0


@add_to_class(Trainer)
def evaluate(self, dataset=None, max_utterances: int | None = None) -> dict:
    """Score the model on the dev set (or another SpeechDataset)."""
    dataset = dataset or self.dev_set
    limit = max_utterances if max_utterances is not None else self.config.training.eval_utterances
    with self._scope():
        return evaluate(self.model, dataset, self.tokenizer, limit, device=self.device)


# %% [markdown]
# The loop: steps until a budget runs out (minutes of this run, or a total number of
# steps), a log line every `log_every` steps, an evaluation and checkpoints every
# `eval_every`, and a last evaluation at the end.

# %% [markdown]
# The log's `train_seconds` is the time spent in training steps, their batches' features
# included: the figure that steps per hour and the training-time columns of later chapters
# are computed from. A long run on a shared machine may be paused (`kill -STOP`, then
# `-CONT`) while something else runs; the wall clock would count the pause as training. A
# step counts its wall-clock time unless the process ran for less than half of it, then
# only the CPU time it got.

# %%
#| export
def step_seconds(wall: float, cpu: float) -> float:
    """Training time of one step: its wall-clock time, or its CPU time if it was mostly paused."""
    return cpu if wall > 1.0 and cpu < 0.5 * wall else wall


# %%
#| export
@add_to_class(Trainer)
def train(
    self, max_minutes: float | None = None, max_steps: int | None = None, progress: bool = False
) -> list:
    """Train until a budget runs out (minutes of this run, or total steps); evaluate, checkpoint."""
    t = self.config.training
    max_minutes = t.max_minutes if max_minutes is None else max_minutes
    max_steps = t.max_steps if max_steps is None else max_steps
    bar = tqdm(
        total=max_steps - self.step if max_steps else None,
        unit="step",
        file=sys.stderr,
        disable=not progress,
    )  # on for the command line; off in notebooks and tests
    start, window, batches = time.perf_counter(), [], self.batches()
    while not (max_steps and self.step >= max_steps) and not self._out_of_time(start, max_minutes):
        tick, cpu = time.perf_counter(), time.process_time()
        batch = next(batches)  # drawn only when it will be trained on: a resumed run skips nothing
        with self._scope():
            window.append(self.train_step(batch))
        wall, cpu = time.perf_counter() - tick, time.process_time() - cpu
        self.train_seconds += step_seconds(wall, cpu)  # a paused step counts its CPU time
        bar.update(1)
        if self.step % t.log_every == 0:
            self._log_train(window)
            window = []
        if self.step % t.eval_every == 0:
            self._evaluate_and_save()
    if window:
        self._log_train(window)
    if not self.log or self.log[-1].get("step") != self.step or "dev_cer" not in self.log[-1]:
        self._evaluate_and_save()
    bar.close()
    return self.log


@add_to_class(Trainer)
def _out_of_time(self, start: float, max_minutes: float) -> bool:
    """True once the loop started at `start` has run max_minutes (0: no time budget)."""
    return bool(max_minutes) and time.perf_counter() - start > 60 * max_minutes


# %% [markdown]
# What the loop writes: the mean of each logged value over the steps since the last
# line, and at each evaluation a dev row, `latest.pt` and, when dev CER improved,
# `best.pt`.

# %%
#| export
@add_to_class(Trainer)
def _log_train(self, window: list[dict]) -> None:
    """Append the mean of each logged value over the steps since the last line."""
    keys = (
        "loss",
        "loss_ce",
        "loss_quantity",
        "loss_ctc",
        "accuracy",
        "accuracy_first_pass",
        "glm_replaced",
        "grad_norm",
        *(["loss_phoneme"] if "loss_phoneme" in window[0] else []),
    )
    previous = [r["train_seconds"] for r in self.log if "loss" in r]
    # training time of the window's steps
    seconds = self.train_seconds - (previous[-1] if previous else 0.0)
    row = {
        "step": self.step,
        "epoch": self.epoch,
        "lr": window[-1]["lr"],
        "train_seconds": self.train_seconds,
        **{k: sum(w[k] for w in window) / len(window) for k in keys},
        "utterances_per_second": sum(w["utterances"] for w in window) / max(1e-9, seconds),
    }
    self.log.append(row)
    self._append_jsonl(row)


@add_to_class(Trainer)
def _evaluate_and_log(self) -> dict:
    """Evaluate on dev and append the scores to the log; the scores."""
    scores = self.evaluate()
    row = {
        "step": self.step,
        "epoch": self.epoch,
        "train_seconds": self.train_seconds,
        **{f"dev_{k}": v for k, v in scores.items() if not isinstance(v, list)},
    }
    self.log.append(row)
    self._append_jsonl(row)
    return scores


@add_to_class(Trainer)
def _evaluate_and_save(self) -> None:
    """Evaluate and log; save the latest checkpoint, the best (by dev CER), the last few kept."""
    scores = self._evaluate_and_log()
    self.save(self.out_dir / "latest.pt")
    model_only = (self.model, self.tokenizer, self.frontend, self.config)
    keep = self.config.training.keep_checkpoints
    if keep:  # model-only checkpoints of the last `keep` evaluations, for average_checkpoints
        kept = self.out_dir / "checkpoints"
        save_checkpoint(
            kept / f"step-{self.step:07d}.pt",
            *model_only,
            step=self.step,
            dev_cer=scores["cer"],
            kind=self.kind,
        )
        for old in sorted(kept.glob("step-*.pt"))[:-keep]:
            old.unlink()
    if scores["cer"] < self.best_cer:
        self.best_cer = scores["cer"]
        save_checkpoint(
            self.out_dir / "best.pt",
            *model_only,
            step=self.step,
            dev_cer=scores["cer"],
            kind=self.kind,
        )


@add_to_class(Trainer)
def _append_jsonl(self, row: dict) -> None:
    """Add one line to out_dir/train_log.jsonl."""
    self.out_dir.mkdir(parents=True, exist_ok=True)
    with open(self.out_dir / "train_log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


# %% [markdown]
# Saving and resuming: `latest.pt` holds everything the run needs to go on as if it had
# never stopped, and `resume` rebuilds the trainer from it. A run may be resumed with
# other settings (`--override training.threads=1`, or SpecAugment switched off): the log
# then gets a row at that step with each changed setting, before and after, so that the
# log tells the whole story of the run.

# %%
#| export
@add_to_class(Trainer)
def save(self, path) -> None:
    """A checkpoint that resumes exactly: weights, optimiser, data position, every random state."""
    save_checkpoint(
        path,
        self.model,
        self.tokenizer,
        self.frontend,
        self.config,
        trainer={
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "train_seconds": self.train_seconds,
            "best_cer": self.best_cer,
            "log": json.dumps(self.log),
            "rng": self.rng_state,
            "glm_rng": self.generator.get_state(),
            "cuda_rng": self.cuda_rng_state if self.cuda else [],
            "phoneme_ctc": {} if self.phoneme_ctc is None else self.phoneme_ctc.state_dict(),
            "phoneme_layer": 0 if self.phoneme_ctc is None else self.phoneme_ctc.k,
        },
        kind=self.kind,
    )
    # the recipe, readable beside its checkpoint
    save_config(self.config, Path(path).parent / "config.yaml")


@add_to_class(Trainer)
@classmethod
def resume(
    cls, path, out_dir=None, config: Config | None = None, manifests: dict | None = None
) -> "Trainer":
    """The trainer of a checkpoint written by save(), ready to go on as if it had never stopped."""
    payload = load_checkpoint(path)
    if "trainer" not in payload:
        raise ValueError(
            f"{path} holds a model but no training state (a best.pt?): resume from latest.pt"
        )
    stored = config_from_dict(payload["config"])
    # weights, vocabulary, CMVN
    trainer = cls(config or stored, out_dir or Path(path).parent, manifests, init=path)
    state = payload["trainer"]
    with_head = trainer.phoneme_ctc is not None
    if bool(state.get("phoneme_ctc")) != with_head:
        raise ValueError(
            f"{path} was trained with{'out' if with_head else ''} training.phoneme_ctc: resume "
            "with the run's own setting (no --config, or --override training.phoneme_ctc=...), "
            "or start a new run from its weights (train --init)"
        )
    if with_head:
        layer = state.get("phoneme_layer", trainer.phoneme_ctc.k)
        if layer != trainer.phoneme_ctc.k:
            raise ValueError(
                f"{path}'s phoneme head reads encoder layer {layer}, the recipe's layer "
                f"{trainer.phoneme_ctc.k}: resume with --override training.phoneme_layer={layer}"
            )
        trainer.phoneme_ctc.load_state_dict(state["phoneme_ctc"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.step, trainer.epoch, trainer.batch_in_epoch = (
        state["step"],
        state["epoch"],
        state["batch_in_epoch"],
    )
    trainer.train_seconds, trainer.best_cer, trainer.log = (
        state["train_seconds"],
        state["best_cer"],
        json.loads(state["log"]),
    )
    trainer.rng_state = state["rng"]
    trainer.generator.set_state(state["glm_rng"])
    if isinstance(state["cuda_rng"], torch.Tensor) and trainer.cuda:
        trainer.cuda_rng_state = state["cuda_rng"]
    log_file = trainer.out_dir / "train_log.jsonl"
    # rows logged after the checkpoint will be logged again: the file as it was then
    if log_file.exists():
        log_file.write_text("".join(json.dumps(row) + "\n" for row in trainer.log))
    trainer._log_changed_settings(payload["config"])
    return trainer


# %% [markdown]
# The row a resume with other settings adds to the log: every setting that differs from
# the stored configuration's, as `[before, after]` (a setting the stored configuration
# predates counts as its default). `tools/release_model.py` splits a released model's
# history at these rows, and chapter 8 marks them on its training curves.

# %%
#| export
@add_to_class(Trainer)
def _log_changed_settings(self, stored: dict) -> None:
    """Log the settings a resumed run changed ({setting: [before, after]}) at its step."""
    before = flat_settings(config_to_dict(config_from_dict(stored)))
    after = flat_settings(config_to_dict(self.config))
    changed = {k: [before.get(k), v] for k, v in after.items() if before.get(k) != v}
    if changed:  # the log tells from which step the run went on with other settings
        row = {"step": self.step, "resumed_with": changed}
        self.log.append(row)
        self._append_jsonl(row)


# %% [markdown]
# A trainer for the chapter's recipe, and one batch of what it feeds the model. The
# corpus, the tokenizer and the cached features all come from the cache, so this
# takes seconds:

# %%
RUNS = Path(os.environ.get("PARAFORMER_EDU_RUNS", ROOT / "runs"))
trainer = Trainer(config, RUNS / "chapter7-demo")
batch = next(trainer.batches())
print(
    f"{len(trainer.train_set)} training utterances in {len(trainer.sampler)} batches of at most "
    f"{config.data.max_frames} padded frames"
)
print("features", tuple(batch["features"].shape), "| targets", tuple(batch["targets"].shape))
print(f"parameters: {sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f} M")
row = trainer.train_step(batch)
print(
    "the first step's losses:",
    ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k.startswith("loss")),
)
assert all(math.isfinite(row[k]) for k in ("loss", "loss_ce", "loss_ctc", "loss_quantity"))

# %% [markdown]
# **What a step costs.** Two settings of the recipe are about speed on a CPU. Dropout
# draws a random mask for every activation it touches (`torch.bernoulli_`), which on a
# CPU costs about as much as the matrix products around it; the recipe turns it off
# and leaves regularisation to SpecAugment. And the recipe's model is smaller than the
# code's defaults (chapter 6's 192 x 6 encoder): 144 wide and 4 layers deep. The time
# of one training step on the same batch, for each. A timing depends on the machine
# and on what else it is doing, so this output is not compared when the chapter is
# re-run and nothing asserts on it; `benchmarks/bench_training_step.py` measures the
# same steps with more repetitions. On a quiet 2-core machine the recipe's step came
# out about three times faster than the defaults'.

# %%
# NBVAL_IGNORE_OUTPUT
def seconds_per_step(model_config, batch, steps=4) -> float:
    """Mean wall time of a training step (forward, backward, Adam) of a fresh model on one batch."""
    torch.manual_seed(0)
    model = paraformer_edu.Paraformer(model_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    args = (batch["features"], batch["feature_lengths"], batch["targets"], batch["target_lengths"])
    times = []
    for _ in range(steps + 1):  # the first step warms up the allocator
        start = time.perf_counter()
        optimizer.zero_grad()
        model(*args)["loss"].backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / steps


default_model = paraformer_edu.ParaformerConfig()
variants = {
    "code defaults (192 x 6), dropout 0.1": default_model,
    "same, dropout 0": replace(
        default_model, encoder=replace(default_model.encoder, dropout=0.0), decoder_dropout=0.0
    ),
    "the recipe (144 x 4), dropout 0": config.model,
}
timings = {name: seconds_per_step(model_config, batch) for name, model_config in variants.items()}
for name, seconds in timings.items():
    print(f"{name:<38} {seconds:.2f} s/step")
first, *_, last = timings.values()
print(f"the recipe's step is {first / last:.1f}x faster")

# %% [markdown]
# **Proof that resuming is exact.** Two runs of eight steps with the same recipe: one
# straight through, one stopped after four steps, saved, thrown away and resumed from
# its `latest.pt` in a new `Trainer`. If anything were missing from the checkpoint (a
# random state, the optimiser's moments, the position in the epoch), the weights
# after step eight would differ.

# %%
quick = load_config(RECIPE, ["training.eval_utterances=8", "training.eval_every=1000"])
with tempfile.TemporaryDirectory() as folder:
    straight = Trainer(quick, Path(folder) / "straight")
    straight.train(max_minutes=0, max_steps=8)
    interrupted = Trainer(quick, Path(folder) / "interrupted")
    interrupted.train(max_minutes=0, max_steps=4)
    del interrupted
    resumed = Trainer.resume(Path(folder) / "interrupted" / "latest.pt")
    print("resumed at step", resumed.step, "epoch", resumed.epoch, "batch", resumed.batch_in_epoch)
    resumed.train(max_minutes=0, max_steps=8)
a, b = straight.model.state_dict(), resumed.model.state_dict()
worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
losses = [[r["loss"] for r in t.log if "loss" in r] for t in (straight, resumed)]
identical = all(torch.equal(a[k], b[k]) for k in a)
print(f"after 8 steps: max abs diff of the weights {worst:.1e}, identical: {identical}")
assert all(torch.equal(a[k], b[k]) for k in a) and resumed.step == straight.step == 8

# %% [markdown]
# What a user gets wrong with checkpoints, and what they are told. The checkpoint of the
# run above is first copied, cut short, and replaced by a text file; then resumed with a
# configuration whose encoder has six layers instead of the recipe's four; then given
# weights from a model with another vocabulary size under its own configuration, as a
# checkpoint from another version of the code would be:

# %%
with tempfile.TemporaryDirectory() as folder:
    good = Path(folder) / "latest.pt"
    resumed.save(good)
    truncated, text = Path(folder) / "truncated.pt", Path(folder) / "notes.pt"
    truncated.write_bytes(good.read_bytes()[:100_000])
    text.write_text("not a checkpoint\n")
    other = paraformer_edu.model.Paraformer(replace(config.model, vocab_size=150))
    foreign = Path(folder) / "foreign.pt"
    save_checkpoint(foreign, other, resumed.tokenizer, resumed.frontend, config)
    attempts = {
        "truncated file": lambda: load_checkpoint(truncated),
        "not a checkpoint": lambda: load_checkpoint(text),
        "another config": lambda: Trainer.resume(
            good, config=load_config(RECIPE, ["model.encoder.n_layers=6"])
        ),
        "weights that don't fit": lambda: model_from_checkpoint(load_checkpoint(foreign)),
        "averaging two models": lambda: average_checkpoints([good, foreign], Path(folder) / "x.pt"),
    }
    for name, attempt in attempts.items():
        try:
            attempt()
        except CheckpointError as error:
            message = str(error).replace(folder, "...")
            print(f"{name}:")
            print(textwrap.fill(message, 100, initial_indent="  ", subsequent_indent="  "))
        else:
            raise AssertionError(f"{name} was accepted")

# %% [markdown]
# **Averaging, checked.** A run of eight steps that keeps the checkpoints of its last
# two evaluations (every four steps) leaves `step-0000004.pt` and `step-0000008.pt`;
# their average must be their element-wise mean, and it must load like any checkpoint:

# %%
kept = load_config(RECIPE, ["training.eval_utterances=8", "training.eval_every=4"])
kept = replace(kept, training=replace(kept.training, keep_checkpoints=2))
with tempfile.TemporaryDirectory() as folder:
    Trainer(kept, Path(folder)).train(max_minutes=0, max_steps=8)
    paths = sorted((Path(folder) / "checkpoints").glob("step-*.pt"))
    print("kept:", [p.name for p in paths])
    mean = average_checkpoints(paths, Path(folder) / "averaged.pt")
    a, b = (load_checkpoint(p)["model"] for p in paths)
    worst = max((mean["model"][k] - (a[k] + b[k]) / 2).abs().max().item() for k in a)
    averaged_model, *_ = model_from_checkpoint(load_checkpoint(Path(folder) / "averaged.pt"))
    print(f"averaged weights against (a + b) / 2: max abs diff {worst:.1e}")
    print("averaged from", [Path(p).name for p in mean["averaged_from"]], "at step", mean["step"])
assert [p.name for p in paths] == ["step-0000004.pt", "step-0000008.pt"] and worst < 1e-6

# %% [markdown]
# ## From a checkpoint to a transcript: inference
#
# What a user of a trained model needs lives in a module of its own,
# `paraformer_edu.inference`: a `Transcript` per utterance (text, tokens, each token's
# start and end from chapter 5's timestamps, and the words they make), and a
# `Recognizer` that holds a model with its tokenizer and front end and, if given,
# chapter 9's beam search (`search`; without it each position takes its most likely
# token, and `evaluate` takes the same argument). It takes audio in any of the forms
# chapter 1's `load_audio` accepts. The rule for what is one input and what is a batch
# is explicit: a path, an array or a tensor is **one** clip (a 2-D array is one clip
# with channels, chapter 1), a list or tuple is a **batch**, and anything else is
# refused. Silent audio gets an empty transcript without running the model. The
# features of a batch are cut into length-sorted batches of at most `max_frames`
# padded frames by chapter 1's `BucketBatchSampler`, without shuffling.

# %%
#| export inference
import os
from typing import NamedTuple

import numpy as np
import torch

from paraformer_edu import checkpoint  # the module: its names stay those the cells above defined
from paraformer_edu.audio import AudioError, is_silent, load_audio
from paraformer_edu.dataset import BucketBatchSampler
from paraformer_edu.features import Frontend
from paraformer_edu.model import Paraformer


class Transcript(NamedTuple):
    """One transcribed utterance: its text, tokens and each token's (start, end) in seconds."""

    text: str
    tokens: list[str]
    timestamps: list[tuple[float, float]]

    @property
    def words(self) -> list[tuple[str, float, float]]:
        """(word, start, end) per word: a word starts at a token that begins with '▁'."""
        words = []
        for token, (start, end) in zip(self.tokens, self.timestamps):
            if token.startswith("<"):  # a special token: not text
                continue
            if token.startswith("\u2581") or not words:
                words.append([token.lstrip("\u2581"), start, end])
            else:
                words[-1][0] += token
                words[-1][2] = end
        return [(w, s, e) for w, s, e in words if w]


# %%
#| export inference
class Recognizer:
    """A trained Paraformer with tokenizer and front end: audio in, text (and timestamps) out."""

    def __init__(
        self,
        model: Paraformer,
        tokenizer,
        frontend: Frontend,
        config=None,
        device: str | torch.device = "cpu",
        search=None,
    ):
        self.device = torch.device(device)
        self.model, self.tokenizer, self.frontend = (
            model.eval().to(self.device),
            tokenizer,
            frontend,
        )
        # search: None (argmax) or chapter 9's beam search
        self.config, self.search = config, search

    def features(self, audio, sample_rate: int | None = None) -> torch.Tensor:
        """Features (T', D) of a path or a waveform (with its sample rate); (0, D) for silence."""
        wave = load_audio(audio, sample_rate)  # (S,) 16 kHz mono; AudioError for unusable audio
        if is_silent(wave):
            return torch.zeros(0, self.frontend.dim)  # (0, D): nothing to recognise
        return self.frontend(wave)  # (T', D)

    @torch.no_grad()
    def recognize_features(
        self, features: list[torch.Tensor], max_frames: int = 8000
    ) -> list[Transcript]:
        """Transcripts of feature matrices (T', D), in length-sorted batches of <= max_frames."""
        results = [Transcript("", [], [])] * len(features)
        speech = [i for i, x in enumerate(features) if len(x)]  # silence stays ""
        lengths = [len(features[i]) for i in speech]
        for batch in (
            BucketBatchSampler(lengths, max(max_frames, *lengths, 1), shuffle=False).batches()
            if speech
            else []
        ):
            chunk = [speech[j] for j in batch]
            # (B, T, D)
            X = torch.nn.utils.rnn.pad_sequence([features[i] for i in chunk], batch_first=True)
            X_lengths = torch.tensor([len(features[i]) for i in chunk])  # (B,)
            hyps = self.model.recognize(X.to(self.device), X_lengths.to(self.device), self.search)
            for i, hyp in zip(chunk, hyps):
                results[i] = Transcript(
                    hyp.text(self.tokenizer),
                    [self.tokenizer.tokens[t] for t in hyp.token_ids],
                    hyp.timestamps,
                )
        return results


# %% [markdown]
# `transcribe` applies the rule: one input gives one result, a list gives a list.

# %%
#| export inference
def _as_batch(audio) -> tuple[list, bool]:
    """(inputs, single): one path/array/tensor is a single input, a list or tuple is a batch."""
    if isinstance(audio, (str, os.PathLike, np.ndarray, torch.Tensor)):
        return [audio], True
    if isinstance(audio, (list, tuple)):
        return list(audio), False
    raise AudioError(
        f"cannot transcribe a {type(audio).__name__}: pass a path, a waveform (array or tensor, "
        "with sample_rate=...), or a list of them"
    )


# %%
#| export inference
@add_to_class(Recognizer)
def transcribe(self, audio, sample_rate: int | None = None, timestamps: bool = False):
    """Text of one input (path, or waveform and sample_rate) or a list; Transcripts if asked."""
    inputs, single = _as_batch(audio)
    transcripts = self.recognize_features([self.features(a, sample_rate) for a in inputs])
    out = transcripts if timestamps else [t.text for t in transcripts]
    return out[0] if single else out


# %%
#| export inference
def load_model(path, device: str | torch.device = "cpu") -> Recognizer:
    """A Recognizer from a checkpoint file written by save_checkpoint (or the book's model)."""
    model, tokenizer, frontend, config = checkpoint.model_from_checkpoint(
        checkpoint.load_checkpoint(path)
    )
    return Recognizer(model, tokenizer, frontend, config, device)

# %% [markdown]
# ## The live run: ten minutes on a laptop CPU
#
# Now the real thing: the chapter's recipe (`configs/paraformer.yaml`) on the 8,000
# training utterances, for a budget of **10 minutes of training on two CPU cores**
# (30 minutes when a GPU is present; the environment variable
# `PARAFORMER_EDU_TRAIN_MINUTES` sets any other budget; the outputs stored in the book
# come from the 10-minute CPU run). CI gives the run a budget of *steps* instead
# (`PARAFORMER_EDU_TRAIN_STEPS`), so that a slow or busy machine trains the same
# model and meets the same bound. The dev set is recognised every 250 steps; the
# budget is wall time and counts those evaluations too, so a little less than ten
# minutes goes to the training steps themselves.
#
# The recipe was chosen by trial runs of this kind. With ten minutes, the number of
# optimiser steps decides most: batches of at most 2,000 padded frames (about 55 of
# the corpus's two-second utterances, 144 batches an epoch) beat batches twice that
# size, and the smaller model measured above beat the larger one. A peak learning rate
# of $4 \cdot 10^{-3}$ was no better than $2 \cdot 10^{-3}$. SpecAugment slows the
# first steps (the model has to learn around holes in its input before it has learned
# the input), so the recipe switches it on only from step 4,000: the live run, about
# 2,400 steps, never reaches it. It is a regulariser, for a model that would otherwise
# overfit; the book's model, below, had it on for a while and trained faster once it
# was off, because even after 13,000 steps it did not overfit.

# %%
device = choose_device(config.training.device)
minutes = float(os.environ.get("PARAFORMER_EDU_TRAIN_MINUTES", 10 if device.type == "cpu" else 30))
steps = int(os.environ.get("PARAFORMER_EDU_TRAIN_STEPS", 0))  # a step budget replaces the minutes
budget = {"max_minutes": 0, "max_steps": steps} if steps else {"max_minutes": minutes}
live_dir = RUNS / "live"
shutil.rmtree(live_dir, ignore_errors=True)  # a fresh run each time the chapter runs
live = Trainer(replace(config, training=replace(config.training, **budget)), live_dir)
start = time.perf_counter()
log = live.train()
wall = time.perf_counter() - start
train_rows = [row for row in log if "loss" in row]
dev_rows = [row for row in log if "dev_cer" in row]

# %% [markdown]
# How long it took, and the dev set after each evaluation (these numbers depend on the
# machine's speed, so they are not compared when the chapter is re-run):

# %%
# NBVAL_IGNORE_OUTPUT
epochs = live.epoch + live.batch_in_epoch / len(live.sampler)
speed = sum(r["utterances_per_second"] for r in train_rows) / len(train_rows)
print(f"{live.step} steps, {epochs:.1f} epochs on {device}, {speed:.0f} utterances/s")
print(
    f"{live.train_seconds / 60:.1f} min of training ({wall / 60:.1f} min with the dev evaluations)"
)
print()
print_table(
    [
        (
            row["step"],
            row["train_seconds"] / 60,
            row["dev_cer"],
            row["dev_wer"],
            row["dev_sentence_accuracy"],
            row["dev_length_exact"],
        )
        for row in dev_rows
    ],
    ["step", "minutes", "dev CER", "dev WER", "sentences", "exact length"],
    {"minutes": ".1f", **{k: ".1%" for k in ("dev CER", "dev WER", "sentences", "exact length")}},
)

# %% [markdown]
# The curves: each loss part over the steps (the mean over each 25-step window), and
# what the decoder and the GLM sampler did meanwhile.

# %% mystnb={"figure": {"caption": "The live run's training curves, each point the mean over a 25-step window. Top: each part of the loss, on a log scale. Bottom: the decoder's first-pass accuracy and the share of tokens the GLM sampler replaced.", "name": "fig-ch07-live-training-curves"}, "image": {"alt": "Two line charts over the training steps. Top: four falling loss curves, total, CE, CTC and quantity. Bottom: the first-pass accuracy rising while the share of tokens replaced by GLM slowly falls."}}
fig, (loss_ax, decoder_ax) = plt.subplots(2, 1, figsize=(9, 5.4), sharex=True)
steps = [r["step"] for r in train_rows]
for key, label in [
    ("loss", "total"),
    ("loss_ce", "CE (decoder)"),
    ("loss_ctc", "CTC (encoder)"),
    ("loss_quantity", "quantity (predictor)"),
]:
    loss_ax.plot(steps, [r[key] for r in train_rows], label=label)
loss_ax.set(yscale="log", ylabel="loss (log scale)", title="Training losses")
decoder_ax.plot(steps, [r["accuracy_first_pass"] for r in train_rows], label="first-pass accuracy")
decoder_ax.plot(steps, [r["glm_replaced"] for r in train_rows], label="replaced by GLM")
decoder_ax.set(
    xlabel="training step", ylabel="share of tokens", ylim=(0, 1), title="Decoder and sampler"
)
for ax in (loss_ax, decoder_ax):  # legends beside the plots, off the curves
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
plt.tight_layout()
plt.show()

# %% [markdown]
# And the dev error rates, against the minutes of training:

# %% mystnb={"figure": {"caption": "Dev CER and WER of the live run at each evaluation (every 250 steps), against the minutes of training. WER can exceed 100%: a hypothesis can insert words without limit.", "name": "fig-ch07-live-dev-error-rates"}, "image": {"alt": "A line chart of two falling curves against the minutes of training: the word error rate above, the character error rate below it."}}
fig, ax = plt.subplots(figsize=(7, 3))
ax.plot(
    [r["train_seconds"] / 60 for r in dev_rows],
    [100 * r["dev_cer"] for r in dev_rows],
    "o-",
    label="CER",
)
ax.plot(
    [r["train_seconds"] / 60 for r in dev_rows],
    [100 * r["dev_wer"] for r in dev_rows],
    "s-",
    label="WER",
)
ax.set(
    xlabel="minutes of training",
    ylabel="error rate on dev (%)",
    title="Dev error rates",
    ylim=(0, max(100, 105 * max(r["dev_wer"] for r in dev_rows))),
)  # WER can exceed 100%
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
plt.tight_layout()
plt.show()

# %% [markdown]
# The claims, checked: every loss part fell from the first 25 steps to the last
# (the total by at least a quarter), and the best dev CER is below the bound that the
# number of steps trained promises: 55% from 2,000 steps (the ten minutes on two cores
# gave about 2,400 steps in the run printed above, and about 42% dev CER), 98% below
# that (CI's budget of 250 steps gives 70% on one CPU and 94% on another: the model is
# just starting to spell). The bounds are what trial runs of the recipe
# reached, with a margin; they depend on the steps, not on the clock. Ten minutes give
# a model that has learned a great deal, not yet a usable recogniser: every loss part
# is still falling when the budget ends, hardly a dev sentence comes out exactly
# right, and the goal of 20% CER on the test split is far off. The book's model, next,
# is larger and trains for longer on more speech.

# %%
first, last = train_rows[0], train_rows[-1]
fell = {
    key: round(last[key] / first[key], 2)
    for key in ("loss", "loss_ce", "loss_ctc", "loss_quantity")
}
bound = 0.55 if live.step >= 2000 else 0.98  # 250 steps (CI): 70-94% on different CPUs
best_dev = min(r["dev_cer"] for r in dev_rows)
print(
    "every loss part fell:",
    all(v < 1 for v in fell.values()),
    "| the total by a quarter or more:",
    fell["loss"] < 0.75,
)
print(f"best dev CER within the budget's bound: {best_dev <= bound}")
assert all(v < 1 for v in fell.values()) and fell["loss"] < 0.75 and best_dev <= bound

# %% [markdown]
# ## How good is it? The held-out splits
#
# The dev set chose the best checkpoint, so its score may be slightly optimistic. The
# corpus has two splits the run never touched: **test** (unseen sentences, voices heard
# in training) and **test-voices** (unseen sentences *and* voices never heard: other
# accents and speaker variants). We load `best.pt` the way a user would, with
# `load_checkpoint` and `model_from_checkpoint`, and score all three splits, 300
# utterances each.

# %%
def score_splits(
    model, tokenizer, frontend, manifests=manifests, splits=("dev", "test", "test-voices")
) -> dict:
    """evaluate() on the whole of each split, from cached features."""
    return {
        split: evaluate(
            model, SpeechDataset(manifests[split], frontend, tokenizer.encode), tokenizer
        )
        for split in splits
    }


live_model, live_tokenizer, live_frontend, _ = model_from_checkpoint(
    load_checkpoint(live_dir / "best.pt")
)
live_scores = score_splits(live_model, live_tokenizer, live_frontend)


def print_scores(scores: dict) -> None:
    """One line per split: CER, WER, sentence accuracy, exact token counts."""
    print_table(
        [
            (split, s["cer"], s["wer"], s["sentence_accuracy"], s["length_exact"])
            for split, s in scores.items()
        ],
        ["split", "CER", "WER", "sentences", "exact length"],
        {"CER": ".1%", "WER": ".1%", "sentences": ".1%", "exact length": ".1%"},
    )

# %%
# NBVAL_IGNORE_OUTPUT
print_scores(live_scores)

# %% [markdown]
# A few test utterances, with the alignment of each hypothesis to its reference: a word
# in capitals was substituted (`REF→HYP`), `[-word]` deleted, `[+word]` inserted.

# %%
def show_alignment(ref: str, hyp: str) -> str:
    """The words of an alignment, errors marked."""
    marks = {
        "=": lambda r, h: r,
        "S": lambda r, h: f"{r.upper()}→{h.upper()}",
        "D": lambda r, h: f"[-{r}]",
        "I": lambda r, h: f"[+{h}]",
    }
    return " ".join(marks[op](r, h) for op, r, h in align(ref.split(), hyp.split()).steps)

# %%
# NBVAL_IGNORE_OUTPUT
test = live_scores["test"]
for ref, hyp in list(zip(test["references"], test["hypotheses"]))[:6]:
    print(textwrap.fill(f"REF {ref}", 100, subsequent_indent=" " * 4))
    print(textwrap.fill(f"HYP {show_alignment(ref, hyp)}", 100, subsequent_indent=" " * 4))
    print()

# %% [markdown]
# ## The book's model
#
# Ten minutes on the book corpus's 3,700 words leave the live model at about 41% CER on test;
# everyday English needs more words, more speech and more steps. The book's model is
# trained by a second recipe, `configs/paraformer-book.yaml`: a wider and deeper model
# (192 x 6, the code's defaults) with the phoneme CTC loss, which paid in the
# five-minute runs of the levers below, and without dropout or SpecAugment, because it
# underfitted: after 20,000 steps its CER on its own training utterances was no lower
# than on dev (a gap of a few points has opened since, printed below). It learns
# from chapter 1's `everyday-large` corpus, all of WordNet's sentences (40,000
# utterances, 26 hours, 24,000 words, with non-speech clips and augmented audio). It
# was trained in the background, in stretches, each going on from the weights of the
# one before, while the recipe was being learned:
#
# 1. 7,000 steps from scratch, SpecAugment from step 4,000 (the first release);
# 2. 4,000 steps from those weights, with a new warm-up to a lower peak learning rate
#    ($6 \cdot 10^{-4}$) and SpecAugment throughout;
# 3. the same again with the phoneme CTC loss, resumed after 2,000 steps with
#    SpecAugment off, which made the dev CER fall faster (printed below);
# 4. 6,000 steps from the committed `model.pt` itself, on a fresh machine, with a new
#    optimiser and a warm-up to $4 \cdot 10^{-4}$ (the best dev evaluation of an 8,000-step
#    run).
#
# It is committed to the repository at `models/paraformer-book/`: `model.pt` (float16
# weights, configuration, vocabulary and CMVN statistics in one file), `config.yaml`,
# `vocab.txt`, `train_log.jsonl` and `metrics.json`. It was made with
#
# ```bash
# python -m paraformer_edu train --config configs/paraformer-book.yaml --out runs/book-everyday \
#     --override training.phoneme_ctc=0 data.spec_augment=true data.spec_augment_from=4000
# python -m paraformer_edu train --resume runs/book-everyday/latest.pt   # after an interruption
# python tools/release_model.py runs/book-everyday/best.pt models/paraformer-book
# python -m paraformer_edu train --config configs/paraformer-book.yaml \
#     --init models/paraformer-book/model.pt --out runs/book-more --override \
#     training.lr=6e-4 training.warmup_steps=500 training.phoneme_ctc=0 data.spec_augment=true
# python -m paraformer_edu train --config configs/paraformer-book.yaml \
#     --init runs/book-more/latest.pt --out runs/book-phoneme --override \
#     training.lr=6e-4 training.warmup_steps=500 data.spec_augment=true
# python -m paraformer_edu train --resume runs/book-phoneme/latest.pt \
#     --override data.spec_augment=false
# python tools/release_model.py runs/book-phoneme/best.pt models/paraformer-book \
#     --continues models/paraformer-book runs/book-more
# python -m paraformer_edu train --config configs/paraformer-book.yaml \
#     --init models/paraformer-book/model.pt --out runs/book-cont --override \
#     training.lr=4e-4 training.warmup_steps=500
# python tools/release_model.py runs/book-cont/best.pt models/paraformer-book \
#     --continues models/paraformer-book
# ```
#
# (`release_model.py` converts the best checkpoint to float16, measures the metrics, and
# with `--continues` counts the steps, hours and log of the stretches before it and
# records each stretch's settings.) The later chapters load it, so a reader who skips
# this chapter's training still gets the longest-trained model we have; `metrics.json`
# records how far it has trained, printed below. Training can go on from the committed
# file itself: `python -m paraformer_edu train --config configs/paraformer-book.yaml
# --init models/paraformer-book/model.pt` starts a new run from its weights, vocabulary
# and CMVN, with a new optimiser and warm-up (the model configurations must match). Here
# it is scored again on the held-out splits of its own corpus; the assertion checks that
# it still reaches the dev CER recorded when it was released, so a change to the code
# that breaks the model cannot go unnoticed.

# %% [markdown]
# The release records the model's history in `metrics.json`: each stretch of training,
# a run or a resumed part of one, with the settings it changed. One line per stretch:

# %%
#| export
HISTORY_KEYS = (
    "data.corpus",
    "training.lr",
    "training.warmup_steps",
    "data.spec_augment",
    "data.spec_augment_from",
    "training.phoneme_ctc",
)


def history_lines(history: list, keys: tuple = HISTORY_KEYS) -> list[str]:
    """One line per stretch of a released model's training: its steps, the settings it changed."""
    lines = []
    for stretch in history:
        (first, last), changed = stretch["steps"], stretch["settings"]
        shown = ", ".join(f"{k}={v}" for k, v in changed.items() if k in keys)
        resumed = " (the same run, resumed)" if stretch.get("resumed") else ""
        lines.append(f"steps {first:>6,} to {last:>6,}: {shown or 'no change shown'}{resumed}")
    return lines


# %%
# NBVAL_IGNORE_OUTPUT
BOOK_MODEL = ROOT / "models" / "paraformer-book"
recorded = json.loads((BOOK_MODEL / "metrics.json").read_text())
book = paraformer_edu.load_model(BOOK_MODEL / "model.pt")
book_manifests = build_corpus(
    corpus_config(book.config.data.corpus), splits=("dev", "test", "test-voices")
)
book_scores = score_splits(book.model, book.tokenizer, book.frontend, book_manifests)
print(
    f"the book's model: {recorded['parameters'] / 1e6:.2f} M parameters, "
    f"{recorded['steps']} steps, {recorded['train_hours']:.1f} h of training "
    f"on {recorded['device']}"
)
print(
    f"dev CER now {book_scores['dev']['cer']:.2%}, recorded at release {recorded['dev']['cer']:.2%}"
)
assert abs(book_scores["dev"]["cer"] - recorded["dev"]["cer"]) < 0.005
for line in history_lines(recorded["history"]):
    print(textwrap.fill(line, 100, subsequent_indent=" " * 24))
train_cer, dev_cer = recorded["train_sample"]["cer"], recorded["dev"]["cer"]
print(f"CER on 300 of its training utterances {train_cer:.1%}, on dev {dev_cer:.1%}")
# a few points better on what it trained on: it has begun to learn its training sentences
assert dev_cer - 0.06 < train_cer < dev_cer - 0.01
book_log = [json.loads(line) for line in (BOOK_MODEL / "train_log.jsonl").read_text().splitlines()]
dev_at = {r["step"]: r["dev_cer"] for r in book_log if "dev_cer" in r}
off = next(
    h["steps"][0] for h in recorded["history"] if h["settings"].get("data.spec_augment") is False
)
fell = [dev_at[off - 1000] - dev_at[off], dev_at[off] - dev_at[off + 1000]]
print(
    f"SpecAugment off at step {off:,}: dev CER fell {100 * fell[0]:.1f} points in the 1,000 "
    f"steps before, {100 * fell[1]:.1f} after"
)
assert fell[1] > fell[0]

# %%
# NBVAL_IGNORE_OUTPUT
print_scores(book_scores)

# %% [markdown]
# ## What pays: the levers, measured
#
# Every setting of the two recipes is a lever, and a lever is kept only if it pays.
# `benchmarks/bench_levers.py` measures them: it trains the live recipe from the same
# seed for five minutes with one thing changed (the model's width and depth,
# SpecAugment, the peak learning rate or the schedule's shape, the phoneme CTC loss of
# this chapter on encoder layer 2 of 4 with weight 0.3) and scores each run greedily on
# test and test-voices. Two more rows come with the live recipe's own run: the mean of
# its final weights and the four kept before them every 100 steps (the checkpoint
# averaging FunASR applies to its best checkpoints), and the recipe again with another
# seed, which shows how far chance alone moves the figures. Every run has the same wall-clock budget,
# evaluations included, as the live run does: a lever that makes steps slower pays for
# it in steps. The benchmark takes about an hour on two cores, so the chapter reads its
# stored results (`benchmarks/results/levers.json`); `python benchmarks/bench_levers.py`
# measures them again on your machine.

# %%
levers = json.loads((ROOT / "benchmarks" / "results" / "levers.json").read_text())
print(f"{levers['budget']['max_minutes']:.0f} minutes a run, {levers['machine']}")
runs = {r["lever"]: r for r in levers["rows"]}
base = runs["live recipe"]
k, every = base["averaged"]["checkpoints"], base["averaged"]["every"]
runs = {
    "live recipe": base,
    f"  final + {k - 1} before (every {every}), averaged": {
        **base,
        **base["averaged"],
    },
    **{name: r for name, r in runs.items() if name != "live recipe"},
}
change = {name: r["test_cer"] - base["test_cer"] for name, r in runs.items()}
print_table(
    [
        (name, r["parameters"] / 1e6, r["steps_per_hour"], r["test_cer"], 100 * change[name])
        + (r["voices_cer"],)
        for name, r in runs.items()
    ],
    ["lever", "M params", "steps/h", "test CER", "change (points)", "voices CER"],
    {
        "M params": ".2f",
        "steps/h": ",.0f",
        "test CER": ".1%",
        "change (points)": "+.1f",
        "voices CER": ".1%",
    },
)
noise = abs(change["live recipe, seed 1"])
pays = [name for name, c in change.items() if c < -noise]
print(f"another seed moves test CER by {100 * noise:.1f} points; levers beyond that: {pays}")
steps = [r["steps"] for r in levers["rows"] if r["parameters"] == base["parameters"]]
print(f"runs of the live recipe's size: {min(steps)} to {max(steps)} steps in their budget")
averaged, phoneme = base["averaged"], runs["phoneme CTC, layer 2 (0.3)"]
for name, r in (("live recipe", base), ("averaged", averaged), ("phoneme CTC", phoneme)):
    print(f"{name:>12}: test WER {r['test_wer']:.1%}, voices WER {r['voices_wer']:.1%}")
assert pays == ["phoneme CTC, layer 2 (0.3)"]
assert phoneme["test_wer"] > base["test_wer"] - 0.01 and phoneme["voices_wer"] > base["voices_wer"]
assert (
    -noise < averaged["test_cer"] - base["test_cer"] < 0 and averaged["test_wer"] > base["test_wer"]
)
assert 0 < change["deeper: 144 x 6"] < change["wider and deeper: 192 x 6"]
assert change["cosine decay to 0"] > 0
assert min(c for name, c in change.items() if "SpecAugment" in name or "LR" in name) > 0.05

# %% [markdown]
# What the five minutes say:
#
# - **Size.** At equal time the live recipe's 144 x 4 wins: 144 x 6 makes a fifth fewer
#   steps per hour and 192 x 6 half as many, and each loses more than it gains from
#   its capacity. In minutes, steps beat capacity. The book's model trains for hours,
#   where capacity can pay; whether 192 x 6 is the best use of its hours is a question
#   a five-minute benchmark cannot answer.
# - **SpecAugment** costs about 20 points here, at either strength: the masks make the
#   task harder before the model has learned its easy version. It is a regulariser,
#   for a model that would otherwise overfit, and nothing overfits in five minutes.
#   The live recipe starts it at step 4,000, that is never.
# - **The learning rate.** The recipe's peak of $2 \cdot 10^{-3}$ beats half and twice
#   that, and a cosine decay (reaching zero at the live recipe's step count) does not
#   beat the Noam schedule's $1/\sqrt{\text{step}}$.
# - **Checkpoint averaging**, the mean of the final weights and the four kept before
#   them every 100 steps, is a little better in CER than the final weights alone and
#   worse in WER; the difference is smaller than a second seed's. It costs no training
#   at all, and it is meant for the end of a long run, when the learning rate is low
#   and the weights wander around a minimum: the regime to measure it in next.
# - **The phoneme CTC loss is the one lever that pays**, in CER, on the test split and
#   on the held-out voices, by more than a second seed moves the figure. WER does not
#   improve (on the held-out voices it is worse): the loss buys better spelling of the
#   sounds rather than more whole words. The book's recipe turns it on
#   (`training.phoneme_ctc: 0.3`), a bet that it pays over hours as over minutes. The
#   live recipe leaves it off so that chapter 12 compares the model families, whose CTC
#   and AR baselines have no such head, on one recipe; `--override
#   training.phoneme_ctc=0.3` turns it on for a run of your own.
#
# How far to trust this: one pair of seeds, five minutes a run, and a machine whose
# speed varies, so that runs of the same size made different numbers of steps (printed
# above) and the rows measured on different occasions (the live recipe and the phoneme
# loss were measured again, together, after the others) differ by more than their
# seeds alone would make them. The large effects (size, SpecAugment, the learning rate)
# are safe; the small ones are leads, not verdicts.
#
# **Averaging at the end of a long run.** Five minutes cannot say whether averaging
# pays where it is meant to. `benchmarks/bench_averaging.py` measures it on the book's
# model: the last five checkpoints of its last stretch (1,000 steps apart, the
# learning rate down to a quarter of its peak), each alone and the mean of the last
# $k$ of them, scored greedily on 500 utterances of each held-out split.

# %%
averaging = json.loads((ROOT / "benchmarks" / "results" / "averaging.json").read_text())
rows = averaging["rows"]
print_table(
    [
        (
            r["checkpoint"],
            r["dev"]["cer"],
            r["test"]["cer"],
            r["test-voices"]["cer"],
            r["test"]["wer"],
        )
        for r in rows
    ],
    ["weights", "dev CER", "test CER", "voices CER", "test WER"],
    {h: ".2%" for h in ("dev CER", "test CER", "voices CER", "test WER")},
)
last = [r for r in rows if "k" not in r][-1]
best = min((r for r in rows if "k" in r), key=lambda r: r["dev"]["cer"])  # chosen on dev
gain = {s: 100 * (last[s]["cer"] - best[s]["cer"]) for s in ("dev", "test", "test-voices")}
print(f"{best['checkpoint']} against the last checkpoint alone, points of CER:")
print("  " + ", ".join(f"{s} {g:+.1f}" for s, g in gain.items()))
assert all(abs(g) < 0.5 for g in gain.values()) and min(gain.values()) < 0 < max(gain.values())

# %% [markdown]
# The average that is best on dev moves each split by less than half a point, one of
# them the wrong way: no more than 500 utterances can resolve. Here, averaging does not
# pay, and the release is the last checkpoint alone. The checkpoints are still moving
# (dev CER was still falling, by about 0.3 points every thousand steps, so their mean
# lags behind the last of them) rather than wandering around a minimum, which is where
# averaging helps; `training.keep_checkpoints` and `average` stay in the package for a
# run that gets there.

# %% [markdown]
# ## Using the model
#
# For a user, a checkpoint is one file and one call. `paraformer_edu.load_model`
# returns a `Recognizer` whose `transcribe` takes a path, or a waveform with its sample
# rate, or a list of them (decoded in length-sorted batches); audio that is not 16 kHz
# mono is converted, silence gives an empty text, and unusable audio (empty, too short,
# unreadable) raises an `AudioError` that says what is wrong. With `timestamps=True` it
# returns each token's start and end in seconds, from the predictor's firing frames
# (chapter 5). Here is one test utterance to listen to, and what the book's model
# makes of it:

# %%
# NBVAL_IGNORE_OUTPUT
from IPython.display import display

entry = read_manifest(book_manifests["test"])[3]
display(listen(entry["audio_filepath"], f"test utterance 3 ({entry['duration']:.1f} s)"))
transcript = book.transcribe(entry["audio_filepath"], timestamps=True)
print("reference: ", paraformer_edu.normalize_text(entry["text"]))
print("recognised:", transcript.text)
token_times = " ".join(
    f"{tok}@{start:.2f}" for tok, (start, _) in zip(transcript.tokens, transcript.timestamps)
)
word_times = " ".join(f"{word}@{start:.2f}-{end:.2f}" for word, start, end in transcript.words)
print(textwrap.fill(token_times, 100, initial_indent="tokens: ", subsequent_indent=" " * 8))
print(textwrap.fill(word_times, 100, initial_indent="words:  ", subsequent_indent=" " * 8))
assert " ".join(word for word, _, _ in transcript.words) == transcript.text
wave, rate = (
    torchaudio.functional.resample(
        paraformer_edu.load_audio(entry["audio_filepath"]), 16000, 44100
    ),
    44100,
)
# (S, 2) at 44.1 kHz, as a music player would have it
stereo = torch.stack([wave, 0.5 * wave], dim=1).numpy()
same = book.transcribe(stereo, sample_rate=rate)
silence = book.transcribe(torch.zeros(16000), sample_rate=16000)
print(f"same audio, 44.1 kHz stereo: {same!r}\none second of silence: {silence!r}")
print(
    "characters that differ after the round trip 16 -> 44.1 -> 16 kHz:",
    edit_distance(same, transcript.text),
)
assert silence == "" and transcript.text == book.transcribe(entry["audio_filepath"])
try:
    book.transcribe(torch.zeros(100), sample_rate=16000)
except paraformer_edu.AudioError as error:
    print("6 ms of audio:", error)

# %% [markdown]
# The same from the command line: `transcribe` prints the path, a tab and the text of
# each file; `evaluate` prints one line per manifest and, last, one JSON object with
# the figures a script would read (on one line; shown here with one key per line).

# %%
# NBVAL_IGNORE_OUTPUT
def cli(*args) -> str:
    """Run `python -m paraformer_edu ARGS` and return what it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "paraformer_edu", *map(str, args)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


entries = read_manifest(manifests["test"])[:3]
print(
    cli(
        "transcribe",
        "--checkpoint",
        BOOK_MODEL / "model.pt",
        *[e["audio_filepath"] for e in entries],
    ).replace(str(Path(entries[0]["audio_filepath"]).parent), "...")
)

# %%
# NBVAL_IGNORE_OUTPUT
report = cli(
    "evaluate",
    "--checkpoint",
    BOOK_MODEL / "model.pt",
    "--manifest",
    manifests["test"],
    "--manifest",
    manifests["test-voices"],
)
final = json.loads(report.splitlines()[-1])
for line in report.replace(str(manifests["test"].parent), "...").splitlines()[:-1]:
    print(textwrap.fill(line, 100, subsequent_indent="  "))
print(json.dumps(final, indent=2))  # the last line, one key per line here
assert (
    final["utterances"] == 600
    and abs(final["cer"] - (book_scores["test"]["cer"] + book_scores["test-voices"]["cer"]) / 2)
    < 0.05
)

# %% [markdown]
# **Decoding speed.** The real-time factor (RTF) is the decoding time divided by the
# duration of the audio, here for the 300 test utterances with the features computed
# from the WAV files included, one utterance at a time (batch 1) and sixteen at a
# time (batch 16), on this machine's two CPU cores:

# %%
# NBVAL_IGNORE_OUTPUT
test_entries = read_manifest(manifests["test"])
audio_seconds = sum(e["duration"] for e in test_entries)
for batch_size in (1, 16):
    start = time.perf_counter()
    for i in range(0, len(test_entries), batch_size):
        book.transcribe([e["audio_filepath"] for e in test_entries[i : i + batch_size]])
    rtf = (time.perf_counter() - start) / audio_seconds
    print(f"batch {batch_size:>2}: RTF {rtf:.4f} ({1 / rtf:.0f}x faster than real time)")

# %% [markdown]
# ## Summary
#
# - **Metrics.** The edit distance fills a table with
#   $D_{i,j} = \min(D_{i-1,j-1} + [r_i \ne h_j], D_{i-1,j} + 1, D_{i,j-1} + 1)$; walking it
#   back gives the substitutions, deletions and insertions. CER and WER are the total
#   edits over the total reference units; ours equal `torchaudio.functional.edit_distance`
#   and `jiwer` exactly. Sentence accuracy shows how the errors are spread.
# - **The recipe** is a YAML file read into a frozen `Config` (model, data, training);
#   any key can be overridden as `section.key=value`, and unknown keys or wrong types are
#   refused by name.
# - **The trainer** feeds cached float16 features (CMVN and SpecAugment on the fly),
#   length-bucketed, to Adam with a warm-up schedule and gradient clipping; it logs every
#   loss part, evaluates the dev set and writes `latest.pt` and `best.pt`. A resumed run
#   equals an uninterrupted one to the last bit, because the checkpoint holds the
#   optimiser, the position in the data and every random state.
# - **Checkpoints** are dictionaries of tensors and strings, written atomically, read with
#   `weights_only=True`, and refused with a clear message when truncated, foreign, or of
#   another configuration. `average_checkpoints` writes the mean of one run's checkpoints
#   (`training.keep_checkpoints` keeps them).
# - **The live run**: ten minutes on two CPU cores take the model from nothing to the dev
#   CER printed above. The book's model, 192 x 6 and trained by its own recipe
#   (`configs/paraformer-book.yaml`) for 26,000 steps (about five hours on two cores) on
#   40,000 utterances, reaches about 19% CER on its corpus's test split (about 13% with
#   chapter 9's language model); it is in `models/paraformer-book/` and is what
#   `paraformer_edu.load_model` users and the next chapter load.
# - **What pays** is measured, not assumed: in five-minute runs only the phoneme CTC
#   loss beat the noise of a second seed; at the end of the book model's run,
#   checkpoint averaging did not pay.
#
# In `paraformer_edu.metrics`: `edit_table`, `align`, `edit_distance`, `cer`, `wer`,
# `sentence_accuracy`. In `paraformer_edu.config`: `Config`, `DataConfig`,
# `TrainingConfig`, `load_config`, `save_config`. In `paraformer_edu.training`:
# `choose_device`, `warmup_lr`, `evaluate`, `Trainer`. In `paraformer_edu.checkpoint`:
# `save_checkpoint`, `load_checkpoint`, `model_from_checkpoint`, `average_checkpoints`. In
# `paraformer_edu.phonemes`: `espeak_phonemes`, `phoneme_targets`, `PhonemeCTC`. In
# `paraformer_edu.inference`: `Transcript`, `Recognizer`, `load_model`. On the command line:
# `python -m paraformer_edu train | average | evaluate | transcribe`.
#
# ## Exercises
#
# 1. **Where the errors are.** Using the live run's test hypotheses, count the
#    substitutions, deletions and insertions over the whole split at the word level.
#    Which kind dominates? What does it say about the predictor's token count?

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
# NBVAL_IGNORE_OUTPUT
totals = {"=": 0, "S": 0, "D": 0, "I": 0}
for ref, hyp in zip(live_scores["test"]["references"], live_scores["test"]["hypotheses"]):
    for op, n in align(ref.split(), hyp.split()).counts().items():
        totals[op] += n
words = totals["="] + totals["S"] + totals["D"]
names = {"S": "substitutions", "D": "deletions", "I": "insertions"}
print_table(
    [(names[op], n, n / words) for op, n in totals.items() if op != "="],
    ["edit", "count", "per reference word"],
    {"per reference word": ".1%"},
)
assert abs((totals["S"] + totals["D"] + totals["I"]) / words - live_scores["test"]["wer"]) < 1e-9

# %% [markdown]
# 2. **Another schedule.** Write a cosine schedule with linear warm-up,
#    $\eta_s = \eta \cdot s / W$ for $s \le W$ and
#    $\eta_s = \frac{\eta}{2}\bigl(1 + \cos(\pi \frac{s - W}{S - W})\bigr)$ up to $S$ steps,
#    and plot it beside `warmup_lr` for $S = 5000$. Which gives the larger learning rate
#    in the middle of a run? (To train with it you would subclass `Trainer` and override
#    `train_step`'s choice of `lr`.)

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution", "figure": {"caption": "Exercise 2: the warm-up schedule with 1/sqrt decay (`warmup_lr`) and a cosine schedule with the same warm-up, over 5,000 steps.", "name": "fig-ch07-cosine-lr"}, "image": {"alt": "Two learning-rate curves that rise together to 0.002 at step 300; the 1/sqrt curve then falls fast and flattens, the cosine curve stays higher until about step 3,300 and reaches 0 at step 5,000."}} tags=["hide-cell"]
def cosine_lr(step: int, peak_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to peak_lr, then half a cosine down to 0 at total_steps."""
    if step <= warmup_steps:
        return peak_lr * step / warmup_steps
    return (
        peak_lr
        / 2
        * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))))
    )


steps = range(1, 5001)
fig, ax = plt.subplots(figsize=(7.5, 2.6))
ax.plot(steps, [warmup_lr(s, 2e-3, 300) for s in steps], label="warm-up, 1/sqrt")
ax.plot(steps, [cosine_lr(s, 2e-3, 300, 5000) for s in steps], label="warm-up, cosine")
ax.set(xlabel="training step", ylabel="learning rate")
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
plt.tight_layout()
plt.show()
print(
    f"at step 2500: 1/sqrt {warmup_lr(2500, 2e-3, 300):.2e}, "
    f"cosine {cosine_lr(2500, 2e-3, 300, 5000):.2e}"
)
assert cosine_lr(2500, 2e-3, 300, 5000) > warmup_lr(2500, 2e-3, 300)

# %% [markdown]
# 3. **A corrupted save.** `save_checkpoint` writes to a temporary name and renames it.
#    Simulate a crash in the middle of a plain `torch.save` (write the first half of a
#    checkpoint's bytes to the final path) and show what `load_checkpoint` says. Why does
#    the rename make this impossible for our saves? (On POSIX file systems a rename within
#    a folder is atomic: a reader sees the old file or the new one, never a mix.)

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "model.pt"
    save_checkpoint(path, live_model, live_tokenizer, live_frontend, config)
    data = path.read_bytes()
    # what a crash halfway through a plain torch.save leaves
    path.write_bytes(data[: len(data) // 2])
    try:
        load_checkpoint(path)
    except CheckpointError as error:
        print(textwrap.fill(str(error).replace(folder, "..."), 100))
    else:
        raise AssertionError("a half-written checkpoint was accepted")
