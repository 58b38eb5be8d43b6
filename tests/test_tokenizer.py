"""Tests of paraformer_edu.tokenizer (chapter 2): normalisation, character and BPE tokenizers."""

import io
import json
import os
import subprocess
import sys
import random
import re

import pytest
import wordfreq

from paraformer_edu.tokenizer import (
    ALPHABET, BLANK_ID, EOS_ID, PAD_ID, SOS_ID, SPECIAL_TOKENS, UNK_ID, WORD_BOUNDARY,
    BPETokenizer, CharTokenizer, bpe_merges, count_pairs, default_tokenizer, merge_pair,
    merge_priority, normalize_text, spell_number, spell_ordinal, train_bpe,
)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """A small corpus like chapter 1's: sentences of frequent English words, in spoken form."""
    words = [w for w in wordfreq.top_n_list("en", 3000) if re.fullmatch(r"[a-z]+(?:'[a-z]+)*", w)]
    weights = [wordfreq.word_frequency(w, "en") for w in words]
    rng = random.Random(0)
    return [" ".join(rng.choices(words, weights, k=rng.randint(3, 15))) for _ in range(1500)]


@pytest.fixture(scope="module")
def bpe(texts) -> BPETokenizer:
    return train_bpe(texts, 150)


@pytest.fixture(scope="module")
def book_texts() -> dict[str, list[str]]:
    """The transcripts of the book's corpus, as written (chapter 1's plan: text only, no audio)."""
    data = pytest.importorskip("paraformer_edu.corpus")
    plan = data.corpus_plan(data.corpus_config("book"))
    return {split: [u["text"] for u in utterances] for split, utterances in plan.items()}


@pytest.fixture(scope="module")
def book_bpe(book_texts) -> BPETokenizer:
    return train_bpe(book_texts["train"], 200)


@pytest.mark.parametrize("raw, expected", [
    ("", ""),
    (" \t\n ", ""),
    ("Hello, World!", "hello world"),
    ("Don’t ‘stop’ DON'T", "don't stop don't"),
    ("'quoted' dogs' o'clock rock'n'roll", "quoted dogs o'clock rock'n'roll"),
    ("' '' '''", ""),
    ("well-known... U.S.A.; (yes) [no] {x} \"q\" «guillemets» ¿qué?", "well known u s a yes no x q guillemets qué"),
    ("a\u00a0b\u2003c\u3000d", "a b c d"),  # no-break, em and ideographic spaces
    ("ﬁne ＡＢＣ", "fine abc"),  # NFKC: ligature, full-width letters
    ("co\u00adop\u200berate", "cooperate"),  # soft hyphen, zero-width space
    ("ÉCOLE", "école"),  # stays outside the alphabet: the tokenizers map é to <unk>
    ("0 7 13 20 42 99", "zero seven thirteen twenty forty two ninety nine"),
    ("100 101 110 1000 1001", "one hundred one hundred one one hundred ten one thousand one thousand one"),
    ("1,234,567", "one million two hundred thirty four thousand five hundred sixty seven"),
    ("3.14 0.5", "three point one four zero point five"),
    ("1st 2nd 3rd 4th 11th 12th 20th 21st 100th", "first second third fourth eleventh twelfth twentieth "
                                                  "twenty first one hundredth"),
    ("mp3 3d 4k", "mp three three d four k"),
    ("x² ½", "x two one ⁄ two"),  # NFKC spells out superscripts and vulgar fractions as digits
    ("１２", "twelve"),  # full-width digits
    ("$5 & 10% a+b=c @x", "$ five and ten percent a plus b equals c at x"),  # a few symbols are read
    ("€ ~ ^ © 😂", "€ ~ ^ © 😂"),  # other symbols are left for the tokenizers, which map them to <unk>
])
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected
    assert normalize_text(expected) == expected  # idempotent


def test_normalize_text_refuses_huge_numbers():
    with pytest.raises(ValueError, match="cannot spell out 1000000000000"):
        normalize_text("1000000000000 stars")
    assert normalize_text("999999999999").startswith("nine hundred ninety nine billion")


def test_spell_number():
    assert spell_number(0) == "zero"
    assert spell_number(2024) == "two thousand twenty four"
    assert spell_number(1_000_000_001) == "one billion one"
    assert spell_number(40_000_000) == "forty million"
    assert spell_ordinal(40) == "fortieth" and spell_ordinal(112) == "one hundred twelfth"
    with pytest.raises(ValueError):
        spell_number(-1)
    spelled = {spell_number(n) for n in range(20_000)}
    assert len(spelled) == 20_000  # distinct numbers, distinct words
    assert all(set(s) <= set(ALPHABET + " ") for s in spelled)


def test_special_tokens():
    assert SPECIAL_TOKENS == ("<blank>", "<sos>", "<eos>", "<unk>")
    assert (BLANK_ID, SOS_ID, EOS_ID, UNK_ID, PAD_ID) == (0, 1, 2, 3, 0)
    chars = CharTokenizer()
    assert chars.tokens[:4] == list(SPECIAL_TOKENS) and chars.vocab_size == 4 + 1 + 27
    assert (chars.blank_id, chars.pad_id, chars.sos_id, chars.eos_id, chars.unk_id) == (0, 0, 1, 2, 3)


@pytest.mark.parametrize("make", [CharTokenizer, lambda: train_bpe(["a b"], 40)], ids=["char", "bpe"])
def test_empty_and_whitespace(make):
    tok = make()
    for text in ("", " ", "\t\n  ", "!?", "..."):
        assert tok.encode(text) == []
    assert tok.decode([]) == ""


def test_char_round_trip(texts):
    chars = CharTokenizer()
    for text in texts:
        ids = chars.encode(text)
        assert len(ids) == len(text) and UNK_ID not in ids
        assert chars.decode(ids) == text


def test_bpe_round_trip(texts, bpe):
    for text in texts:
        ids = bpe.encode(text)
        assert UNK_ID not in ids and all(4 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == text
    raw = "Don’t PANIC: it's 42, isn't it?"
    assert bpe.decode(bpe.encode(raw)) == normalize_text(raw) == "don't panic it's forty two isn't it"


def test_unknown_characters(bpe):
    chars = CharTokenizer()
    ids = chars.encode("Café 😂 ok")
    boundary = chars.token_to_id[WORD_BOUNDARY]
    assert ids == chars.encode("caf") + [UNK_ID, boundary, UNK_ID, boundary] + chars.encode("ok")
    assert chars.decode(ids) == "caf ok"  # <unk> is skipped: a word of unknown characters vanishes
    ids = bpe.encode("Café 😂 ok")
    assert ids.count(UNK_ID) == 2
    assert bpe.tokenize_word("😂") == [WORD_BOUNDARY, "<unk>"]
    assert bpe.decode(ids) == "caf ok"
    assert bpe.tokenize_word("xéx")[-2:] == ["<unk>", "x"]  # <unk> never merges


def test_decode_skips_special_tokens_and_checks_ids(bpe):
    ids = bpe.encode("hello world")
    assert bpe.decode([SOS_ID, *ids, EOS_ID, BLANK_ID, BLANK_ID]) == "hello world"
    assert bpe.decode(iter(ids)) == "hello world"
    for bad in (-1, bpe.vocab_size):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            bpe.decode([bad])


def test_char_save_load(tmp_path, texts):
    chars = CharTokenizer()
    path = tmp_path / "chars.vocab"
    chars.save(path)
    assert path.read_text(encoding="utf-8").split("\n") == [*chars.tokens, ""]
    loaded = CharTokenizer.load(path)
    assert loaded.tokens == chars.tokens
    assert all(loaded.encode(t) == chars.encode(t) for t in texts[:200])
    small = CharTokenizer("abc")
    small.save(path)
    assert CharTokenizer.load(path).tokens == small.tokens
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))  # Windows line ends read the same
    assert CharTokenizer.load(path).tokens == small.tokens


def test_bpe_save_load(tmp_path, texts, bpe):
    path = tmp_path / "bpe.vocab"
    bpe.save(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    assert len(lines) == bpe.vocab_size + 1 and lines[-1] == ""
    assert lines[32] == " ".join(bpe.merges[0])
    loaded = BPETokenizer.load(path)
    assert loaded.tokens == bpe.tokens and loaded.merges == bpe.merges
    assert all(loaded.encode(t) == bpe.encode(t) for t in texts)
    with pytest.raises(ValueError, match="BPETokenizer.load"):
        CharTokenizer.load(path)


SPECIALS = "<blank>\n<sos>\n<eos>\n<unk>\n"


@pytest.mark.parametrize("load, content, message", [
    (CharTokenizer.load, "", "starts with the lines"),
    (CharTokenizer.load, "<sos>\n<blank>\n<eos>\n<unk>\n▁\na\n", "starts with the lines"),
    (CharTokenizer.load, SPECIALS + "▁\na\n\nb\n", "line 7"),
    (CharTokenizer.load, SPECIALS + "▁\na\nb\na\n", "distinct characters"),
    (CharTokenizer.load, SPECIALS + "▁\na\tb\n", "line 6"),
    (CharTokenizer.load, SPECIALS + "a\nb\n", "line 5"),
    (CharTokenizer.load, SPECIALS + "▁\nab\n", "not one character"),
    (BPETokenizer.load, SPECIALS + "a\nb\n", "after the special tokens"),
    (BPETokenizer.load, SPECIALS + "▁\na\nb\na b\nc\n", "line 9"),
    (BPETokenizer.load, SPECIALS + "▁\na\nb\na b c\n", "line 8"),
    (BPETokenizer.load, SPECIALS + "▁\na\nb\nab a\n", "not defined before"),
    (BPETokenizer.load, SPECIALS + "▁\na\nb\na b\na b\n", "duplicate tokens"),
    (BPETokenizer.load, SPECIALS + "▁\na\nb\na  b\n", "line 8"),
])
def test_malformed_vocabulary_files(tmp_path, load, content, message):
    path = tmp_path / "bad.vocab"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load(path)


def test_merge_pair_and_count_pairs():
    assert merge_pair(list("aaab"), ("a", "a")) == ["aa", "a", "b"]  # left to right, no overlap
    assert merge_pair(["▁", "a", "b", "a", "b"], ("a", "b")) == ["▁", "ab", "ab"]
    assert merge_pair(["a"], ("a", "a")) == ["a"]
    pairs = count_pairs([["a", "b", "a", "b"], ["a", "b"]], [2, 3])
    assert pairs == {("a", "b"): 7, ("b", "a"): 2}


def naive_merges(word_counts: dict, n: int) -> list:
    """Reference BPE: recount every pair of every word at each step; skip pairs spelling a known token."""
    words = {(WORD_BOUNDARY, *w): c for w, c in word_counts.items()}
    tokens = {symbol for symbols in words for symbol in symbols}
    merges = []
    for _ in range(n):
        pairs = {}
        for symbols, c in words.items():
            for pair in zip(symbols, symbols[1:]):
                if pair[0] + pair[1] not in tokens:
                    pairs[pair] = pairs.get(pair, 0) + c
        if not pairs:
            break
        best = sorted(pairs, key=lambda p: (-pairs[p], len(p[0] + p[1]), p[0] + p[1], p))[0]
        merges.append((best, pairs[best]))
        tokens.add(best[0] + best[1])
        words = {tuple(merge_pair(list(s), best)): c for s, c in words.items()}
    return merges


def test_bpe_merges_match_naive_recount(texts):
    counts = {}
    for text in texts:
        for word in text.split():
            counts[word] = counts.get(word, 0) + 1
    fast = list(zip(range(80), bpe_merges(counts)))
    assert [m for _, m in fast] == naive_merges(counts, 80)


def test_bpe_merges_to_exhaustion_match_naive_recount(texts):
    # run until every word is one token: every stale heap entry and every skipped pair is exercised
    counts = {}
    for text in texts[:60]:
        for word in text.split():
            counts[word] = counts.get(word, 0) + 1
    fast = list(bpe_merges(counts))
    assert fast == naive_merges(counts, 10**6)
    assert len({a + b for (a, b), _ in fast}) == len(fast)  # every merge makes a new token
    assert {a + b for (a, b), _ in fast} >= {WORD_BOUNDARY + w for w in counts}  # each word ends as one token


def test_merge_priority_ties():
    # equal counts: the shorter new token first, then the new token's string, then the pair
    assert merge_priority(("a", "b"), 5) < merge_priority(("▁", "ab"), 5) < merge_priority(("a", "b"), 4)
    assert merge_priority(("a", "bc"), 5) < merge_priority(("ab", "c"), 5) < merge_priority(("b", "cd"), 5)
    counts = {"ab": 1, "cd": 1}  # every pair is tied at count 1
    merges = [pair for pair, _ in bpe_merges(counts)]
    assert merges == [("a", "b"), ("c", "d"), ("▁", "ab"), ("▁", "cd")]  # '▁' sorts after letters


def test_bpe_deterministic_and_order_independent(texts, bpe):
    assert train_bpe(texts, 150).merges == bpe.merges
    shuffled = list(texts)
    random.Random(1).shuffle(shuffled)
    assert train_bpe(shuffled, 150).merges == bpe.merges
    assert train_bpe(texts, 100).merges == bpe.merges[:100 - 32]  # a smaller vocabulary is a prefix


def test_bpe_vocab_size(texts, bpe):
    assert bpe.vocab_size == 150 and len(set(bpe.tokens)) == 150
    assert train_bpe(texts, 32).merges == []
    with pytest.raises(ValueError, match="smaller than"):
        train_bpe(texts, 31)
    assert train_bpe(["ab ab"], 1000).tokens[32:] == ["ab", "▁ab"]  # the text runs out of pairs
    with pytest.raises(ValueError, match="outside the alphabet"):
        train_bpe(["naïve café"], 100)


def test_encoding_reproduces_training_segmentation(texts, bpe):
    segmentation = {w: [WORD_BOUNDARY, *w] for text in texts for w in text.split()}
    for pair in bpe.merges:
        segmentation = {w: merge_pair(s, pair) for w, s in segmentation.items()}
    assert all(bpe.tokenize_word(w) == s for w, s in segmentation.items())


def test_bpe_matches_sentencepiece(texts, bpe):
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=150,
        character_coverage=1.0, normalization_rule_name="identity", split_by_unicode_script=False,
        num_threads=1, minloglevel=2, pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="<blank>",
        bos_piece="<sos>", eos_piece="<eos>", unk_piece="<unk>")
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert pieces[:4 + len(bpe.merges)] == bpe.tokens[:4] + [a + b for a, b in bpe.merges]
    assert set(pieces) == set(bpe.tokens)
    assert all(bpe.tokenize(t) == sp.encode(t, out_type=str) for t in texts[:300])


def test_default_tokenizer(tmp_path, texts):
    pytest.importorskip("paraformer_edu.corpus")
    manifest = tmp_path / "train.jsonl"
    with manifest.open("w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"audio_filepath": f"{i}.wav", "text": text, "duration": 1.0,
                                "voice": "v", "words": len(text.split())}) + "\n")
    tok = default_tokenizer(manifest)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size == 200
    assert tok.merges == train_bpe(texts, 200).merges
    assert default_tokenizer(manifest).tokens == tok.tokens  # deterministic


def test_default_tokenizer_needs_the_text_plan_not_the_audio(tmp_path):
    """Without a manifest it learns from the corpus plan; no synthesis, so it works from a script on stdin too."""
    corpus = pytest.importorskip("paraformer_edu.corpus")
    plan = [u["text"] for u in corpus.corpus_plan(corpus.corpus_config("book"))["train"]]
    code = "from paraformer_edu.tokenizer import default_tokenizer\nprint(default_tokenizer().merges[:3])\n"
    env = {**os.environ, "PARAFORMER_EDU_CACHE": str(tmp_path)}  # an empty cache: nothing to read the audio from
    done = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(train_bpe(plan, 200).merges[:3])
    assert not any(tmp_path.iterdir()), "the tokenizer synthesised or cached something"


def test_book_corpus_normalisation(book_texts):
    # the corpus is written text (capitals, , . ? and apostrophes): normalised, it is lowercase words
    for raw in (t for split in book_texts.values() for t in split):
        spoken = normalize_text(raw)
        assert spoken == re.sub(r"[,.?!]", "", raw).lower()
        assert set(spoken) <= set(ALPHABET + " ") and normalize_text(spoken) == spoken


def test_book_corpus_round_trips(book_texts, book_bpe):
    chars = CharTokenizer()
    assert book_bpe.vocab_size == 200
    for raw in (t for split in book_texts.values() for t in split):
        spoken = normalize_text(raw)
        for tok in (chars, book_bpe):
            ids = tok.encode(raw)
            assert UNK_ID not in ids and tok.decode(ids) == spoken
        assert len(chars.encode(raw)) == len(spoken)


def test_book_corpus_save_load_identical_ids(tmp_path, book_texts, book_bpe):
    path = tmp_path / "bpe200.vocab"
    book_bpe.save(path)
    loaded = BPETokenizer.load(path)
    assert loaded.tokens == book_bpe.tokens
    assert all(loaded.encode(t) == book_bpe.encode(t) for split in book_texts.values() for t in split)


def test_book_bpe_deterministic(book_texts, book_bpe):
    shuffled = list(book_texts["train"])
    random.Random(0).shuffle(shuffled)
    assert train_bpe(shuffled, 200).merges == book_bpe.merges  # the order of the sentences does not matter
    assert book_bpe.merges[:5] == [("▁", "t"), ("h", "e"), ("▁t", "he"), ("▁", "a"), ("▁", "s")]
    per_word = sum(len(book_bpe.encode(t)) for t in book_texts["dev"]) / sum(len(t.split()) for t in book_texts["dev"])
    assert 2.3 < per_word < 2.7  # about 2.5 tokens per word (chapter 2)
