"""Chapter 6, the decoder: the parallel decoder and the GLM sampler."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from paraformer_edu.attention import causal_mask, padding_mask
from paraformer_edu.decoder import DecoderLayer, GlmSample, ParaformerDecoder, glm_positions, glm_sample

V, D = 11, 16


@pytest.fixture
def decoder():
    torch.manual_seed(0)
    return ParaformerDecoder(V, D, n_layers=2, n_heads=4, d_ffn=32, dropout=0.1).eval()


@pytest.fixture
def batch():
    """Token embeddings (B, N, D) with lengths, encoder output (B, T, D) with lengths, targets (B, N)."""
    g = torch.Generator().manual_seed(0)
    N, T = torch.tensor([7, 4, 1, 0]), torch.tensor([9, 5, 9, 2])
    E = torch.randn(4, 7, D, generator=g) * padding_mask(N, 7)[..., None]
    H = torch.randn(4, 9, D, generator=g) * padding_mask(T, 9)[..., None]
    targets = torch.randint(4, V, (4, 7), generator=g).masked_fill(~padding_mask(N, 7), 0)
    return E, N, H, T, targets


def test_shapes_and_empty_batch(decoder, batch):
    E, N, H, T, _ = batch
    with torch.no_grad():
        assert decoder(E, N, H, T).shape == (4, 7, V)
        empty = decoder(E[:, :0], torch.zeros(4, dtype=torch.long), H, T)
    assert empty.shape == (4, 0, V)


def test_layer_matches_torch_transformer_decoder_layer(batch):
    torch.manual_seed(0)
    E, N, H, T, _ = batch
    ours = DecoderLayer(D, 4, 32, dropout=0.0).eval()
    ref = nn.TransformerDecoderLayer(D, 4, 32, dropout=0.0, batch_first=True, norm_first=True).eval()
    with torch.no_grad():
        for mine, theirs in [(ours.self_attn, ref.self_attn), (ours.src_attn, ref.multihead_attn)]:
            theirs.in_proj_weight.copy_(torch.cat([mine.linear_q.weight, mine.linear_k.weight, mine.linear_v.weight]))
            theirs.in_proj_bias.copy_(torch.cat([mine.linear_q.bias, mine.linear_k.bias, mine.linear_v.bias]))
            theirs.out_proj.load_state_dict(mine.linear_out.state_dict())
        ref.linear1.load_state_dict(ours.feed_forward.w_1.state_dict())
        ref.linear2.load_state_dict(ours.feed_forward.w_2.state_dict())
        for i in (1, 2, 3):
            getattr(ref, f"norm{i}").load_state_dict(getattr(ours, f"norm{i}").state_dict())
        token_mask, h_mask = padding_mask(N, 7), padding_mask(T, 9)
        keep = N > 0  # torch's layer returns NaN for a sequence without any key
        a = ours(E[keep], token_mask[keep], H[keep], h_mask[keep])
        b = ref(E[keep], H[keep], tgt_key_padding_mask=~token_mask[keep], memory_key_padding_mask=~h_mask[keep])
    torch.testing.assert_close(a[token_mask[keep]], b[token_mask[keep]], atol=1e-5, rtol=0)


def test_cross_attention_matches_scaled_dot_product_attention(batch):
    torch.manual_seed(0)
    E, N, H, T, _ = batch
    attn = DecoderLayer(D, 4, 32, dropout=0.0).eval().src_attn
    h_mask = padding_mask(T, 9)
    with torch.no_grad():
        heads = F.scaled_dot_product_attention(attn.split_heads(attn.linear_q(E)), attn.split_heads(attn.linear_k(H)),
                                               attn.split_heads(attn.linear_v(H)), attn_mask=h_mask[:, None, None, :])
        expected = attn.linear_out(attn.merge_heads(heads))
        torch.testing.assert_close(attn(E, H, H, h_mask)[0], expected, atol=1e-6, rtol=0)


def test_batched_equals_unbatched(decoder, batch):
    E, N, H, T, _ = batch
    with torch.no_grad():
        logits = decoder(E, N, H, T)
        for b, (n, t) in enumerate(zip(N.tolist(), T.tolist())):
            alone = decoder(E[b:b + 1, :n], N[b:b + 1], H[b:b + 1, :t], T[b:b + 1])[0]
            torch.testing.assert_close(logits[b, :n], alone, atol=1e-5, rtol=0)


def test_padding_values_do_not_change_valid_outputs(decoder, batch):
    E, N, H, T, _ = batch
    token_mask, h_mask = padding_mask(N, 7), padding_mask(T, 9)
    E2 = torch.where(token_mask[..., None], E, 1e4 * torch.randn_like(E))
    H2 = torch.where(h_mask[..., None], H, -1e4 * torch.randn_like(H))
    with torch.no_grad():
        clean, dirty = decoder(E, N, H, T), decoder(E2, N, H2, T)
    torch.testing.assert_close(clean[token_mask], dirty[token_mask], atol=1e-5, rtol=0)
    assert torch.isfinite(dirty[token_mask]).all()


def test_no_causal_mask_every_output_depends_on_every_input(decoder, batch):
    E, N, H, T, _ = batch
    E2 = E.clone()
    E2[0, 3] += torch.randn(D, generator=torch.Generator().manual_seed(1))  # (a constant shift would vanish in LN)
    with torch.no_grad():
        change = (decoder(E2, N, H, T) - decoder(E, N, H, T))[0].abs().amax(-1)
        causal = (decoder(E2, N, H, T, causal_mask(7)) - decoder(E, N, H, T, causal_mask(7)))[0].abs().amax(-1)
    assert (change > 1e-4).all()  # earlier tokens too
    assert causal[:3].max() == 0 and (causal[3:] > 1e-4).all()
    # other utterances are untouched
    with torch.no_grad():
        torch.testing.assert_close(decoder(E2, N, H, T)[1:], decoder(E, N, H, T)[1:], atol=0, rtol=0)


def test_permuting_inputs_permutes_outputs(decoder, batch):
    E, N, H, T, _ = batch
    perm = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    with torch.no_grad():
        torch.testing.assert_close(decoder(E[:1, perm], N[:1], H[:1], T[:1]), decoder(E[:1], N[:1], H[:1], T[:1])[:, perm],
                                   atol=1e-5, rtol=0)


def test_empty_utterance_in_a_batch_gives_finite_outputs(decoder, batch):
    E, N, H, T, _ = batch
    with torch.no_grad():
        assert torch.isfinite(decoder(E, N, H, T)).all()  # N[3] == 0


def test_dropout_only_in_training(decoder, batch):
    E, N, H, T, _ = batch
    with torch.no_grad():
        assert torch.equal(decoder(E, N, H, T), decoder(E, N, H, T))
        decoder.train()
        assert not torch.equal(decoder(E, N, H, T), decoder(E, N, H, T))


# --- the GLM sampler --------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.4, 0.5, 0.75, 1.0])
def test_glm_count_follows_the_rule_and_spares_padding(decoder, batch, lam):
    E, N, H, T, targets = batch
    s = glm_sample(decoder, E, N, H, T, targets, lam, torch.Generator().manual_seed(0))
    assert isinstance(s, GlmSample)
    valid = padding_mask(N, 7)
    errors = ((s.first_logits.argmax(-1) != targets) & valid).sum(1)
    assert torch.equal(s.errors, errors)
    assert s.replaced.sum(1).tolist() == [math.floor(lam * e) for e in errors.tolist()]
    assert not s.replaced[~valid].any()


def test_glm_lambda_zero_gives_the_plain_input(decoder, batch):
    E, N, H, T, targets = batch
    s = glm_sample(decoder, E, N, H, T, targets, 0.0)
    assert torch.equal(s.embeds, E) and not s.replaced.any()


def test_glm_mixes_target_embeddings_and_acoustic_embeddings(decoder, batch):
    E, N, H, T, targets = batch
    s = glm_sample(decoder, E, N, H, T, targets, 1.0, torch.Generator().manual_seed(1))
    assert s.replaced.any()
    E_y = decoder.embed(targets)
    assert torch.equal(s.embeds[s.replaced], E_y[s.replaced])
    assert torch.equal(s.embeds[~s.replaced], E[~s.replaced])


def test_glm_first_pass_carries_no_gradient(decoder, batch):
    E, N, H, T, targets = batch
    E = E.clone().requires_grad_(True)
    decoder.train()
    s = glm_sample(decoder, E, N, H, T, targets, 1.0, torch.Generator().manual_seed(0))
    assert not s.first_logits.requires_grad and s.first_logits.grad_fn is None
    not_embed = [p for name, p in decoder.named_parameters() if not name.startswith("embed")]
    grads = torch.autograd.grad(s.embeds.sum(), [E, decoder.embed.weight, *not_embed], allow_unused=True)
    assert grads[0] is not None and grads[1] is not None  # kept positions -> E_ac, chosen ones -> E_y
    assert all(g is None for g in grads[2:])  # nothing flows into the first pass
    kept = (~s.replaced & padding_mask(N, 7))
    assert (grads[0][kept] == 1).all() and (grads[0][s.replaced] == 0).all()


def test_glm_positions_are_uniform_and_reproducible():
    lengths = torch.full((4000,), 10)
    errors = torch.full((4000,), 10)
    chosen = glm_positions(errors, lengths, 0.3, 12, torch.Generator().manual_seed(0))
    assert chosen.shape == (4000, 12)
    assert (chosen.sum(1) == 3).all() and not chosen[:, 10:].any()
    frequency = chosen[:, :10].float().mean(0)
    assert (frequency - 0.3).abs().max() < 0.04
    again = glm_positions(errors, lengths, 0.3, 12, torch.Generator().manual_seed(0))
    assert torch.equal(chosen, again)


def test_glm_positions_edge_cases():
    lengths = torch.tensor([0, 1, 5])
    errors = torch.tensor([0, 1, 5])
    assert glm_positions(errors, lengths, 1.0, 5).sum(1).tolist() == [0, 1, 5]
    assert glm_positions(errors, lengths, 0.5, 5).sum(1).tolist() == [0, 0, 2]
    assert glm_positions(errors, lengths, 0.4, 0).shape == (3, 0)
