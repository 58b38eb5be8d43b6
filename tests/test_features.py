"""Tests of paraformer_edu.features (chapter 1) against torchaudio and plain loops."""

import math

import pytest
import torch
import torchaudio

from paraformer_edu import features
from paraformer_edu.synthesis import synthesize


def kaldi_fbank(x):
    return torchaudio.compliance.kaldi.fbank(x[None] * 32768, num_mel_bins=80, frame_length=25, frame_shift=10,
                                             dither=0.0, window_type="hamming", sample_frequency=16000)


@pytest.fixture(scope="module")
def speech():
    wave, _ = synthesize("the quick brown fox jumps over the lazy dog", voice="en-us+m3")
    return wave


@pytest.mark.parametrize("n", [400, 401, 559, 560, 1234, 16000])
def test_fbank_equals_torchaudio_kaldi_on_noise(n):
    g = torch.Generator().manual_seed(n)
    x = 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    ours, ref = features.fbank(x), kaldi_fbank(x)
    assert ours.shape == ref.shape == (1 + (n - 400) // 160, 80)
    assert (ours - ref).abs().max() < 5e-4  # torchaudio builds its mel filters in float32


def test_fbank_equals_torchaudio_kaldi_on_speech(speech):
    assert (features.fbank(speech.double()) - kaldi_fbank(speech.double())).abs().max() < 1e-3
    assert (features.fbank(speech) - kaldi_fbank(speech)).abs().max() < 2e-2  # float32 rounding in silence


def test_mel_filterbank_equals_torchaudio():
    ref, _ = torchaudio.compliance.kaldi.get_mel_banks(80, 512, 16000.0, 20.0, 0.0, 100.0, -500.0, 1.0)
    ours = features.mel_filterbank()
    assert ours.shape == (80, 257) and not ours[:, 256].any()
    assert (ours[:, :256] - ref).abs().max() < 1e-4


def test_fbank_of_silence_is_finite():
    F = features.fbank(torch.zeros(1600))
    assert torch.isfinite(F).all() and torch.allclose(F, torch.full_like(F, math.log(torch.finfo(torch.float32).eps)))


def test_fbank_refuses_too_short_input():
    with pytest.raises(ValueError, match="400"):
        features.fbank(torch.zeros(399))


def lfr_loop(F, m, n):
    T = F.shape[0]
    padded = torch.cat([F[:1].repeat((m - 1) // 2, 1), F])
    out = []
    for i in range(math.ceil(T / n)):
        chunk = padded[i * n: i * n + m]
        out.append(torch.cat([chunk, padded[-1:].repeat(m - chunk.shape[0], 1)]).reshape(-1))
    return torch.stack(out)


@pytest.mark.parametrize("m, n", [(7, 6), (5, 4), (1, 1), (4, 3)])
@pytest.mark.parametrize("T", [1, 2, 3, 6, 7, 11, 50, 101])
def test_lfr_equals_the_loop(T, m, n):
    F = torch.randn(T, 4)
    assert torch.equal(features.lfr(F, m, n), lfr_loop(F, m, n))


def test_cmvn_normalises_and_round_trips_state():
    g = torch.Generator().manual_seed(0)
    feats = [3 + 2 * torch.randn(int(t), 5, generator=g) for t in torch.randint(1, 40, (30,), generator=g)]
    cmvn = features.CMVN(5).fit(feats)
    allf = torch.cat(feats)
    assert torch.allclose(cmvn.mean, allf.mean(0), atol=1e-5)
    assert torch.allclose(cmvn.std, allf.std(0, unbiased=False), atol=1e-5)
    z = cmvn(allf)
    assert torch.allclose(z.mean(0), torch.zeros(5), atol=1e-5) and torch.allclose(z.std(0, unbiased=False), torch.ones(5), atol=1e-4)
    other = features.CMVN(5)
    other.load_state_dict(cmvn.state_dict())
    assert torch.equal(other(allf), z)


def test_spec_augment_masks_whole_bands_and_spans():
    X = torch.randn(100, 560) + 10
    aug = features.SpecAugment(n_freq_masks=1, max_freq_width=10, n_time_masks=1, max_time_width=8).train()
    for seed in range(20):
        Y = aug(X, generator=torch.Generator().manual_seed(seed))
        assert Y.shape == X.shape and torch.equal(X, X)  # the input is not modified
        zero = (Y == 0).view(100, 7, 80)
        bins = zero.all(dim=0).all(dim=0)  # bins masked in every frame and block
        rows = (Y == 0).all(dim=1)  # frames masked entirely
        assert bins.sum() <= 10 and rows.sum() <= 8
        assert torch.equal(zero, bins.expand(100, 7, 80) | rows[:, None, None].expand(100, 7, 80))
        assert torch.equal(Y[~(Y == 0)], X[~(Y == 0)])
    same = [aug(X, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(*same)
    assert torch.equal(aug.eval()(X), X)


def test_spec_augment_on_a_one_frame_utterance():
    aug = features.SpecAugment().train()
    assert aug(torch.randn(1, 560)).shape == (1, 560)


def test_frontend_shapes_and_num_frames(speech):
    frontend = features.Frontend()
    X = frontend(speech)
    assert X.shape == (frontend.num_frames(speech.numel()), 560)
    assert frontend.frame_seconds == pytest.approx(0.06)
    for n in (400, 559, 560, 1359, 1360, 16000, 16001):
        assert frontend(torch.randn(n)).shape[0] == frontend.num_frames(n)
    assert torch.equal(X, features.lfr(features.fbank(speech)))  # identity CMVN before fitting
