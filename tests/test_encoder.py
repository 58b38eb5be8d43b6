"""Chapter 4, the encoder: SAN-M layers, padding masks, the FSMN memory, CTC loss and decoding."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from paraformer_edu.encoder import (
    CTCHead,
    EncoderConfig,
    FSMNMemory,
    SANMAttention,
    SANMEncoder,
    SANMEncoderLayer,
    ctc_collapse,
    ctc_greedy_decode,
    ctc_loss,
    ctc_trellis,
    extend_with_blanks,
)

SMALL = EncoderConfig(d_input=20, d_model=16, n_heads=4, n_layers=3, d_ffn=32, kernel_size=5, dropout=0.1)


def make_mask(lengths, T):
    """Boolean padding mask (B, T), True on valid frames."""
    return torch.arange(T) < lengths[:, None]


@pytest.fixture
def batch():
    """A padded batch of random features with very different lengths."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([23, 17, 6, 1])
    return torch.randn(4, 23, SMALL.d_input, generator=g), lengths


@pytest.mark.parametrize("kernel_size", [5, 11, 0])
def test_batched_equals_unbatched(batch, kernel_size):
    torch.manual_seed(0)
    encoder = SANMEncoder(replace(SMALL, kernel_size=kernel_size)).eval()
    x, lengths = batch
    with torch.no_grad():
        h, out_lengths = encoder(x, lengths)
        assert h.shape == (4, 23, SMALL.d_model) and torch.equal(out_lengths, lengths)
        for b, n in enumerate(lengths.tolist()):
            alone, _ = encoder(x[b:b + 1, :n], lengths[b:b + 1])
            torch.testing.assert_close(h[b, :n], alone[0], atol=1e-5, rtol=0)
        assert h[~make_mask(lengths, 23)].abs().max() == 0  # padded output frames are zero


def test_padding_values_do_not_change_valid_outputs_of_a_layer(batch):
    """The layer itself (not only the encoder's input masking) ignores padded frames."""
    torch.manual_seed(0)
    layer = SANMEncoderLayer(16, 16, 4, 32, kernel_size=11, dropout=0.0).eval()
    _, lengths = batch
    x = torch.randn(4, 23, 16)
    mask = make_mask(lengths, 23)
    garbage = torch.where(mask[..., None], x, 1e3 * torch.randn_like(x))
    with torch.no_grad():
        clean, dirty = layer(x, mask), layer(garbage, mask)
    torch.testing.assert_close(clean[mask], dirty[mask], atol=1e-5, rtol=0)


def test_padding_values_do_not_change_encoder_outputs(batch):
    torch.manual_seed(0)
    encoder = SANMEncoder(SMALL).eval()
    x, lengths = batch
    mask = make_mask(lengths, 23)
    garbage = torch.where(mask[..., None], x, torch.full_like(x, float("nan")))
    with torch.no_grad():
        torch.testing.assert_close(encoder(x, lengths)[0], encoder(garbage, lengths)[0], atol=1e-6, rtol=0)


def test_fsmn_impulse_in_padding_does_not_reach_valid_frames():
    torch.manual_seed(0)
    block = FSMNMemory(8, kernel_size=11).eval()
    lengths = torch.tensor([10])
    mask = make_mask(lengths, 20)
    v = torch.zeros(1, 20, 8)
    v[0, 10] = 1.0  # first padded frame, right next to the last valid one
    with torch.no_grad():
        assert block(v, mask).abs().max() == 0
    v = torch.zeros(1, 20, 8)
    v[0, 9] = 1.0  # last valid frame: its memory must not spill into the padding
    with torch.no_grad():
        m = block(v, mask)
    assert m[0, 10:].abs().max() == 0
    assert m[0, 4:10].abs().min() > 0  # but it does reach the 5 frames before it, and itself


def test_fsmn_matches_the_equation():
    """m_t = v_t + sum_i a_i v_{t+i}, zero outside the utterance."""
    torch.manual_seed(0)
    block = FSMNMemory(3, kernel_size=5).eval()
    v = torch.randn(1, 9, 3)
    mask = make_mask(torch.tensor([7]), 9)
    a = block.conv.weight[:, 0, :]  # (D, K)
    expected = torch.zeros_like(v)
    for t in range(7):
        expected[0, t] = v[0, t] + sum(a[:, j] * v[0, t + j - 2] for j in range(5) if 0 <= t + j - 2 < 7)
    with torch.no_grad():
        torch.testing.assert_close(block(v, mask), expected, atol=1e-6, rtol=0)


def test_fsmn_shift_makes_the_memory_look_back():
    block = FSMNMemory(2, kernel_size=5, shift=2)  # left context 4, right context 0
    assert block.padding == (4, 0)
    v = torch.zeros(1, 12, 2)
    v[0, 6] = 1.0
    with torch.no_grad():
        m = block(v, make_mask(torch.tensor([12]), 12))
    assert m[0, :6].abs().max() == 0  # no frame sees the future


def test_sanm_attention_is_attention_plus_memory():
    torch.manual_seed(0)
    sanm = SANMAttention(12, 8, 2, kernel_size=11)
    plain = SANMAttention(12, 8, 2, kernel_size=0)
    missing = plain.load_state_dict(sanm.state_dict(), strict=False)
    assert all(k.startswith("memory.") for k in missing.unexpected_keys)
    x = torch.randn(2, 7, 12)
    mask = make_mask(torch.tensor([7, 4]), 7)
    with torch.no_grad():
        torch.testing.assert_close(sanm(x, mask)[0] - plain(x, mask)[0], sanm.memory(sanm.linear_v(x), mask))


def test_first_layer_maps_input_width_without_residual():
    encoder = SANMEncoder(SMALL)
    first, second = encoder.layers[0], encoder.layers[1]
    assert first.self_attn.linear_q.in_features == SMALL.d_input and not first.residual
    assert second.self_attn.linear_q.in_features == SMALL.d_model and second.residual


@pytest.mark.parametrize("d_in", [16, 20])
def test_layer_is_pre_ln_with_residuals(d_in):
    """Z = Y + FFN(LN(Y)) with Y = X + SANM(LN(X)), or Y = SANM(LN(X)) when the widths differ."""
    torch.manual_seed(0)
    layer = SANMEncoderLayer(d_in, 16, 4, 32, kernel_size=5, dropout=0.0).eval()
    x = torch.randn(2, 9, d_in)
    mask = make_mask(torch.tensor([9, 6]), 9)
    with torch.no_grad():
        y = layer.self_attn(layer.norm1(x), mask)[0]
        y = x + y if d_in == 16 else y
        z = y + layer.feed_forward(layer.norm2(y))
        torch.testing.assert_close(layer(x, mask), z)


def test_default_config_size():
    encoder = SANMEncoder()
    n = sum(p.numel() for p in encoder.parameters())
    assert EncoderConfig().d_model == 192 and 2_000_000 < n < 4_000_000


def test_training_mode_backward():
    torch.manual_seed(0)
    encoder, head = SANMEncoder(SMALL).train(), CTCHead(SMALL.d_model, 6)
    x, lengths = torch.randn(2, 10, SMALL.d_input), torch.tensor([10, 8])
    h, _ = encoder(x, lengths)
    loss = head.loss(h, lengths, torch.tensor([[1, 2, 3], [4, 4, 0]]), torch.tensor([3, 2]))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in encoder.parameters())


# --- CTC ---

def test_collapse_and_extended_labels():
    assert ctc_collapse([0, 1, 2, 0, 2, 2, 2, 0, 3, 2, 2]) == [1, 2, 2, 3, 2]  # _ER_RRR_ORR -> ERROR
    assert ctc_collapse([0, 1, 2, 2, 2, 2, 2, 0, 3, 2, 2]) == [1, 2, 3, 2]  # no blank: RR merge
    assert ctc_collapse([]) == [] and ctc_collapse([0, 0]) == []
    assert ctc_collapse([5, 5, 1], blank=5) == [1]
    assert extend_with_blanks(torch.tensor([1, 2, 2])).tolist() == [0, 1, 0, 2, 0, 2, 0]


def test_greedy_decoding_hand_cases():
    ids = torch.tensor([[0, 1, 1, 0, 2, 2, 0, 2, 3, 3], [3, 3, 3, 0, 0, 3, 1, 1, 1, 1]])
    log_probs = F.one_hot(ids, 4).float().log_softmax(-1)
    assert ctc_greedy_decode(log_probs, torch.tensor([10, 10])) == [[1, 2, 2, 3], [3, 3, 1]]
    assert ctc_greedy_decode(log_probs, torch.tensor([4, 1])) == [[1], [3]]  # lengths cut the padding
    assert ctc_greedy_decode(log_probs, torch.tensor([0, 3])) == [[], [3]]


def random_ctc_case(seed, B=6, T=30, V=6, U=10, dtype=torch.float64):
    """Random logits with padded inputs and targets, including an empty target."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype, requires_grad=True)
    input_lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    input_lengths[0] = T
    target_lengths = torch.randint(1, U + 1, (B,), generator=g).clamp(max=input_lengths // 2)
    target_lengths[-1] = 0
    targets = torch.randint(1, V, (B, U), generator=g)
    targets[1, :3] = 2  # repeated tokens
    return logits, targets, input_lengths, target_lengths


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_ctc_loss_matches_torch(seed, reduction):
    logits, targets, input_lengths, target_lengths = random_ctc_case(seed)
    ours = ctc_loss(logits.log_softmax(-1), targets, input_lengths, target_lengths, reduction=reduction)
    (g_ours,) = torch.autograd.grad(ours.sum(), logits)
    ref = F.ctc_loss(logits.log_softmax(-1).transpose(0, 1), targets, input_lengths, target_lengths,
                     reduction=reduction)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-10, rtol=0)


def test_ctc_loss_float32_and_blank_elsewhere():
    logits, targets, input_lengths, target_lengths = random_ctc_case(7, dtype=torch.float32)
    targets = targets - 1  # tokens 0..4, blank is 5
    log_probs = logits.log_softmax(-1)
    ours = ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=5, reduction="none")
    ref = F.ctc_loss(log_probs.transpose(0, 1), targets, input_lengths, target_lengths, blank=5, reduction="none")
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)


def test_ctc_loss_is_infinite_without_a_valid_path():
    log_probs = torch.randn(1, 3, 4).log_softmax(-1)
    targets, lengths = torch.tensor([[2, 2]]), torch.tensor([3])
    assert math.isfinite(ctc_loss(log_probs, targets, lengths, torch.tensor([2]), reduction="sum").item())
    too_short = ctc_loss(log_probs, targets, torch.tensor([2]), torch.tensor([2]), reduction="sum")  # RR needs 3
    assert too_short.item() == math.inf
    assert F.ctc_loss(log_probs.transpose(0, 1), targets, torch.tensor([2]), torch.tensor([2]),
                      reduction="sum").item() == math.inf


def test_trellis_counts_paths_and_matches_batched_loss():
    target = torch.tensor([1, 2, 2, 3, 2])
    counted = ctc_trellis(torch.zeros(7, 4, dtype=torch.float64), target)
    assert round(torch.logaddexp(counted[-1, -1], counted[-1, -2]).exp().item()) == 11
    log_probs = torch.randn(12, 4, dtype=torch.float64).log_softmax(-1)
    alpha = ctc_trellis(log_probs, target)
    batched = ctc_loss(log_probs[None], target[None], torch.tensor([12]), torch.tensor([5]), reduction="sum")
    torch.testing.assert_close(-torch.logaddexp(alpha[-1, -1], alpha[-1, -2]), batched)


def test_ctc_head_shapes_and_loss():
    torch.manual_seed(0)
    head = CTCHead(16, 9)
    h = torch.randn(2, 12, 16)
    log_probs = head(h)
    assert log_probs.shape == (2, 12, 9)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(2, 12))
    targets, target_lengths, lengths = torch.tensor([[1, 2, 3], [4, 0, 0]]), torch.tensor([3, 1]), torch.tensor([12, 5])
    torch.testing.assert_close(head.loss(h, lengths, targets, target_lengths),
                               ctc_loss(log_probs, targets, lengths, target_lengths), atol=1e-5, rtol=0)
