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
# # The tokenizer
#
# A recognizer writes text one **token** at a time, and a token is whatever unit we
# choose: a character, a word, or something in between. Chapter 1 built a corpus of
# spoken sentences; this chapter decides how their transcripts become the integer ids the
# model predicts, and back.
#
# The choice matters more for Paraformer than for most recognizers. Its predictor (CIF,
# chapter 5) walks along the encoder's frames and *fires* a token when enough weight has
# accumulated, at most about one token per frame. With 60 ms frames that is at most 16.7
# tokens per second of speech, and English letters come at roughly that rate. So we will
# not pick the unit by taste: we will measure tokens per second on the corpus and compare
# them with frames per second.
#
# Three pieces come first: one **normalisation** function that every transcript goes
# through, a **character tokenizer**, and a **byte-pair encoding** (BPE) tokenizer
# {cite:p}`sennrich2016bpe` trained from scratch on the training text and checked against
# `sentencepiece` {cite:p}`kudo2018sentencepiece`.
#
# ## Learning goals
#
# After this chapter you can
#
# - write a text normaliser for an ASR corpus (Unicode NFKC, case, apostrophes,
#   punctuation, numbers spelled out) and say what it does with everything else;
# - build a tokenizer with the special tokens an ASR model needs (`<blank>`, `<sos>`,
#   `<eos>`, `<unk>`), save its vocabulary to a plain text file and load it back;
# - train BPE step by step (count pairs, merge the most frequent, repeat) over word counts,
#   with deterministic ties, and reproduce `sentencepiece`'s BPE exactly;
# - measure tokens per second against encoder frames per second and choose the unit (and
#   the vocabulary size) that Paraformer's predictor can emit.

# %%
# In Colab, install the book's package first:
# # !pip install -q "paraformer-edu[book] @ git+https://github.com/paraformer-edu/paraformer-edu"
# %matplotlib inline
import io
import itertools
import math
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import sentencepiece as spm
import torch

import paraformer_edu
from paraformer_edu.corpus import build_corpus, read_manifest
from paraformer_edu.display import book_style, print_table

book_style()
torch.manual_seed(0)
print("paraformer_edu", paraformer_edu.__version__)

# %% [markdown]
# The corpus of chapter 1 (built once, then read from the cache): each split is a manifest
# of utterances with their transcript, as written, and their duration.

# %%
manifests = build_corpus()
corpus = {split: read_manifest(path) for split, path in manifests.items()}
for split, utterances in corpus.items():
    hours = sum(u["duration"] for u in utterances) / 3600
    words = sum(len(u["text"].split()) for u in utterances)
    print(f"{split:<12}{len(utterances):>7,} utterances {hours:6.2f} h {words:>8,} words")
for u in corpus["train"][:3]:
    print(f"{u['duration']:5.2f} s  {u['text']!r}")

# %% [markdown]
# ## Text normalisation
#
# A transcript must say what was *spoken*, in one spelling. "Don't", "don’t" and "DON'T"
# are the same sound; "42" is spoken "forty two"; a comma is not spoken at all. If the
# training transcripts spell the same sound several ways, the model is asked to guess
# which spelling the annotator liked. So every piece of text that enters the system (the
# corpus, a user's reference transcript, the tokenizer's input) goes through **one**
# function, `normalize_text`, which does, in order:
#
# 1. curly and look-alike apostrophes (`’ ‘ ʼ ′ ´` and the backtick) become `'`;
# 2. Unicode **NFKC** folds compatibility forms: the ligature `ﬁ` becomes `fi`,
#    full-width `１２` becomes `12`, `²` becomes `2`, a non-breaking space becomes a space;
# 3. lowercase, and five symbols that are read aloud become words: `&` "and", `%`
#    "percent", `+` "plus", `=` "equals", `@` "at";
# 4. **numbers are spelled out**, as integers (`1,234` included), decimals (`3.14` is
#    "three point one four") and ordinals (`21st` is "twenty first"); numbers of a trillion
#    or more raise a `ValueError` (no corpus of read sentences needs them). Years come out
#    as cardinals ("1984" is "one thousand nine hundred eighty four") and a minus sign goes
#    with the punctuation: simple rules, written down, rather than guesses;
# 5. punctuation (Unicode categories `P*`), separators and control characters end a word;
#    invisible format characters (a soft hyphen, a zero-width space) are dropped;
# 6. apostrophes are kept only inside a word (`don't`, `o'clock`), not around it
#    (`'quoted'`, `dogs'`), and whitespace collapses to single spaces.
#
# Anything else (an accented letter, a currency sign, an emoji) is **left in place**: it
# is not our business to guess how `€` or `😂` is read. The tokenizers below map every
# character outside their alphabet, `'` and `a`-`z`, to the `<unk>` token.
#
# Numbers first. Below 100 English words come from two small tables (the units and
# teens, the tens); from 100 on, split off the largest scale $s \in \{10^9, 10^6, 10^3, 10^2\}$ that fits, $n = q\,s + r$ with
# $0 \le r < s$, and spell
#
# $$
# \mathrm{words}(n) = \mathrm{words}(q)\ \mathrm{name}(s)\ \mathrm{words}(r),
# $$
#
# leaving out $\mathrm{words}(r)$ when $r = 0$ (American style, without "and").

# %%
#| default_exp tokenizer
#| export
import heapq
import itertools
import re
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

# %%
#| export
_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**9, "billion"), (10**6, "million"), (10**3, "thousand"), (100, "hundred"))


def spell_number(n: int) -> str:
    """English words for an integer 0 <= n < 10**12, without 'and': 42 -> 'forty two'."""
    if not 0 <= n < 10**12:
        raise ValueError(
            f"cannot spell out {n}: only integers from 0 to 999,999,999,999 are supported"
        )
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    for scale, name in _SCALES:
        if n >= scale:
            head, rest = divmod(n, scale)
            return f"{spell_number(head)} {name}" + ("" if rest == 0 else " " + spell_number(rest))


# %% [markdown]
# An ordinal changes only the last word: "one" becomes "first", "twenty" becomes
# "twentieth", most others take "th".

# %%
#| export
_ORDINALS = {
    "one": "first",
    "two": "second",
    "three": "third",
    "five": "fifth",
    "eight": "eighth",
    "nine": "ninth",
    "twelve": "twelfth",
}


def spell_ordinal(n: int) -> str:
    """English words for an ordinal: 21 -> 'twenty first', 40 -> 'fortieth'."""
    *head, last = spell_number(n).split()
    if last in _ORDINALS:
        last = _ORDINALS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return " ".join([*head, last])


# %%
for n in (0, 7, 13, 40, 42, 100, 101, 999, 1000, 2024, 1_000_000, 3_000_000_021):
    print(f"{n:>13,}  {spell_number(n):<28} {spell_ordinal(n)}")

# %% [markdown]
# A regular expression finds the numbers: digits with optional thousands commas, an
# optional decimal part, an optional ordinal suffix. Each match is replaced by its words
# with a space on both sides, so `mp3` becomes "mp three". Then the character loop of
# steps 5 and 6.

# %%
#| export
ALPHABET = "'abcdefghijklmnopqrstuvwxyz"
APOSTROPHES = "\u2018\u2019\u201b\u02bc\u2032`\u00b4"  # ‘ ’ ‛ ʼ ′ ` ´, all read as '
SPOKEN_SYMBOLS = {"&": " and ", "%": " percent ", "+": " plus ", "=": " equals ", "@": " at "}
_NUMBER_RE = re.compile(r"(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?:(st|nd|rd|th)\b)?")


def _spell_match(match: re.Match) -> str:
    """Words for one number found by _NUMBER_RE: integer, decimal or ordinal."""
    integer, decimals, suffix = match.groups()
    n = int(integer.replace(",", ""))
    words = spell_ordinal(n) if suffix and not decimals else spell_number(n)
    if decimals:
        words += " point " + " ".join(_ONES[int(d)] for d in decimals)
    return f" {words} "


def normalize_text(text: str) -> str:
    """Spoken-form text: NFKC, lowercase, numbers spelled out, no punctuation, single spaces."""
    text = text.translate(str.maketrans(APOSTROPHES, "'" * len(APOSTROPHES)))
    text = unicodedata.normalize("NFKC", text).lower().translate(str.maketrans(SPOKEN_SYMBOLS))
    text = _NUMBER_RE.sub(_spell_match, text)
    chars = []
    for ch in text:
        category = unicodedata.category(ch)
        if ch != "'" and (category[0] in "PZ" or category == "Cc"):
            chars.append(" ")  # punctuation, separators and control characters end a word
        elif category != "Cf":
            chars.append(ch)  # letters (in the alphabet or not), apostrophes, symbols
    words = (word.strip("'") for word in "".join(chars).split())  # apostrophes only inside words
    return " ".join(word for word in words if word)


# %% [markdown]
# Each rule, with the answer we want written down beside it: the cell fails if any case
# disagrees.

# %%
normalisation_cases = {
    "Hello, World!": "hello world",
    "Don’t STOP": "don't stop",
    "don´t, don`t": "don't don't",
    "'Quoted' dogs' rock 'n' roll": "quoted dogs rock n roll",
    "well-known U.S. e-mail": "well known u s e mail",
    "  tabs\tand\nnew   lines  ": "tabs and new lines",
    "ﬁne １２ x²": "fine twelve x two",
    "co\u00adoperate\u200b": "cooperate",
    "42 apples, 1,234 pears": "forty two apples one thousand two hundred thirty four pears",
    "the 21st and the 40th": "the twenty first and the fortieth",
    "pi is 3.14": "pi is three point one four",
    "mp3": "mp three",
    "café 😂 €5": "café 😂 € five",
    "10% & 2+2=4": "ten percent and two plus two equals four",
    " \t ": "",
}
for raw, expected in normalisation_cases.items():
    got = normalize_text(raw)
    print(f"{raw!r:<34} -> {got!r}")
    assert got == expected, (raw, got, expected)
    assert normalize_text(got) == got  # idempotent: normalising twice changes nothing
try:
    normalize_text("population 8000000000000")
except ValueError as error:
    print("ValueError:", error)

# %% [markdown]
# The corpus transcripts are written text: a capital letter at the start (and in "I"), a
# full stop, question mark or exclamation mark at the end, sometimes a comma,
# apostrophes in contractions ("don't", "we're"). We normalise every transcript once,
# here, and use only the spoken form from now on. For this corpus an independent
# reference is easy to write (lowercase, delete `,` `.` `?` `!`), and the two must agree
# on every transcript (the non-speech clips' empty transcripts included); after normalisation
# every character is in the alphabet or is the space between words.

# %%
texts = {
    split: [normalize_text(u["text"]) for u in utterances] for split, utterances in corpus.items()
}
train_texts, dev_texts = texts["train"], texts["dev"]
all_texts = [text for split_texts in texts.values() for text in split_texts]
raw_texts = [u["text"] for utterances in corpus.values() for u in utterances]
reference = [re.sub(r"[,.?!]", "", text).lower() for text in raw_texts]
raw_chars, corpus_chars = Counter("".join(raw_texts)), Counter("".join(all_texts))
print("characters as written:", "".join(sorted(raw_chars)).replace(" ", "␣"))
print("after normalize_text: ", "".join(sorted(corpus_chars)).replace(" ", "␣"))
print(
    f"agrees with the reference: {sum(map(str.__eq__, all_texts, reference)):,} "
    f"of {len(all_texts):,} transcripts"
)
print(f"{raw_texts[0]!r} -> {all_texts[0]!r}")
assert all_texts == reference and set(corpus_chars) <= set(ALPHABET + " ")
assert all(normalize_text(text) == text for text in all_texts)

# %% [markdown]
# ## The character tokenizer
#
# A tokenizer is a **vocabulary**, a list of tokens whose positions are the ids, and a
# rule that splits text into those tokens. An ASR model needs four tokens that are not
# text, and we put them first, at fixed ids:
#
# | id | token | use |
# |---|---|---|
# | 0 | `<blank>` | CTC's "no token at this frame" (chapter 4), and the padding of a batch of targets |
# | 1 | `<sos>` | start of sentence, for an autoregressive decoder (the baseline Paraformer is compared with) |
# | 2 | `<eos>` | end of sentence, for the same decoder |
# | 3 | `<unk>` | any character outside the alphabet |
#
# Paraformer itself never emits `<sos>` or `<eos>`: its predictor counts the tokens, so
# no token has to say "stop". The two ids stay because the autoregressive baseline that
# Paraformer is measured against needs them, and because one vocabulary file then serves
# both models. (FunASR's recipes do append `<eos>` to Paraformer's targets and let the
# predictor count it; this book does not.)
#
# Making the blank id 0 the padding id too is the usual convention (FunASR, WeNet): a
# padded target position never collides with a real token. Then the units: for characters,
# the word boundary and the 27 characters of the alphabet. We write the space between
# words as `▁` (U+2581, sentencepiece's mark) so that every token is visible and none is
# whitespace, which keeps the vocabulary file one plain token per line.
#
# The base class holds what every tokenizer shares: the vocabulary, `encode` (normalise,
# split, look up; unknown units become `<unk>`), `decode` (skip the special tokens, turn
# `▁` back into spaces) and `save`.

# %%
#| export
SPECIAL_TOKENS = ("<blank>", "<sos>", "<eos>", "<unk>")
BLANK_ID = 0  # CTC's blank, and the padding of target batches
PAD_ID = BLANK_ID
SOS_ID = 1
EOS_ID = 2
UNK_ID = 3
WORD_BOUNDARY = "\u2581"  # '▁': a space between words (characters) or a word's start (BPE)

# %% [markdown]
# The base class holds the vocabulary and what every tokenizer shares:

# %%
#| export
class Tokenizer:
    """Text <-> ids: the special tokens, then the units; subclasses split text into units."""

    blank_id, sos_id, eos_id, unk_id, pad_id = BLANK_ID, SOS_ID, EOS_ID, UNK_ID, PAD_ID

    def __init__(self, units):
        self.tokens = [*SPECIAL_TOKENS, *units]
        self.token_to_id = {token: i for i, token in enumerate(self.tokens)}
        if len(self.token_to_id) != len(self.tokens):
            duplicates = sorted({t for t in self.tokens if self.tokens.count(t) > 1})
            raise ValueError(f"duplicate tokens in the vocabulary: {duplicates}")

    @property
    def vocab_size(self) -> int:
        """Number of tokens, the special ones included."""
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        """Ids of the normalised text; characters outside the alphabet become <unk>."""
        return [self.token_to_id.get(unit, UNK_ID) for unit in self.tokenize(normalize_text(text))]

    def decode(self, ids) -> str:
        """Text of the ids: special tokens skipped, '▁' read as a space, single spaces."""
        pieces = []
        for i in map(int, ids):
            if not 0 <= i < len(self.tokens):
                raise ValueError(f"id {i} is outside the vocabulary (0..{len(self.tokens) - 1})")
            if i >= len(SPECIAL_TOKENS):
                pieces.append(self.tokens[i])
        return " ".join("".join(pieces).replace(WORD_BOUNDARY, " ").split())

    def save(self, path) -> None:
        """Write the vocabulary file: line i (counting from 0) describes the token of id i."""
        Path(path).write_text("".join(line + "\n" for line in self.vocab_lines()), encoding="utf-8")

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """The tokenizer whose vocabulary file is path (see from_lines)."""
        lines = Path(path).read_text(encoding="utf-8").split("\n")
        # drop the final newline
        return cls.from_lines(lines[:-1] if lines[-1] == "" else lines, source=str(path))


# %% [markdown]
# Reading a vocabulary file back must fail loudly on anything malformed: a file that does
# not start with the four special tokens in order, an empty line, a token with whitespace
# in it. Each line is split at a single space into its parts: one part for a plain token,
# two for a BPE merge (next section). The lines can come from a file (`load`) or from
# anywhere else, a checkpoint for instance (`from_lines`, chapter 7); `source` names
# them in the error messages.

# %%
#| export
def vocab_rows(lines: list[str], source: str = "vocabulary") -> list[list[str]]:
    """The parts of each vocabulary line, after checking the special tokens."""
    if tuple(lines[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
        raise ValueError(
            f"{source}: a vocabulary file starts with the lines {' '.join(SPECIAL_TOKENS)}"
        )
    rows = []
    for number, line in enumerate(lines, start=1):
        parts = line.split(" ")
        if not all(parts) or len(parts) > 2 or any(ch.isspace() for part in parts for ch in part):
            raise ValueError(
                f"{source}, line {number}: {line!r} is neither a token nor a pair 'left right'"
            )
        rows.append(parts)
    return rows


# %% [markdown]
# The character tokenizer itself: the text's characters, with `▁` for each space.

# %%
#| export
def _check_alphabet(alphabet: str) -> str:
    """The alphabet, if its characters are distinct, not whitespace and not '▁'."""
    if len(set(alphabet)) != len(alphabet) or any(
        ch.isspace() or ch == WORD_BOUNDARY for ch in alphabet
    ):
        raise ValueError(
            f"the alphabet must hold distinct characters, no whitespace and no {WORD_BOUNDARY!r}"
        )
    return alphabet


class CharTokenizer(Tokenizer):
    """One token per character of the alphabet, and WORD_BOUNDARY for the space between words."""

    def __init__(self, alphabet: str = ALPHABET):
        super().__init__([WORD_BOUNDARY, *_check_alphabet(alphabet)])
        self.alphabet = alphabet

    def tokenize(self, text: str) -> list[str]:
        """Units of normalised text: its characters, '▁' between words."""
        return list(text.replace(" ", WORD_BOUNDARY))

    def vocab_lines(self) -> list[str]:
        """The lines of the vocabulary file: the tokens themselves."""
        return list(self.tokens)

    @classmethod
    def from_lines(cls, lines: list[str], source: str = "vocabulary") -> "CharTokenizer":
        """The tokenizer of the lines of a vocabulary file."""
        units = vocab_rows(lines, source)[len(SPECIAL_TOKENS) :]
        for number, parts in enumerate(units, start=len(SPECIAL_TOKENS) + 1):
            if len(parts) != 1 or len(parts[0]) != 1:
                raise ValueError(
                    f"{source}, line {number}: {' '.join(parts)!r} is not one character"
                    " (a BPE vocabulary? load it with BPETokenizer.load)"
                )
        if not units or units[0] != [WORD_BOUNDARY]:
            raise ValueError(
                f"{source}, line {len(SPECIAL_TOKENS) + 1}: expected {WORD_BOUNDARY!r}"
            )
        try:
            return cls("".join(parts[0] for parts in units[1:]))
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None


# %%
chars = CharTokenizer()
ids = chars.encode("Don't panic, 42!")
print(chars.vocab_size, "tokens:", " ".join(chars.tokens))
print("each unit of the text, and its id:")
print_table([ids], headers=[chars.tokens[i] for i in ids])
print(repr(chars.decode(ids)))

# %% [markdown]
# A character outside the alphabet becomes `<unk>` (id 3), and `decode` skips it like the
# other special tokens: what comes back is the text without that character. A word made
# only of unknown characters disappears.

# %%
ids = chars.encode("Café au lait 😂 ok")
print_table([ids], headers=[chars.tokens[i] for i in ids])
print(repr(chars.decode(ids)))
assert ids.count(UNK_ID) == 2 and chars.decode(ids) == "caf au lait ok"

# %% [markdown]
# Saving writes one token per line; loading gives the same ids. Every transcript of the
# corpus, as written, comes back from `encode` then `decode` in its normalised form. A
# malformed file (here, one whose special tokens are in the wrong order) is refused with
# the reason:

# %%
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "chars.vocab"
    chars.save(path)
    print(path.read_text().split("\n")[:8])
    reloaded = CharTokenizer.load(path)
    assert reloaded.tokens == chars.tokens
    assert all(reloaded.encode(t) == chars.encode(t) for t in dev_texts)
    assert all(chars.decode(chars.encode(raw)) == text for raw, text in zip(raw_texts, all_texts))
    path.write_text("<sos>\n<blank>\n<eos>\n<unk>\n▁\na\n")
    try:
        CharTokenizer.load(path)
    except ValueError as error:
        print("ValueError:", str(error).replace(tmp, "TMP"))

# %% [markdown]
# ## Byte-pair encoding
#
# Characters make long sequences; whole words make a vocabulary of tens of thousands of
# rare tokens and cannot spell a word never seen in training. **Byte-pair encoding**
# {cite:p}`sennrich2016bpe` learns units in between from the training text. Start from
# characters; then repeatedly find the adjacent pair of symbols that occurs most often and
# *merge* it into a new symbol:
#
# $$
# (a^*, b^*) = \operatorname*{arg\,max}_{(a, b)} \sum_{w} c(w)\; n_{ab}(w),
# $$
#
# where $c(w)$ is how often word $w$ occurs in the training text and $n_{ab}(w)$ how often
# the pair $(a, b)$ occurs in the current segmentation of $w$. Each merge adds one token to
# the vocabulary; stop when it has the size asked for. Two choices make it practical:
#
# - **Count over unique words, not over the text.** Merges never cross a space, so each
#   distinct word is segmented once and its pairs are weighted by its count $c(w)$: a few
#   thousand words instead of hundreds of thousands of running characters.
# - **Mark where a word starts.** Like sentencepiece, every word begins with `▁`, so
#   `▁the` (the word "the") and `the` (inside "other") are different tokens, and decoding
#   restores the spaces: each `▁` is a space.
#
# Ties (two pairs with the same count) are broken as sentencepiece breaks them: the pair
# whose new token is shorter first, then the new token in string order (then the pair
# itself, so that nothing is left to chance). The merges depend only on the word counts:
# the same text in any order gives the same tokenizer.
#
# First the two operations, on the toy example of the BPE paper: "low" 5 times, "lower"
# twice, "newest" 6 times, "widest" 3 times.

# %%
#| export
def merge_priority(pair: tuple, count: int) -> tuple:
    """Sort key of a candidate merge: most frequent, then shortest new token, then its string."""
    return -count, len(pair[0] + pair[1]), pair[0] + pair[1], pair


def count_pairs(words, counts) -> Counter:
    """How often each adjacent pair of symbols occurs, each word weighted by its count."""
    pairs = Counter()
    for symbols, count in zip(words, counts):
        for pair in zip(symbols, symbols[1:]):
            pairs[pair] += count
    return pairs


def merge_pair(symbols, pair) -> list[str]:
    """The symbols with each occurrence of the adjacent pair, left to right, fused into one."""
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


# %%
toy_counts = {"low": 5, "lower": 2, "newest": 6, "widest": 3}
toy_words = [[WORD_BOUNDARY, *word] for word in toy_counts]
for step in range(1, 6):
    pairs = count_pairs(toy_words, toy_counts.values())
    best = min(pairs, key=lambda p: merge_priority(p, pairs[p]))
    top = ", ".join(
        f"{a}+{b}:{pairs[a, b]}"
        for a, b in sorted(pairs, key=lambda p: merge_priority(p, pairs[p]))[:4]
    )
    toy_words = [merge_pair(symbols, best) for symbols in toy_words]
    print(f"step {step}: {top:<34} merge {best[0]}+{best[1]}")
    print(f"{'':8}-> {' | '.join(' '.join(w) for w in toy_words)}")

# %% [markdown]
# After each merge only the words that held the merged pair change, so only their pairs
# need recounting. `bpe_merges` keeps the pair counts and, for each pair, the words that
# hold it; a merge subtracts those words' old pairs and adds their new ones. Finding the
# best pair must not mean scanning every pair at every step either: the candidates wait
# in a **heap** (a priority queue) ordered by `merge_priority`, and when a pair's count
# changes its new entry is pushed. The old entry stays behind; it is **stale**, and is
# skipped when it reaches the top because its count is no longer the pair's count.
#
# `bpe_merges` is a generator: it yields merges for as long as we ask (or until every
# word is one token), so the merges of a small vocabulary are the first merges of a
# large one. A pair that would spell a token the vocabulary already has is skipped
# (sentencepiece does the same), so that every token has one meaning and one recipe.

# %%
#| export
def bpe_merges(word_counts: dict):
    """Yield (pair, count): merge the pair first by merge_priority, update the counts, repeat."""
    words = [[WORD_BOUNDARY, *word] for word in sorted(word_counts)]  # each word's symbols
    counts = [word_counts[word] for word in sorted(word_counts)]
    pairs = count_pairs(words, counts)
    where = defaultdict(set)  # pair -> indices of the words that hold it
    for i, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            where[pair].add(i)
    tokens = {symbol for symbols in words for symbol in symbols}
    heap = [merge_priority(pair, count) for pair, count in pairs.items()]  # best candidate first
    heapq.heapify(heap)
    while heap:
        minus_count, *_, best = heapq.heappop(heap)
        if -minus_count != pairs[best] or best[0] + best[1] in tokens:
            continue  # stale: the pair's count has changed since, or its token exists already
        yield best, pairs[best]
        tokens.add(best[0] + best[1])
        changed = Counter()
        for i in sorted(where.pop(best)):
            new = merge_pair(words[i], best)
            changed.subtract(count_pairs([words[i]], [counts[i]]))
            changed.update(count_pairs([new], [counts[i]]))
            for pair in zip(new, new[1:]):
                where[pair].add(i)
            words[i] = new
        for pair, delta in changed.items():
            if delta:
                pairs[pair] += delta
                if pairs[pair] > 0:
                    heapq.heappush(heap, merge_priority(pair, pairs[pair]))


# %% [markdown]
# On the corpus's training text, the merge table as it grows: the first merges join `▁`
# to frequent first letters, build frequent pairs (`he`, `in`, `re`) and spell the word
# `▁the`; later ones, each counted fewer times, build longer pieces (`ent`, `ity`) and
# whole words (`▁put`, `▁high`). The first 16 merges, then every 50th and the last of a
# 500-token vocabulary:

# %%
train_word_counts = Counter(word for text in train_texts for word in text.split())
print(f"{sum(train_word_counts.values()):,} running words, {len(train_word_counts):,} distinct")
n_base = len(SPECIAL_TOKENS) + 1 + len(ALPHABET)  # special tokens, '▁' and the alphabet: 32
# a vocabulary of 500
merge_table = list(itertools.islice(bpe_merges(train_word_counts), 500 - n_base))
print(" rank  pair              count  new token")
for rank, ((a, b), n) in enumerate(merge_table):
    if rank < 16 or rank % 50 == 0 or rank == len(merge_table) - 1:
        print(f"{rank:>5}  {a + ' + ' + b:<16}{n:>7,}  {a + b}")

# %% [markdown]
# An independent check of the bookkeeping: the plain algorithm, which recounts every pair
# over every word at every step, must choose the same first merges.

# %%
def naive_bpe_merges(word_counts: dict, n_merges: int) -> list:
    """The first merges, recounting all pairs at each step (slow, obviously right)."""
    words = {(WORD_BOUNDARY, *word): count for word, count in word_counts.items()}
    merges = []
    for _ in range(n_merges):
        pairs = count_pairs(words.keys(), words.values())
        best = min(pairs, key=lambda p: merge_priority(p, pairs[p]))
        merges.append((best, pairs[best]))
        words = {tuple(merge_pair(symbols, best)): count for symbols, count in words.items()}
    return merges


n_check = 60
print(
    "first",
    n_check,
    "merges identical:",
    naive_bpe_merges(train_word_counts, n_check) == merge_table[:n_check],
)
assert naive_bpe_merges(train_word_counts, n_check) == merge_table[:n_check]

# %% [markdown]
# A word's segmentation as the vocabulary grows (the vocabulary size counts the 4 special
# tokens and the 28 base symbols, `▁`, `'` and `a`-`z`):

# %%
example_words = ["the", "because", "understanding", "don't"]
segmentations = []  # one row per vocabulary size
for size in (n_base, 50, 100, 200, 500):
    merges = [pair for pair, _ in merge_table[: size - n_base]]
    row = [size]
    for word in example_words:
        symbols = [WORD_BOUNDARY, *word]
        for pair in merges:
            symbols = merge_pair(symbols, pair)
        row.append(" ".join(symbols))
    segmentations.append(row)
print_table(segmentations, headers=["vocab", *example_words])

# %% [markdown]
# ### The BPE tokenizer
#
# To encode a word, start from `▁` and its characters and apply the learned merges: at
# each step the adjacent pair with the lowest **rank** (the earliest merge), until no pair
# is in the table. Because every merge creates a new token, a pair's rank is always later
# than the merges that made its parts, so this reproduces exactly the segmentation that
# training gave each training word. Words repeat a lot, so each word's segmentation is
# cached. A character outside the alphabet becomes `<unk>`, which takes part in no merge.
#
# The vocabulary file stays one token per line, and it is also the merge table: a merged
# token is written as its two parts with a space between them (`▁t he` is the token
# `▁the`), which a space inside a token can never be confused with, because no token holds
# a space. The first lines are the special tokens, `▁` and the alphabet, one character each.

# %%
#| export
class BPETokenizer(Tokenizer):
    """Byte-pair encoding over characters: words start with WORD_BOUNDARY; merges apply by rank."""

    def __init__(self, merges, alphabet: str = ALPHABET):
        base = [WORD_BOUNDARY, *_check_alphabet(alphabet)]
        super().__init__([*base, *(left + right for left, right in merges)])
        for new_id, (left, right) in enumerate(merges, start=len(SPECIAL_TOKENS) + len(base)):
            if not all(self.token_to_id.get(part, new_id) < new_id for part in (left, right)):
                raise ValueError(
                    f"merge {left!r} + {right!r} (id {new_id}) uses a token not defined before it"
                )
        self.alphabet, self.merges = alphabet, [tuple(pair) for pair in merges]
        self.ranks = {pair: rank for rank, pair in enumerate(self.merges)}
        self._cache: dict[str, list[str]] = {}

    def tokenize_word(self, word: str) -> list[str]:
        """Units of one word: '▁' and its characters, merged by lowest rank until none applies."""
        if word not in self._cache:
            symbols = [WORD_BOUNDARY] + [
                ch if ch in self.alphabet else SPECIAL_TOKENS[UNK_ID] for ch in word
            ]
            while len(symbols) > 1:
                pair = min(
                    zip(symbols, symbols[1:]), key=lambda p: self.ranks.get(p, len(self.ranks))
                )
                if pair not in self.ranks:
                    break
                symbols = merge_pair(symbols, pair)
            self._cache[word] = symbols
        return self._cache[word]

    def tokenize(self, text: str) -> list[str]:
        """Units of normalised text, word by word."""
        return [unit for word in text.split() for unit in self.tokenize_word(word)]

    def vocab_lines(self) -> list[str]:
        """The vocabulary file's lines: base tokens as they are, merged tokens as 'left right'."""
        return self.tokens[: len(self.tokens) - len(self.merges)] + [
            f"{a} {b}" for a, b in self.merges
        ]

# %% [markdown]
# Reading a BPE vocabulary back: the base tokens, one character a line, then the
# merges, two parts a line, each checked. (`add_to_class` attaches the function to the
# class, so that a class can be written in steps; in the package the exporter writes
# such methods into the class body.)

# %%
def add_to_class(cls):
    """Attach the decorated function to cls as a method; its name keeps its old meaning."""
    name = lambda method: getattr(method, "__func__", method).__name__  # noqa: E731
    return lambda method: setattr(cls, name(method), method) or globals().get(name(method))


# %%
#| export
@add_to_class(BPETokenizer)
@classmethod
def from_lines(cls, lines: list[str], source: str = "vocabulary") -> "BPETokenizer":
    """The tokenizer of the lines of a vocabulary file."""
    rows = vocab_rows(lines, source)[len(SPECIAL_TOKENS) :]
    base = [parts[0] for parts in itertools.takewhile(lambda parts: len(parts) == 1, rows)]
    if not base or base[0] != WORD_BOUNDARY or any(len(ch) != 1 for ch in base[1:]):
        raise ValueError(
            f"{source}: after the special tokens come {WORD_BOUNDARY!r} and the alphabet, "
            "one character a line"
        )
    merges = rows[len(base) :]
    for number, parts in enumerate(merges, start=len(SPECIAL_TOKENS) + len(base) + 1):
        if len(parts) != 2:
            raise ValueError(
                f"{source}, line {number}: {parts[0]!r} after the merges began; "
                "expected 'left right'"
            )
    try:
        return cls([tuple(parts) for parts in merges], "".join(base[1:]))
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


# %% [markdown]
# Training puts it together: normalise, count words, refuse characters outside the
# alphabet (they would need tokens of their own), and take the first
# `vocab_size - 32` merges.

# %%
#| export
def train_bpe(texts, vocab_size: int, alphabet: str = ALPHABET) -> BPETokenizer:
    """A BPE tokenizer of vocab_size tokens (fewer if the pairs run out) learned from texts."""
    word_counts = Counter(word for text in texts for word in normalize_text(text).split())
    unknown = sorted(set("".join(word_counts)) - set(alphabet))
    if unknown:
        raise ValueError(f"the training text holds characters outside the alphabet: {unknown}")
    n_base = len(SPECIAL_TOKENS) + 1 + len(alphabet)
    if vocab_size < n_base:
        raise ValueError(
            f"vocab_size {vocab_size} is smaller than the {n_base} special and base tokens"
        )
    merges = [pair for pair, _ in itertools.islice(bpe_merges(word_counts), vocab_size - n_base)]
    return BPETokenizer(merges, alphabet)


# %% [markdown]
# Training is fast because it works on word counts and recounts only what a merge
# changed (the timing below is not compared when the book's tests re-run this notebook):

# %%
# NBVAL_IGNORE_OUTPUT
start = time.perf_counter()
bpe500 = train_bpe(train_texts, 500)
print(
    f"train_bpe(vocab_size=500) on {len(train_texts):,} utterances: "
    f"{time.perf_counter() - start:.1f} s"
)

# %% [markdown]
# Checks: the tokenizer's merges are the merge table above; encoding each training word
# reproduces the segmentation training gave it; training on the texts in reverse order
# gives the same merges; decoding restores every transcript, as written, in its
# normalised form; the vocabulary file gives back the same tokenizer.

# %%
assert bpe500.merges == [pair for pair, _ in merge_table]
training_segmentation = {word: [WORD_BOUNDARY, *word] for word in train_word_counts}
for pair in bpe500.merges:
    training_segmentation = {w: merge_pair(s, pair) for w, s in training_segmentation.items()}
assert all(bpe500.tokenize_word(w) == s for w, s in training_segmentation.items())
assert train_bpe(train_texts[::-1], 500).merges == bpe500.merges
assert all(bpe500.decode(bpe500.encode(raw)) == text for raw, text in zip(raw_texts, all_texts))
with tempfile.TemporaryDirectory() as tmp:
    bpe500.save(Path(tmp) / "bpe500.vocab")
    lines = (Path(tmp) / "bpe500.vocab").read_text().split("\n")
    reloaded = BPETokenizer.load(Path(tmp) / "bpe500.vocab")
print("lines", lines[30:36], "...", len(lines) - 1, "lines")
assert reloaded.tokens == bpe500.tokens and all(
    reloaded.encode(t) == bpe500.encode(t) for t in dev_texts
)
text = dev_texts[0]
print(text)
print(" ".join(bpe500.tokens[i] for i in bpe500.encode(text)))
print(f"{len(text)} characters, {len(bpe500.encode(text))} BPE-500 tokens")

# %% [markdown]
# ## A reference: sentencepiece
#
# `sentencepiece` {cite:p}`kudo2018sentencepiece` is the tokenizer library most ASR
# toolkits (ESPnet, WeNet, FunASR, icefall) use. Its BPE mode trains the same algorithm;
# we give it the same training text and vocabulary size, our four special tokens at the
# same ids, no normalisation of its own (`normalization_rule_name="identity"`, the text is
# normalised already), every character kept (`character_coverage=1.0`) and one thread. It
# normally writes a model file and logs to the terminal: `model_writer` takes the model in
# memory instead, and `minloglevel=2` silences it.

# %%
def train_sentencepiece(
    texts, vocab_size: int, model_type="bpe", **options
) -> spm.SentencePieceProcessor:
    """A sentencepiece model trained in memory, quietly, with our special tokens."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        character_coverage=1.0,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
        pad_id=BLANK_ID,
        bos_id=SOS_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        pad_piece="<blank>",
        bos_piece="<sos>",
        eos_piece="<eos>",
        unk_piece="<unk>",
        **options,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


def sp_pieces(sp: spm.SentencePieceProcessor) -> list[str]:
    """The vocabulary of a sentencepiece model, by id."""
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


# %% [markdown]
# For three vocabulary sizes: how many of our tokens sentencepiece also has, and the
# tokens per word each gives on the dev text. sentencepiece's default
# `split_by_unicode_script=True` never lets a token span letters and `'` (a different
# Unicode script), so it is trained twice: with its defaults, and with that switch off.

# %%
dev_words = sum(len(text.split()) for text in dev_texts)
overlap_rows = []
sentencepiece_models = {}
for size in (100, 200, 500):
    ours = train_bpe(train_texts, size)
    sp_default = train_sentencepiece(train_texts, size)
    sp_nosplit = train_sentencepiece(train_texts, size, split_by_unicode_script=False)
    sentencepiece_models[size] = (ours, sp_default, sp_nosplit)
    overlap = [len(set(ours.tokens) & set(sp_pieces(sp))) for sp in (sp_default, sp_nosplit)]
    per_word = [
        sum(len(encode(t)) for t in dev_texts) / dev_words
        for encode in (ours.encode, sp_default.encode, sp_nosplit.encode)
    ]
    overlap_rows.append([size, f"{overlap[0]}/{size}", f"{overlap[1]}/{size}", *per_word])
    assert overlap[0] >= 0.97 * size and overlap[1] == size  # (almost) the same vocabulary
    assert abs(per_word[1] / per_word[0] - 1) < 0.025 and per_word[2] == per_word[0]
per_word_names = ["ours", "sp", "sp-no-split"]
print("tokens of ours that sentencepiece has too; tokens per dev word (ours, sp, sp-no-split)")
print_table(
    overlap_rows,
    headers=["vocab", "overlap (default)", "overlap (no script split)", *per_word_names],
    formats={name: ".3f" for name in per_word_names},
)

# %% [markdown]
# The two agree almost completely. With its defaults, sentencepiece shares 199 of our 200
# tokens (all 100 of 100, 494 of 500) and needs 2.493 tokens per dev word where ours
# needs 2.494 (1.942 against 1.930 at 500). The difference is the apostrophe:
# sentencepiece's script split forbids joining `'` to letters (our `'t` in `▁d on 't`,
# below), so it spends those merges on other pieces, and "don't" costs it a token more.
# With the split off, the vocabularies are identical.
#
# Segmentations side by side (vocabulary 200), for frequent words, contractions and a
# word the training text never saw:

# %%
ours, sp_default, sp_nosplit = sentencepiece_models[200]
for word in ["the", "because", "don't", "they're", "understanding", "paraformer"]:
    print(
        f"{word:<14} ours: {' '.join(ours.tokenize_word(word)):<26} "
        f"sentencepiece: {' '.join(sp_default.encode(word, out_type=str))}"
    )

# %% [markdown]
# With the script split off, sentencepiece's BPE is our BPE: the same tokens, learned in
# the same order (sentencepiece lists merged pieces by the step that created them, then the
# single characters), and the same segmentation of every dev utterance.

# %%
for size, (ours, _, sp_nosplit) in sentencepiece_models.items():
    pieces = sp_pieces(sp_nosplit)
    same_order = pieces[4 : 4 + len(ours.merges)] == [a + b for a, b in ours.merges]
    same_segmentation = sum(
        ours.tokenize(t) == sp_nosplit.encode(t, out_type=str) for t in dev_texts
    )
    print(
        f"vocab {size}: merges in the same order: {same_order}; "
        f"identical segmentations: {same_segmentation}/{len(dev_texts)} dev utterances"
    )
    assert same_order and same_segmentation == len(dev_texts)

# %% [markdown]
# ## Characters or word pieces? Tokens per frame
#
# Chapter 1's frontend turns $N$ samples at 16 kHz into $T = 1 + \lfloor (N - 400) / 160
# \rfloor$ fbank frames (25 ms windows every 10 ms); the encoder then sees one frame per
# $k$ of them: $k = 6$ with LFR stacking (60 ms frames, FunASR's choice), $k = 4$ with the
# convolutional subsampling of most CTC and attention models (40 ms). CIF fires at most
# about once per encoder frame, so an utterance of $U$ tokens needs
#
# $$
# \rho = \frac{U}{\lceil T / k \rceil} \le 1,
# $$
#
# and comfortably below 1: the predictor must also learn *where* to fire, and FunASR's
# recipes make it count one more token, an `<eos>` appended to every target (this book's
# model does not append it, but the choice below leaves room for it). We measure $\rho$ for every training
# utterance, for characters and for BPE at vocabulary sizes 50, 100, 200, 500 and 1000
# (steps of about a factor two). One training run to 1000 tokens gives all of them: the
# merges of a smaller vocabulary are the first merges of a larger one.

# %%
def encoder_frames(duration: float, subsampling: int, sample_rate: int = 16000) -> int:
    """Encoder frames of an utterance: 10 ms fbank frames (25 ms window), one in `subsampling`."""
    n_fbank = 1 + (round(duration * sample_rate) - 400) // 160
    return math.ceil(n_fbank / subsampling)


bpe1000 = train_bpe(train_texts, 1000)
assert bpe1000.merges[: len(bpe500.merges)] == bpe500.merges  # a smaller vocabulary is a prefix
vocab_sizes = (50, 100, 200, 500, 1000)
tokenizers = {
    "characters": chars,
    **{f"BPE-{n}": BPETokenizer(bpe1000.merges[: n - n_base]) for n in vocab_sizes},
}
durations = np.array([u["duration"] for u in corpus["train"]])  # (N,) seconds
# (N,) each
frames = {ms: np.array([encoder_frames(d, ms // 10) for d in durations]) for ms in (40, 60)}
encoded = {name: [tok.encode(text) for text in train_texts] for name, tok in tokenizers.items()}
# (N,) each: U
lengths = {name: np.array([len(ids) for ids in encoded[name]]) for name in tokenizers}
# (N,) each: rho
per_frame = {name: {ms: U / frames[ms] for ms in (40, 60)} for name, U in lengths.items()}
print(
    f"{len(durations):,} training utterances, {durations.sum() / 3600:.2f} h; "
    f"frames per second: {frames[60].sum() / durations.sum():.1f} at 60 ms, "
    f"{frames[40].sum() / durations.sum():.1f} at 40 ms"
)

# %% [markdown]
# The table: tokens per second of speech, then $\rho$ at 60 ms and at 40 ms frames, each
# with its mean, 95th percentile and maximum over the training utterances, and the share
# of utterances above 0.8 and above 1 token per frame.

# %%
def spread(values: np.ndarray) -> str:
    """Mean, 95th percentile and maximum, side by side (17 characters)."""
    return f"{values.mean():5.2f}{np.percentile(values, 95):6.2f}{values.max():6.2f}"


def shares(rho: np.ndarray) -> str:
    """Share of utterances above 0.8 and above 1 token per frame (14 characters)."""
    return f"{np.mean(rho > 0.8):7.1%}{np.mean(rho > 1):7.1%}"


stats = " mean   p95   max"  # above spread()
head = stats + "   >0.8     >1"  # above spread() and shares()
print(
    f"{'':<17}{'tokens per second':^18}|{'tokens per 60 ms frame':^31}|"
    f"{'tokens per 40 ms frame':^31}".rstrip()
)
print(f"{'unit':<11}{'vocab':>6}{stats:>18}|{head}|{head}")
for name, tok in tokenizers.items():
    rho = per_frame[name]
    print(
        f"{name:<11}{tok.vocab_size:>6}{spread(lengths[name] / durations):>18}|"
        f"{spread(rho[60])}{shares(rho[60])}|{spread(rho[40])}{shares(rho[40])}"
    )

# %% [markdown]
# The histogram of $\rho$ at 60 ms frames, with the line CIF cannot cross (dashed) and
# the comfort limit discussed below (dotted):

# %% mystnb={"figure": {"caption": "Tokens per 60 ms encoder frame, $\\rho$, of the training utterances, for characters and three BPE vocabularies, with the line CIF cannot cross (1, dashed) and the comfort limit (0.8, dotted).", "name": "fig-ch02-tokens-per-frame"}, "image": {"alt": "Four step histograms of tokens per frame: characters centred near 0.95 and reaching past 1, BPE-100 near 0.55, BPE-200 near 0.45 and BPE-500 near 0.35, with vertical lines at 0.8 and 1."}}
fig, ax = plt.subplots(figsize=(7, 3))
bins = np.linspace(0, 1.6, 65)
for name in ("characters", "BPE-100", "BPE-200", "BPE-500"):
    ax.hist(per_frame[name][60], bins=bins, histtype="step", linewidth=1.5, label=name)
ax.axvline(1.0, color="black", linestyle="--", linewidth=1, label="CIF's limit")
ax.axvline(0.8, color="black", linestyle=":", linewidth=1, label="comfort limit")
ax.set_xlabel("tokens per encoder frame (60 ms frames)")
ax.set_ylabel("utterances")
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
plt.show()

# %% [markdown]
# ### Why not right up to 1?
#
# $\rho$ is an average over the utterance, and speech does not keep a steady pace: some
# words are spoken faster than others, and the predictor needs one frame per token
# *there*. Chapter 1's manifests hold the time at which each word starts, so we can
# measure the busiest stretch of each utterance: the three consecutive words with the most
# tokens per frame. espeak reports a contraction by its first part ("don" for "don't"), so
# we keep the utterances whose word lists agree with their transcripts.

# %%
def busiest_stretch(
    tokenizer, utterance: dict, text: str, n_words: int = 3, frame_s: float = 0.06
) -> float:
    """Most tokens per frame over n_words consecutive words, timed by the words' start times."""
    words = text.split()
    # (len(words) + 1,)
    starts = [start for _, start in utterance["words"]] + [utterance["duration"]]
    k = min(n_words, len(words))
    return max(
        len(tokenizer.encode(" ".join(words[i : i + k]))) / ((starts[i + k] - starts[i]) / frame_s)
        for i in range(len(words) - k + 1)
    )


timed = [
    i
    for i, (u, text) in enumerate(zip(corpus["train"], train_texts))
    # speech, words timed
    if text and [normalize_text(word) for word, _ in u["words"]] == text.split()
]
print(
    f"{len(timed):,} of {len(train_texts):,} utterances "
    "with word times that match their transcripts"
)
print(
    f"{'unit':<11}{'busiest 3 words / utterance: median':>36}{'p95':>6}"
    "   busiest 3 words > 1 token/frame"
)
burst = {}
for name in ("characters", "BPE-100", "BPE-200", "BPE-500"):
    # (N',)
    peak = np.array(
        [busiest_stretch(tokenizers[name], corpus["train"][i], train_texts[i]) for i in timed]
    )
    burst[name] = peak / per_frame[name][60][timed]  # (N',)
    print(
        f"{name:<11}{np.median(burst[name]):>36.2f}{np.percentile(burst[name], 95):>6.2f}"
        f"{np.mean(peak > 1):>14.1%}"
    )
assert all(1.05 < np.median(b) < 1.35 for b in burst.values())

# %% [markdown]
# Whatever the unit, the busiest three words of an utterance run at 1.1 to 1.2 times its
# average pace (the median ratio), and at 1.3 to 1.5 times for one utterance in twenty.
# A BPE utterance at $\rho = 0.8$ therefore typically asks for about
# $0.8 \times 1.17 \approx 0.94$ tokens per frame in its busiest stretch, and one in
# twenty asks for more than 1 ($0.8 \times 1.4 = 1.12$): 0.8 is where the margin runs
# out. With characters, three utterances in five have a stretch beyond one token per
# frame; with BPE-100, one in a hundred; with BPE-200, one in a thousand.
#
# The other side of the balance is the vocabulary. A larger one means fewer tokens per
# frame, but each token is rarer, and the decoder's output layer must learn every one of
# them from the examples it sees. For each vocabulary: how often its median token occurs
# in the training text, how many tokens occur fewer than 20 times, and how many never
# occur at all (pieces that every word holding them merges further: `ould` lives only
# inside `▁would`, `▁could` and `▁should`):

# %%
rare_threshold = 20
rare = {}
print(f"{'unit':<11}{'vocab':>6}{'median count':>14}   seen < {rare_threshold} times   never used")
for name, tok in tokenizers.items():
    counts = Counter(i for ids in encoded[name] for i in ids)
    units = range(len(SPECIAL_TOKENS), tok.vocab_size)
    rare[name] = sum(counts[i] < rare_threshold for i in units)
    unused = [tok.tokens[i] for i in units if counts[i] == 0]
    print(
        f"{name:<11}{tok.vocab_size:>6}{np.median([counts[i] for i in units]):>14,.0f}"
        f"{rare[name]:>18}{len(unused):>13} {' '.join(unused[:6])}".rstrip()
    )

# %% [markdown]
# **The choice.** Say that a unit *fits* a frame rate when no training utterance needs one
# token per frame or more, and at most one in 200 (0.5%) needs more than 0.8, the margin
# its busiest stretch asks for. Then, from the tables:
#
# - **Characters do not fit**, neither at 60 ms ($\rho$ mean 0.94, 82% of utterances
#   above 0.8 and 33% above 1) nor at 40 ms (max 1.11, 5.7% above 0.8). A character
#   Paraformer would need frames of about 30 ms, or a predictor that fires several times
#   in one frame.
# - At 60 ms, **BPE-200 is the smallest vocabulary that fits**: 7.6 tokens per second
#   against 16.7 frames per second, $\rho$ mean 0.45, p95 0.60, max 0.82, and at most
#   three of the 8,000 utterances above 0.8 (0.0% in the table). BPE-100 does not (its
#   fastest utterance needs more than a token per frame, 1.17, and 1.4% are above 0.8);
#   BPE-500 and BPE-1000 fit with more room on average ($\rho$ mean 0.35 and 0.29).
# - Among the vocabularies that fit we take the smallest: the median token of BPE-200
#   occurs 406 times in the training text, that of BPE-500 98 times and that of BPE-1000
#   38 times, with 123 tokens seen fewer than 20 times. BPE-100 would fit at 40 ms, but
#   40 ms frames are 1.5 times as many encoder frames, and attention's cost grows with
#   the square of their number.
#
# So the book's model uses **BPE with 200 tokens at 60 ms LFR frames**. The cell applies
# the rule to the measurements and fails if they stop supporting the choice; it also
# counts the `<eos>` token that FunASR's recipes append to every target.

# %%
def fits(rho: np.ndarray, comfortable: float = 0.8, share: float = 0.005) -> bool:
    """True if no utterance needs >= 1 token per frame and at most `share` need > `comfortable`."""
    return bool(rho.max() < 1 and np.mean(rho > comfortable) <= share)


for ms in (60, 40):
    print(
        f"fit at {ms} ms frames:",
        ", ".join(name for name in tokenizers if fits(per_frame[name][ms])),
    )
choice = min(
    (name for name in tokenizers if fits(per_frame[name][60])),
    key=lambda name: tokenizers[name].vocab_size,
)
with_eos = (lengths[choice] + 1) / frames[60]  # (N,) counting FunASR's extra <eos> token
print(
    f"choice: {choice} at 60 ms; counting <eos>: max {with_eos.max():.2f}, "
    f"above 0.8: {np.mean(with_eos > 0.8):.1%}"
)
assert not fits(per_frame["characters"][60]) and not fits(per_frame["characters"][40])
assert choice == "BPE-200" and fits(with_eos)

# %% [markdown]
# The choice goes into the package. `default_tokenizer()` trains BPE-200 on the training
# transcripts of chapter 1's corpus (about a second) and is the tokenizer of the later
# chapters; training is deterministic, so each of them gets the same ids. Without a
# manifest it reads the transcripts from the corpus *plan* (chapter 1's
# `corpus_plan`), so a script that only needs the tokenizer never synthesises audio.

# %%
#| export
DEFAULT_VOCAB_SIZE = 200


def default_tokenizer(train_manifest=None, vocab_size: int = DEFAULT_VOCAB_SIZE) -> BPETokenizer:
    """The book's tokenizer: BPE on a training manifest's texts, by default the book's plan."""
    # chapter 1; used only here
    from paraformer_edu.corpus import corpus_config, corpus_plan, read_manifest

    if train_manifest is None:
        return train_bpe(
            [utterance["text"] for utterance in corpus_plan(corpus_config())["train"]], vocab_size
        )
    return train_bpe([utterance["text"] for utterance in read_manifest(train_manifest)], vocab_size)


# %%
tokenizer = default_tokenizer(manifests["train"])
assert tokenizer.vocab_size == DEFAULT_VOCAB_SIZE == tokenizers[choice].vocab_size
assert (
    tokenizer.merges == tokenizers[choice].merges and default_tokenizer().merges == tokenizer.merges
)
print(
    f"the book's tokenizer: BPE, {tokenizer.vocab_size} tokens; first merges "
    + ", ".join(" ".join(pair) for pair in tokenizer.merges[:5])
)

# %% [markdown]
# ## Closing note: tokens per second against frames per second
#
# The measurements behind the choice, computed afresh from the training utterances.
# Encoder frames run at 16.7 per second at 60 ms (LFR, the book's frontend) and 24.9 per
# second at 40 ms; $\rho$ is tokens per encoder frame, per utterance. The unit: **BPE
# with 200 tokens** (the 4 special tokens, `▁`, the 27 characters and 168 merges) **at
# 60 ms frames**, `paraformer_edu.default_tokenizer()`. The cell prints the table and
# checks the key numbers against the rule above.

# %%
print(
    f"{len(durations):,} training utterances, {durations.sum() / 3600:.2f} h; "
    f"encoder frames per second: {frames[60].sum() / durations.sum():.1f} at 60 ms, "
    f"{frames[40].sum() / durations.sum():.1f} at 40 ms"
)
closing_rows = []
for name in tokenizers:
    rate, r60, r40 = lengths[name] / durations, per_frame[name][60], per_frame[name][40]
    verdict = ("yes: chosen" if name == choice else "yes") if fits(r60) else "no"
    closing_rows.append(
        [
            name,
            f"{rate.mean():.1f} ({rate.max():.1f})",
            f"{r60.mean():.2f} / {np.percentile(r60, 95):.2f} / {r60.max():.2f}",
            np.mean(r60 > 0.8),
            np.mean(r60 > 1),
            f"{r40.mean():.2f} / {r40.max():.2f}",
            verdict,
        ]
    )
print("rho: tokens per encoder frame, at 60 ms and at 40 ms frames")
print_table(
    closing_rows,
    headers=[
        "unit",
        "tokens/s mean (max)",
        "rho 60 mean/p95/max",
        "> 0.8",
        "> 1",
        "rho 40 mean/max",
        "fits at 60 ms",
    ],
    formats={"> 0.8": ".1%", "> 1": ".1%"},
)
assert round(float(frames[60].sum() / durations.sum()), 1) == 16.7 and choice == "BPE-200"
assert all(
    fits(per_frame[name][60]) == (name in ("BPE-200", "BPE-500", "BPE-1000")) for name in tokenizers
)

# %% [markdown]
# ## Summary
#
# - One function, `normalize_text`, turns any text into the corpus's spoken form:
#   NFKC, lowercase, `'` for every apostrophe, numbers spelled out (up to a trillion,
#   with ordinals and decimals), punctuation removed, apostrophes kept only inside words,
#   single spaces. What is left outside the alphabet becomes `<unk>` in the tokenizers.
# - Every tokenizer puts `<blank>` (also the padding), `<sos>`, `<eos>` and `<unk>` at ids
#   0 to 3; `decode` skips them; the vocabulary file is one token per line and loading it
#   gives the same ids.
# - BPE learns merges from word counts: the most frequent adjacent pair (ties: the
#   shorter new token, then string order), merged, recounted only in the words it
#   changed, with a heap of candidates; 500 tokens from 8,000 utterances in under a
#   second. The merges depend only on the word counts, and a smaller vocabulary's merges
#   are the first merges of a larger one.
# - sentencepiece's BPE, trained on the same text, shares 199 of our 200 tokens with its
#   defaults (2.493 against our 2.494 tokens per dev word); with `split_by_unicode_script`
#   off it learns the same merges in the same order and segments every dev utterance as
#   we do.
# - Tokens per second against encoder frames per second decides the unit. English
#   characters run at 15.6 per second, close to the 16.7 frames per second of 60 ms
#   frames: a third of the training utterances would need more than one token per frame,
#   and even at 40 ms the fastest need more than one. BPE-200 runs at 7.6 tokens per
#   second, 0.45 per 60 ms frame on average and 0.82 at most, which leaves room for the
#   busiest stretches of speech (about 1.15 times the average pace) and still gives its
#   median token hundreds of examples (406). The book's model uses **BPE-200 at 60 ms
#   frames**, `default_tokenizer()`.
#
# ## Exercises
#
# 1. **Read the numbers back.** Write `words_to_number(text)`, the inverse of
#    `spell_number` for its own output ("two thousand twenty four" -> 2024), and check the
#    round trip for every integer below 100,000 and some large ones.
# 2. **How fast can CTC talk?** Chapter 4's CTC needs one frame per token *plus* a blank
#    between two equal neighbours (`l l` in "hello"). For characters and BPE-200 at 60 ms,
#    what fraction of training utterances has fewer frames than CTC needs?
# 3. **Another subword model.** sentencepiece's default model is not BPE but a unigram
#    language model. Train it with `model_type="unigram"` at 200 tokens: how many tokens per
#    word does it give on dev, and how does it split "understanding" and "don't"?

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
def words_to_number(text: str) -> int:
    """The integer spelled by spell_number's words: 'two thousand twenty four' -> 2024."""
    values = {word: i for i, word in enumerate(_ONES)} | {
        word: 10 * i for i, word in enumerate(_TENS) if i > 1
    }
    scales = {name: scale for scale, name in _SCALES if scale > 100}
    total, group = 0, 0  # finished groups (billions, millions, thousands), the group being read
    for word in text.split():
        if word in values:
            group += values[word]
        elif word == "hundred":
            group *= 100
        else:
            total, group = total + group * scales[word], 0
    return total + group


checks = list(range(100_000)) + [10**6, 1_000_001, 123_456_789, 20_000_000_019, 999_999_999_999]
assert all(words_to_number(spell_number(n)) == n for n in checks)
print(f"round trip exact for {len(checks):,} numbers; e.g. {spell_number(20_000_000_019)!r}")

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
def ctc_min_frames(units: list) -> int:
    """Fewest frames a CTC path needs: one per token, one blank between equal neighbours."""
    return len(units) + sum(a == b for a, b in zip(units, units[1:]))


for name in ("characters", f"BPE-{DEFAULT_VOCAB_SIZE}"):
    need = np.array([ctc_min_frames(ids) for ids in encoded[name]])  # (N,)
    print(
        f"{name:<11} CTC needs more frames than there are at 60 ms: "
        f"{np.mean(need > frames[60]):.1%}"
        f" (without repeats: {np.mean(lengths[name] > frames[60]):.1%})"
    )

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
unigram = train_sentencepiece(train_texts, 200, model_type="unigram")
print(
    f"unigram-200: {sum(len(unigram.encode(t)) for t in dev_texts) / dev_words:.3f} "
    "tokens/word on dev "
    f"(BPE-200: {sum(len(tokenizer.encode(t)) for t in dev_texts) / dev_words:.3f})"
)
for word in ["understanding", "don't"]:
    print(
        f"{word:<14} unigram: {' '.join(unigram.encode(word, out_type=str)):<24} "
        f"BPE: {' '.join(tokenizer.tokenize_word(word))}"
    )
