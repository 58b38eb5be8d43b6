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
# # Using the model: long audio, files, ONNX and a service
#
# Chapters 1 to 9 built a recognizer and measured it on short utterances, a few seconds
# each. People who use a recognizer ask other questions. Can it transcribe a meeting of
# an hour? Can it work through a folder of recordings overnight and pick up where it
# stopped? Can its network run outside PyTorch? Can a web page send it audio and get text
# back?
#
# This chapter answers each with a small piece of `paraformer_edu`, built and measured
# here:
#
# - **long audio**: self-attention's memory grows with the square of the length, so a
#   long recording is read block by block, each block cut at its quietest moment (an
#   energy-based voice activity detector), transcribed, and its words and timestamps put
#   back on the recording's clock, with memory that does not grow with the recording;
# - **many files**: one JSON line per file, with timestamps; resumable; a bad file is
#   reported and skipped, never the end of the run;
# - **ONNX**: the whole model, encoder, integrate-and-fire and decoder, exported to one
#   ONNX graph and run with ONNX Runtime, checked against PyTorch;
# - **an HTTP service**: `POST /transcribe` on FastAPI and uvicorn, concurrent requests
#   gathered into batches, limits with clear errors.
#
# ## Learning goals
#
# After this chapter you can
#
# - say how the memory of self-attention grows with the length of a recording, and find
#   the pauses of a recording from its frame energies;
# - transcribe a long recording block by block with bounded memory, stitch the words and
#   timestamps onto one clock, and measure the error rates and timestamp errors;
# - write a batch job that is resumable and survives bad input;
# - export a model whose output length depends on its input to ONNX, by bounding that
#   length, and check the exported graph against PyTorch;
# - serve a model over HTTP, batch concurrent requests, and refuse bad requests with a
#   status and a message that says what to do.

# %%
#| default_exp transcription
# In Colab, clone the repository first (this chapter loads the book's model, models/):
# # !git clone -q --depth 1 https://github.com/paraformer-edu/paraformer-edu
# # !pip install -q -e "./paraformer-edu[book]"
# # %cd paraformer-edu
# %matplotlib inline
import contextlib
import difflib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import matplotlib.pyplot as plt
import numpy as np
import soundfile as sf
import torch

import paraformer_edu
from paraformer_edu.corpus import build_corpus, corpus_config, read_manifest
from paraformer_edu.display import book_style, listen, print_table
from paraformer_edu.metrics import cer, wer
from paraformer_edu.tokenizer import normalize_text

book_style()
torch.manual_seed(0)
torch.set_num_threads(2)
print("paraformer_edu", paraformer_edu.__version__)

# %% [markdown]
# The model: the book's committed model by default (set `PARAFORMER_EDU_CHECKPOINT` to
# use your own), and the test split of its corpus.

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
manifests = build_corpus(corpus_config(config.data.corpus), splits=("test",))
test_rows = read_manifest(manifests["test"])
test_dir = manifests["test"].parent
print(f"checkpoint: {CHECKPOINT.name}; test split: {len(test_rows)} utterances")

# %% [markdown]
# ## Long recordings
#
# ### Why one pass does not scale
#
# Every encoder layer computes, for each of its $h$ heads, a $T' \times T'$ matrix of
# attention weights over the $T'$ frames of the input (chapter 3): the memory grows with
# the square of the length. At 60 ms a frame, one layer of the book's model needs:

# %%
heads = config.model.encoder.n_heads
rows = []
for label, seconds in [("10 s", 10), ("1 min", 60), ("10 min", 600), ("1 hour", 3600)]:
    frames = round(seconds / model.config.frame_shift)  # T'
    weights = heads * frames**2 * 4  # bytes: h maps of T' x T' float32 weights
    rows.append([label, frames, weights / 2**20])
print_table(rows, ["recording", "frames T'", "weights of one layer (MiB)"], {2: ",.1f"})

# %% [markdown]
# An hour would need over 50 GiB for the attention weights of one layer. So a recording
# is transcribed in **blocks** of at most `max_seconds`, each short enough for one pass.
# A block boundary cuts the audio; cut inside a word and the word is lost or split in
# two. We cut where nobody speaks, and to find those places we need a **voice activity
# detector** (VAD).
#
# ### A recording whose every word time we know
#
# To measure what cutting does we need a long recording with a known transcript and known
# word times. We make one from the test split: its utterances one after another, with
# pauses of 0.4 to 1.5 s between them, as in a talk. The synthesiser reported when each
# word starts (chapter 1), so every word's time on the long recording's clock is known.

# %%
def long_recording(rows: list, seconds: float, seed: int = 0):
    """Test utterances with random pauses, about `seconds` long: wave, text, words, spans."""
    g = torch.Generator().manual_seed(seed)
    pieces, words, texts, spans, t = [], [], [], [], 0.0
    for row in rows:
        if t >= seconds:
            break
        pause = 0.4 + 1.1 * torch.rand((), generator=g).item()  # seconds of silence
        wave = paraformer_edu.load_audio(test_dir / row["audio_filepath"])  # (S_i,)
        pieces += [torch.zeros(round(pause * 16000)), wave]
        t += round(pause * 16000) / 16000
        words += [(w, t + start) for w, start in row["words"]]
        spans.append((t, t + len(wave) / 16000))
        texts.append(row["text"])
        t += len(wave) / 16000
    return torch.cat(pieces), " ".join(texts), words, spans  # (S,), str, [(w, s)], [(s, e)]


recording, recording_text, recording_words, utterance_spans = long_recording(test_rows, 240)
print(
    f"{len(recording) / 16000:.1f} s, {len(utterance_spans)} utterances, "
    f"{len(recording_words)} words"
)
print(f"it starts: {recording_text[:80]}...")
listen(recording[: 8 * 16000], "the first 8 seconds of the long recording")

# %% [markdown]
# ### Frame energies
#
# The simplest VAD listens for loudness. For frames $m$ of $L = 400$ samples (25 ms) every
# $H = 160$ samples (10 ms), the energy in decibels is
#
# $$E_m = 10 \log_{10}\Big(\frac{1}{L} \sum_{n=0}^{L-1} x_{mH + n}^2 + \epsilon\Big),$$
#
# with a floor $\epsilon = 10^{-10}$ ($-100$ dB) for digital silence. A frame is speech
# when its energy is within `range_db` of the loud frames of the audio in hand (their 95th
# percentile; below, the audio in hand is a buffer of up to 20 s) and above $-80$ dBFS, the
# level chapter 1 calls silence: a threshold relative to the audio, so one setting serves a
# quiet file and a loud one. It is a VAD for clean recordings: exercise 2 shows what noise
# does to it.

# %%
#| export
import json
import sys
from pathlib import Path
from typing import NamedTuple

import soundfile as sf
import torch
import torchaudio
from tqdm import tqdm

from paraformer_edu.audio import MIN_SAMPLES, SAMPLE_RATE, AudioError, is_silent, load_audio
from paraformer_edu.inference import Transcript

VAD_FRAME, VAD_HOP = 400, 160  # samples: 25-ms frames every 10 ms, like the filterbank's


def frame_energy_db(wave: torch.Tensor) -> torch.Tensor:
    """Energy in dB of the 25-ms frames, every 10 ms, of a 16 kHz waveform (S,): (M,)."""
    if len(wave) < VAD_FRAME:
        wave = torch.nn.functional.pad(wave, (0, VAD_FRAME - len(wave)))  # (VAD_FRAME,)
    frames = wave.unfold(0, VAD_FRAME, VAD_HOP)  # (M, L)
    return 10 * torch.log10(frames.pow(2).mean(-1) + 1e-10)  # (M,)


def speech_frames(energy_db: torch.Tensor, range_db: float = 40.0) -> torch.Tensor:
    """Speech mask (M,): frames within range_db of the loud frames (95th percentile)."""
    loud = torch.quantile(energy_db, 0.95)  # dB
    return energy_db > loud - range_db  # (M,)


# %% [markdown]
# How well does it find the pauses? We compare its decision with the truth, frame by
# frame: frames between utterances should all be silence; frames inside an utterance are
# mostly speech, except the short pauses between its words.

# %%
energy = frame_energy_db(recording)  # (M,)
vad = speech_frames(energy)  # (M,)
frame_times = torch.arange(len(energy)) * 0.01 + 0.0125  # (M,) centre of each frame, s
inside = torch.zeros(len(energy), dtype=torch.bool)  # (M,) True inside an utterance
for start, end in utterance_spans:
    inside |= (frame_times >= start) & (frame_times < end)
pause_silent = (~vad[~inside]).float().mean().item()
speech_found = vad[inside].float().mean().item()
print(f"frames between utterances marked silence: {pause_silent:.1%}")
print(f"frames inside utterances marked speech: {speech_found:.1%}")
assert pause_silent > 0.99 and speech_found > 0.6

# %% mystnb={"figure": {"caption": "Frame energies of the first 30 s of the long recording (line), the VAD's threshold (dashed), and the true utterances (shaded). The pauses between utterances are digital silence, at the -100 dB floor.", "name": "fig-ch10-energy"}, "image": {"alt": "Energy in decibels over 30 seconds: bursts of speech around -20 to -40 dB separated by pauses at -100 dB, with a dashed threshold line and shaded utterance spans."}}
shown = frame_times < 30
threshold = torch.quantile(energy, 0.95).item() - 40.0
fig, ax = plt.subplots(figsize=(10, 3), layout="constrained")
for start, end in utterance_spans:
    if start < 30:
        ax.axvspan(start, min(end, 30), color="tab:green", alpha=0.15, lw=0)
ax.plot(frame_times[shown], energy[shown], lw=0.7, label="frame energy $E_m$")
ax.axhline(threshold, color="k", ls="--", lw=1, label="threshold")
ax.set_xlabel("time (s)")
ax.set_ylabel("energy (dB)")
ax.set_xlim(0, 30)
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
plt.show()

# %% [markdown]
# ### One pass per stretch of speech
#
# Where should the blocks end? A first idea is "every 20 seconds, at the quietest moment",
# so that each pass is as long as memory allows. Before we build it, we ask the model
# what it makes of silence. It was trained on single sentences that start and end with
# speech (the synthesiser adds no silence); here are 60 test utterances as they are, with
# silence added at both ends, and two by two with a pause between them:

# %%
waves = [paraformer_edu.load_audio(test_dir / r["audio_filepath"]) for r in test_rows[:60]]
texts = [normalize_text(r["text"]) for r in test_rows[:60]]
rows = []
for pad in (0.0, 0.02, 0.1, 0.5):
    z = torch.zeros(round(pad * 16000))  # (P,) silence
    hyps = recognizer.transcribe([torch.cat([z, w, z]) for w in waves], 16000)
    rows.append([f"{1000 * pad:.0f} ms of silence at each end", cer(texts, hyps)])
pairs = [torch.cat([waves[i], torch.zeros(8000), waves[i + 1]]) for i in range(0, 60, 2)]
pair_texts = [texts[i] + " " + texts[i + 1] for i in range(0, 60, 2)]
rows.append(["two utterances, 0.5 s apart", cer(pair_texts, recognizer.transcribe(pairs, 16000))])
print_table(rows, ["input", "CER"], {"CER": ".1%"})
assert rows[-2][1] > rows[0][1] + 0.02 and rows[-1][1] > rows[0][1] + 0.02

# %% [markdown]
# Silence costs accuracy, half a second of it a great deal (a tenth of a second already
# a little), and so does a pause between two sentences: this model has heard neither. (Training with silence around and between
# sentences would teach it otherwise; that is a lever for the training recipe, not for
# the decoder.) Blocks of 20 seconds would hold several sentences and their pauses. So the
# VAD decides the blocks: a block is a **stretch of speech**, speech frames joined across
# pauses shorter than `min_silence` (0.3 s), trimmed to the speech frames themselves
# (`pad`, 0 by default); what lies between stretches is not transcribed at all. A stretch
# longer than `max_seconds`, which a talk without a breath could produce, is cut at the
# quietest 200 ms of its last 40%: there is no better place.

# %%
#| export
def speech_segments(
    wave: torch.Tensor, min_silence: float = 0.3, pad: float = 0.0, range_db: float = 40.0
) -> list:
    """Stretches of speech (start, end) in samples: speech frames joined across short pauses."""
    energy = frame_energy_db(wave)  # (M,)
    speech = speech_frames(energy, range_db) & (energy > -80.0)  # (M,); below -80 dBFS: silence
    frames = speech.nonzero().flatten()  # (S,) indices of speech frames
    if len(frames) == 0:
        return []
    breaks = (frames.diff() > round(min_silence * SAMPLE_RATE / VAD_HOP)).nonzero().flatten()
    first = torch.cat([frames[:1], frames[breaks + 1]])  # (K,) first frame of each stretch
    last = torch.cat([frames[breaks], frames[-1:]])  # (K,) its last frame
    p = round(pad * SAMPLE_RATE)
    return [
        (max(0, a * VAD_HOP - p), min(len(wave), b * VAD_HOP + VAD_FRAME + p))
        for a, b in zip(first.tolist(), last.tolist())
    ]


def quietest_cut(wave: torch.Tensor, lo: int, hi: int, window: int = 20) -> int:
    """Sample index in [lo, hi) at the centre of the quietest `window` frames (200 ms)."""
    energy = frame_energy_db(wave[lo:hi])  # (M,)
    if len(energy) > window:
        energy = energy.unfold(0, window, 1).mean(-1)  # (M - window + 1,) mean over 200 ms
        centre = int(energy.argmin()) * VAD_HOP + (window * VAD_HOP) // 2
    else:
        centre = int(energy.argmin()) * VAD_HOP
    return lo + min(centre, hi - lo - 1)


# %% [markdown]
# A long file must not be read whole either: an hour at 16 kHz is 230 MB of float32
# samples before any feature is computed. So the recording arrives in **pieces** of a
# few seconds, appended to a buffer. Each time, the stretches of speech that are
# complete (followed by `min_silence` of silence inside the buffer, and ending within
# `max_seconds`) go out as blocks and leave the buffer; if the buffer fills to
# `max_seconds` without one, the quietest cut makes one. The buffer never holds more than
# `max_seconds` plus a piece: memory is bounded whatever the length of the file.

# %%
#| export
def audio_blocks(pieces, max_seconds: float = 20.0, min_silence: float = 0.3):
    """Blocks (start sample, wave, samples held) of speech, each at most max_seconds long."""
    if max_seconds < 1.0 or min_silence <= 0:
        raise ValueError(
            f"max_seconds must be at least 1 and min_silence positive "
            f"(got {max_seconds} and {min_silence})"
        )
    limit, quiet = round(max_seconds * SAMPLE_RATE), round(min_silence * SAMPLE_RATE)
    buffer, start = torch.zeros(0), 0
    for piece in pieces:  # (S_p,) each
        buffer = torch.cat([buffer, piece])  # (S_b,)
        held = len(buffer)
        while True:
            segments = speech_segments(buffer, min_silence)
            if not segments:  # silence only: drop it, but keep its end, where speech may begin
                drop = max(0, len(buffer) - quiet)
                buffer, start = buffer[drop:], start + drop
                break
            first = segments[0][0]  # drop the silence before the speech: lengths count from it
            buffer, start = buffer[first:], start + first
            segments = [(a - first, b - first) for a, b in segments]
            done = [(a, b) for a, b in segments if b + quiet <= len(buffer) and b <= limit]
            if not done and len(buffer) < limit:
                break  # wait for more audio
            if not done:  # max_seconds of speech without a pause
                done = [(0, quietest_cut(buffer, round(0.6 * limit), limit))]
            for a, b in done:
                yield start + a, buffer[a:b].clone(), held  # a copy: the buffer can be freed
            buffer, start = buffer[done[-1][1] :], start + done[-1][1]
    for a, b in speech_segments(buffer, min_silence):  # what is left at the end
        yield start + a, buffer[a:b].clone(), len(buffer)


# %% [markdown]
# The pieces come from a file, read with `soundfile` a few seconds at a time and brought to
# 16 kHz mono as `load_audio` does; an array or tensor already in memory is simply
# sliced. A file that cannot be read is an `AudioError` that says what to do, as in
# chapter 1. (A file at another rate is resampled piece by piece, which leaves a faint
# edge, about -36 dB, every 5 seconds; convert long files to 16 kHz first where that
# matters.)

# %%
#| export
def audio_pieces(source, sample_rate: int | None = None, piece_seconds: float = 5.0):
    """16 kHz mono pieces (S_p,) of a path (read piece by piece) or of an array/tensor."""
    if not isinstance(source, (str, Path)):
        wave = load_audio(source, sample_rate)  # (S,) already in memory
        step = round(piece_seconds * SAMPLE_RATE)
        yield from (wave[i : i + step] for i in range(0, len(wave), step))
        return
    path = Path(source)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    try:
        f = sf.SoundFile(str(path))
    except Exception as error:  # soundfile raises LibsndfileError / RuntimeError
        raise AudioError(
            f"{path}: not a readable audio file ({error}); use WAV, FLAC or OGG"
        ) from None
    with f:
        if f.frames == 0:
            raise AudioError(f"{path}: the audio is empty (0 samples): nothing to transcribe")
        step = round(piece_seconds * f.samplerate)
        for block in f.blocks(blocksize=step, dtype="float32", always_2d=True):  # (S_p, C)
            piece = torch.from_numpy(block).mean(1)  # (S_p,) mono
            if not torch.isfinite(piece).all():
                raise AudioError(
                    f"{path}: the audio holds NaN or infinite samples: the file is damaged"
                )
            if f.samplerate != SAMPLE_RATE:  # piece by piece: a small edge effect every 5 s
                piece = torchaudio.functional.resample(piece, f.samplerate, SAMPLE_RATE)
            yield piece


# %% [markdown]
# What blocks does our recording give? Each utterance should be one block (or a few, if
# it has a long pause inside), no block should hold two utterances, and no speech should
# be left out:

# %%
from paraformer_edu.transcription import audio_blocks, audio_pieces

blocks = list(audio_blocks(audio_pieces(recording, 16000), max_seconds=20.0))
spans = [(s / 16000, (s + len(w)) / 16000) for s, w, _ in blocks]  # seconds


def overlapping(span, others):
    """The spans among others that overlap span."""
    return [o for o in others if o[0] < span[1] and span[0] < o[1]]


two_utterances = sum(len(overlapping(s, utterance_spans)) > 1 for s in spans)
split = sum(len(overlapping(u, spans)) > 1 for u in utterance_spans)
missed = sum(len(overlapping(u, spans)) == 0 for u in utterance_spans)
print(
    f"{len(blocks)} blocks of {min(e - s for s, e in spans):.1f} "
    f"to {max(e - s for s, e in spans):.1f} s"
)
print(
    f"blocks holding two utterances: {two_utterances}; utterances split: {split}; missed: {missed}"
)
print(f"most samples held at once: {max(h for *_, h in blocks) / 16000:.1f} s of audio")
assert two_utterances == 0 and missed == 0 and max(e - s for s, e in spans) <= 20.0

# %% [markdown]
# ### Transcribing the blocks and stitching them
#
# Each block is transcribed like any utterance, several at a time in one padded batch
# (chapter 7's `recognize_features`); its token timestamps (chapter 5) are in seconds from
# the block's start, so we add the block's start time to put them on the recording's
# clock. The words and their (start, end) times come from the tokens as in chapter 7
# (`Transcript.words`); the text is the blocks' texts, joined.

# %%
#| export
class LongTranscript(NamedTuple):
    """A long recording's transcript: text, words and tokens on the recording's clock.

    blocks: (start, end) seconds of each block; peak_samples: most samples held at once.
    """

    text: str
    words: list  # (word, start s, end s)
    tokens: list  # token strings
    timestamps: list  # (start s, end s) per token
    blocks: list
    peak_samples: int
    duration: float  # seconds of audio read


def on_recording_clock(t: Transcript, offset: float, seconds: float) -> Transcript:
    """A block's transcript, its timestamps moved by offset s and none past the block's end."""
    end = offset + seconds  # a last 60 ms frame can run past the block
    return Transcript(
        t.text, t.tokens, [(min(s + offset, end), min(e + offset, end)) for s, e in t.timestamps]
    )


def _decode_blocks(recognizer, batch: list) -> list:
    """Transcripts of (offset s, wave) blocks, timestamps moved onto the recording's clock."""
    transcripts = recognizer.recognize_features([recognizer.frontend(w) for _, w in batch])
    return [
        on_recording_clock(t, offset, len(wave) / SAMPLE_RATE)
        for (offset, wave), t in zip(batch, transcripts)
    ]


def transcribe_long(
    recognizer, source, sample_rate: int | None = None, max_seconds: float = 20.0, batch: int = 8
) -> LongTranscript:
    """Transcribe a recording of any length, block by block (memory bounded by max_seconds)."""
    done, pending, spans, peak, read = [], [], [], 0, [0]

    def counted(pieces):
        for piece in pieces:
            read[0] += len(piece)  # samples read: the recording's duration at the end
            yield piece

    for start, wave, held in audio_blocks(counted(audio_pieces(source, sample_rate)), max_seconds):
        peak = max(peak, held)
        spans.append((start / SAMPLE_RATE, (start + len(wave)) / SAMPLE_RATE))
        if len(wave) >= MIN_SAMPLES and not is_silent(wave):
            pending.append((start / SAMPLE_RATE, wave))
        if len(pending) == batch:
            done, pending = done + _decode_blocks(recognizer, pending), []
    done += _decode_blocks(recognizer, pending) if pending else []
    tokens = [tok for t in done for tok in t.tokens]
    stamps = [stamp for t in done for stamp in t.timestamps]
    words = Transcript("", tokens, stamps).words
    text = " ".join(t.text for t in done if t.text)
    return LongTranscript(text, words, tokens, stamps, spans, peak, read[0] / SAMPLE_RATE)


# %%
from paraformer_edu.transcription import transcribe_long

long = transcribe_long(recognizer, recording, 16000, max_seconds=20.0)
reference = normalize_text(recording_text)
print(f"{len(long.blocks)} blocks, {len(long.words)} words recognised")
print(
    f"long recording: CER {cer([reference], [long.text]):.1%}, "
    f"WER {wer([reference], [long.text]):.1%}"
)

# %% [markdown]
# Is that what the model does on the same utterances one at a time? If cutting and
# stitching lost or damaged words, the long recording's error rates would be higher:

# %%
used = test_rows[: len(utterance_spans)]
one_by_one = recognizer.transcribe([str(test_dir / r["audio_filepath"]) for r in used])
refs = [normalize_text(r["text"]) for r in used]
joined = " ".join(h for h in one_by_one if h)
cer_each, cer_long = cer(refs, one_by_one), cer([reference], [long.text])
print(
    f"the same {len(used)} utterances one at a time: CER {cer_each:.1%}, "
    f"WER {wer(refs, one_by_one):.1%}"
)
print(f"block-wise against the one-at-a-time transcripts: CER {cer([joined], [long.text]):.1%}")
assert abs(cer_long - cer_each) < 0.02

# %% [markdown]
# The character error rates agree within two points, and the word error rates within
# about three. The two transcripts are not the same, though: about one character in five
# differs between them. Trimming a block to its speech frames moves its start by a few
# milliseconds against the file's, and this model is that sensitive (the table above);
# the mistakes move, their number does not.

# %% [markdown]
# And the timestamps? Each recognised word that matches a reference word (aligned with
# `difflib` on the word sequences) has a true start time from the synthesiser. We compare
# the block-wise words with the words of the utterances transcribed one at a time and
# moved by hand to where each utterance lies in the recording:

# %%
def start_errors(words: list, truth: list) -> torch.Tensor:
    """Recognised minus true start (s) of the words that match a reference word."""
    ref, hyp = [normalize_text(w) for w, _ in truth], [w for w, _, _ in words]
    matcher = difflib.SequenceMatcher(a=ref, b=hyp, autojunk=False)
    pairs = [(a + k, b + k) for a, b, size in matcher.get_matching_blocks() for k in range(size)]
    return torch.tensor([words[j][1] - truth[i][1] for i, j in pairs])  # (W_matched,)


each = recognizer.transcribe([str(test_dir / r["audio_filepath"]) for r in used], timestamps=True)
moved = [
    (w, s + span[0], e + span[0]) for t, span in zip(each, utterance_spans) for w, s, e in t.words
]
rows = []
for name, words in [("block-wise", long.words), ("one at a time, moved", moved)]:
    e = start_errors(words, recording_words)  # (W_matched,)
    rows.append(
        [name, len(e), 1000 * e.median(), 1000 * e.abs().median(), 1000 * e.abs().quantile(0.9)]
    )
print(f"{len(recording_words)} words in the recording; start errors (ms) of the matched ones:")
print_table(
    rows,
    ["transcribed", "matched", "median", "median |e|", "90th pct |e|"],
    {2: "+.0f", 3: ".0f", 4: ".0f"},
)
assert rows[0][4] < 200 and abs(rows[0][3] - rows[1][3]) < 30 and rows[0][2] > 0

# %% [markdown]
# Only the words recognised correctly can be timed (about two in five, at this model's
# word error rate). Of those, nine in ten start within a fifth of a second of the truth,
# on the clock of a four-minute recording, and the block-wise words are timed as well as
# the utterances transcribed one at a time: the block offsets add no error of their own.
# Both start late, as chapter 8 found on single utterances.
#
# Memory does not grow with the recording: `benchmarks/bench_long_audio.py` transcribes
# files of minutes to half an hour in a fresh process each, and prints the peak resident
# memory, the time and the error rate, block by block and (for the shorter ones) in one
# pass.
#
# ## Many files: a resumable batch job
#
# A batch job over a folder has three duties besides transcribing: write each result as
# soon as it exists, in a format other tools read (JSON lines: one object per line); on
# a re-run, skip the files already done, so a crash or a `Ctrl-C` costs nothing; and treat
# a bad file as a line of the report, never as the end of the run. A line torn by a
# crash in the middle of writing is cut off when the job resumes, so the file stays
# valid JSON lines.

# %%
#| export
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")


def audio_files(inputs) -> list[Path]:
    """Files to transcribe, as absolute paths, each once: files given, audio under folders."""
    files = []
    for item in (Path(i).resolve() for i in inputs):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
        else:
            files.append(item)
    return list(dict.fromkeys(files))


def finished_paths(output: Path) -> set:
    """Paths already in a JSON-lines output; a torn last line (an interrupted run) is cut off."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]  # a line without its newline was cut short
    if len(whole) != len(data):
        output.write_bytes(whole)
    done = set()
    for number, line in enumerate(whole.decode("utf-8", errors="replace").splitlines(), 1):
        try:
            done.add(json.loads(line)["path"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f"{output}, line {number}: not a result line; use another --output"
            ) from None
    return done


# %%
#| export
def result_line(path: Path, recognizer, max_seconds: float = 20.0) -> dict:
    """One file's JSON line: text, duration and word timestamps, or the error."""
    try:
        t = transcribe_long(recognizer, path, max_seconds=max_seconds)
    except AudioError as error:
        return {"path": str(path), "error": str(error)}
    except Exception as error:  # a damaged file fails here, not the whole run
        return {"path": str(path), "error": f"{path}: {type(error).__name__}: {error}"}
    words = [[w, round(s, 3), round(e, 3)] for w, s, e in t.words]
    return {"path": str(path), "text": t.text, "duration": round(t.duration, 3), "words": words}


def transcribe_files(recognizer, inputs, output, max_seconds: float = 20.0, progress: bool = False):
    """Transcribe files and folders into a JSON-lines file; skip those already there. Counts.

    A file with an error line is skipped too: delete its line to try it again.
    """
    output = Path(output)
    files = audio_files(inputs)
    done = finished_paths(output)
    todo = [p for p in files if str(p) not in done]
    failed = 0
    with output.open("a", encoding="utf-8") as out:
        for path in tqdm(todo, unit="file", disable=not progress, file=sys.stderr):
            line = result_line(path, recognizer, max_seconds)
            if "error" in line:
                failed += 1
                print(line["error"], file=sys.stderr)  # it names the file
            out.write(json.dumps(line) + "\n")
            out.flush()  # a crash loses at most the file being transcribed
    return {"transcribed": len(todo) - failed, "failed": failed, "skipped": len(files) - len(todo)}


# %% [markdown]
# The whole job, as a script you can copy (it writes one line per file, and run again it
# continues where it stopped):
#
# ```python
# import paraformer_edu
# from paraformer_edu.transcription import transcribe_files
#
# recognizer = paraformer_edu.load_model("models/paraformer-book/model.pt")
# counts = transcribe_files(recognizer, ["recordings/"], "results.jsonl", progress=True)
# print(counts)  # {'transcribed': ..., 'failed': ..., 'skipped': ...}
# for line in open("results.jsonl"):  # {"path", "text", "duration", "words": [[w, start, end]]}
#     print(line, end="")
# ```
#
# We try it on a folder with three test utterances, the long recording, an empty WAV
# file, and a text file that claims to be a WAV:

# %%
from paraformer_edu.transcription import transcribe_files

work = Path(tempfile.mkdtemp(prefix="paraformer-ch10-"))
folder = work / "audio"
folder.mkdir()
for row in test_rows[:3]:
    (folder / Path(row["audio_filepath"]).name).write_bytes(
        (test_dir / row["audio_filepath"]).read_bytes()
    )
sf.write(folder / "long-recording.flac", recording.numpy(), 16000)
sf.write(folder / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
(folder / "notes.wav").write_text("not audio at all\n")
output = work / "results.jsonl"
report = io.StringIO()
with contextlib.redirect_stderr(report):
    counts = transcribe_files(recognizer, [folder], output)
print("first run:", counts)
print("reported on stderr:")
for line in report.getvalue().splitlines():
    print(
        textwrap.fill(
            line.replace(str(folder) + "/", ""), 96, initial_indent="  ", subsequent_indent="    "
        )
    )
for line in output.read_text().splitlines():
    row = json.loads(line)
    shown = row.get("text", "")[:60] or "error: " + row["error"].replace(str(folder) + "/", "")[:60]
    print(f"  {Path(row['path']).name:<20} {shown}")

# %% [markdown]
# A second run finds everything done. To see the resume at work, we tear the last line in
# half, as a crash in the middle of writing would, and run again: the torn line is cut
# off and only that file is transcribed again.

# %%
with contextlib.redirect_stderr(io.StringIO()):
    print("second run:", transcribe_files(recognizer, [folder], output))
    text = output.read_text()
    output.write_text(text[: len(text) - 40])  # an interrupted write
    print("after a torn line:", transcribe_files(recognizer, [folder], output))
lines = [json.loads(line) for line in output.read_text().splitlines()]
assert len(lines) == 6 and len({row["path"] for row in lines}) == 6

# %% [markdown]
# The same job is a command, with a progress bar when it runs on a terminal:
#
# ```
# python -m paraformer_edu transcribe --checkpoint models/paraformer-book/model.pt \
#     --output results.jsonl recordings/
# ```
#
# Without `--output`, `transcribe` prints one line per file as before. We run it here on
# the folder and check that it writes the same lines as the function:

# %%
cli_output = work / "cli.jsonl"
command = [sys.executable, "-m", "paraformer_edu", "transcribe", "--checkpoint", str(CHECKPOINT)]
run = subprocess.run(
    command + ["--output", str(cli_output), str(folder)], capture_output=True, text=True
)
print("exit status", run.returncode, "(1: some files failed)")
cli_lines = [json.loads(line) for line in cli_output.read_text().splitlines()]
by_path = {row["path"]: row for row in lines}
assert run.returncode == 1 and all(by_path[row["path"]] == row for row in cli_lines)
print(f"{len(cli_lines)} lines, the same as transcribe_files wrote")

# %% [markdown]
# ## Exporting to ONNX
#
# ONNX is a file format for computation graphs; ONNX Runtime runs them from C, C++, C#,
# Java, JavaScript or Python, without PyTorch. (Here the network goes to ONNX; the front
# end, whose CMVN statistics live in the checkpoint, and the tokenizer stay in Python.) PyTorch's exporter runs the model once
# on example inputs and records the operations. Two things in the Paraformer resist that
# recording:
#
# 1. the number of tokens $N = \lfloor \sum_t \alpha_t + \tau \rfloor$ is a *value* computed
#    from the input, and chapter 5's vectorised CIF uses it as a *size*:
#    `K = int(N.max())`; a recorded graph would keep the $K$ of the example forever;
# 2. `torch.searchsorted`, which finds the frame where each token fires, has no ONNX
#    operator.
#
# Both have an answer in the predictor itself. Each weight is a sigmoid, $\alpha_t < 1$, and
# the tail threshold $\tau = 0.45 < 1$, so $N \le T'$: **the number of frames bounds the
# number of tokens**, and $T'$ is a size the graph knows. So the exportable CIF computes $T'$
# token slots, of which the first $N$ are the tokens and the rest are zero. And "the first
# frame whose accumulated weight reaches $k+1$" is a count: the number of frames whose
# accumulated weight is still below $k + 1$,
#
# $$f_k = \sum_{t=1}^{T'} \big[\, C_t < k + 1 \,\big],$$
#
# a comparison and a sum, which every runtime has. The price is a decoder that runs over
# $T'$ positions instead of $N$, about twice as many; the masks keep the padding slots
# from touching the tokens.

# %%
#| export onnx_export
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from paraformer_edu.model import Hypothesis
from paraformer_edu.predictor import cif_count, cif_timestamps


def cif_bounded(
    h, alphas, lengths, beta: float = 1.0, tail_threshold: float = 0.45, rescale: bool = True
):
    """CIF with T' token slots (N <= T'), no data-dependent size: embeds (B, T', D), N, fires."""
    B, T, D = h.shape
    C, N = cif_count(alphas, lengths, beta, tail_threshold)  # (B, T + 1), (B,)
    if rescale:  # chapter 5's default: the weights scaled to the count, as in training
        C, N = cif_count(alphas, lengths, beta, 0.0, N)  # (B, T + 1), (B,)
    k = torch.arange(T, dtype=C.dtype, device=h.device)  # (K,) with K = T'
    fires = (C[:, None, 1:] < (k + 1)[None, :, None]).sum(-1)  # (B, K): first t, C_t >= k + 1
    j = C[:, :-1].floor()  # (B, T): the token each frame starts in
    w = ((torch.minimum(C[:, 1:], j + 1) - C[:, :-1]) * beta).to(h.dtype)  # (B, T)
    starts_in = (j[..., None] == k) & (j[..., None] < N[:, None, None])  # (B, T, K)
    first = torch.einsum("btk,btd->bkd", starts_in.to(h.dtype) * w[..., None], h)  # (B, K, D)
    f = fires[:, :-1].clamp(max=T - 1)  # (B, K - 1): the frame holding boundary k
    u = (torch.minimum(C[:, 1:].gather(1, f), k[1:] + 1) - k[1:]).clamp(min=0) * beta
    u = u.masked_fill(k[1:] >= N[:, None], 0.0).to(h.dtype)  # (B, K - 1)
    hf = h.gather(1, f[..., None].expand(B, T - 1, D))  # (B, K - 1, D)
    embeds = first + F.pad(u[..., None] * hf, (0, 0, 1, 0))  # (B, K, D)
    tail = k + 1 > C[:, -1:]  # (B, K): completed only by the tail frame
    fires = torch.where(tail, lengths[:, None], fires).masked_fill(k >= N[:, None], -1)
    return embeds, N, fires


# %% [markdown]
# Same tokens as chapter 5's `cif`? On random weights and padded batches, the first $N$
# slots must equal `cif`'s embeddings and firing frames, and the other slots be empty,
# both for chapter 5's default (count with the tail rule, then integrate the weights
# scaled to the count) and for the paper's raw integration (`rescale=False`):

# %%
from paraformer_edu.onnx_export import cif_bounded
from paraformer_edu.predictor import cif, cif_count

g = torch.Generator().manual_seed(0)
worst = 0.0
for trial in range(50):
    B, T, D = 3, int(torch.randint(2, 60, (), generator=g)), 16
    h = torch.randn(B, T, D, generator=g)  # (B, T, D)
    lengths = torch.randint(1, T + 1, (B,), generator=g)  # (B,)
    alphas = torch.rand(B, T, generator=g) * (torch.arange(T) < lengths[:, None])  # (B, T)
    count = cif_count(alphas, lengths, 1.0, 0.45)[1]  # (B,): the tail rule's
    for rescale in (True, False):
        if rescale:
            ref_embeds, ref_n, ref_fires = cif(h, alphas, lengths, 1.0, 0.0, count)
        else:
            ref_embeds, ref_n, ref_fires = cif(h, alphas, lengths, 1.0, 0.45)
        embeds, n, fires = cif_bounded(h, alphas, lengths, 1.0, 0.45, rescale)
        K = ref_embeds.size(1)
        assert torch.equal(n, ref_n) and torch.equal(fires[:, :K], ref_fires)
        assert (fires[:, K:] == -1).all() and embeds[:, K:].abs().sum().item() == 0.0
        worst = max(worst, (embeds[:, :K] - ref_embeds).abs().max().item())
print(
    "cif_bounded vs cif, 50 random batches, both ways: counts and fires exact, "
    f"embeddings within {worst:.1e}"
)
assert worst < 1e-5

# %% [markdown]
# The exportable model is the same Paraformer with `cif_bounded` in the middle. Its
# inputs are the features and their lengths (the filterbank front end stays in Python:
# it is a few lines in any language); its outputs are the log-probabilities of the $T'$
# slots, the token counts, the firing frames (for timestamps) and the frame counts.

# %%
#| export onnx_export
class ExportableParaformer(nn.Module):
    """A Paraformer for export: features (B, T, F), lengths (B,) -> log-probs, N, fires, T'."""

    def __init__(self, model):
        super().__init__()
        self.model = model.eval()

    def forward(self, features: torch.Tensor, feature_lengths: torch.Tensor):
        m = self.model
        h, h_lengths = m.encoder(features, feature_lengths)  # (B, T', D), (B,)
        alphas = m.predictor.weights(h, h_lengths)  # (B, T')
        beta, tau = m.predictor.beta, m.predictor.tail_threshold
        # (B, T', D), (B,), (B, T')
        embeds, n, fires = cif_bounded(h, alphas, h_lengths, beta, tau, m.predictor.rescale)
        log_probs = m.decoder(embeds, n, h, h_lengths).log_softmax(-1)  # (B, T', V)
        return log_probs, n, fires, h_lengths


def export_onnx(model, path, opset: int = 17) -> Path:
    """Export a Paraformer to an ONNX file, batch and length dynamic; return the path."""
    path, wrapper = Path(path), ExportableParaformer(model)
    features = torch.randn(2, 64, model.config.encoder.d_input)  # (B, T, F) an example
    dims = {
        "features": {0: "B", 1: "T"},
        "feature_lengths": {0: "B"},
        "log_probs": {0: "B", 1: "K"},
    }
    dims |= {"token_lengths": {0: "B"}, "fires": {0: "B", 1: "K"}, "frame_lengths": {0: "B"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values it records
        torch.onnx.export(
            wrapper, (features, torch.tensor([64, 40])), str(path), opset_version=opset,
            input_names=["features", "feature_lengths"], dynamic_axes=dims, dynamo=False,
            output_names=["log_probs", "token_lengths", "fires", "frame_lengths"],
        )  # fmt: skip
    return path


# %% [markdown]
# To use the exported graph where the package uses a model, we wrap an ONNX Runtime
# session in an object with the model's `recognize` method (chapter 6): the `Recognizer`
# of chapter 7 then runs on ONNX unchanged, front end, batching and timestamps included.

# %%
#| export onnx_export
class OnnxParaformer:
    """An exported Paraformer run by ONNX Runtime, with Paraformer.recognize's interface."""

    def __init__(self, path, frame_shift: float = 0.06, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.frame_shift = frame_shift

    def eval(self):
        return self

    def to(self, device):
        return self

    def recognize(self, features, feature_lengths, search=None) -> list[Hypothesis]:
        """Greedy recognition of features (B, T, F): token ids and timestamps per utterance."""
        if search is not None:
            raise ValueError("the ONNX model decodes greedily; beam search needs the PyTorch model")
        inputs = {"features": features.numpy(), "feature_lengths": feature_lengths.numpy()}
        log_probs, n, fires, frames = map(torch.from_numpy, self.session.run(None, inputs))
        stamps = cif_timestamps(fires, n, frames, self.frame_shift)
        ids = log_probs.argmax(-1)  # (B, T')
        return [Hypothesis(ids[b, :k].tolist(), stamps[b]) for b, k in enumerate(n.tolist())]


def onnx_recognizer(path, recognizer, threads: int | None = None):
    """A Recognizer (chapter 7) that runs the exported model: same front end and tokenizer."""
    onnx_model = OnnxParaformer(path, recognizer.model.config.frame_shift, threads)
    return type(recognizer)(
        onnx_model, recognizer.tokenizer, recognizer.frontend, recognizer.config
    )


# %%
from paraformer_edu.onnx_export import export_onnx, onnx_recognizer

onnx_path = export_onnx(model, work / "paraformer.onnx")
onnx_rec = onnx_recognizer(onnx_path, recognizer)
print(f"{onnx_path.name}: {onnx_path.stat().st_size / 2**20:.1f} MiB")

# %% [markdown]
# The check: on the whole test split, the log-probabilities of the exported graph against
# PyTorch's at every valid position, and the texts.

# %%
features = [recognizer.features(str(test_dir / r["audio_filepath"])) for r in test_rows]
X = torch.nn.utils.rnn.pad_sequence(features[:16], batch_first=True)  # (16, T, F)
X_lengths = torch.tensor([len(x) for x in features[:16]])  # (16,)
reference_out = model.infer(X, X_lengths)
onnx_out = onnx_rec.model.session.run(
    None, {"features": X.numpy(), "feature_lengths": X_lengths.numpy()}
)
onnx_log_probs, onnx_n = torch.from_numpy(onnx_out[0]), torch.from_numpy(onnx_out[1])
assert torch.equal(onnx_n, reference_out.cif.token_lengths)
diff = max(
    (onnx_log_probs[b, :k] - reference_out.log_probs[b, :k]).abs().max().item()
    for b, k in enumerate(onnx_n.tolist())
)
torch_texts = [t.text for t in recognizer.recognize_features(features)]
onnx_texts = [t.text for t in onnx_rec.recognize_features(features)]
same = sum(a == b for a, b in zip(torch_texts, onnx_texts))
print(f"16 utterances: token counts equal; log-probs max abs diff {diff:.1e}")
print(f"test split: {same} of {len(features)} texts identical")
assert diff < 1e-3 and same >= len(features) - 2

# %% [markdown]
# Speed, measured in one run on this machine's CPU (the figures vary from run to run and
# from machine to machine, and no check depends on them):

# %%
# NBVAL_IGNORE_OUTPUT
def seconds_per_audio_second(rec, feats, batch: int) -> float:
    """Real-time factor of greedy recognition of feats in batches of `batch` (best of 2)."""
    audio = sum(len(x) for x in feats) * model.config.frame_shift
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        for i in range(0, len(feats), batch):
            rec.recognize_features(feats[i : i + batch])
        best = min(best, time.perf_counter() - start)
    return best / audio


sample = features[:64]
rows = []
for batch in (1, 16):
    rtf_torch = seconds_per_audio_second(recognizer, sample, batch)
    rtf_onnx = seconds_per_audio_second(onnx_rec, sample, batch)
    rows.append([batch, rtf_torch, rtf_onnx, rtf_torch / rtf_onnx])
print_table(
    rows,
    ["batch", "RTF PyTorch", "RTF ONNX Runtime", "ONNX speed-up"],
    {1: ".4f", 2: ".4f", 3: ".2f"},
)

# %% [markdown]
# ## An HTTP service
#
# The service is a small FastAPI application in `paraformer_edu.serving` (an optional
# extra: `pip install paraformer-edu[serve]`). Its parts:
#
# - `GET /health` says the model is loaded, for load balancers and start-up scripts;
# - `POST /transcribe` takes a WAV, FLAC or OGG file (as a form upload named `file`, or
#   as the request body), or raw 16-bit mono PCM (`Content-Type: audio/pcm`,
#   little-endian, with `?sample_rate=...`; or `audio/L16;rate=...`, big-endian as RFC 2586
#   has it), and answers JSON: the text, the words and tokens with their times, the
#   duration, and how long decoding took;
# - limits, checked before the expensive work: an upload whose size passes `max_bytes`
#   is refused with 413 before it is read in full; audio longer than `max_seconds` with 413
#   from its header (or its byte count), before it is decoded; a sample rate that audio
#   does not use (8 to 192 kHz, the usual ones) with 400; a file that is not audio with
#   415; empty audio with 400; each with a message that says what to do;
# - the audio is cut into stretches of speech as in the first section (the model prefers
#   them), and the stretches of all concurrent requests go to a **micro-batcher**: it
#   collects what arrives within 10 ms (up to 8 stretches) and decodes them in one padded
#   batch, less than half the cost per stretch of one at a time (chapter 7 measured the
#   real-time factor at batch 1 and 16). Decoding files and computing features run in
#   worker threads, so the event loop keeps accepting requests.

# %%
#| export serving
import asyncio
import io
import os
import time

import numpy as np
import soundfile as sf
import torch

from paraformer_edu.audio import SAMPLE_RATE, AudioError, is_silent, load_audio
from paraformer_edu.inference import Transcript, load_model
from paraformer_edu.transcription import audio_blocks, audio_pieces, on_recording_clock

try:
    from fastapi import FastAPI, HTTPException, Request
except ImportError as error:  # the optional extra
    raise ImportError("the service needs FastAPI: pip install 'paraformer-edu[serve]'") from error


class MicroBatcher:
    """Decodes concurrent stretches of speech together: up to max_batch, within max_wait s."""

    def __init__(self, recognizer, max_batch: int = 8, max_wait: float = 0.01):
        self.recognizer, self.max_batch, self.max_wait = recognizer, max_batch, max_wait
        self.queue, self.task, self.loop = None, None, None

    async def transcribe(self, wave: torch.Tensor) -> Transcript:
        """The transcript of one stretch of speech (S,) at 16 kHz, decoded in a batch."""
        loop = asyncio.get_running_loop()
        if self.loop is not loop:  # first use, or a new event loop (a restarted server)
            self.loop, self.queue = loop, asyncio.Queue()
            self.task = loop.create_task(self._run())
        done = loop.create_future()
        await self.queue.put((wave, done))
        return await done

    async def _run(self):
        while True:
            batch = [await self.queue.get()]
            deadline = self.loop.time() + self.max_wait
            while len(batch) < self.max_batch and (left := deadline - self.loop.time()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            batch = [(w, done) for w, done in batch if not done.done()]  # cancelled meanwhile
            try:
                results = await asyncio.to_thread(self._decode, [w for w, _ in batch])
            except Exception as error:  # a failed batch fails its requests, not the service
                results = [error] * len(batch)
            for (_, done), result in zip(batch, results):
                if done.done():
                    continue
                if isinstance(result, Exception):
                    done.set_exception(result)
                else:
                    done.set_result(result)

    def _decode(self, waves: list) -> list:
        """Features and transcripts of a batch of waves (in a worker thread)."""
        frontend = self.recognizer.frontend
        return self.recognizer.recognize_features([frontend(w) for w in waves])


# %% [markdown]
# Reading a request is where bad input is caught, and where the limits are checked before
# any work: the body is read up to the size limit and no further; the duration comes from
# the file's header (or the byte count of raw PCM) before anything is decoded; the sample
# rate must be one that audio uses; then the rules of `load_audio` (chapter 1) apply.

# %%
#| export serving
# sample rates audio uses (Hz): resampling from an odd rate such as 44,101 Hz would build
# a filter of 16,000 x 44,101 taps
RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000, 192000)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request's body, refused with 413 as soon as it passes max_bytes."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise HTTPException(413, f"the upload is over the limit of {max_bytes:,} bytes")
    return bytes(body)


def pcm_format(content_type: str, sample_rate: int | None):
    """(dtype, rate) of raw PCM from its Content-Type, or None for an audio file."""
    kind, *params = [p.strip() for p in content_type.lower().split(";")]
    options = dict(p.split("=", 1) for p in params if "=" in p)
    if kind not in ("audio/pcm", "audio/l16"):
        return None
    rate = sample_rate or (int(options["rate"]) if options.get("rate", "").isdigit() else None)
    if rate is None:
        raise HTTPException(400, "raw PCM needs its sample rate: add ?sample_rate=16000")
    return ("<i2" if kind == "audio/pcm" else ">i2"), rate  # audio/L16 is big-endian (RFC 2586)


def check_rate_and_length(rate: int, seconds: float, max_seconds: float) -> None:
    """400 for a sample rate audio does not use, 413 for audio over the length limit."""
    if rate not in RATES:
        raise HTTPException(
            400, f"a sample rate of {rate} Hz; use one of {', '.join(map(str, RATES))}"
        )
    if seconds > max_seconds:
        raise HTTPException(413, f"the audio is {seconds:.0f} s; the limit is {max_seconds:.0f} s")


def decode_audio(data: bytes, content_type: str, sample_rate: int | None, max_seconds: float):
    """16 kHz mono samples (S,) of an uploaded file or raw PCM; HTTPException for bad input."""
    if not data:
        raise HTTPException(400, "the upload is empty: send a WAV, FLAC or OGG file, or raw PCM")
    pcm = pcm_format(content_type, sample_rate)
    if pcm is not None:
        dtype, rate = pcm
        check_rate_and_length(rate, len(data) // 2 / rate, max_seconds)
        samples = np.frombuffer(data[: len(data) // 2 * 2], dtype=dtype).astype(np.int16)
    else:
        try:
            info = sf.info(io.BytesIO(data))
        except Exception:
            raise HTTPException(
                415, "not an audio file soundfile can read: send WAV, FLAC or OGG, or raw PCM "
                "with Content-Type: audio/pcm and ?sample_rate=..."
            ) from None  # fmt: skip
        check_rate_and_length(info.samplerate, info.frames / info.samplerate, max_seconds)
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    try:
        return load_audio(samples, rate)  # (S,)
    except AudioError as error:
        raise HTTPException(400, str(error)) from None


# %% [markdown]
# The application itself: two routes, the limits, the stretches of speech of each request
# decoded through the batcher, and the timestamps moved back onto the request's clock.

# %%
#| export serving
def create_app(
    recognizer, max_bytes: int = 50 * 2**20, max_seconds: float = 3600.0, max_batch: int = 8
) -> FastAPI:
    """The HTTP service of a Recognizer: GET /health, POST /transcribe."""
    app = FastAPI(title="paraformer-edu", description="Paraformer speech recognition")
    batcher = MicroBatcher(recognizer, max_batch)

    @app.get("/health")
    def health():
        return {"status": "ok", "sample_rate": SAMPLE_RATE, "max_seconds": max_seconds}

    async def upload(request: Request) -> tuple[bytes, str]:
        """The audio bytes and their content type, from a form upload or the raw body."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes + 2**16:  # a form's few headers
            raise HTTPException(
                413, f"the upload is {int(declared):,} bytes; the limit is {max_bytes:,}"
            )
        content_type = request.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            return await read_body(request, max_bytes), content_type
        form = await request.form()
        try:
            if "file" not in form or not hasattr(form["file"], "read"):
                raise HTTPException(400, "a form upload needs its audio in a field named 'file'")
            if (form["file"].size or 0) > max_bytes:
                raise HTTPException(413, f"the upload is over the limit of {max_bytes:,} bytes")
            return await form["file"].read(), form["file"].content_type or ""
        finally:
            await form.close()

    @app.post("/transcribe")
    async def transcribe(request: Request, sample_rate: int | None = None):
        start = time.perf_counter()
        data, content_type = await upload(request)
        wave = await asyncio.to_thread(decode_audio, data, content_type, sample_rate, max_seconds)
        decode_start = time.perf_counter()
        # the stretches of speech, found as transcribe_long finds them: the same blocks
        blocks = [] if is_silent(wave) else list(audio_blocks(audio_pieces(wave, SAMPLE_RATE)))
        parts = await asyncio.gather(*(batcher.transcribe(w) for _, w, _ in blocks))
        tokens, stamps = [], []
        for (offset, block, _), t in zip(blocks, parts):
            t = on_recording_clock(t, offset / SAMPLE_RATE, len(block) / SAMPLE_RATE)
            tokens, stamps = tokens + t.tokens, stamps + t.timestamps
        words = Transcript("", tokens, stamps).words
        return {
            "text": " ".join(t.text for t in parts if t.text),
            "duration": round(len(wave) / SAMPLE_RATE, 3),
            "words": [[w, round(s, 3), round(e, 3)] for w, s, e in words],
            "tokens": [[tok, round(s, 3), round(e, 3)] for tok, (s, e) in zip(tokens, stamps)],
            "timings": {
                "decode_ms": round(1000 * (time.perf_counter() - decode_start), 1),
                "total_ms": round(1000 * (time.perf_counter() - start), 1),
            },
        }

    return app


def app_from_environment() -> FastAPI:
    """The app of PARAFORMER_EDU_SERVE_CHECKPOINT and its limits (for uvicorn's workers)."""
    env = os.environ
    torch.set_num_threads(int(env.get("PARAFORMER_EDU_SERVE_THREADS", "1")))
    recognizer = load_model(env["PARAFORMER_EDU_SERVE_CHECKPOINT"])
    max_bytes = int(float(env.get("PARAFORMER_EDU_SERVE_MAX_MB", "50")) * 2**20)
    max_seconds = float(env.get("PARAFORMER_EDU_SERVE_MAX_SECONDS", "3600"))
    return create_app(recognizer, max_bytes, max_seconds)


# %% [markdown]
# The command line starts it with uvicorn, the usual server for FastAPI:
#
# ```
# python -m paraformer_edu serve --checkpoint models/paraformer-book/model.pt --port 8000 \
#     [--workers 2] [--max-mb 50] [--max-seconds 3600]
# ```
#
# Each worker is a process with its own copy of the model (17 MB of float32 weights here,
# besides PyTorch itself), so workers scale
# with CPU cores; within a worker the batcher gathers concurrent requests. We start it on
# the loopback interface, on a free port, and wait for `/health`:

# %%
def free_port() -> int:
    """A TCP port nobody listens on, on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


port = free_port()
server = subprocess.Popen(
    [sys.executable, "-m", "paraformer_edu", "serve", "--checkpoint", str(CHECKPOINT),
     "--port", str(port), "--max-seconds", "120", "--max-mb", "5"],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
)  # fmt: skip
url = f"http://127.0.0.1:{port}"
for _ in range(240):
    try:
        health = httpx.get(f"{url}/health", timeout=2).json()
        break
    except httpx.TransportError:
        time.sleep(0.25)
else:
    raise RuntimeError("the service did not start")
print("health:", health)

# %% [markdown]
# A request as any client would send it, a WAV upload:

# %%
example = test_dir / test_rows[0]["audio_filepath"]
with open(example, "rb") as f:
    reply = httpx.post(f"{url}/transcribe", files={"file": ("a.wav", f, "audio/wav")}, timeout=60)
answer = reply.json()
print("status", reply.status_code)
print("text:", answer["text"])
print("words:", ", ".join(f"{w} {s:.2f}-{e:.2f}" for w, s, e in answer["words"]))
assert answer["text"] == transcribe_long(recognizer, str(example)).text  # the same blocks

# %% [markdown]
# Bad requests get a status and a message, never a stack trace:

# %%
pcm = (recording[: 3 * 16000] * 32767).to(torch.int16).numpy().tobytes()
trials = {
    "raw PCM, with its rate": dict(
        content=pcm, headers={"content-type": "audio/pcm"}, params={"sample_rate": 16000}
    ),
    "raw PCM, no rate": dict(content=pcm, headers={"content-type": "audio/pcm"}),
    "raw PCM at 44,101 Hz": dict(
        content=pcm, headers={"content-type": "audio/pcm"}, params={"sample_rate": 44101}
    ),
    "a text file": dict(files={"file": ("notes.wav", b"not audio at all", "audio/wav")}),
    "empty body": dict(content=b"", headers={"content-type": "audio/wav"}),
    "6 MB upload": dict(content=b"\0" * (6 * 2**20), headers={"content-type": "audio/wav"}),
    "a 4-minute recording": dict(
        files={"file": ("long.flac", (folder / "long-recording.flac").read_bytes())}
    ),
}  # fmt: skip
statuses = {}
for name, request in trials.items():
    reply = httpx.post(f"{url}/transcribe", timeout=60, **request)
    statuses[name] = reply.status_code
    detail = reply.json().get("detail") or reply.json()["text"][:50]
    print(f"{name:<22} {reply.status_code}  {detail[:70]}")
assert statuses == {
    "raw PCM, with its rate": 200, "raw PCM, no rate": 400, "raw PCM at 44,101 Hz": 400,
    "a text file": 415,
    "empty body": 400, "6 MB upload": 413, "a 4-minute recording": 413,
}  # fmt: skip

# %% [markdown]
# Eight clients at once: each gets its own transcript, the same as one at a time.

# %%
clips = [test_dir / r["audio_filepath"] for r in test_rows[:8]]


def post(path: Path) -> str:
    """Send one file, return its text."""
    return httpx.post(f"{url}/transcribe", content=path.read_bytes(), timeout=60).json()["text"]


with ThreadPoolExecutor(8) as pool:
    together = list(pool.map(post, clips))
assert together == [transcribe_long(recognizer, str(p)).text for p in clips]
print("8 concurrent requests: every text equals the one-at-a-time transcript")
server.terminate()
status = server.wait(timeout=30)

# %% [markdown]
# How many requests a second, and how long each waits, depends on the machine and the
# load; `benchmarks/bench_serve.py` measures it from another process, with a bounded
# number of concurrent clients, and prints requests per second and the 50th and 95th
# percentile latencies for one and for several workers.
#
# ## Summary
#
# - A long recording is read in pieces; frame energies in dB against a threshold relative
#   to the audio find the pauses of a clean recording (not of a noisy one: exercise 2), and
#   each stretch of speech becomes a block (cut at
#   its quietest moment if it runs past 20 s). Memory is bounded by the block, not the
#   recording.
# - The book's model has only heard sentences without silence around them: silence and
#   neighbouring sentences in its input cost it accuracy, so the blocks are trimmed to the
#   speech. Then a four-minute recording gave the character error rate of the same
#   utterances one at a time (within 2 points, checked), and the words it got right start
#   within a fifth of a second of the truth, nine in ten, as one at a time.
# - A batch job writes a JSON line per file as soon as it is done, skips what is done
#   on a re-run, repairs a torn last line, and reports bad files without stopping.
# - The number of tokens of a Paraformer is bounded by its number of frames, so CIF can
#   be computed over $T'$ slots with a comparison-and-count in place of a search: the
#   whole model exports to one ONNX graph whose outputs match PyTorch's.
# - A FastAPI service with a micro-batcher answers concurrent requests in batches and
#   refuses bad input with 400, 413 or 415 and a message.
#
# ## Exercises
#
# 1. Transcribe the long recording with `max_seconds=2`: how many utterances are cut in two
#    now, and what happens to the error rate?
# 2. Add white noise at 20 dB SNR to the long recording. What does the VAD decide now, and
#    where do the blocks end?
# 3. Export with `opset=13` and with `opset=18`. Do both load in ONNX Runtime and give the
#    same outputs?

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
# Exercise 1: utterances longer than 2 s must be cut somewhere inside, at their quietest moment.
short = transcribe_long(recognizer, recording, 16000, max_seconds=2.0)
split_up = sum(len(overlapping(u, short.blocks)) > 1 for u in utterance_spans)
print(f"max_seconds=2: {len(short.blocks)} blocks; {split_up} utterance(s) cut in two")
print(f"CER {cer([reference], [short.text]):.1%} (20-s blocks: {cer_long:.1%})")

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
# Exercise 2: noise fills the pauses, so the VAD hears one long stretch; its quietest
# moments, where the blocks end, still lie in the pauses.
g = torch.Generator().manual_seed(1)
speech_power = recording[recording != 0].pow(2).mean()
noise = torch.randn(len(recording), generator=g) * (speech_power / 10 ** (20 / 10)).sqrt()
noisy = recording + noise  # (S,) 20 dB SNR
noisy_vad = speech_frames(frame_energy_db(noisy))
print(f"noisy: pauses marked silence {(~noisy_vad[~inside]).float().mean():.1%}")
noisy_blocks = list(audio_blocks(audio_pieces(noisy, 16000)))
noisy_cuts = [s / 16000 for s, _, _ in noisy_blocks[1:]]
in_pause = sum(not any(s <= c < e for s, e in utterance_spans) for c in noisy_cuts)
print(f"cuts in a pause: {in_pause} of {len(noisy_cuts)}")

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
# Exercise 3: both opsets hold every operator the model uses.
import onnxruntime as ort

x = {"features": X[:2].numpy(), "feature_lengths": X_lengths[:2].numpy()}
for opset in (13, 18):
    path = export_onnx(model, work / f"paraformer-{opset}.onnx", opset=opset)
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)
    same_n = np.array_equal(out[1], onnx_out[1][:2])
    print(f"opset {opset}: loads, token counts equal: {same_n}, log-probs max diff "
          f"{np.abs(out[0] - onnx_out[0][:2]).max():.1e}")  # fmt: skip
