"""Chapter 9, decoding with a language model: the n-gram LM (against NLTK), both beam searches (against
greedy decoding, brute force and torch's ctc_loss), the search inside Recognizer and the command line."""

import itertools
import math
import random
from collections import Counter, defaultdict

import pytest
import torch
import torch.nn.functional as F
from nltk.lm import KneserNeyInterpolated
from nltk.util import everygrams

import paraformer_edu.language_model as language_model
from paraformer_edu.beam_search import LMSearch, ctc_prefix_beam_search, log_add, paraformer_beam_search
from paraformer_edu.encoder import EncoderConfig, ctc_collapse, ctc_greedy_decode
from paraformer_edu.language_model import NGramLM, book_language_model, count_ngrams, lm_sentences, ngram_codes
from paraformer_edu.model import Paraformer, ParaformerConfig
from paraformer_edu.tokenizer import EOS_ID, SOS_ID, CharTokenizer

V = 12  # ids 0..3 are the special tokens, as in the tokenizers


def random_corpus(seed: int, n: int = 80) -> list[list[int]]:
    """Sentences of ids 4..V-1 with some structure (a Markov chain), so that contexts repeat."""
    rng = random.Random(seed)
    return [[rng.choice([4 + (i * 3 + j) % (V - 4) for j in range(3)]) for i in range(rng.randint(1, 9))]
            for _ in range(n)]


# --- the language model ---------------------------------------------------------------------------------------

def test_count_ngrams_equals_a_plain_counter():
    corpus = random_corpus(0)
    for k in (1, 2, 3):
        codes, counts = count_ngrams(corpus, k, V)
        expected = Counter(tuple(s[i:i + k]) for s in ([SOS_ID] * (k - 1) + c + [EOS_ID] for c in corpus)
                           for i in range(len(s) - k + 1) if s[i + k - 1] != SOS_ID)  # nothing predicts <s>
        ours = {tuple(int(c) // V ** (k - 1 - j) % V for j in range(k)): int(n) for c, n in zip(codes, counts)}
        assert ours == dict(expected) and torch.equal(codes, codes.sort().values)


def test_ngram_codes_are_base_v_numbers():
    assert ngram_codes(torch.tensor([[1, 2, 3], [0, 0, 5]]), 10).tolist() == [123, 5]


@pytest.mark.parametrize("order", [2, 3, 4])
def test_kneser_ney_equals_nltk(order):
    corpus = random_corpus(order)
    ours = NGramLM(V, order=order, discount=0.6).fit(corpus)
    ref = KneserNeyInterpolated(order, discount=0.6)
    padded = [[SOS_ID] * (order - 1) + s + [EOS_ID] for s in corpus]
    ref.fit([[g for g in everygrams([str(t) for t in s], max_len=order) if g[-1] != str(SOS_ID)] for s in padded],
            vocabulary_text=map(str, range(V)))
    rng, checked = random.Random(0), 0
    contexts = {tuple(s[i - order + 1:i]) for s in padded for i in range(order - 1, len(s))}
    contexts |= {tuple(rng.randrange(2, V) for _ in range(order - 1)) for _ in range(30)}  # unseen ones too
    for u in contexts:
        p = ours.probs(u)
        for w in range(V):
            assert p[w].item() == pytest.approx(ref.score(str(w), [str(t) for t in u]), abs=1e-12)
            checked += 1
    assert checked >= 100


def test_every_distribution_sums_to_one_and_unseen_tokens_get_zero():
    lm = NGramLM(V, order=3).fit(random_corpus(1))
    rng = random.Random(1)
    for _ in range(50):
        context = [rng.choice([SOS_ID, *range(4, V)]) for _ in range(rng.randint(0, 4))]
        p = lm.probs(context)
        assert p.dtype == torch.float64 and abs(p.sum().item() - 1) < 1e-12 and (p >= 0).all()
        assert p[0] == 0 and p[SOS_ID] == 0  # never seen as a continuation: blank and <s>
    assert lm.log_probs([]).exp().sub(lm.probs([])).abs().max() < 1e-15


def test_score_and_perplexity_are_the_chain_rule():
    lm = NGramLM(V, order=3).fit(random_corpus(2))
    seq = [4, 7, 10]
    expected = sum(math.log(lm.probs(seq[:i])[t].item()) for i, t in enumerate([*seq, EOS_ID]))
    assert lm.score(seq) == pytest.approx(expected, abs=1e-12)
    assert lm.perplexity([seq]) == pytest.approx(math.exp(-expected / 4))


def test_more_context_lowers_held_out_perplexity():
    corpus = random_corpus(3, n=400)
    train, dev = corpus[:350], corpus[350:]
    ppl = [NGramLM(V, order=n).fit(train).perplexity(dev) for n in (2, 3)]
    assert ppl[1] < ppl[0] < V


def test_sampling_is_seeded():
    lm = NGramLM(V, order=3).fit(random_corpus(4))
    draw = lambda seed: lm.sample(torch.Generator().manual_seed(seed))  # noqa: E731
    assert draw(0) == draw(0) and all(4 <= t < V for t in draw(0))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="order must be at least 2"):
        NGramLM(V, order=1)
    with pytest.raises(ValueError, match="token ids must lie in"):
        NGramLM(V).fit([[4, V]])


def test_save_load_round_trip_and_vocabulary_check(tmp_path):
    tokenizer = CharTokenizer()
    lm = NGramLM(tokenizer.vocab_size, order=3).fit([tokenizer.encode(s) for s in ("a cat sat", "the cat ran")])
    path = tmp_path / "lm.pt"
    lm.save(path, tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm.pt"]  # no temporary file left
    again = NGramLM.load(path, tokenizer)
    assert torch.equal(again.probs(tokenizer.encode("the c")), lm.probs(tokenizer.encode("the c")))
    with pytest.raises(ValueError, match="another vocabulary"):
        NGramLM.load(path, CharTokenizer("abc"))


def test_book_language_model_is_cached_per_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("PARAFORMER_EDU_CACHE", str(tmp_path))
    monkeypatch.setattr(language_model, "lm_sentences", lambda: ["a cat sat.", "the cat ran."])
    tokenizer = CharTokenizer()
    first = book_language_model(tokenizer, order=3)
    files = list((tmp_path / "lm").iterdir())
    assert len(files) == 1
    second = book_language_model(tokenizer, order=3)  # read from the cache
    assert torch.equal(first.probs([]), second.probs([]))


def test_lm_text_holds_no_held_out_sentence():
    from paraformer_edu.corpus import sentence_splits, sentence_words, wordnet_sentences
    splits = sentence_splits(wordnet_sentences())
    held_out = {tuple(sentence_words(s)) for split in ("dev", "test", "test-voices") for s in splits[split]}
    texts = lm_sentences()
    assert len(texts) > 4 * len(splits["train"])  # far more text than the speech corpus holds
    assert not any(tuple(sentence_words(s)) in held_out for s in texts)


# --- beam search over the Paraformer's positions --------------------------------------------------------------

def random_log_probs(seed: int, n: int, v: int = V) -> torch.Tensor:
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)).mul(2).log_softmax(-1)  # (N, V)


@pytest.mark.parametrize("seed", range(5))
def test_beam_one_without_lm_is_greedy_and_wider_beams_agree(seed):
    lp = random_log_probs(seed, 7)
    greedy = lp.argmax(-1).tolist()
    for beam in (1, 4):
        assert list(paraformer_beam_search(lp, beam=beam)[0].tokens) == greedy
    lm = NGramLM(V, order=3).fit(random_corpus(seed))
    assert list(paraformer_beam_search(lp, lm, lm_weight=0.0, beam=3)[0].tokens) == greedy  # weight 0: no LM


def test_beam_score_is_the_fused_sum_and_beams_come_sorted():
    lp, lm = random_log_probs(0, 6), NGramLM(V, order=3).fit(random_corpus(0))
    beams = paraformer_beam_search(lp, lm, lm_weight=0.7, beam=5)
    assert len(beams) == 5 and all(a.score >= b.score for a, b in zip(beams, beams[1:]))
    for hyp in beams:
        expected = sum(lp[i, t].item() + 0.7 * lm.log_probs(hyp.tokens[:i])[t].item() for i, t in enumerate(hyp.tokens))
        assert hyp.score == pytest.approx(expected + 0.7 * lm.log_probs(hyp.tokens)[EOS_ID].item(), abs=1e-9)


def test_exhaustive_beam_finds_the_best_fused_sequence():
    lp, lm = random_log_probs(1, 3, v=6), NGramLM(6, order=2).fit([[4, 5, 4], [5, 5], [4]])
    best = max(itertools.product(range(6), repeat=3),
               key=lambda y: sum(lp[i, t].item() + 0.5 * lm.log_probs(y[:i])[t].item() for i, t in enumerate(y))
               + 0.5 * lm.log_probs(y)[EOS_ID].item())
    assert paraformer_beam_search(lp, lm, 0.5, beam=6 ** 3)[0].tokens == best


def test_empty_utterance_gives_the_empty_sequence():
    assert paraformer_beam_search(torch.zeros(0, V), beam=4)[0].tokens == ()


# --- CTC prefix beam search ---------------------------------------------------------------------------------

def brute_force(lp: torch.Tensor) -> dict:
    totals = defaultdict(lambda: -math.inf)
    for path in itertools.product(range(lp.size(1)), repeat=lp.size(0)):
        key = tuple(ctc_collapse(list(path), 0))
        totals[key] = log_add(totals[key], sum(lp[t, c].item() for t, c in enumerate(path)))
    return totals


@pytest.mark.parametrize("seed", range(4))
def test_prefix_search_equals_brute_force_and_ctc_loss(seed):
    lp = random_log_probs(seed, 5, v=4)
    totals = brute_force(lp)
    best = max(totals, key=totals.get)
    found = ctc_prefix_beam_search(lp, beam=200, prune=4)
    assert found[0].tokens == best and found[0].score == pytest.approx(totals[best], abs=1e-9)
    for hyp in found[:5]:
        if hyp.tokens:
            nll = F.ctc_loss(lp[:, None], torch.tensor([hyp.tokens]), torch.tensor([5]), torch.tensor([len(hyp.tokens)]),
                             reduction="sum")
            assert hyp.score == pytest.approx(-nll.item(), abs=1e-5)


def test_prefix_search_scores_never_exceed_the_true_probability():
    lp = random_log_probs(9, 30, v=8)
    for hyp in ctc_prefix_beam_search(lp, beam=3, prune=3):
        if hyp.tokens:
            nll = F.ctc_loss(lp[:, None], torch.tensor([hyp.tokens]), torch.tensor([30]),
                             torch.tensor([len(hyp.tokens)]), reduction="sum")
            assert hyp.score <= -nll.item() + 1e-5


def test_prefix_search_on_peaked_frames_is_greedy_and_lm_weight_zero_changes_nothing():
    g = torch.Generator().manual_seed(0)
    lp = (torch.randn(40, V, generator=g) * 8).log_softmax(-1)  # confident frames
    greedy = ctc_greedy_decode(lp[None], torch.tensor([40]))[0]
    lm = NGramLM(V, order=3).fit(random_corpus(0))
    assert list(ctc_prefix_beam_search(lp, beam=1)[0].tokens) == greedy
    assert ctc_prefix_beam_search(lp, lm, 0.0, beam=4) == ctc_prefix_beam_search(lp, None, 0.0, beam=4)


def test_a_bonus_per_token_lengthens_the_labelling():
    lp = random_log_probs(3, 20, v=V)
    short = ctc_prefix_beam_search(lp, beam=4, bonus=-5.0)[0].tokens
    long = ctc_prefix_beam_search(lp, beam=4, bonus=5.0)[0].tokens
    assert len(short) < len(long)


# --- the search in the recognizer -----------------------------------------------------------------------------

SMALL = ParaformerConfig(
    encoder=EncoderConfig(d_input=20, d_model=16, n_heads=4, n_layers=2, d_ffn=32, kernel_size=5, dropout=0.0),
    vocab_size=V, decoder_layers=1, decoder_heads=4, decoder_ffn=32, decoder_dropout=0.0)


def test_lm_search_batched_equals_one_by_one_and_beam_one_is_greedy():
    torch.manual_seed(0)
    model = Paraformer(SMALL)
    with torch.no_grad():
        model.predictor.linear.bias.fill_(0.0)  # fire a few tokens from random weights
    features = torch.randn(3, 40, 20, generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([40, 31, 12])
    lm = NGramLM(V, order=3).fit(random_corpus(5))
    search = LMSearch(lm, lm_weight=0.5, beam=3)
    batched = model.recognize(features, lengths, search)
    assert sum(len(h.token_ids) for h in batched) > 0
    for b, n in enumerate(lengths.tolist()):
        assert model.recognize(features[b:b + 1, :n], lengths[b:b + 1], search)[0] == batched[b]
    greedy = model.recognize(features, lengths)
    assert model.recognize(features, lengths, LMSearch(None, 0.0, beam=1)) == greedy
    assert [len(h.token_ids) for h in batched] == [len(h.token_ids) for h in greedy]  # same positions, same times
    assert [h.timestamps for h in batched] == [h.timestamps for h in greedy]


def test_cli_refuses_a_bad_beam_or_weight(tmp_path, capsys):
    from paraformer_edu.cli import main
    for flags, message in ((["--beam", "0"], "--beam must be at least 1"), (["--lm-weight", "-1"], "--lm-weight")):
        with pytest.raises(SystemExit) as exit_info:
            main(["transcribe", "--checkpoint", str(tmp_path / "none.pt"), *flags, "x.wav"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
