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
# # From synthetic to real speech, and from a laptop to many GPUs
#
# Everything so far ran on speech the book made for itself: espeak-ng voices reading
# WordNet's sentences, a few thousand utterances, two CPU cores. Readers who go on want
# two things the book has not yet shown: training on the **real corpora** the field uses
# (LibriSpeech, LJSpeech, Common Voice, or a manifest of their own), and training on
# **more than one processor**. This chapter builds both with the same package, and it
# measures, honestly, what a model trained only on synthetic voices makes of real human
# speech.
#
# - **Real corpora**: each layout becomes the book's JSON-lines manifest (chapter 1);
#   every row is checked, and a bad row (missing file, empty transcript, unreadable or
#   over-long audio) is reported with its file and line, then skipped or refused, as a
#   setting says; never silently dropped.
# - **Features on disk**: a corpus larger than memory keeps its features in one
#   memory-mapped file.
# - **Real speech**: recordings of people reading, transcribed by the book's model: the
#   gap between synthetic and real speech, measured.
# - **Many processes**: data parallelism with PyTorch's DistributedDataParallel, under
#   `torchrun`; gradient accumulation; one process writes the logs and checkpoints; a
#   run with two processes is checked against one process, step by step.
#
# ## Learning goals
#
# After this chapter you can
#
# - turn LibriSpeech, LJSpeech, Common Voice or any JSON-lines listing into a manifest
#   whose every row has been checked, and read the report of the rows left out;
# - keep a corpus's features in a memory-mapped file when they do not fit in memory;
# - measure a model on real recordings and say what the domain shift costs;
# - write the gradient of a batch as a weighted sum of the gradients of its pieces, and
#   use it to split a batch over processes (data parallelism) or over time (gradient
#   accumulation) without changing the model that is trained;
# - launch `python -m paraformer_edu train` on several processes with `torchrun`.

# %%
#| default_exp corpora
# In Colab, clone the repository first (this chapter loads the book's model, models/):
# # !git clone -q --depth 1 https://github.com/paraformer-edu/paraformer-edu
# # !pip install -q -e "./paraformer-edu[book]"
# # %cd paraformer-edu
# %matplotlib inline
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import soundfile as sf
import torch

import paraformer_edu
from paraformer_edu.config import load_config
from paraformer_edu.corpus import build_corpus, corpus_config, read_manifest
from paraformer_edu.display import book_style, listen, print_table
from paraformer_edu.metrics import cer, wer
from paraformer_edu.tokenizer import normalize_text

book_style()
torch.manual_seed(0)
torch.set_num_threads(2)
ROOT = Path(paraformer_edu.__file__).resolve().parent.parent
print("paraformer_edu", paraformer_edu.__version__)

# %% [markdown]
# ## Real corpora as manifests
#
# Chapter 1 described a corpus by a **manifest**: one JSON line per utterance, with the
# path of its audio, its transcript and its duration in seconds,
#
# ```json
# {"audio_filepath": "/data/LibriSpeech/dev-clean/84/121123/84-121123-0000.flac",
#  "text": "GO DO YOU HEAR", "duration": 1.755}
# ```
#
# This is also the format of NVIDIA NeMo's manifests, so a manifest written for NeMo can be
# read here as it is. Public corpora list their utterances in their own ways:
#
# | corpus | listing | audio |
# |---|---|---|
# | LibriSpeech | `SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt`, lines `ID TEXT` | `ID.flac` beside it |
# | LJSpeech | `metadata.csv`, lines `ID\|raw text\|normalised text` | `wavs/ID.wav` |
# | Common Voice | `validated.tsv`, `train.tsv`, ...: columns `path`, `sentence`, ... | `clips/*.mp3` |
# | any | JSON lines with `audio_filepath` and `text` | where they point |
#
# A corpus of a thousand hours has bad rows: a file that was never downloaded, an empty
# transcript, a truncated file, a recording of ten minutes among utterances of ten
# seconds. Each of them, trained on, breaks a run hours in, or quietly teaches the
# model something wrong. So every row is checked before it enters a manifest, and the
# check says what it found. A row of a listing, before the check, is where it was
# listed, its audio and its text; a row that cannot be used becomes a `Problem`.

# %%
#| export
import csv
import json
import os
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import soundfile as sf

from paraformer_edu.tokenizer import normalize_text


class Row(NamedTuple):
    """One utterance as a corpus lists it: where (file:line), its audio file, its transcript."""

    where: str
    audio: Path
    text: str


class Problem(NamedTuple):
    """A listed utterance that cannot be used: where it is listed and what is wrong."""

    where: str
    reason: str


class CorpusError(ValueError):
    """A corpus that cannot be read, or a bad row under on_problem="raise"."""


# %% [markdown]
# The check reads only the audio file's header (`soundfile.info`: its sample rate and
# number of samples), so it costs milliseconds a file, not the decoding of the whole
# corpus. An utterance longer than `max_seconds` is refused: self-attention's memory
# grows with the square of the length (chapter 10), and one long utterance in a batch
# pads every other one to its length.

# %%
#| export
def check_row(row: Row, max_seconds: float | None = None) -> dict | Problem:
    """The manifest entry of a listed utterance, or the Problem that keeps it out."""
    if not normalize_text(row.text):
        return Problem(row.where, "empty transcript")
    if not row.audio.is_file():
        return Problem(row.where, f"missing audio file {row.audio.name}")
    try:
        info = sf.info(str(row.audio))
    except Exception as error:  # soundfile raises LibsndfileError, RuntimeError, TypeError
        reason = str(error).split("': ")[-1].strip(" .")  # soundfile's reason, without the path
        return Problem(row.where, f"unreadable audio {row.audio.name} ({reason})")
    if info.frames == 0:
        return Problem(row.where, f"empty audio {row.audio.name}")
    duration = info.frames / info.samplerate
    if max_seconds and duration > max_seconds:
        return Problem(row.where, f"{duration:.1f} s, longer than max_seconds={max_seconds:g}")
    text = " ".join(row.text.split())
    return {
        "audio_filepath": str(row.audio.resolve()),
        "text": text,
        "duration": round(duration, 3),
    }


# %% [markdown]
# `prepare_manifest` checks every row a listing yields and writes the usable ones. What
# it does with a bad row is a setting, `on_problem`: `"skip"` leaves it out and reports
# it (in the returned `Report`, and in a `.problems.tsv` file beside the manifest, one
# line per row with its file and line), `"raise"` stops at the first one with a
# `CorpusError` that names it. The manifest is written under a temporary name and
# renamed when complete, so an interrupted run never leaves half a manifest.

# %%
#| export
class Report(NamedTuple):
    """What prepare_manifest wrote: the manifest, its size, and the rows it left out."""

    manifest: Path
    utterances: int
    hours: float
    problems: list  # of Problem


def prepare_manifest(
    rows: Iterable, out, max_seconds: float | None = None, on_problem: str = "skip", split_with=None
) -> Report:
    """Check every Row (a reader may also yield Problems); write the usable ones as a manifest."""
    # split_with (a Recognizer): utterances over max_seconds are cut at their pauses
    # (split_utterance, below) into pieces written beside the manifest, not left out
    if on_problem not in ("skip", "raise"):
        raise ValueError(f"on_problem must be 'skip' or 'raise', not {on_problem!r}")
    out, entries, problems = Path(out), [], []
    for row in rows:
        checked = (
            check_row(row, None if split_with else max_seconds) if isinstance(row, Row) else row
        )
        if split_with and isinstance(checked, dict) and checked["duration"] > (max_seconds or 1e9):
            pieces = out.with_name(out.name.removesuffix(".jsonl") + "-pieces")
            checked = split_utterance(checked, row.where, split_with, max_seconds, pieces)
        if isinstance(checked, Problem) and on_problem == "raise":
            hint = "on_problem='skip' leaves such rows out and reports them"
            raise CorpusError(f"{checked.where}: {checked.reason} ({hint})")
        if isinstance(checked, Problem):
            problems.append(checked)
        else:
            entries += checked if isinstance(checked, list) else [checked]
    report = out.with_name(out.name.removesuffix(".jsonl") + ".problems.tsv")
    _write_atomically(report, [f"{p.where}\t{p.reason}\n" for p in problems])
    if not entries:
        raise CorpusError(f"no usable utterance in {len(problems)} rows (see {report.name})")
    _write_atomically(out, [json.dumps(e) + "\n" for e in entries])
    hours = sum(e["duration"] for e in entries) / 3600
    return Report(out, len(entries), hours, problems)


# %% [markdown]
# The manifest is written under a temporary name and renamed into place: a run that
# stops half-way leaves the previous manifest, or none, never half of one.

# %%
#| export
def _write_atomically(path: Path, lines: list[str]) -> None:
    """Write lines to path under a temporary name, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    partial.write_text("".join(lines), encoding="utf-8")
    partial.replace(path)


# %% [markdown]
# Each layout needs only a reader: a generator of `Row`s (or of `Problem`s, for a line
# it cannot even parse). LibriSpeech lists the utterances of each chapter of each
# speaker in a `.trans.txt` file beside their FLAC files:

# %%
#| export
def librispeech_rows(root) -> Iterator[Row]:
    """LibriSpeech: SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt lines 'ID TEXT', ID.flac beside."""
    listings = sorted(Path(root).rglob("*.trans.txt"))
    if not listings:
        raise CorpusError(
            f"{root}: no *.trans.txt here; point at one LibriSpeech split, "
            "e.g. LibriSpeech/train-clean-100"
        )
    for listing in listings:
        for n, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                utterance, _, text = line.strip().partition(" ")
                yield Row(f"{listing}:{n}", listing.parent / f"{utterance}.flac", text)


def ljspeech_rows(root) -> Iterator[Row]:
    """LJSpeech: metadata.csv lines 'ID|raw text|normalised text', audio in wavs/ID.wav."""
    metadata = Path(root) / "metadata.csv"
    if not metadata.is_file():
        raise CorpusError(f"{root}: no metadata.csv; point at the LJSpeech-1.1 folder")
    for n, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            fields = line.split("|")  # the normalised text spells numbers out: prefer it
            text = fields[2] if len(fields) > 2 and fields[2].strip() else "|".join(fields[1:2])
            yield Row(f"{metadata}:{n}", metadata.parent / "wavs" / f"{fields[0]}.wav", text)


# %% [markdown]
# Common Voice lists its clips in tab-separated files with a header line (one file per
# subset: `validated.tsv`, `train.tsv`, `dev.tsv`, `test.tsv`); the clips are MP3 files,
# which `soundfile` reads (libsndfile 1.1 and later). Sentences may hold quotation marks,
# so the TSV is read without quoting rules. And any JSON-lines listing with
# `audio_filepath` and `text` (a NeMo manifest, say) is read too; its durations are
# measured again rather than trusted.

# %%
#| export
def common_voice_rows(listing) -> Iterator[Row | Problem]:
    """Common Voice: a TSV (validated.tsv, train.tsv...) with path and sentence; MP3s in clips/."""
    listing = Path(listing)
    if not listing.is_file():
        raise CorpusError(f"{listing}: no such file; name a Common Voice TSV, e.g. validated.tsv")
    with open(listing, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, [])
        if not {"path", "sentence"} <= set(header):
            raise CorpusError(f"{listing}: needs 'path' and 'sentence' columns, has {header}")
        p, s = header.index("path"), header.index("sentence")
        for n, fields in enumerate(reader, 2):
            if not fields:
                continue  # a blank line
            if len(fields) != len(header):
                yield Problem(
                    f"{listing}:{n}", f"{len(fields)} fields, the header has {len(header)}"
                )
            else:
                yield Row(f"{listing}:{n}", listing.parent / "clips" / fields[p], fields[s])


def jsonl_rows(manifest) -> Iterator[Row | Problem]:
    """Any JSON-lines listing with audio_filepath (relative to the file) and text."""
    manifest = Path(manifest)
    for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            yield Problem(f"{manifest}:{n}", f"not JSON ({error.msg})")
            continue
        if not isinstance(entry, dict) or not {"audio_filepath", "text"} <= entry.keys():
            yield Problem(f"{manifest}:{n}", "needs audio_filepath and text")
        else:
            audio = manifest.parent / entry["audio_filepath"]
            yield Row(f"{manifest}:{n}", audio, str(entry["text"]))


# %% [markdown]
# The layouts by name, and the one call that turns any of them into a checked manifest:

# %%
#| export
LAYOUTS = {
    "librispeech": librispeech_rows,
    "ljspeech": ljspeech_rows,
    "common-voice": common_voice_rows,
    "jsonl": jsonl_rows,
}


def prepare_corpus(layout: str, source, out, **options) -> Report:
    """prepare_manifest of a corpus in one of LAYOUTS (its folder, or its listing file)."""
    if layout not in LAYOUTS:
        raise CorpusError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}")
    return prepare_manifest(LAYOUTS[layout](source), out, **options)


# %% [markdown]
# ### Four layouts, built in miniature
#
# No corpus can be downloaded here, so the chapter builds a tiny copy of each layout from
# the book's own test utterances, in the formats the real corpora use (FLAC for
# LibriSpeech, WAV for LJSpeech, MP3 for Common Voice), and breaks a few rows on purpose:
# a file that is not there, an empty transcript, a file that is not audio, an utterance
# of 40 seconds, a TSV line with a missing field.

# %%
book_manifests = build_corpus(corpus_config("book"), splits=("test",))
source = read_manifest(book_manifests["test"])[:6]
work = Path(tempfile.mkdtemp(prefix="corpora-"))


def copy_audio(entry: dict, path: Path, fmt: str | None = None) -> None:
    """Write a book utterance's audio to path (FLAC, WAV or MP3 by its suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    wave, rate = sf.read(entry["audio_filepath"], dtype="float32")  # (S,)
    sf.write(path, wave, rate, format=fmt)


def make_librispeech(root: Path) -> None:
    """Two chapters of one speaker; one missing file, one empty transcript, one 40 s file."""
    lines = {"19/198": [], "19/227": []}
    for i, e in enumerate(source):
        chapter = "19/198" if i < 3 else "19/227"
        name = f"{chapter.replace('/', '-')}-{i:04d}"
        if i != 1:  # row 1: its FLAC is missing
            copy_audio(e, root / chapter / f"{name}.flac")
        lines[chapter].append(f"{name} {'' if i == 2 else e['text'].upper()}")
    silence = np.zeros(40 * 16000, dtype="float32")  # a 40-second recording
    sf.write(root / "19/227/19-227-0099.flac", silence, 16000)
    lines["19/227"].append("19-227-0099 A CHAPTER READ IN ONE GO")
    for chapter, rows in lines.items():
        (root / chapter / f"{chapter.replace('/', '-')}.trans.txt").write_text("\n".join(rows))


make_librispeech(work / "LibriSpeech" / "dev-clean")
report = prepare_corpus(
    "librispeech", work / "LibriSpeech" / "dev-clean", work / "ls.jsonl", max_seconds=20
)
print(f"{report.utterances} utterances, {3600 * report.hours:.1f} s; left out:")
print_table([(Path(p.where).name, p.reason) for p in report.problems], ["where", "why"])


# %% [markdown]
# Three of seven rows were left out, each with its file and line, and the report is also
# on disk beside the manifest:

# %%
print(report.manifest.with_name("ls.problems.tsv").read_text().replace(str(work) + "/", ""))
first = read_manifest(report.manifest)[0]
for key, value in first.items():
    print(f"{key}: {Path(value).name if key == 'audio_filepath' else value}")
assert report.utterances == 4 and len(report.problems) == 3
assert [p.reason.split()[0] for p in report.problems] == ["missing", "empty", "40.0"]

# %% [markdown]
# The same for LJSpeech (one `metadata.csv` row points to a text file renamed `.wav`),
# Common Voice (MP3 clips; one TSV line lost its last field) and a JSON-lines listing
# (one line is not JSON). With `on_problem="raise"`, the first bad row stops the run and
# says where it is.

# %%
def make_ljspeech(root: Path) -> None:
    """metadata.csv and wavs/; one .wav that is not audio."""
    rows = []
    for i, e in enumerate(source):
        copy_audio(e, root / "wavs" / f"LJ001-{i:04d}.wav")
        rows.append(f"LJ001-{i:04d}|{e['text']}|{e['text']}")
    (root / "wavs" / "LJ001-0003.wav").write_text("not a sound file")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")


def make_common_voice(root: Path) -> None:
    """clips/*.mp3 and validated.tsv; one line with a missing field."""
    header = ["client_id", "path", "sentence", "up_votes", "down_votes"]
    lines = ["\t".join(header)]
    for i, e in enumerate(source):
        copy_audio(e, root / "clips" / f"common_voice_en_{i}.mp3", "MP3")
        lines.append("\t".join(["c0ffee", f"common_voice_en_{i}.mp3", e["text"], "2", "0"]))
    lines[4] = "\t".join(lines[4].split("\t")[:-1])
    (root / "validated.tsv").write_text("\n".join(lines) + "\n")


def make_jsonl(path: Path) -> None:
    """A NeMo-style manifest with relative paths; one line that is not JSON."""
    lines = []
    for i, e in enumerate(source):
        copy_audio(e, path.parent / "audio" / f"{i}.wav")
        lines.append(json.dumps({"audio_filepath": f"audio/{i}.wav", "text": e["text"]}))
    lines[5] = lines[5][:-1]
    path.write_text("\n".join(lines) + "\n")


# %% [markdown]
# Each miniature read with its layout:

# %%
make_ljspeech(work / "LJSpeech-1.1")
make_common_voice(work / "cv-corpus" / "en")
make_jsonl(work / "mine" / "listing.jsonl")
layouts = [
    ("ljspeech", work / "LJSpeech-1.1"),
    ("common-voice", work / "cv-corpus" / "en" / "validated.tsv"),
    ("jsonl", work / "mine" / "listing.jsonl"),
]
rows = []
for layout, where in layouts:
    r = prepare_corpus(layout, where, work / f"{layout}.jsonl")
    for p in r.problems:
        rows.append((layout, r.utterances, Path(p.where).name, p.reason[:56]))
print_table(rows, ["layout", "kept", "left out", "why"])
assert [row[1] for row in rows] == [5, 5, 5]

# %%
try:
    prepare_corpus("ljspeech", work / "LJSpeech-1.1", work / "lj.jsonl", on_problem="raise")
except CorpusError as error:
    print(textwrap.fill(str(error).replace(str(work) + "/", ""), 100))
assert not (work / "lj.jsonl").exists()  # nothing written

# %% [markdown]
# The MP3 clips go through the same door as everything else, `load_audio` (chapter 1),
# which resamples Common Voice's 48 kHz (here the synthesiser's 22.05 kHz) to 16 kHz.
# A check that the decoded audio is the same speech: the recognizer's error on the MP3
# clips is close to its error on the same clips as WAV files (MP3's lossy compression
# may cost a few points).

# %%
recognizer = paraformer_edu.load_model(ROOT / "models" / "paraformer-book" / "model.pt")
cv = read_manifest(work / "common-voice.jsonl")
mp3 = recognizer.transcribe([e["audio_filepath"] for e in cv])
wav = recognizer.transcribe([e["audio_filepath"] for e in read_manifest(work / "ljspeech.jsonl")])
refs = [normalize_text(e["text"]) for e in cv]
print(f"CER from MP3: {cer(refs, mp3):.1%}, from the same clips as WAV: {cer(refs, wav):.1%}")
assert abs(cer(refs, mp3) - cer(refs, wav)) < 0.1

# %% [markdown]
# ### Long utterances: refused, or cut at their pauses
#
# An utterance over `max_seconds` is left out by default. Corpora made from audiobooks
# (LibriSpeech among them) hold many such stretches, and leaving them out wastes hours of
# speech. They can be cut instead, but not anywhere: each piece must keep exactly the
# words spoken in it. The transcript says which words were spoken; what is missing is
# *when*. A trained model's CTC head (chapter 4) answers that by **forced alignment**:
# the single best CTC path that spells the known transcript, found by the Viterbi
# algorithm over the same trellis as the CTC loss, with a maximum where the loss has a
# sum. For the extended label sequence $z$ (the $U$ tokens with blanks around and
# between them, $S = 2U + 1$ states) and the CTC log-probabilities $\log p_t(\cdot)$,
#
# $$
# \delta_t(s) = \log p_t(z_s) + \max\big(\delta_{t-1}(s),\ \delta_{t-1}(s-1),\
#   \delta_{t-1}(s-2)\ [\text{if } z_s \ne \text{blank and } z_s \ne z_{s-2}]\big),
# $$
#
# starting in the first blank or the first token, ending in the last token or the last
# blank; following the choices back gives every frame its state, and so every token its
# first and last frame.

# %%
#| export
import math

import torch


def ctc_forced_align(log_probs: torch.Tensor, tokens: list, blank: int = 0) -> list:
    """Viterbi CTC alignment of tokens to log_probs (T, V): the (first, last) frame of each."""
    T, S = log_probs.shape[0], 2 * len(tokens) + 1
    z = torch.full((S,), blank, dtype=torch.long)
    z[1::2] = torch.tensor(tokens, dtype=torch.long)  # (S,) blank, y1, blank, y2, ..., blank
    emit = log_probs[:, z]  # (T, S)
    skip = torch.zeros(S, dtype=torch.bool)
    skip[3::2] = z[3::2] != z[1:-2:2]  # (S,) a token may follow the token two states back
    delta = torch.full((S,), -math.inf)  # (S,)
    delta[:2] = emit[0, :2]
    back = torch.zeros(T, S, dtype=torch.long)  # (T, S) how many states each best path moved
    for t in range(1, T):
        moves = torch.stack([delta, delta.roll(1), delta.roll(2).masked_fill(~skip, -math.inf)])
        moves[1, 0] = moves[2, :2] = -math.inf  # (3, S) no state before the first
        best, back[t] = moves.max(0)
        delta = best + emit[t]
    s = S - 1 if S == 1 or delta[-1] >= delta[-2] else S - 2
    if not math.isfinite(delta[s]):
        raise ValueError(f"{len(tokens)} tokens cannot be aligned to {T} frames")
    spans = {}
    for t in range(T - 1, -1, -1):  # back from the last frame
        if s % 2:
            spans[s // 2] = (t, spans.get(s // 2, (t, t))[1])
        s -= int(back[t, s])
    return [spans[u] for u in range(len(tokens))]


# %% [markdown]
# The check against torchaudio's implementation of the same algorithm
# (`torchaudio.functional.forced_align`), on random log-probabilities with repeated
# tokens, frame by frame:

# %%
import warnings

import torchaudio


def frame_labels(spans: list, tokens: list, T: int) -> list:
    """The label of every frame: a token inside its span, blank (0) elsewhere."""
    labels = [0] * T
    for (first, last), token in zip(spans, tokens):
        labels[first : last + 1] = [token] * (last - first + 1)
    return labels


g = torch.Generator().manual_seed(0)
agree = 0
for trial in range(20):
    T, U = (
        int(torch.randint(12, 40, (1,), generator=g)),
        int(torch.randint(1, 6, (1,), generator=g)),
    )
    log_probs = torch.randn(T, 8, generator=g).log_softmax(-1)  # (T, V)
    tokens = torch.randint(1, 4, (U,), generator=g).tolist()  # few symbols: repeats are common
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # torchaudio announces the function's move to another package
        reference, _ = torchaudio.functional.forced_align(log_probs[None], torch.tensor([tokens]))
    mine = frame_labels(ctc_forced_align(log_probs, tokens), tokens, T)
    agree += mine == reference[0].tolist()
print(f"frame labels identical to torchaudio's forced_align: {agree} of 20 random cases")
assert agree == 20

# %% [markdown]
# With each word's frames known, `pause_cuts` picks where to cut. CTC's alignments are
# *peaky*: a token is emitted on one or two frames, often a little after its sound, so
# the frames between two words' spikes say little about where a pause is. Chapter 10's
# energy detector does: its silent stretches are the places to cut, in their middle,
# and the alignment says only how many words start before each of them. The longest
# pause is cut first, then again within each side, until every piece is short enough.
# `split_utterance` aligns, cuts, writes each piece as a FLAC file (named after its
# source) and returns its manifest entries; an utterance that cannot be cut short
# enough at its pauses (a single word of a minute) is a `Problem` like any other.

# %%
#| export
def pause_cuts(starts: list, silent: torch.Tensor, limit: float, min_pause: int = 3) -> list:
    """Cut points (frame, words before it) so that no piece is longer than limit frames."""
    # starts: the first frame of every word; silent (T',) marks the frames without speech.
    # A cut falls in the middle of a pause (at least min_pause silent frames) with words
    # on both sides; the longest pause is cut first, then again within each side.
    edges = torch.diff(silent.int(), prepend=torch.tensor([0]), append=torch.tensor([0]))
    runs = zip(
        (edges == 1).nonzero().flatten().tolist(), (edges == -1).nonzero().flatten().tolist()
    )
    pauses = [(b - a, (a + b) // 2) for a, b in runs if b - a >= min_pause]  # (length, middle)

    def cut(lo: tuple, hi: tuple) -> list:
        words = lambda f: sum(s < f for s in starts)  # noqa: E731: words that start before f
        inside = [(n, f) for n, f in pauses if lo[1] < words(f) < hi[1] and lo[0] < f < hi[0]]
        if hi[0] - lo[0] <= limit or not inside:
            return []
        middle = max(inside)[1]
        return (
            cut(lo, (middle, words(middle)))
            + [(middle, words(middle))]
            + cut((middle, words(middle)), hi)
        )

    return [(0, 0), *cut((0, 0), (len(silent), len(starts))), (len(silent), len(starts))]


def word_spans(recognizer, x: torch.Tensor, words: list) -> list:
    """The (first, last) frame of every word of a transcript in features x (T', D)."""
    model, tokenizer = recognizer.model, recognizer.tokenizer
    with torch.no_grad():
        h, _ = model.encoder(x[None], torch.tensor([len(x)]))  # (1, T', D)
        log_probs = model.ctc(h)[0]  # (T', V)
    ids = [tokenizer.encode(w) for w in words]  # BPE encodes word by word
    spans = ctc_forced_align(log_probs, [i for w in ids for i in w], tokenizer.blank_id)
    ends = torch.tensor([len(w) for w in ids]).cumsum(0).tolist()
    return [(spans[e - len(w)][0], spans[e - 1][1]) for w, e in zip(ids, ends)]


# %%
#| export
import hashlib

from paraformer_edu.audio import SAMPLE_RATE, load_audio
from paraformer_edu.transcription import frame_energy_db, speech_frames


def split_utterance(entry: dict, where: str, recognizer, max_seconds: float, folder: Path):
    """Cut a long utterance at its pauses into pieces of at most max_seconds (FLAC files)."""
    wave = load_audio(entry["audio_filepath"])  # (S,)
    x = recognizer.features(wave, SAMPLE_RATE)  # (T', D)
    words = normalize_text(entry["text"]).split()
    try:
        spans = word_spans(recognizer, x, words)
    except ValueError as error:
        return Problem(where, f"cannot align its transcript ({error})")
    n = recognizer.frontend.lfr_n  # 10-ms frames per model frame
    quiet = ~speech_frames(frame_energy_db(wave))  # (M,) chapter 10's energy VAD
    quiet = torch.nn.functional.pad(quiet, (0, n * len(x) - len(quiet)), value=True)  # (n T',)
    silent = quiet[: n * len(x)].view(len(x), n).float().mean(1) > 0.5  # (T',)
    limit = max_seconds / recognizer.frontend.frame_seconds  # frames
    cuts = pause_cuts([first for first, _ in spans], silent, limit)
    hop = round(recognizer.frontend.frame_seconds * SAMPLE_RATE)  # samples per frame
    source = Path(entry["audio_filepath"])
    pieces, stem = [], f"{source.stem}-{hashlib.sha1(str(source).encode()).hexdigest()[:6]}"
    for k, ((a, lo), (b, hi)) in enumerate(zip(cuts, cuts[1:])):
        piece = wave[a * hop : b * hop if b < len(x) else len(wave)]  # (samples,)
        if len(piece) > max_seconds * SAMPLE_RATE:
            return Problem(where, f"no pause cuts it into pieces of at most {max_seconds:g} s")
        path = folder / f"{stem}-{k:02d}.flac"
        pieces.append((path, piece, " ".join(words[lo:hi])))
    folder.mkdir(parents=True, exist_ok=True)
    for path, piece, _ in pieces:
        sf.write(path, piece.numpy(), SAMPLE_RATE)
    return [
        {
            "audio_filepath": str(path.resolve()),
            "text": text,
            "duration": round(len(piece) / SAMPLE_RATE, 3),
        }
        for path, piece, text in pieces
    ]


# %% [markdown]
# A test of the whole: twelve test utterances, each followed by half a second of
# silence, as one recording of about half a minute, listed with the joined transcript.
# With `max_seconds=8` and the book's model as `split_with`, it comes back in pieces:

# %%
picked = read_manifest(book_manifests["test"])[10:22]
pause = torch.zeros(SAMPLE_RATE // 2)  # (8000,) half a second of silence
waves = [paraformer_edu.load_audio(e["audio_filepath"]) for e in picked]
long_wave = torch.cat([torch.cat([w, pause]) for w in waves])  # (S,)
ends = torch.tensor([len(w) + len(pause) for w in waves]).cumsum(0) / SAMPLE_RATE  # (12,)
long_path = work / "long" / "chapter-0001.wav"
long_path.parent.mkdir()
sf.write(long_path, long_wave.numpy(), SAMPLE_RATE)
text = " ".join(e["text"] for e in picked)
(work / "long" / "listing.jsonl").write_text(
    json.dumps({"audio_filepath": long_path.name, "text": text}) + "\n"
)
split = prepare_corpus(
    "jsonl",
    work / "long" / "listing.jsonl",
    work / "long.jsonl",
    max_seconds=8,
    split_with=recognizer,
)
pieces = read_manifest(split.manifest)
starts = torch.tensor([0.0] + [e["duration"] for e in pieces]).cumsum(0)  # (P + 1,)
print_table(
    [(float(a), float(a) + e["duration"], e["text"][:64]) for a, e in zip(starts, pieces)],
    ["start (s)", "end (s)", "words"],
    {"start (s)": ".2f", "end (s)": ".2f"},
)

# %% [markdown]
# Every piece is at most 8 seconds, every cut fell into one of the silences between
# two utterances (the gaps of 0.5 s: each cut within them, give or take a frame), and
# each piece holds exactly the words of the utterances spoken in it. That last check
# depends on the alignment, which is only as good as the model: with the book's model
# (about 19% CER) a word beside a cut now and then lands on the wrong side of it
# (`tests/test_corpora.py` allows two words per cut on another recording).

# %%
cut_times = starts[1:-1]  # (P - 1,)
silences = [(float(e) - 0.5, float(e)) for e in ends[:-1]]
inside = [any(a - 0.06 <= t <= b + 0.06 for a, b in silences) for t in cut_times.tolist()]
# the words of each piece: those of the utterances whose speech ends inside it
spoken = (ends - 0.5).tolist()  # (12,) the end of each utterance, before its silence
truth = [
    " ".join(normalize_text(u["text"]) for u, t in zip(picked, spoken) if a < t < a + e["duration"])
    for a, e in zip(starts.tolist(), pieces)
]
same_words = [e["text"] for e in pieces] == truth
print(
    f"{len(pieces)} pieces of {len(long_wave) / SAMPLE_RATE:.1f} s; longest "
    f"{max(e['duration'] for e in pieces):.2f} s; each piece's words right: {same_words}; "
    f"cuts inside a silence: {sum(inside)} of {len(inside)}"
)
assert max(e["duration"] for e in pieces) <= 8 and same_words and all(inside)

# %% [markdown]
# From the command line, one corpus a command:
#
# ```bash
# python -m paraformer_edu prepare librispeech LibriSpeech/train-clean-100 \
#     --out data/ls100/train.jsonl --max-seconds 20
# python -m paraformer_edu prepare librispeech LibriSpeech/dev-clean --out data/ls100/dev.jsonl
# python -m paraformer_edu prepare common-voice cv-corpus-17.0/en/train.tsv \
#     --out data/cv/train.jsonl --on-problem raise
# python -m paraformer_edu prepare librispeech LibriSpeech/train-other-500 \
#     --out data/ls/other.jsonl --max-seconds 20 \
#     --split-with models/paraformer-book/model.pt   # cut at pauses instead of leaving out
# ```
#
# A folder holding `train.jsonl` and `dev.jsonl` is a corpus the trainer takes by its
# path: `data.corpus: data/ls100` in a recipe (chapter 7's `training_manifests`).
#
# ## Features on disk
#
# Chapter 1 computes every utterance's features once and keeps them, in float16, for all
# the epochs that follow. An hour of speech takes about 67 MB that way: the book's
# corpora fit in memory, LibriSpeech's 960 hours (over 60 GB) do not. With
# `data.features_on_disk: true` (or `cached_features(..., on_disk=True)`) the features go
# to one flat file that the operating system pages in as batches need it, through a
# memory map (`DiskFeatures`, chapter 1); only the offsets of the utterances are in
# memory. The same numbers come out:

# %%
from paraformer_edu.features import DiskFeatures, Frontend, cached_features

frontend = recognizer.frontend
in_memory = cached_features(report.manifest, frontend)  # a list of (T', 560) float16
on_disk = cached_features(report.manifest, frontend, on_disk=True)  # a DiskFeatures
same = all(torch.equal(a, b) for a, b in zip(in_memory, on_disk))
print(f"{type(on_disk).__name__}: {len(on_disk)} utterances, identical to the list: {same}")
frames = sum(on_disk.lengths)
seconds = sum(e["duration"] for e in read_manifest(report.manifest))
mb_per_hour = frames * 560 * 2 / seconds * 3600 / 1e6
print(f"{mb_per_hour:.0f} MB of features per hour of speech; 960 h: {mb_per_hour * 0.96:.0f} GB")
assert same and isinstance(on_disk, DiskFeatures) and len(on_disk) == len(in_memory)
assert 60 < mb_per_hour < 75

# %% [markdown]
# ## Real human speech, honestly
#
# The book's model has heard only espeak-ng. How does it do on people? Real recordings
# with transcripts are rare in software packages, but a few ship inside the source
# package of CMU's PocketSphinx recognizer on PyPI, for its own tests: five utterances of
# a LibriVox reading of *Sense and Sensibility* (read English, the domain of
# LibriSpeech), five short commands naming playing cards, and "go forward ten meters".
# `real_recordings` fetches that package's source archive once from PyPI (the registry pip
# installs from, through its simple index), checks its SHA-256, takes out the recordings and
# their transcripts, and writes them as a manifest through `prepare_manifest`: the door of
# this chapter.

# %%
#| export
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.request

import numpy as np

from paraformer_edu.corpus import cache_dir

POCKETSPHINX = "pocketsphinx==5.1.1"  # its test/data: LibriVox read speech and short commands
POCKETSPHINX_SHA256 = "675778b309a22dfc9b7d37f7621976bba491d2a5f8c59696bd77fd6d07271355"
SIMPLE_INDEX = "https://pypi.org/simple"  # PEP 691: the index pip reads, as JSON


def _download_sdist(spec: str, sha256: str, folder: str) -> Path:
    """Download a release's source archive from PyPI into `folder`, checked against `sha256`."""
    name, version = spec.split("==")
    archive = Path(folder) / f"{name}-{version}.tar.gz"
    accept = {"Accept": "application/vnd.pypi.simple.v1+json"}
    try:
        request = urllib.request.Request(f"{SIMPLE_INDEX}/{name}/", headers=accept)
        with urllib.request.urlopen(request, timeout=60) as response:
            files = json.load(response)["files"]
        url = next(f["url"] for f in files if f["filename"] == archive.name)
        with urllib.request.urlopen(url, timeout=600) as response:
            archive.write_bytes(response.read())
    except (OSError, ValueError, KeyError, StopIteration):  # no direct route: pip knows the way
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
        command += ["--no-binary", ":all:", "-d", folder, spec]
        if subprocess.run(command, capture_output=True).returncode or not archive.exists():
            raise CorpusError(f"could not download {spec} from PyPI: is the registry reachable?")
    if hashlib.sha256(archive.read_bytes()).hexdigest() != sha256:
        raise CorpusError(f"{archive.name} is not the file PyPI published (its SHA-256 differs)")
    return archive


def _pocketsphinx_rows(data: Path) -> Iterator[Row]:
    """The recordings of pocketsphinx's test/data with their transcripts."""
    for wav in sorted((data / "librivox").glob("*.wav")):
        yield Row(f"{wav.with_suffix('.txt')}:1", wav, wav.with_suffix(".txt").read_text())
    listing = data / "cards" / "cards.transcription"
    for n, line in enumerate(listing.read_text().splitlines(), 1):
        text, number = re.fullmatch(r"<s>(.*)</s> \((\d+)\)", line.strip()).groups()
        yield Row(f"{listing}:{n}", data / "cards" / f"{number}.wav", text)
    raw = np.fromfile(data / "goforward.raw", dtype="<i2")  # 16 kHz, 16-bit, no header
    sf.write(data / "goforward.wav", raw, 16000)
    yield Row("goforward.raw", data / "goforward.wav", "go forward ten meters")


# %%
#| export
def real_recordings(root=None) -> Path:
    """A manifest of the real English recordings in PyPI's pocketsphinx source package."""
    folder = Path(root or cache_dir() / "real-speech")
    if (folder / "real.jsonl").exists():
        return folder / "real.jsonl"
    with tempfile.TemporaryDirectory() as download:
        archive = _download_sdist(POCKETSPHINX, POCKETSPHINX_SHA256, download)
        partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        with tarfile.open(archive) as sdist:
            wanted = re.compile(r"[^/]+/test/data/(librivox/.*\.(wav|txt)|cards/.*|goforward.raw)")
            members = [m for m in sdist.getmembers() if wanted.fullmatch(m.name)]
            sdist.extractall(partial, members, filter="data")
        data = next(partial.glob("*/test/data"))
        prepare_manifest(_pocketsphinx_rows(data), partial / "real.jsonl", on_problem="raise")
        # the manifest's paths, into the folder's final place, then the folder moved there
        lines = (
            (partial / "real.jsonl")
            .read_text()
            .replace(str(partial.resolve()), str(folder.resolve()))
        )
        _write_atomically(partial / "real.jsonl", lines.splitlines(keepends=True))
    partial.rename(folder)
    return folder / "real.jsonl"


# %%
real = read_manifest(real_recordings())
print_table(
    [(Path(e["audio_filepath"]).parent.name, e["duration"], e["text"][:64]) for e in real],
    ["set", "seconds", "transcript"],
    {"seconds": ".1f"},
)

# %%
first = real[1]
listen(first["audio_filepath"], f"a LibriVox reader: \u201c{first['text']}\u201d")

# %% [markdown]
# The book's model on these eleven recordings, beside its own test split, greedy and with
# chapter 9's language model:

# %%
from paraformer_edu.beam_search import LMSearch
from paraformer_edu.language_model import book_language_model

metrics = json.loads((ROOT / "models" / "paraformer-book" / "metrics.json").read_text())
lm_weight = metrics["lm"]["weight"]  # tuned on dev (chapter 9)
features = [recognizer.features(e["audio_filepath"]) for e in real]
references = [normalize_text(e["text"]) for e in real]
greedy = [t.text for t in recognizer.recognize_features(features)]
recognizer.search = LMSearch(book_language_model(recognizer.tokenizer), lm_weight, 4)
fused = [t.text for t in recognizer.recognize_features(features)]
recognizer.search = None
for e, g in list(zip(real, greedy))[1:6:2]:
    print(textwrap.fill(f"said:  {normalize_text(e['text'])}", 100, subsequent_indent=" " * 7))
    print(textwrap.fill(f"heard: {g}", 100, subsequent_indent=" " * 7), end="\n\n")

# %% [markdown]
# The transcripts are far from what was said. The figures, beside the model's own test
# split:

# %%
sets = {"librivox": "LibriVox reading", "cards": "card names", "data": "go forward"}
rows = []
for key, label in sets.items():
    pick = [i for i, e in enumerate(real) if Path(e["audio_filepath"]).parent.name == key]
    r, g, f = ([x[i] for i in pick] for x in (references, greedy, fused))
    rows.append((label, len(pick), cer(r, g), cer(r, f), wer(r, g)))
rows.append(
    (
        "all real recordings",
        len(real),
        cer(references, greedy),
        cer(references, fused),
        wer(references, greedy),
    )
)
test = metrics["test"]  # the model's own test split: synthetic voices it was trained on
rows.append(
    (
        "its synthetic test split",
        test["utterances"],
        test["cer"],
        test["with_lm"]["cer"],
        test["wer"],
    )
)
print_table(
    rows,
    ["recordings", "utts", "CER", "CER + LM", "WER"],
    {"CER": ".1%", "CER + LM": ".1%", "WER": ".1%"},
)
real_cer = cer(references, greedy)
assert real_cer > 2 * test["cer"]  # the domain shift: more than twice the synthetic error
assert abs(cer(references, fused) - real_cer) < 0.05  # and the language model barely moves it

# %% [markdown]
# More than twice the error of the synthetic test split, and most words wrong: a
# recognizer trained on one synthesiser has learnt that synthesiser's voices, not
# speech. This is the **domain shift** every recognizer trained on one kind of audio
# meets on another, here at its most extreme. Two of the usual suspects can be ruled out
# at once. The language model barely helps (the words are not the problem: the sounds
# are). And the features' normalisation is not it either: chapter 1's CMVN statistics
# come from the synthetic corpus, but normalising each real recording by its own mean
# and variance changes little:

# %%
raw = [frontend.raw(paraformer_edu.load_audio(e["audio_filepath"])) for e in real]
own = [(x - x.mean(0)) / x.std(0).clamp(min=1e-3) for x in raw]  # (T', 560) each
own_cmvn = [t.text for t in recognizer.recognize_features(own)]
print(
    f"corpus CMVN: CER {real_cer:.1%}; each recording's own CMVN: {cer(references, own_cmvn):.1%}"
)
assert abs(cer(references, own_cmvn) - real_cer) < 0.1

# %% [markdown]
# What does differ? {numref}`fig-ch11-shift` puts a synthetic test utterance and a real
# reader side by side, as the model's filterbank sees them, and averages the log-mel
# energy of every band over each set.

# %% mystnb={"figure": {"caption": "Left and middle: log-mel filterbank energies of a synthetic test utterance and of a LibriVox reader, on one colour scale. Right: the mean log energy of each mel band over 60 synthetic test utterances and over the eleven real recordings.", "name": "fig-ch11-shift"}, "image": {"alt": "Two spectrograms and a line plot comparing synthetic and real speech across mel bands."}}
synthetic = read_manifest(book_manifests["test"])[:60]
shown = {
    "synthetic (espeak-ng)": paraformer_edu.load_audio(synthetic[0]["audio_filepath"]),
    "real (LibriVox reader)": paraformer_edu.load_audio(real[1]["audio_filepath"]),
}
F = {name: paraformer_edu.fbank(wave) for name, wave in shown.items()}  # (T, 80) each
low, high = (float(torch.cat(list(F.values())).quantile(q)) for q in (0.05, 0.995))
fig, axes = plt.subplots(
    1, 3, figsize=(11.5, 3.3), gridspec_kw={"width_ratios": [1, 1.3, 1]}, layout="constrained"
)
for ax, (name, f) in zip(axes, F.items()):
    image = ax.imshow(
        f.T, origin="lower", aspect="auto", extent=(0, len(f) / 100, 0, 80), vmin=low, vmax=high
    )
    ax.set(title=name, xlabel="time (s)", ylabel="mel band")
fig.colorbar(image, ax=axes[1], label="log energy")
bands = {
    "synthetic test": [
        paraformer_edu.fbank(paraformer_edu.load_audio(e["audio_filepath"])) for e in synthetic
    ],
    "real recordings": [
        paraformer_edu.fbank(paraformer_edu.load_audio(e["audio_filepath"])) for e in real
    ],
}
means = {name: torch.cat(fs).mean(0) for name, fs in bands.items()}  # (80,) over all frames
for name, mean in means.items():
    axes[2].plot(mean, label=name)
axes[2].set(title="mean per band", xlabel="mel band", ylabel="mean log energy")
axes[2].legend(loc="lower left")
top = {name: float(mean[-5:].mean()) for name, mean in means.items()}  # the highest 5 bands
assert top["real recordings"] < top["synthetic test"] - 1.5
plt.show()

# %% [markdown]
# The synthesiser's voiced sounds are sharp, evenly spaced harmonics that hold still
# within a sound and jump from one sound to the next; the reader's harmonics glide and
# blur, and the sounds run into each other. The real recordings also carry almost no
# energy in the highest bands (the LibriVox clips went through MP3 at 64 kbit/s, which
# cuts the top of the spectrum), and the balance of the lower bands differs too: more in
# the lowest few, less from about band 5 to 25. A network that learnt
# espeak-ng's crisp patterns meets smeared ones, on a different spectral balance.
#
# Is the missing top of the spectrum what hurts? Cut it from the synthetic test audio
# (a low-pass filter at 6.5 kHz, applied twice for a steeper edge: less energy at the top
# than the real recordings have) and recognise again:

# %%
def band_limited(wave: torch.Tensor, cutoff: float = 6500.0) -> torch.Tensor:
    """The wave (S,) without its content above `cutoff` Hz (two biquad low-passes)."""
    for _ in range(2):
        wave = torchaudio.functional.lowpass_biquad(wave, 16000, cutoff)  # (S,)
    return wave


said = [normalize_text(e["text"]) for e in synthetic]
waves = [paraformer_edu.load_audio(e["audio_filepath"]) for e in synthetic]  # (S,) each
limited = [band_limited(w) for w in waves]  # (S,) each
top_cut = float(torch.cat([paraformer_edu.fbank(w) for w in limited]).mean(0)[-5:].mean())
full = [recognizer.features(w, 16000) for w in waves]  # (T', 560) each
cut = [recognizer.features(w, 16000) for w in limited]  # (T', 560) each
full, cut = ([t.text for t in recognizer.recognize_features(x)] for x in (full, cut))
print(
    f"mean log energy of the top 5 bands: real {top['real recordings']:.1f}, "
    f"synthetic {top['synthetic test']:.1f}, synthetic cut at 6.5 kHz {top_cut:.1f}"
)
print(
    f"{len(said)} synthetic test utterances: CER {cer(said, full):.1%}, "
    f"cut at 6.5 kHz: {cer(said, cut):.1%}; real recordings: {real_cer:.1%}"
)
cost, gap = cer(said, cut) - cer(said, full), real_cer - cer(said, full)
print(f"the cut costs {100 * cost:.1f} points of CER: {cost / gap:.0%} of the gap to real speech")
assert top_cut <= top["real recordings"]  # at least as little top as the real recordings
assert 0 <= cost < gap / 4  # a small part of the gap

# %% [markdown]
# With even less energy at the top than the real recordings, the synthetic speech loses
# some points, but a small part of the gap to real speech: the missing top of the
# spectrum is not what makes real speech hard for this model. What differs lies in the
# sounds themselves.
#
# What narrows such a gap is data that varies the way real speech varies: more voices,
# and more natural ones, speed perturbation, reverberation and noise (chapter 1 already
# applies the last three to 30% of the training audio), and, above all, real recordings
# in training: which is what the loaders above are for.
#
# ### More natural voices, measured
#
# espeak-ng is a formant synthesiser: its voices are rules, not recordings. Festival's
# diphone voices (`kal`, `ked`) glue together snippets of a real speaker, and its HMM voice
# (`slt`) is a statistical model of one; both sound closer to a person. Festival comes
# from Debian, not PyPI, so the experiment is a script rather than a cell:
# `tools/natural_voices.py` speaks 4,000 of the book corpus's training sentences with
# those three voices at varied speed, then fine-tunes the book's model (`train --init`)
# for 500 steps twice: on the espeak-ng corpus alone (the control: the same steps, the
# same schedule) and on the corpus plus the Festival utterances. Neither run hears a
# real recording. Its stored results, measured from an earlier release of the book's
# model (7,000 steps; the figures above are today's):

# %%
stored = json.loads((ROOT / "benchmarks" / "results" / "natural_voices.json").read_text())
results = stored["results"]
sets = ["real recordings", "Festival voices (test)", "espeak-ng voices (test)"]
print_table(
    [[model, *[r[s]["cer"] for s in sets]] for model, r in results.items()],
    ["model (CER)", "real recordings", "Festival test", "espeak-ng test"],
    formats={h: ".1%" for h in ["real recordings", "Festival test", "espeak-ng test"]},
)
base, control, festival = (r["real recordings"]["cer"] for r in results.values())
print(f"real recordings: {base:.1%} -> {festival:.1%} with Festival's voices")
print(f"(and {control:.1%} with the same steps on espeak-ng alone)")
assert festival < control - 0.05 and festival < base - 0.05  # the voices, not the extra steps

# %% [markdown]
# The extra steps alone move the real recordings by a few points; the same steps with
# Festival's voices move them about four times as much, without a single real recording
# in training. The espeak-ng test split stays at the book model's figure, two points
# behind the control (which spent all its steps on espeak-ng voices). Eleven recordings
# and one seed are a small sample: the direction is clear, its size less so. Voices are a
# lever: the more the training voices differ from each other, the less the model can rely
# on the traits of any one of them. The 50% this chapter aimed at on real speech is not reached with
# three extra voices and 500 steps; what would go further, in order of expected effect:
# real recordings (LibriSpeech's 100 hours, below, or Common Voice), many more voices
# (every Festival and Flite voice, neural TTS), and a larger model trained for longer.
#
# ## From one process to many
#
# Training is a loop of forward, backward, step over batches. Data parallelism runs
# that loop in $P$ processes (one per GPU, or several on a CPU), each with a copy of the
# model: every process computes the gradient of its own share of the batch, the
# processes **average their gradients** (an all-reduce), and each takes the same
# optimiser step, so the copies stay identical. PyTorch's `DistributedDataParallel`
# (DDP) does the averaging, overlapped with the backward pass; `torchrun` starts the
# processes and tells each its rank $r$ and the world size $P$.
#
# What must the shares be so that $P$ processes train the same model as one? The loss
# of a batch is a mean, and a mean splits into a weighted sum of the means of its
# pieces. Chapter 6's loss has parts with different denominators: the cross-entropy
# $\mathcal{L}_{ce}$ is a mean over the $N$ tokens of the batch; the CTC and quantity
# losses are means over its $B$ utterances. For pieces $k$ with $N_k$ tokens and $B_k$
# utterances,
#
# $$
# \mathcal{L} = \sum_k \left[ (1 - \lambda_{ctc}) \frac{N_k}{N} \mathcal{L}_{ce}^{(k)}
#   + \frac{B_k}{B} \left( \lambda_{ctc} \mathcal{L}_{ctc}^{(k)}
#   + \lambda_{q} \mathcal{L}_{q}^{(k)} \right) \right],
# $$
#
# and since the gradient is linear, $\nabla \mathcal{L}$ is the same sum of the pieces'
# gradients. Averaging over $P$ processes divides by $P$, so each process scales its
# share by $P$. The same identity gives **gradient accumulation**: a process that cannot
# hold its share in memory at once runs it as $A$ smaller pieces, one after the other,
# adding their gradients before the step.
#
# Every process draws the same batches from the same seeded sampler (chapter 1's
# `BucketBatchSampler`) and keeps its pieces: process $r$ of $P$, accumulating $A$, takes
# pieces $rA, \ldots, rA + A - 1$ of $PA$. A run on eight GPUs then trains on exactly the
# batches of a run on one; `data.max_frames` is the size of the whole batch, and each
# piece holds about $1/(PA)$ of it. First the split: consecutive rows, each piece trimmed
# to its own longest utterance.

# %%
#| export distributed
import contextlib
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from paraformer_edu.training import Trainer, autocast, move_batch, warmup_lr


def shard_batch(batch: dict, parts: int) -> list[dict]:
    """A padded batch cut into `parts` runs of consecutive rows, each trimmed to its longest."""
    pieces = []
    for rows in torch.arange(len(batch["texts"])).tensor_split(parts):  # (b,) each
        T = int(batch["feature_lengths"][rows].max()) if len(rows) else 0
        piece = {
            "index": batch["index"][rows],  # (b,)
            "texts": [batch["texts"][i] for i in rows.tolist()],
            "features": batch["features"][rows, :T],  # (b, T_k, D)
            "feature_lengths": batch["feature_lengths"][rows],  # (b,)
        }
        if "targets" in batch:
            N = int(batch["target_lengths"][rows].max()) if len(rows) else 0
            piece["targets"] = batch["targets"][rows, :N]  # (b, N_k)
            piece["target_lengths"] = batch["target_lengths"][rows]  # (b,)
        pieces.append(piece)
    return pieces


# %% [markdown]
# A check of the split and of the equation: the loss and gradient of a real training
# batch, against the weighted sum over three pieces (no dropout, no GLM sampling, so
# that both sides see the same computation).

# %%
from paraformer_edu.dataset import SpeechDataset, collate
from paraformer_edu.model import Paraformer

SMALL = [  # a small model without GLM sampling: both sides compute the same function
    "model.encoder.d_model=64",
    "model.encoder.n_layers=2",
    "model.encoder.d_ffn=128",
    "model.decoder_layers=1",
    "model.decoder_ffn=128",
    "model.glm_lambda=0",
]
tiny_config = load_config(ROOT / "configs" / "paraformer.yaml", SMALL)
c = tiny_config.model
tiny_model = Paraformer(c)
test_set = SpeechDataset(book_manifests["test"], frontend, recognizer.tokenizer.encode)
batch = collate([test_set[i] for i in range(10)])

# %% [markdown]
# The loss and the gradient of the whole batch, then of its three pieces weighted by
# their shares:

# %%
def gradient(model, pieces, weights) -> tuple[float, torch.Tensor]:
    """Weighted loss over the pieces and the flattened gradient of all parameters."""
    model.zero_grad()
    total = 0.0
    for piece, (u, k) in zip(pieces, weights):
        out = model(
            piece["features"], piece["feature_lengths"], piece["targets"], piece["target_lengths"]
        )
        loss = (1 - c.ctc_weight) * k * out["loss_ce"] + u * (
            c.ctc_weight * out["loss_ctc"] + c.quantity_weight * out["loss_quantity"]
        )
        loss.backward()
        total += float(loss.detach())
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return total, torch.cat([g.flatten() for g in grads])  # (number of parameters,)


whole_loss, whole_grad = gradient(tiny_model, [batch], [(1.0, 1.0)])
pieces = shard_batch(batch, 3)
B, N = len(batch["texts"]), int(batch["target_lengths"].sum())
weights = [(len(p["texts"]) / B, int(p["target_lengths"].sum()) / N) for p in pieces]
split_loss, split_grad = gradient(tiny_model, pieces, weights)
print(
    f"pieces of {[len(p['texts']) for p in pieces]} utterances, "
    f"frames {[p['features'].shape[1] for p in pieces]} (whole batch: {batch['features'].shape[1]})"
)
rel = ((split_grad - whole_grad).norm() / whole_grad.norm()).item()
print(f"loss {whole_loss:.6f} vs {split_loss:.6f}; gradient relative difference {rel:.1e}")
assert abs(whole_loss - split_loss) < 1e-5 and rel < 1e-5

# %% [markdown]
# Equal up to float rounding. A piece of consecutive rows of a length-bucketed batch is
# also shorter to pad than the whole batch was, so the pieces together compute less
# than the batch did.
#
# ### The distributed trainer
#
# `DistributedTrainer` is chapter 7's `Trainer` with three changes. Its `train_step`
# runs this process's pieces, scaling each piece's loss by its share of the batch
# (times $P$, which DDP's averaging divides out), lets DDP average the gradients on the
# last piece only (`no_sync` on the others: one all-reduce per step, not one per piece),
# and sums the logged statistics over all processes, so that every process logs the
# numbers of the whole batch. Its evaluation and checkpoints happen in process 0 only,
# which then sends the dev row to the others: one process writes the log and the
# checkpoints, and every process knows the same history. And the GLM sampler's
# generator (chapter 6) is seeded from the step and the rank, so that each process draws
# its own choices and a resumed run draws the same ones again.

# %%
#| export distributed
def init_distributed() -> tuple[int, int]:
    """Join the process group that torchrun describes (gloo on CPUs, NCCL on GPUs): (rank, P)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "gloo"  # CPU tensors: the batch statistics, and whole runs on CPUs
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "cpu:gloo,cuda:nccl"  # NCCL for tensors on GPUs
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def shares(piece: dict, batch: dict) -> tuple[float, float]:
    """A piece's share of the batch's utterances and of its tokens."""
    tokens = int(batch["target_lengths"].sum())
    return len(piece["texts"]) / len(batch["texts"]), int(piece["target_lengths"].sum()) / max(
        tokens, 1
    )


# the statistics of the forward pass that are means over tokens; the others are over utterances
PER_TOKEN = ("loss_ce", "accuracy", "accuracy_first_pass", "glm_replaced")


# %% [markdown]
# The class is built up in steps, as chapter 7 built the `Trainer`, with the same
# three-line helper:

# %%
def add_to_class(cls):
    """Attach the decorated function to cls as a method; its name keeps its old value (or None)."""
    name = lambda method: getattr(method, "__func__", method).__name__  # noqa: E731
    return lambda method: setattr(cls, name(method), method) or globals().get(name(method))


# %%
#| export distributed
class DistributedTrainer(Trainer):
    """Trainer for P processes (torchrun) and gradient accumulation: the same model as one."""

    def __init__(self, config, out_dir, manifests: dict | None = None, init=None):
        if config.data.accumulate < 1:
            raise ValueError(f"data.accumulate must be at least 1, not {config.data.accumulate}")
        self.rank, self.world = (
            (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        )
        if self.rank > 0:
            dist.barrier()  # process 0 builds the corpus and feature caches first
        super().__init__(config, out_dir, manifests, init)
        if self.rank == 0 and self.world > 1:
            dist.barrier()
        self.ddp = self.model
        if self.world > 1:  # broadcasts process 0's weights to all
            ids = [torch.cuda.current_device()] if self.device.type == "cuda" else None
            # a step without GLM replacements leaves the decoder's embedding unused
            self.ddp = DistributedDataParallel(self.model, ids, find_unused_parameters=True)

    def my_pieces(self, batch: dict) -> list[tuple[dict, float, float]]:
        """This process's pieces of a batch with their shares; an empty piece weighs 0."""
        A = self.config.data.accumulate
        mine = shard_batch(batch, self.world * A)[self.rank * A : (self.rank + 1) * A]
        stand_in = shard_batch(batch, len(batch["texts"]))[0]  # keeps all processes in step
        return [(p, *shares(p, batch)) if p["texts"] else (stand_in, 0.0, 0.0) for p in mine]


# %% [markdown]
# One piece's forward pass, its loss weighted by the piece's shares of the batch's
# utterances ($u$) and tokens ($k$), as derived above:

# %%
#| export distributed
@add_to_class(DistributedTrainer)
def piece_loss(self, piece: dict, u: float, k: float) -> dict:
    """The forward pass of one piece; its loss is the piece's share of the batch's loss."""
    c = self.config.model
    b = move_batch(piece, self.device)
    with autocast(self.device, self.precision):  # bfloat16 on a GPU (chapter 7)
        out = self.ddp(
            b["features"], b["feature_lengths"], b["targets"], b["target_lengths"], self.generator
        )
    out["loss"] = (1 - c.ctc_weight) * k * out["loss_ce"] + u * (
        c.ctc_weight * out["loss_ctc"] + c.quantity_weight * out["loss_quantity"]
    )
    return out


# %% [markdown]
# The step, and the sum of the logged statistics over the processes:

# %%
#| export distributed
@add_to_class(DistributedTrainer)
def train_step(self, batch: dict) -> dict:
    """One optimiser step over this process's pieces of the batch; gradients averaged by DDP."""
    t = self.config.training
    self.step += 1
    lr = warmup_lr(self.step, t.lr, t.warmup_steps)
    for group in self.optimizer.param_groups:
        group["lr"] = lr
    seed = (t.seed * 1_000_003 + self.step) * 1_009 + self.rank  # this step's, this process's
    self.generator.manual_seed(seed)  # the GLM sampler's choices
    torch.manual_seed(seed)  # dropout (the trainer's own generator, inside its _scope)
    self.optimizer.zero_grad(set_to_none=True)
    pieces, sums = self.my_pieces(batch), {}
    for i, (piece, u, k) in enumerate(pieces):
        last = i == len(pieces) - 1  # gradients are averaged over processes after the last
        with contextlib.nullcontext() if last or self.world == 1 else self.ddp.no_sync():
            out = self.piece_loss(piece, u, k)
            (self.world * out["loss"]).backward()
        for key, value in out.items():  # the batch's statistics: weighted sums of the pieces'
            w = 1.0 if key == "loss" else k if key in PER_TOKEN else u
            sums[key] = sums.get(key, 0.0) + w * float(value.detach())
    grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
    self.optimizer.step()
    return {
        "step": self.step,
        "lr": lr,
        "grad_norm": float(grad_norm),
        "utterances": len(batch["texts"]),
        **self.all_sum(sums),
    }


@add_to_class(DistributedTrainer)
def all_sum(self, values: dict) -> dict:
    """Sum each value over the processes (one all-reduce)."""
    if self.world == 1:
        return values
    total = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)  # (K,)
    dist.all_reduce(total)
    return dict(zip(values, total.tolist()))


# %% [markdown]
# Evaluation, logs and checkpoints, in process 0 only:

# %%
#| export distributed
@add_to_class(DistributedTrainer)
def _evaluate_and_save(self) -> None:
    """Process 0 evaluates and writes the checkpoints; every process then logs the same row."""
    if self.rank == 0:
        Trainer._evaluate_and_save(self)
    if self.world > 1:
        shared = [(self.log[-1], self.best_cer) if self.rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)
        if self.rank:
            self.log.append(shared[0][0])
            self.best_cer = shared[0][1]


@add_to_class(DistributedTrainer)
def _append_jsonl(self, row: dict) -> None:
    """Only process 0 writes the log file."""
    if self.rank == 0:
        Trainer._append_jsonl(self, row)


@add_to_class(DistributedTrainer)
def save(self, path) -> None:
    """Only process 0 writes checkpoints (every process holds the same state)."""
    if self.rank == 0:
        Trainer.save(self, path)


# %% [markdown]
# ### Two processes against one
#
# `python -m paraformer_edu train` uses the `DistributedTrainer` when `torchrun` starts it
# in several processes (or when `data.accumulate` is above 1). Three short runs of a small
# model on the book corpus, in one call each: one process as in chapter 7; one process
# accumulating two pieces a step; two processes (the `gloo` backend, one CPU thread each)
# started by `torchrun`. GLM sampling, SpecAugment and dropout are off, so that the three
# runs compute the same functions and any difference is the arithmetic of the split.

# %%
small = SMALL + [
    "data.spec_augment=false",
    "training.max_steps=8",
    "training.max_minutes=0",
    "training.log_every=1",
    "training.eval_every=1000",
    "training.eval_utterances=20",
    "training.threads=1",
    "training.device=cpu",
]
recipe = str(ROOT / "configs" / "paraformer.yaml")
launch = {
    "one process": [sys.executable, "-m", "paraformer_edu"],
    "one process, accumulating 2": [sys.executable, "-m", "paraformer_edu"],
    "two processes (torchrun)": [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "paraformer_edu",
    ],
}
runs = {}
for name, command in launch.items():
    out = work / "runs" / name.split()[0].replace(",", "") / str(len(runs))
    extra = ["data.accumulate=2"] if "accumulating" in name else []
    done = subprocess.run(
        command + ["train", "--config", recipe, "--out", str(out), "--override", *small, *extra],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    runs[name] = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    files = sorted(p.name for p in out.iterdir())
    print(f"{name}: wrote {', '.join(files)}")

# %%
losses = {name: [r["loss"] for r in log if "loss" in r] for name, log in runs.items()}
base = losses["one process"]
print_table(
    [(step + 1, *(losses[name][step] for name in runs)) for step in range(len(base))],
    ["step", *runs],
    {name: ".6f" for name in runs},
)
for name in list(runs)[1:]:
    diff = max(abs(a - b) / a for a, b in zip(base, losses[name]))
    print(f"{name}: largest relative difference from one process {diff:.1e}")
    assert len(losses[name]) == len(base) and diff < 1e-6
dev = [[r["dev_cer"] for r in log if "dev_cer" in r] for log in runs.values()]
print("dev CER after the last step:", ", ".join(f"{d[-1]:.1%}" for d in dev))
assert all(len(d) == 1 for d in dev)  # one evaluation, logged once

# %% [markdown]
# The three runs agree to about six significant digits at every step: what is left is
# the order in which floating-point sums are added, which no parallel computation can
# keep. One log file and one set of checkpoints were written by each run, whatever the
# number of processes. With a GPU per process the command is the same
# (`init_distributed` adds NCCL for the GPUs' tensors), and for several machines
# `torchrun` takes `--nnodes` and a
# rendezvous address:
#
# ```bash
# torchrun --nproc-per-node=8 -m paraformer_edu train --config configs/librispeech-100.yaml
# torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \
#     -m paraformer_edu train --config configs/librispeech-100.yaml
# python -m paraformer_edu train --resume runs/librispeech-100/latest.pt   # or under torchrun
# ```
#
# A resumed run goes on exactly where it stopped, with the same number of processes:
# the checkpoint holds the step, the position in the epoch and the optimiser, every
# process draws the same batches, and the random choices of each step (GLM sampling,
# dropout) are seeded from the step and the process's rank. (The tests check this, and
# the two-process run against one process.)
#
# ### A recipe for LibriSpeech on one GPU
#
# `configs/librispeech-100.yaml` trains on LibriSpeech's `train-clean-100` (100 hours,
# 28,539 utterances, 251 speakers), prepared as above into `data/librispeech-100/`: a
# 256 x 12 encoder (about 17 M parameters in all), BPE-500, dropout 0.1, batches of
# 20,000 padded frames (20 minutes of speech), features on disk. No GPU was at hand for
# this chapter, so its time per epoch is an **estimate**: the training throughput of the
# recipe's model measured on this machine's CPU, and what it implies.

# %%
# NBVAL_IGNORE_OUTPUT
ls_config = load_config(ROOT / "configs" / "librispeech-100.yaml")
ls_model = Paraformer(ls_config.model)
parameters = sum(p.numel() for p in ls_model.parameters())
# longer utterances, as LibriSpeech's are: four short ones end to end (about 10 s), 50 tokens
raw = [in_memory[i % len(in_memory)].float() for i in range(32)]  # (T', 560) each
X = [torch.cat(raw[i : i + 4]) for i in range(0, 32, 4)]  # 8 x (about 160, 560)
ls_batch = collate(
    [
        {"index": i, "text": "", "features": x, "targets": torch.full((50,), 5)}
        for i, x in enumerate(X)
    ]
)
optimizer = torch.optim.Adam(ls_model.parameters(), lr=1e-4)
timings = []
for _ in range(3):
    start = time.perf_counter()
    out = ls_model(
        ls_batch["features"],
        ls_batch["feature_lengths"],
        ls_batch["targets"],
        ls_batch["target_lengths"],
        torch.Generator().manual_seed(0),
    )
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    timings.append(time.perf_counter() - start)
audio_seconds = float(ls_batch["feature_lengths"].sum()) * frontend.frame_seconds
speed = audio_seconds / min(timings[1:])  # seconds of speech trained per second
epochs = ls_config.training.max_steps * ls_config.data.max_frames * 0.06 / (100 * 3600)
print(
    f"recipe model: {parameters / 1e6:.1f} M parameters; weights + Adam: "
    f"{16 * parameters / 2**20:.0f} MiB"
)
print(f"this CPU, 2 threads: {speed:.0f} s of speech trained per second (measured)")
steps = ls_config.training.max_steps
print(f"one epoch of train-clean-100: {100 / speed:.1f} h; the recipe's {steps:,} steps")
print(f"({epochs:.0f} epochs): {100 * epochs / speed / 24:.0f} days on this CPU")

# %% [markdown]
# On two CPU cores the recipe's whole run would take days: that corpus needs a GPU.
# The figure measured here is the base of an **estimate**: a data-centre GPU trains a
# model of this size one to two orders of magnitude faster than two CPU cores, which
# brings an epoch to minutes and the run to hours; a reader with a GPU measures it with
# `benchmarks/bench_training_step.py`. Weights, gradients and Adam's two moments take 16
# bytes a parameter, a quarter of a GiB here: on a GPU the activations of a batch take
# most of the memory, which is what `data.max_frames` and `data.accumulate` trade
# against each other. On a GPU with bfloat16 the training command also runs the forward
# pass in bfloat16 mixed precision (chapter 7's `training.precision: auto`); on a CPU
# it stays in float32.
#
# ## Summary
#
# - A corpus's listing becomes a manifest through one door, `prepare_manifest`, which
#   checks every row and reports what it leaves out with its file and line
#   (`on_problem="skip"`) or stops at the first bad row (`"raise"`); readers for
#   LibriSpeech, LJSpeech, Common Voice and JSON lines only say where rows are.
# - Features of a corpus larger than memory live in one memory-mapped file
#   (`data.features_on_disk`), read as batches need them.
# - The book's model, trained on synthetic voices only, gets most words of real
#   recordings wrong: more than twice its synthetic test error. Neither the language
#   model, nor the normalisation, nor the missing top of the spectrum explains it. More
#   natural voices do part of the work: 500 steps with three Festival voices added move
#   the real recordings' CER by about 13 points, against about 3 for the same steps on
#   espeak-ng alone. Real recordings in training would do the rest.
# - A batch's loss is a weighted sum of its pieces' losses (tokens for the
#   cross-entropy, utterances for CTC and the quantity loss); with those weights, $P$
#   processes or $A$ accumulated pieces train on the same batches as one process, and,
#   without random choices inside a step (GLM sampling, dropout), the same model to float
#   rounding; `torchrun -m paraformer_edu train` does it.
#
# ## Exercises
#
# 1. Common Voice's `validated.tsv` lists clips that several people listened to. Prepare
#    the miniature Common Voice with `max_seconds=2`: how many clips are left, and what
#    does the report say of the others?
# 2. Split the batch of the gradient check into as many pieces as it has utterances
#    (one utterance a piece) and check the loss and the gradient again. Then weigh every
#    piece by its share of the utterances only (as a naive average of per-process
#    losses would): how far off is the gradient then?

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
# Exercise 1: the utterances are 1-4 s long; those over 2 s are reported, one line each.
short = prepare_corpus(
    "common-voice",
    work / "cv-corpus" / "en" / "validated.tsv",
    work / "cv-short.jsonl",
    max_seconds=2,
)
print(f"kept {short.utterances}; left out {len(short.problems)}:")
for p in short.problems:
    print(" ", Path(p.where).name, p.reason)
assert short.utterances + len(short.problems) == len(source)

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
# Exercise 2: one utterance a piece is still exact; utterance-only weights are not.
singles = shard_batch(batch, B)
exact = [(1 / B, int(p["target_lengths"].sum()) / N) for p in singles]
naive = [(1 / B, 1 / B) for p in singles]
for label, w in [("token and utterance shares", exact), ("utterance shares only", naive)]:
    loss, grad = gradient(tiny_model, singles, w)
    rel = ((grad - whole_grad).norm() / whole_grad.norm()).item()
    print(f"{label}: loss {loss:.6f} (whole batch {whole_loss:.6f}), gradient off by {rel:.1e}")
