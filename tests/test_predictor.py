"""Tests of chapter 5, the CIF predictor (paraformer_edu.predictor).

Three implementations of continuous integrate-and-fire must agree: the paper's loop
(`cif_loop`), the vectorised version (`cif`) and the PyPI package torch-cif, in
embeddings, token counts, fire frames (where defined) and gradients.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch_cif import cif_function

from paraformer_edu.predictor import (CifOutput, CifPredictor, cif, cif_count, cif_loop, cif_timestamps,
                                      integrate_and_fire, quantity_loss)


def random_batch(B=6, T=40, D=8, scale=0.8, seed=0, empty=True):
    """Random h (B, T, D), alphas (B, T) in [0, scale), lengths (B,) with padding (and one empty row)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g)
    alphas = torch.rand(B, T, generator=g) * scale
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    if empty:
        lengths[-1] = 0
    return h, alphas, lengths


def cif_torch_cif(h, alphas, lengths, beta=1.0, tail_threshold=0.0, target_lengths=None):
    """torch-cif with our conventions (eps=0, tail as FunASR's appended frame, tail token not rescaled)."""
    padding = torch.arange(h.size(1)) >= lengths[:, None]
    if target_lengths is not None:
        out = cif_function(h, alphas, beta=beta, padding_mask=padding, target_lengths=target_lengths, eps=0.0)
        return out["cif_out"][0], out["cif_lengths"][0], None
    tail = beta - tail_threshold if tail_threshold > 0 else math.inf
    out = cif_function(h, alphas, beta=beta, tail_thres=tail, padding_mask=padding)
    embeds, n = out["cif_out"][0], out["cif_lengths"][0]
    r = out["tail_weights"][0].detach()
    extended = (n > 0) & (r >= tail)
    undo = torch.ones(embeds.shape[:2], dtype=embeds.dtype)
    undo[extended, n[extended] - 1] = (r[extended] / beta).to(embeds.dtype)
    return embeds * undo[..., None], n, None


def run_with_grads(fn, h, alphas, lengths, **kw):
    """Embeddings, counts, fires and the gradients (h, alphas) of a fixed random function of the output."""
    hh, aa = h.clone().requires_grad_(), alphas.clone().requires_grad_()
    embeds, n, fires = fn(hh, aa, lengths, **kw)
    probe = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(1), dtype=embeds.dtype)
    (embeds * probe).sum().backward()
    return embeds.detach(), n, fires, hh.grad, aa.grad


def max_diff(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


MODES = ["plain", "tail", "target"]


def mode_kwargs(mode, beta, B, seed, high=25):
    if mode == "tail":
        return dict(tail_threshold=0.45 * beta)
    if mode == "target":
        return dict(target_lengths=torch.randint(1, high, (B,), generator=torch.Generator().manual_seed(seed)))
    return {}


# ---------------------------------------------------------------- the worked example

def test_worked_example_by_hand():
    alpha = torch.tensor([0.3, 0.5, 0.4, 0.9, 0.1, 0.2, 0.5, 0.7])
    embeddings, fires, c, a = integrate_and_fire(torch.eye(8), alpha)
    assert fires == [2, 3, 7]
    expected = torch.tensor([[0.3, 0.5, 0.2, 0, 0, 0, 0, 0],
                             [0, 0, 0.2, 0.8, 0, 0, 0, 0],
                             [0, 0, 0, 0.1, 0.1, 0.2, 0.5, 0.1]])
    assert max_diff(torch.stack(embeddings), expected) < 1e-6
    assert abs(a.item() - 0.6) < 1e-6 and abs(c[7].item() - 0.6) < 1e-6
    e, n, f = cif(torch.eye(8)[None], alpha[None], tail_threshold=0.45)
    assert n.tolist() == [4] and f.tolist() == [[2, 3, 7, 8]]  # the 4th token fires on the tail frame
    assert max_diff(e[0, :3], expected) < 1e-6 and abs(e[0, 3, 7].item() - 0.6) < 1e-6


# ---------------------------------------------------------------- loop vs vectorised

@pytest.mark.parametrize("beta,scale", [(1.0, 0.8), (0.7, 0.9), (0.5, 1.0)])
@pytest.mark.parametrize("mode", MODES)
def test_loop_equals_vectorised(beta, scale, mode):
    for seed in range(3):
        h, alphas, lengths = random_batch(scale=scale, seed=seed)
        kw = mode_kwargs(mode, beta, h.size(0), seed)
        ea, na, fa, gha, gaa = run_with_grads(cif_loop, h, alphas, lengths, beta=beta, **kw)
        eb, nb, fb, ghb, gab = run_with_grads(cif, h, alphas, lengths, beta=beta, **kw)
        assert torch.equal(na, nb)
        assert torch.equal(fa, fb)
        assert ea.shape == eb.shape
        assert max_diff(ea, eb) < 1e-5
        assert max_diff(gha, ghb) < 1e-5 and max_diff(gaa, gab) < 1e-5


def test_multi_boundary_frames_fire_several_times():
    h, alphas = torch.eye(3)[None], torch.tensor([[0.5, 0.2, 0.3]])
    for fn in (cif_loop, cif):
        e, n, f = fn(h, alphas, target_lengths=torch.tensor([4]))  # scaled to (2, 0.8, 1.2)
        assert n.tolist() == [4] and f.tolist() == [[0, 1, 2, 2]]
        expected = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0.8, 0.2], [0, 0, 1.0]])
        assert max_diff(e[0], expected) < 1e-6
    # beta < 1: a weight of 0.9 crosses a boundary of 0.25 more than once
    for fn in (cif_loop, cif):
        e, n, f = fn(torch.eye(2)[None], torch.tensor([[0.9, 0.2]]), beta=0.25)
        assert n.tolist() == [4] and f.tolist() == [[0, 0, 0, 1]]


def test_batch_equals_utterances_alone():
    h, alphas, lengths = random_batch(seed=3)
    for kw in ({}, dict(tail_threshold=0.45)):
        e, n, f = cif(h, alphas, lengths, **kw)
        for b in range(h.size(0)):
            L = int(lengths[b])
            eb, nb, fb = cif(h[b:b + 1, :L], alphas[b:b + 1, :L], torch.tensor([L]), **kw)
            assert nb.item() == n[b].item()
            assert max_diff(eb[0], e[b, :nb.item()]) < 1e-6
            assert torch.equal(fb[0], f[b, :nb.item()])
            assert (e[b, nb.item():] == 0).all() and (f[b, nb.item():] == -1).all()


def test_padding_values_are_ignored():
    h, alphas, lengths = random_batch(seed=4)
    junk = torch.arange(h.size(1)) >= lengths[:, None]
    e1 = cif(h, alphas, lengths, tail_threshold=0.45)
    e2 = cif(h.masked_fill(junk[..., None], 7.0), alphas.masked_fill(junk, 0.9), lengths, tail_threshold=0.45)
    assert torch.equal(e1[1], e2[1]) and torch.equal(e1[2], e2[2]) and max_diff(e1[0], e2[0]) < 1e-6


def test_each_token_has_weight_beta():
    h, alphas, lengths = random_batch(seed=5, T=60)
    h[..., 0] = 1.0  # channel 0 of an embedding = the weight of its token
    for beta in (1.0, 0.5):
        e, n, _ = cif(h, alphas, lengths, beta=beta)
        for b in range(h.size(0)):
            assert max_diff(e[b, :n[b], 0], torch.full((int(n[b]),), beta)) < 1e-5


# ---------------------------------------------------------------- torch-cif

@pytest.mark.parametrize("beta,scale", [(1.0, 0.8), (0.5, 1.0)])
@pytest.mark.parametrize("mode", MODES)
def test_vectorised_equals_torch_cif(beta, scale, mode):
    for seed in range(2):
        h, alphas, lengths = random_batch(T=200, scale=scale, seed=seed, empty=False)
        kw = mode_kwargs(mode, beta, h.size(0), seed, high=120)
        ea, na, _, gha, gaa = run_with_grads(cif, h, alphas, lengths, beta=beta, **kw)
        eb, nb, _, ghb, gab = run_with_grads(cif_torch_cif, h, alphas, lengths, beta=beta, **kw)
        assert torch.equal(na, nb)
        assert max_diff(ea, eb) < 1e-4  # torch-cif sums alpha in float32
        assert max_diff(gha, ghb) < 1e-4 and max_diff(gaa, gab) < 1e-4


def test_torch_cif_rescales_its_tail_token():
    h, alphas = torch.randn(1, 6, 4), torch.full((1, 6), 0.6)  # sum 3.6: leftover 0.6 >= 0.55
    ours, n, _ = cif(h, alphas, tail_threshold=0.45)
    theirs = cif_function(h, alphas, beta=1.0, tail_thres=0.55)["cif_out"][0]
    assert n.item() == 4 and theirs.size(1) == 4
    assert max_diff(theirs[0, :3], ours[0, :3]) < 1e-5
    assert max_diff(theirs[0, 3], ours[0, 3] / 0.6) < 1e-5


# ---------------------------------------------------------------- training

def test_target_lengths_fire_exactly():
    g = torch.Generator().manual_seed(0)
    alphas = torch.rand(200, 300, generator=g) * 0.8
    targets = torch.randint(1, 150, (200,), generator=g)
    C, N = cif_count(alphas, target_lengths=targets)
    assert torch.equal(N, targets) and torch.equal(C[:, -1], targets.double())
    h = torch.ones(200, 300, 1)
    e, n, f = cif(h, alphas, target_lengths=targets)
    assert torch.equal(n, targets)
    valid = torch.arange(e.size(1)) < targets[:, None]
    assert max_diff(e[..., 0][valid], torch.ones(int(valid.sum()))) < 1e-5  # every token has weight beta
    assert (f[valid] >= 0).all() and (f[valid] < 300).all() and (f[~valid] == -1).all()


def test_target_lengths_with_zero_weights():
    h, alphas = torch.randn(2, 5, 3), torch.zeros(2, 5)
    alphas[0] = 0.5
    for fn in (cif, cif_loop):
        e, n, f = fn(h, alphas, target_lengths=torch.tensor([2, 2]))
        assert n.tolist() == [2, 2]
        assert (e[1] == 0).all() and f[1].tolist() == [5, 5]  # nothing to integrate: zero tokens at the end


def test_quantity_loss():
    alphas = torch.tensor([[0.6, 0.7, 0.9, 0.0], [0.2, 0.3, 0.1, 0.2]], requires_grad=True)
    target = torch.tensor([2, 1])
    loss = quantity_loss(alphas, target)
    assert abs(loss.item() - F.l1_loss(alphas.sum(1), target.float()).item()) < 1e-6
    loss.backward()
    assert torch.equal(alphas.grad, torch.tensor([[0.5] * 4, [-0.5] * 4]))


# ---------------------------------------------------------------- inference: tail and edge cases

def counts(alphas, **kw):
    h = torch.randn(alphas.size(0), alphas.size(1), 2, dtype=alphas.dtype)
    lengths = torch.full((alphas.size(0),), alphas.size(1))
    results = [fn(h, alphas, lengths, **kw) for fn in (cif, cif_loop)]
    (e1, n1, f1), (e2, n2, f2) = results
    assert torch.equal(n1, n2) and torch.equal(f1, f2) and max_diff(e1, e2) < 1e-6
    return n1.tolist(), f1.tolist()


def even(total, T=6):
    return torch.full((1, T), total / T, dtype=torch.float64)


@pytest.mark.parametrize("total,plain,tail", [
    (0.0, 0, 0), (2.999999, 2, 3), (3.000001, 3, 3), (3.549, 3, 3), (3.551, 3, 4), (0.56, 0, 1), (0.54, 0, 0)])
def test_tail_rule(total, plain, tail):
    assert counts(even(total))[0] == [plain]
    n, f = counts(even(total), tail_threshold=0.45)
    assert n == [tail] == [math.floor(total + 0.45)]
    assert (tail > plain) == (f[0][-1:] == [6])  # a token made by the tail fires on the tail frame


def test_edge_cases():
    assert counts(torch.zeros(1, 6), tail_threshold=0.45) == ([0], [[]])
    assert counts(torch.tensor([[0.7]]), tail_threshold=0.45) == ([1], [[1]])
    assert counts(torch.tensor([[0.5]]), tail_threshold=0.45) == ([0], [[]])
    assert counts(torch.tensor([[0.7]])) == ([0], [[]])
    e, n, f = cif(torch.randn(2, 5, 4), torch.rand(2, 5), torch.tensor([5, 0]), tail_threshold=0.45)
    assert n[1] == 0 and (e[1] == 0).all() and (f[1] == -1).all()
    e, n, f = cif(torch.randn(2, 5, 4), torch.zeros(2, 5), tail_threshold=0.45)
    assert e.shape == (2, 0, 4) and n.tolist() == [0, 0] and f.shape == (2, 0)
    th = torch_cif_count(torch.tensor([[0.7]]))
    assert th == 1


def torch_cif_count(alphas):
    return cif_torch_cif(torch.randn(1, alphas.size(1), 2), alphas, torch.tensor([alphas.size(1)]),
                         tail_threshold=0.45)[1].item()


def test_long_input_stays_exact():
    g = torch.Generator().manual_seed(0)
    h, alphas = torch.randn(1, 20_000, 2, generator=g), torch.rand(1, 20_000, generator=g) * 0.8
    e1, n1, f1 = cif_loop(h, alphas)
    e2, n2, f2 = cif(h, alphas)
    assert n1.item() == n2.item() == math.floor(alphas.double().sum().item())
    assert torch.equal(f1, f2) and max_diff(e1, e2) < 1e-5


# ---------------------------------------------------------------- the predictor module

def test_predictor():
    torch.manual_seed(0)
    predictor = CifPredictor(d_model=16)
    h, lengths = torch.randn(3, 30, 16), torch.tensor([30, 17, 5])
    out = predictor(h, lengths)
    assert isinstance(out, CifOutput)
    assert out.alphas.shape == (3, 30) and out.embeds.shape[0] == 3 and out.embeds.shape[2] == 16
    assert ((out.alphas > 0) & (out.alphas < 1))[0].all() and (out.alphas[1, 17:] == 0).all()
    expected = torch.floor(out.alphas.double().sum(1) + 0.45).long()
    assert torch.equal(out.token_lengths, expected)  # inference: the tail rule
    alone = predictor.weights(h[2:, :5], lengths[2:])  # no dependence on the batch's padding
    assert max_diff(alone, out.alphas[2:, :5]) < 1e-6
    targets = torch.tensor([4, 9, 2])
    out = predictor(h, lengths, targets)
    assert torch.equal(out.token_lengths, targets) and out.embeds.size(1) == 9
    loss = quantity_loss(out.alphas, targets) + out.embeds.pow(2).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in predictor.parameters())


def test_inference_counts_with_the_tail_rule_then_integrates_scaled_weights():
    torch.manual_seed(0)
    predictor = CifPredictor(d_model=16)
    with torch.no_grad():
        predictor.linear.bias.fill_(1.0)  # weights near 0.7: several tokens, leftovers on either side
    h, lengths = torch.randn(4, 30, 16), torch.tensor([30, 17, 5, 0])
    out = predictor(h, lengths)  # the default, rescale=True
    predictor.rescale = False
    raw = predictor(h, lengths)  # the paper's inference
    count = torch.floor(out.alphas.double().sum(1) + 0.45).long()
    assert torch.equal(out.token_lengths, count) and torch.equal(raw.token_lengths, count)
    # the plain loop, given the count as target: the same embeddings and fires as the default
    looped, n, fires = cif_loop(h.double(), out.alphas.double(), lengths, target_lengths=count)
    assert torch.equal(n, count) and torch.equal(fires, out.fires)
    assert max_diff(looped.float(), out.embeds) < 1e-5
    weights = cif(torch.eye(30).expand(4, 30, 30), out.alphas, lengths, target_lengths=count)[0].sum(-1)
    valid = torch.arange(weights.size(1)) < count[:, None]
    assert torch.allclose(weights[valid], torch.ones(int(valid.sum())))  # every token weighs beta
    assert not torch.allclose(raw.embeds, out.embeds)  # the raw integration differs
    predictor.rescale = True
    for b in range(3):  # batched equals alone
        alone = predictor(h[b : b + 1, : lengths[b]], lengths[b : b + 1])
        assert torch.equal(alone.token_lengths, count[b : b + 1])
        assert max_diff(alone.embeds[0], out.embeds[b, : count[b]]) < 1e-5
    assert (out.embeds[3] == 0).all() and out.token_lengths[3] == 0  # padding only: nothing


# ---------------------------------------------------------------- timestamps

def test_timestamps_from_known_fire_frames():
    alphas = torch.zeros(2, 20)
    alphas[0, [3, 9, 15]] = 1.0
    alphas[1, [2, 5, 6, 7]] = torch.tensor([0.9, 0.3, 0.9, 0.6])
    lengths = torch.tensor([20, 8])
    _, n, f = cif(torch.randn(2, 20, 4), alphas, lengths, tail_threshold=0.45)
    assert f[0].tolist() == [3, 9, 15] and f[1].tolist() == [5, 6, 8]
    stamps = cif_timestamps(f, n, lengths)
    assert stamps[0] == [(0.0, 0.24), (0.24, 0.6), (0.6, 0.96)]
    assert stamps[1] == [(0.0, 0.36), (0.36, 0.42), (0.42, 0.48)]  # the tail token ends with the audio
    assert cif_timestamps(f, n, lengths, frame_shift=0.04)[0][1] == (0.16, 0.4)


def test_timestamps_two_fires_in_one_frame():
    _, n, f = cif(torch.randn(1, 4, 2), torch.tensor([[0.6, 0.95, 0.9, 0.3]]), beta=0.5)
    assert f.tolist() == [[0, 1, 1, 2, 3]]
    stamps = cif_timestamps(f, n, torch.tensor([4]))
    assert stamps == [[(0.0, 0.06), (0.06, 0.12), (0.06, 0.12), (0.12, 0.18), (0.18, 0.24)]]


def test_timestamps_need_fire_frames_not_weights():
    alphas = torch.zeros(1, 10)
    alphas[0, [2, 7]] = 1.0
    _, n, f = cif(torch.randn(1, 10, 2), alphas)
    assert cif_timestamps(f, n, torch.tensor([10])) == [[(0.0, 0.18), (0.18, 0.48)]]
    with pytest.raises(TypeError):  # FunASR once passed the weights where the fire frames belong
        cif_timestamps(alphas, n, torch.tensor([10]))


def test_predictor_learns_a_length_with_the_quantity_loss():
    """Frames marked by channel 0 carry one token each; the quantity loss alone teaches the count."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    B, T, D = 32, 40, 8
    h = torch.randn(B, T, D, generator=g)
    marked = torch.rand(B, T, generator=g) < 0.3  # (B, T): the frames that carry a token
    h[..., 0] = marked.float() * 3.0
    lengths = torch.randint(20, T + 1, (B,), generator=g)
    valid = torch.arange(T) < lengths[:, None]
    targets = (marked & valid).sum(1)  # (B,): tokens per utterance
    predictor = CifPredictor(d_model=D)
    optimizer = torch.optim.Adam(predictor.parameters(), lr=1e-2)
    errors = []
    for _ in range(300):
        out = predictor(h, lengths, targets)
        loss = quantity_loss(out.alphas, targets)
        errors.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.equal(out.token_lengths, targets)  # training mode: exactly |y| tokens
    assert errors[-1] < errors[0] / 5 and errors[-1] < 1.0
    with torch.no_grad():
        predicted = predictor(h, lengths).token_lengths  # inference: the tail rule
    assert (predicted - targets).abs().float().mean() < 1.0
