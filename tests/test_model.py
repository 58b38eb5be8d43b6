"""Chapter 6, the whole model: losses, the training forward pass, recognition."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from paraformer_edu.attention import padding_mask
from paraformer_edu.encoder import EncoderConfig
from paraformer_edu.model import Hypothesis, Paraformer, ParaformerConfig, label_smoothing_loss, token_accuracy
from paraformer_edu.tokenizer import CharTokenizer

TOKENIZER = CharTokenizer()
SMALL = ParaformerConfig(
    encoder=EncoderConfig(d_input=20, d_model=16, n_heads=4, n_layers=2, d_ffn=32, kernel_size=5, dropout=0.1),
    vocab_size=TOKENIZER.vocab_size, decoder_layers=2, decoder_heads=4, decoder_ffn=32, decoder_dropout=0.1)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Paraformer(SMALL)


@pytest.fixture
def batch():
    """Features (B, T, 20) with lengths, and padded targets (B, U) with lengths."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([30, 22, 9])
    features = torch.randn(3, 30, 20, generator=g)
    target_lengths = torch.tensor([8, 5, 2])
    targets = torch.randint(4, SMALL.vocab_size, (3, 9), generator=g).masked_fill(~padding_mask(target_lengths, 9), 0)
    return features, lengths, targets, target_lengths


def test_default_config_is_the_books_model():
    c = ParaformerConfig()
    assert (c.ctc_weight, c.quantity_weight, c.label_smoothing, c.glm_lambda) == (0.3, 1.0, 0.1, 0.4)
    assert (c.tail_threshold, c.beta, c.frame_shift, c.vocab_size) == (0.45, 1.0, 0.06, 200)
    assert c.encoder == EncoderConfig()


def test_label_smoothing_loss_matches_the_formula_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    logits, targets, lengths = torch.randn(2, 5, 7, generator=g), torch.randint(0, 7, (2, 5), generator=g), torch.tensor([5, 2])
    log_p = logits.log_softmax(-1)
    per_token = -0.9 * log_p.gather(2, targets[..., None])[..., 0] - 0.1 * log_p.mean(-1)
    expected = per_token[padding_mask(lengths, 5)].mean()
    torch.testing.assert_close(label_smoothing_loss(logits, targets, lengths, 0.1), expected)
    garbage = targets.clone()
    garbage[1, 2:] = 6
    torch.testing.assert_close(label_smoothing_loss(logits, garbage, lengths, 0.1), expected)
    assert label_smoothing_loss(logits[:, :0], targets[:, :0], torch.zeros(2, dtype=torch.long)).item() == 0.0


def test_token_accuracy_counts_valid_positions_only():
    logits = F.one_hot(torch.tensor([[1, 2, 3], [1, 1, 1]]), 4).float()
    targets = torch.tensor([[1, 2, 0], [1, 0, 0]])
    assert token_accuracy(logits, targets, torch.tensor([2, 1])).item() == 1.0
    assert token_accuracy(logits, targets, torch.tensor([3, 2])).item() == pytest.approx(3 / 5)


def test_forward_returns_each_loss_part_and_their_weighted_sum(model, batch):
    out = model(*batch, generator=torch.Generator().manual_seed(0))
    expected_keys = {"loss", "loss_ce", "loss_quantity", "loss_ctc", "accuracy", "accuracy_first_pass",
                     "glm_replaced", "length_predicted", "length_target"}
    assert set(out) == expected_keys
    assert all(torch.isfinite(v) and v.dim() == 0 for v in out.values())
    c = SMALL
    total = (1 - c.ctc_weight) * out["loss_ce"] + c.ctc_weight * out["loss_ctc"] + c.quantity_weight * out["loss_quantity"]
    torch.testing.assert_close(out["loss"], total)
    assert out["length_target"].item() == pytest.approx(5.0)
    assert 0 < out["glm_replaced"].item() <= SMALL.glm_lambda


def test_quantity_loss_uses_unscaled_alphas(model, batch):
    features, lengths, targets, target_lengths = batch
    model.eval()  # no dropout: the same alphas in both computations
    out = model(*batch)
    with torch.no_grad():
        alphas = model.predictor.weights(*model.encoder(features, lengths))
    torch.testing.assert_close(out["loss_quantity"], (alphas.sum(1) - target_lengths).abs().mean())
    torch.testing.assert_close(out["length_predicted"], alphas.sum(1).mean())


def test_gradients_reach_every_parameter(model, batch):
    out = model(*batch, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_glm_off_uses_one_decoder_pass(batch):
    torch.manual_seed(0)
    model = Paraformer(replace(SMALL, glm_lambda=0.0))
    out = model(*batch)
    assert out["glm_replaced"].item() == 0 and out["accuracy"] == out["accuracy_first_pass"]
    out["loss"].backward()
    assert model.decoder.embed.weight.grad is None


def test_ctc_weight_zero_skips_ctc(batch):
    torch.manual_seed(0)
    model = Paraformer(replace(SMALL, ctc_weight=0.0))
    out = model(*batch)
    assert out["loss_ctc"].item() == 0.0
    torch.testing.assert_close(out["loss"], out["loss_ce"] + out["loss_quantity"])


def test_recognize_batch_equals_one_by_one(model, batch):
    features, lengths, _, _ = batch
    hyps = model.recognize(features, lengths)
    assert len(hyps) == 3 and all(isinstance(h, Hypothesis) for h in hyps)
    for b, n in enumerate(lengths.tolist()):
        assert model.recognize(features[b:b + 1, :n], lengths[b:b + 1])[0] == hyps[b]


def test_recognize_timestamps_follow_the_fires(model, batch):
    features, lengths, _, _ = batch
    model.eval()
    with torch.no_grad():
        h, h_lengths = model.encoder(features, lengths)
        cif = model.predictor(h, h_lengths)
    hyps = model.recognize(features, lengths)
    for b, hyp in enumerate(hyps):
        n = int(cif.token_lengths[b])
        assert len(hyp.token_ids) == len(hyp.timestamps) == n
        ends = [round(0.06 * (min(int(f), int(lengths[b]) - 1) + 1), 3) for f in cif.fires[b, :n]]
        assert [end for _, end in hyp.timestamps] == ends
        assert all(0 <= s < e <= 0.06 * int(lengths[b]) + 1e-9 for s, e in hyp.timestamps)
        assert all(0 <= i < SMALL.vocab_size for i in hyp.token_ids)


def test_recognize_is_deterministic_and_restores_training_mode(model, batch):
    features, lengths, _, _ = batch
    model.train()
    first = model.recognize(features, lengths)
    assert model.training
    assert model.recognize(features, lengths) == first
    model.eval()
    assert model.recognize(features, lengths) == first and not model.training


def test_no_token_fired_gives_empty_results(model, batch):
    features, lengths, _, _ = batch
    with torch.no_grad():
        model.predictor.linear.bias.fill_(-30.0)  # alphas ~ 0: nothing fires anywhere
    assert model.recognize(features, lengths) == [([], [])] * 3
    assert model.transcribe(features, lengths, TOKENIZER) == [""] * 3


def test_zero_length_utterance_next_to_normal_ones(model, batch):
    features, lengths, _, _ = batch
    lengths = torch.tensor([30, 0, 9])
    hyps = model.recognize(features, lengths)
    assert hyps[1] == ([], [])
    assert hyps[0] == model.recognize(features[:1], lengths[:1])[0]
    assert hyps[2] == model.recognize(features[2:3, :9], lengths[2:3])[0]


def test_transcribe_decodes_with_the_tokenizer(model, batch):
    features, lengths, _, _ = batch
    texts = model.transcribe(features, lengths, TOKENIZER)
    assert texts == [TOKENIZER.decode(h.token_ids) for h in model.recognize(features, lengths)]
    assert texts == [h.text(TOKENIZER) for h in model.recognize(features, lengths)]


def test_overfits_a_tiny_batch(batch):
    torch.manual_seed(0)
    config = replace(SMALL, encoder=replace(SMALL.encoder, dropout=0.0), decoder_dropout=0.0, label_smoothing=0.0)
    model = Paraformer(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        out = model(*batch, generator=g)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0] / 3
