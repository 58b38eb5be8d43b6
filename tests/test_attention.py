"""Chapter 3, attention: masks, scaled dot-product and multi-head attention, positional encoding."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from paraformer_edu.attention import (
    MultiHeadAttention,
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
    sinusoidal_positional_encoding,
)

D, H = 16, 4


def max_diff(a, b):
    """Largest absolute difference between two lists of tensors."""
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def copy_to_torch(mha):
    """An nn.MultiheadAttention holding the same weights as ours."""
    ref = nn.MultiheadAttention(D, H, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([mha.linear_q.weight, mha.linear_k.weight, mha.linear_v.weight]))
        ref.in_proj_bias.copy_(torch.cat([mha.linear_q.bias, mha.linear_k.bias, mha.linear_v.bias]))
        ref.out_proj.load_state_dict(mha.linear_out.state_dict())
    return ref


@pytest.fixture
def mha():
    torch.manual_seed(0)
    return MultiHeadAttention(D, H).eval()


def test_masks():
    assert padding_mask(torch.tensor([3, 0, 1])).tolist() == [
        [True, True, True], [False, False, False], [True, False, False]]
    assert padding_mask(torch.tensor([2]), 4).tolist() == [[True, True, False, False]]
    assert causal_mask(3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]


@pytest.mark.parametrize("mask_kind", ["none", "padding", "causal", "both"])
def test_sdpa_matches_torch_forward_and_gradients(mask_kind):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 2, 6, 8, generator=g, requires_grad=True) for _ in range(3))
    pad = padding_mask(torch.tensor([6, 4, 1]))[:, None, None, :]  # (B, 1, 1, T_k)
    mask = {"none": None, "padding": pad, "causal": causal_mask(6), "both": pad & causal_mask(6)}[mask_kind]
    grad_out = torch.randn(3, 2, 6, 8, generator=g)
    out, weights = scaled_dot_product_attention(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert max_diff([out], [ref]) < 1e-6
    assert torch.allclose(weights.sum(-1), torch.ones(3, 2, 6))
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    assert max_diff(grads, ref_grads) < 1e-5


def test_causal_mask_hides_the_future():
    """Changing keys/values after position t does not change the outputs up to t."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 8, 4, generator=g) for _ in range(3))
    out, weights = scaled_dot_product_attention(q, k, v, causal_mask(8))
    assert (weights.triu(1) == 0).all()
    k2, v2 = k.clone(), v.clone()
    k2[:, 5:], v2[:, 5:] = 100.0, -100.0
    out2, _ = scaled_dot_product_attention(q, k2, v2, causal_mask(8))
    assert torch.equal(out[:, :5], out2[:, :5])
    assert not torch.allclose(out[:, 5:], out2[:, 5:])


def test_no_valid_key_gives_zeros_not_nan():
    q, k, v = (torch.randn(2, 3, 5, 4, requires_grad=True) for _ in range(3))
    mask = padding_mask(torch.tensor([5, 0]), 5)[:, None, None, :]
    out, weights = scaled_dot_product_attention(q, k, v, mask)
    (out * torch.randn_like(out)).sum().backward()
    assert (out[1] == 0).all() and (weights[1] == 0).all()
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
    assert (q.grad[1] == 0).all() and (k.grad[1] == 0).all() and (v.grad[1] == 0).all()


def test_mha_zero_length_sequence(mha):
    x = torch.randn(3, 6, D, requires_grad=True)
    y, weights = mha(x, x, x, padding_mask(torch.tensor([6, 0, 2]), 6))
    y.square().sum().backward()
    assert (weights[1] == 0).all()
    assert torch.equal(y[1], mha.linear_out.bias.expand(6, D))  # zero heads -> W^O 0 + b^O
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in mha.parameters())


@pytest.mark.parametrize("case", ["self", "self_padding", "self_causal", "cross_padding"])
def test_mha_matches_torch_forward_and_gradients(mha, case):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, D, generator=g, requires_grad=True)
    memory = torch.randn(3, 9, D, generator=g, requires_grad=True)
    query, key = (x[:, :5], memory) if case == "cross_padding" else (x, x)
    lengths = {"self": None, "self_padding": torch.tensor([7, 5, 1]), "self_causal": torch.tensor([7, 5, 1]),
               "cross_padding": torch.tensor([9, 6, 3])}[case]
    key_mask = None if lengths is None else padding_mask(lengths, key.size(1))
    attn_mask = causal_mask(7) if case == "self_causal" else None
    ref = copy_to_torch(mha)

    out, weights = mha(query, key, key, key_mask, attn_mask)
    out_ref, weights_ref = ref(query, key, key, need_weights=True, average_attn_weights=False,
                               key_padding_mask=None if key_mask is None else ~key_mask,
                               attn_mask=None if attn_mask is None else ~attn_mask)
    assert max_diff([out, weights], [out_ref, weights_ref]) < 1e-6

    inputs = [x, memory]
    grads = torch.autograd.grad(out.square().sum(), inputs + list(mha.parameters()), allow_unused=True)
    grads_ref = torch.autograd.grad(out_ref.square().sum(), inputs + list(ref.parameters()), allow_unused=True)
    zero = lambda t, like: torch.zeros_like(like) if t is None else t
    grads = [zero(t, p) for t, p in zip(grads, inputs + list(mha.parameters()))]
    grads_ref = [zero(t, p) for t, p in zip(grads_ref, inputs + list(ref.parameters()))]
    W, b = grads_ref[2], grads_ref[3]
    grads_ref = grads_ref[:2] + [W[:D], b[:D], W[D:2 * D], b[D:2 * D], W[2 * D:], b[2 * D:]] + grads_ref[4:]
    assert max_diff(grads, grads_ref) < 1e-5


def test_mha_returns_weights_of_every_head(mha):
    x, memory = torch.randn(2, 5, D), torch.randn(2, 8, D)
    with torch.no_grad():
        y, weights = mha(x, memory, memory, padding_mask(torch.tensor([8, 3])))
    assert y.shape == (2, 5, D) and weights.shape == (2, H, 5, 8)
    assert torch.allclose(weights.sum(-1), torch.ones(2, H, 5))
    assert (weights[1, :, :, 3:] == 0).all()


def test_mha_wider_inputs():
    mha = MultiHeadAttention(D, H, d_in=24)
    y, _ = mha(torch.randn(2, 5, 24), torch.randn(2, 7, 24), torch.randn(2, 7, 24))
    assert y.shape == (2, 5, D)


@pytest.mark.parametrize("causal", [False, True])
def test_batched_with_padding_equals_unbatched_self(mha, causal):
    g = torch.Generator().manual_seed(4)
    lengths = torch.tensor([9, 4, 1, 7, 0])  # an empty sequence must not disturb the others
    x = torch.randn(5, 9, D, generator=g)
    x = x.masked_fill(~padding_mask(lengths)[..., None], 1e3)  # garbage in the padding must not matter
    with torch.no_grad():
        y, weights = mha(x, x, x, padding_mask(lengths), causal_mask(9) if causal else None)
        assert torch.isfinite(y).all() and (weights[4] == 0).all()
        for b, n in enumerate(lengths.tolist()):
            if n == 0:
                continue
            seq = x[b:b + 1, :n]
            alone, alone_weights = mha(seq, seq, seq, None, causal_mask(n) if causal else None)
            torch.testing.assert_close(y[b, :n], alone[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(weights[b, :, :n, :n], alone_weights[0], atol=1e-6, rtol=0)
            assert (weights[b, :, :, n:] == 0).all()


def test_batched_with_padding_equals_unbatched_gradients(mha):
    """The gradients of each sequence's loss are the same in a padded batch as alone."""
    g = torch.Generator().manual_seed(6)
    lengths = torch.tensor([6, 3, 0])
    x = torch.randn(3, 6, D, generator=g, requires_grad=True)
    y, _ = mha(x, x, x, padding_mask(lengths))
    loss = sum(y[b, :n].square().sum() for b, n in enumerate(lengths.tolist()) if n > 0)
    (grad_x,) = torch.autograd.grad(loss, x)
    assert (grad_x[1, 3:] == 0).all() and (grad_x[2] == 0).all()  # padding gets no gradient
    for b, n in enumerate(lengths.tolist()):
        if n == 0:
            continue
        seq = x[b:b + 1, :n].detach().requires_grad_()
        (grad_alone,) = torch.autograd.grad(mha(seq, seq, seq)[0].square().sum(), seq)
        torch.testing.assert_close(grad_x[b, :n], grad_alone[0], atol=1e-5, rtol=0)


def test_batched_with_padding_equals_unbatched_cross(mha):
    g = torch.Generator().manual_seed(5)
    q_lengths, k_lengths = torch.tensor([3, 6, 1]), torch.tensor([10, 2, 7])
    queries, memory = torch.randn(3, 6, D, generator=g), torch.randn(3, 10, D, generator=g)
    memory = memory.masked_fill(~padding_mask(k_lengths)[..., None], -1e3)
    with torch.no_grad():
        y, _ = mha(queries, memory, memory, padding_mask(k_lengths))
        for b, (n, m) in enumerate(zip(q_lengths.tolist(), k_lengths.tolist())):
            alone, _ = mha(queries[b:b + 1, :n], memory[b:b + 1, :m], memory[b:b + 1, :m])
            torch.testing.assert_close(y[b, :n], alone[0], atol=1e-5, rtol=0)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    mha = MultiHeadAttention(D, H, dropout=0.5)
    x = torch.randn(2, 6, D)
    mha.eval()
    a, _ = mha(x, x, x)
    b, _ = mha(x, x, x)
    assert torch.equal(a, b)
    mha.train()
    _, weights = mha(x, x, x)
    assert (weights == 0).any()


def test_positional_encoding_against_formula():
    T, d = 300, 32
    pe = sinusoidal_positional_encoding(T, d)
    assert pe.shape == (T, d) and pe.dtype == torch.float32
    for t in [0, 1, 7, 123, 299]:
        for i in range(d // 2):
            angle = t / 10000 ** (2 * i / d)
            assert pe[t, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[t, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert torch.equal(pe[0, 0::2], torch.zeros(d // 2)) and torch.equal(pe[0, 1::2], torch.ones(d // 2))


def test_positional_encoding_shift_is_a_rotation():
    """PE[t + k] depends on PE[t] linearly: the dot product of two positions depends only on their offset."""
    pe = sinusoidal_positional_encoding(64, 16).double()
    sim = pe @ pe.T
    for k in [1, 5, 20]:
        diag = torch.diagonal(sim, k)
        assert torch.allclose(diag, diag[0].expand_as(diag), atol=1e-5)
