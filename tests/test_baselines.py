"""Chapter 12: the AR and CTC baselines, their decoders, and the trainer that trains all three systems."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paraformer_edu.attention import causal_mask
from paraformer_edu.baselines import (ARModel, BaselineTrainer, CTCModel, ParaformerV2, ar_beam_search, ar_greedy,
                                      averaging_matrix, ctc_view, forced_spans, load_baseline, path_spans,
                                      teacher_forcing)
from paraformer_edu.checkpoint import CheckpointError
from paraformer_edu.inference import load_model
from paraformer_edu.corpora import ctc_forced_align
from paraformer_edu.config import load_config
from paraformer_edu.encoder import ctc_greedy_decode
from paraformer_edu.model import Paraformer
from paraformer_edu.tokenizer import EOS_ID, SOS_ID

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "paraformer.yaml"
SMALL = ["model.encoder.d_model=64", "model.encoder.n_layers=2", "model.encoder.d_ffn=128", "model.decoder_layers=2",
         "model.decoder_ffn=128", "model.vocab_size=40"]
TINY = SMALL + ["data.corpus=tiny", "model.vocab_size=60", "data.max_frames=600", "training.eval_utterances=4",
                "training.eval_every=1000", "training.log_every=1", "training.warmup_steps=2", "training.threads=1",
                "training.device=cpu", "training.max_minutes=0"]


@pytest.fixture(scope="module")
def ar():
    torch.manual_seed(0)
    model = ARModel(load_config(RECIPE, SMALL).model).eval()
    X, lengths = torch.randn(3, 30, 560), torch.tensor([30, 22, 9])  # (B, T, 560)
    with torch.no_grad():
        h, h_lengths = model.encoder(X, lengths)
    return model, X, lengths, h, h_lengths


def test_teacher_forcing_shifts_by_one_and_ends_with_eos():
    y, lengths = torch.tensor([[5, 6, 7], [8, 9, 0]]), torch.tensor([3, 2])
    inputs, outputs = teacher_forcing(y, lengths)
    assert inputs.tolist() == [[SOS_ID, 5, 6, 7], [SOS_ID, 8, 9, 0]]
    assert outputs.tolist() == [[5, 6, 7, EOS_ID], [8, 9, EOS_ID, 0]]


def test_the_ar_decoder_is_causal(ar):
    model, _, _, h, h_lengths = ar
    tokens = torch.randint(3, 40, (3, 8))
    with torch.no_grad():
        base = model.decoder(model.embed(tokens), torch.full((3,), 8), h, h_lengths, causal_mask(8))
        for n in range(8):
            changed = tokens.clone()
            changed[:, n] = (changed[:, n] + 1) % 40
            out = model.decoder(model.embed(changed), torch.full((3,), 8), h, h_lengths, causal_mask(8))
            assert torch.equal(out[:, :n], base[:, :n]) and not torch.equal(out[:, n:], base[:, n:])


def test_cached_greedy_equals_uncached_and_batched_equals_one_by_one(ar):
    model, _, _, h, h_lengths = ar
    fast, fast_lp = ar_greedy(model, h, h_lengths, cached=True)
    slow, slow_lp = ar_greedy(model, h, h_lengths, cached=False)
    assert fast == slow
    torch.testing.assert_close(fast_lp, slow_lp, atol=1e-4, rtol=0)
    for b in range(3):
        n = int(h_lengths[b])
        alone, _ = ar_greedy(model, h[b:b + 1, :n], h_lengths[b:b + 1])
        assert alone[0] == fast[b]


def test_beam_one_is_greedy_and_the_beam_is_batch_independent(ar):
    model, _, _, h, h_lengths = ar
    greedy, _ = ar_greedy(model, h, h_lengths)
    assert ar_beam_search(model, h, h_lengths, beam=1) == greedy
    beams = ar_beam_search(model, h, h_lengths, beam=3)
    for b in range(3):
        n = int(h_lengths[b])
        assert ar_beam_search(model, h[b:b + 1, :n], h_lengths[b:b + 1], beam=3)[0] == beams[b]


def test_a_beam_never_scores_below_greedy(ar):
    """The beam's normalised log-probability of its answer is at least greedy's (when greedy ends)."""
    model, _, _, h, h_lengths = ar

    def normalised(tokens, b):
        inputs = torch.tensor([[SOS_ID, *tokens]])
        n = inputs.size(1)
        with torch.no_grad():
            logits = model.decoder(model.embed(inputs), torch.tensor([n]), h[b:b + 1], h_lengths[b:b + 1],
                                   causal_mask(n))
        log_probs = logits.log_softmax(-1)[0]  # (n, V)
        return float(log_probs[torch.arange(n), torch.tensor([*tokens, EOS_ID])].sum()) / n

    greedy, steps = ar_greedy(model, h, h_lengths)
    beams = ar_beam_search(model, h, h_lengths, beam=6)
    for b in range(3):
        if len(greedy[b]) < steps.size(1):  # greedy finished with <eos>
            assert normalised(beams[b], b) >= normalised(greedy[b], b) - 1e-5


def test_ctc_model_beam_one_is_greedy_and_batches_equal_one_by_one():
    torch.manual_seed(1)
    model = CTCModel(load_config(RECIPE, SMALL).model).eval()
    X, lengths = torch.randn(3, 30, 560), torch.tensor([30, 22, 9])
    greedy = [h.token_ids for h in model.recognize(X, lengths)]
    with torch.no_grad():
        h, h_lengths = model.encoder(X, lengths)
        assert greedy == ctc_greedy_decode(model.ctc(h), h_lengths)
    assert [h.token_ids for h in model.recognize(X, lengths, 1)] == greedy
    for b in range(3):
        n = int(lengths[b])
        assert model.recognize(X[b:b + 1, :n], lengths[b:b + 1], 4)[0].token_ids == \
            model.recognize(X, lengths, 4)[b].token_ids


def test_ctc_view_shares_the_paraformer_weights():
    model = Paraformer(load_config(RECIPE, SMALL).model).eval()
    view = ctc_view(model)
    assert view.encoder is model.encoder and view.ctc is model.ctc
    X, lengths = torch.randn(2, 20, 560), torch.tensor([20, 15])
    with torch.no_grad():
        h, h_lengths = model.encoder(X, lengths)
        assert [r.token_ids for r in view.recognize(X, lengths)] == ctc_greedy_decode(model.ctc(h), h_lengths)


def test_path_spans_and_averaging_against_a_plain_loop():
    torch.manual_seed(2)
    for _ in range(20):
        path = torch.randint(0, 4, (25,)).tolist()  # blank 0 and three tokens, repeats and all
        tokens, spans, previous = [], [], 0
        for t, p in enumerate(path):  # CTC's collapse, by hand: a new token where the id changes
            if p != 0 and p != previous:
                tokens.append(p)
                spans.append([t, t])
            elif p != 0:
                spans[-1][1] = t
            previous = p
        assert path_spans(path) == [tuple(s) for s in spans]
        A = averaging_matrix([path_spans(path)], 25)[0]  # (N, 25)
        log_probs = torch.randn(25, 6)
        expected = [log_probs[a:b + 1].mean(0) for a, b in spans]
        assert len(expected) == 0 or torch.allclose(A @ log_probs, torch.stack(expected), atol=1e-6)


def test_forced_spans_equal_chapter_11s_viterbi():
    """torchaudio's forced alignment (used in training) against chapter 11's own Viterbi."""
    torch.manual_seed(3)
    log_probs = torch.randn(4, 40, 10).log_softmax(-1)  # (B, T, V)
    targets = torch.tensor([[3, 3, 5, 1], [2, 7, 0, 0], [9, 9, 9, 4], [6, 0, 0, 0]])
    target_lengths, lengths = torch.tensor([4, 2, 4, 0]), torch.tensor([40, 25, 12, 30])
    got = forced_spans(log_probs, lengths, targets, target_lengths)
    for b in range(4):
        U, T = int(target_lengths[b]), int(lengths[b])
        expected = ctc_forced_align(log_probs[b, :T], targets[b, :U].tolist()) if U else []
        assert got[b] == expected
    # too few frames for the reference: an even split, one span per token, no error
    short = forced_spans(log_probs[:1, :3], torch.tensor([3]), targets[:1], torch.tensor([4]))
    assert len(short[0]) == 4


def test_paraformer_v2_batches_equal_one_by_one_and_needs_ctc():
    torch.manual_seed(4)
    config = load_config(RECIPE, SMALL).model
    model = ParaformerV2(config).eval()
    X, lengths = torch.randn(3, 30, 560), torch.tensor([30, 22, 9])
    batched = model.recognize(X, lengths)
    for b in range(3):
        n = int(lengths[b])
        alone = model.recognize(X[b:b + 1, :n], lengths[b:b + 1])[0]
        assert alone.token_ids == batched[b].token_ids and alone.timestamps == batched[b].timestamps
    with torch.no_grad():  # as many tokens as CTC's greedy path holds
        h, h_lengths = model.encoder(X, lengths)
        counts = [len(ids) for ids in ctc_greedy_decode(model.ctc(h), h_lengths)]
    assert [len(r.token_ids) for r in batched] == counts
    with pytest.raises(ValueError, match="ctc_weight > 0"):
        ParaformerV2(load_config(RECIPE, SMALL + ["model.ctc_weight=0"]).model)


@pytest.mark.parametrize("kind", ["paraformer", "ctc", "ar", "paraformer-v2"])
def test_the_baseline_trainer_trains_each_kind_on_the_same_batches(kind, tmp_path):
    trainer = BaselineTrainer(load_config(RECIPE, TINY), tmp_path / kind, kind)
    names = {"paraformer": "Paraformer", "ctc": "CTCModel", "ar": "ARModel", "paraformer-v2": "ParaformerV2"}
    assert type(trainer.model).__name__ == names[kind]
    log = trainer.train(max_steps=12)
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])  # it learns
    assert "dev_cer" in log[-1]
    # the checkpoint records the kind: load_baseline rebuilds the same model, load_model refuses it
    loaded = load_baseline(tmp_path / kind / "best.pt")
    assert loaded.kind == kind and type(loaded.model) is type(trainer.model)
    X, lengths = torch.randn(2, 30, 560), torch.tensor([30, 17])
    assert [h.token_ids for h in loaded.model.recognize(X, lengths)] == \
        [h.token_ids for h in trainer.model.eval().recognize(X, lengths)]
    if kind != "paraformer":
        with pytest.raises(CheckpointError, match=f"holds a '{kind}' model"):
            load_model(tmp_path / kind / "best.pt")
    with pytest.raises(ValueError, match="unknown model kind 'rnnt'"):
        BaselineTrainer(load_config(RECIPE, TINY), tmp_path, "rnnt")


def test_cli_evaluate_decodes_a_paraformer_checkpoint_by_its_ctc_head(tmp_path):
    from paraformer_edu.corpus import build_corpus, corpus_config
    manifest = build_corpus(corpus_config("book"), splits=("test",))["test"]
    lines = Path(manifest).read_text().splitlines()[:6]
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(json.dumps({**json.loads(line), "audio_filepath": str(
        Path(manifest).parent / json.loads(line)["audio_filepath"])}) for line in lines) + "\n")
    ckpt = ROOT / "models" / "paraformer-book" / "model.pt"
    results = {}
    for decoder in ("paraformer", "ctc"):
        done = subprocess.run([sys.executable, "-m", "paraformer_edu", "evaluate", "--checkpoint", str(ckpt),
                               "--manifest", str(small), "--decoder", decoder], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        results[decoder] = json.loads(done.stdout.strip().splitlines()[-1])
        assert results[decoder]["decoder"] == decoder
    assert results["ctc"]["cer"] != results["paraformer"]["cer"] and results["ctc"]["cer"] < 0.6
    done = subprocess.run([sys.executable, "-m", "paraformer_edu", "evaluate", "--checkpoint", str(ckpt),
                           "--manifest", str(small), "--decoder", "ar"], capture_output=True, text=True)
    assert done.returncode == 2 and "has no autoregressive decoder" in done.stderr
    # an AR checkpoint written by BaselineTrainer: greedy and beam, the JSON line says which
    trainer = BaselineTrainer(load_config(RECIPE, TINY), tmp_path / "ar", "ar")
    trainer.train(max_steps=2)
    for beam in ("1", "3"):
        done = subprocess.run([sys.executable, "-m", "paraformer_edu", "evaluate", "--checkpoint",
                               str(tmp_path / "ar" / "best.pt"), "--manifest", str(small), "--decoder", "ar",
                               "--beam", beam], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        line = json.loads(done.stdout.strip().splitlines()[-1])
        assert line["decoder"] == "ar" and line["beam"] == int(beam) and line["utterances"] == 6
    done = subprocess.run([sys.executable, "-m", "paraformer_edu", "evaluate", "--checkpoint",
                           str(tmp_path / "ar" / "best.pt"), "--manifest", str(small)], capture_output=True, text=True)
    assert done.returncode == 2 and "no parallel decoder; use --decoder ar" in done.stderr
