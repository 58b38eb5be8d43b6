"""Chapter 8: hooks that see inside the model, word timestamps against the synthesiser, error analysis, plots."""

from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

import paraformer_edu  # noqa: E402
from paraformer_edu import plots  # noqa: E402
from paraformer_edu.audio import AudioError  # noqa: E402
from paraformer_edu.corpus import build_corpus, corpus_config, read_manifest  # noqa: E402
from paraformer_edu.encoder import SANMAttention  # noqa: E402
from paraformer_edu.inspection import (attention_entropy, attention_share, cer_by, error_summary,  # noqa: E402
                                       frame_energy, look_inside, match_words, onset_errors, reference_words,
                                       shift_words, substitution_counts, token_audio,
                                       utterance_errors, word_timestamps)
from paraformer_edu.metrics import cer  # noqa: E402
from paraformer_edu.synthesis import synthesize  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BOOK_MODEL = ROOT / "models" / "paraformer-book" / "model.pt"


@pytest.fixture(scope="module")
def book():
    return paraformer_edu.load_model(BOOK_MODEL)


@pytest.fixture(scope="module")
def splits(book):
    """The held-out splits of the corpus the book's model was trained on."""
    manifests = build_corpus(corpus_config(book.config.data.corpus), splits=("dev", "test"))
    return {split: read_manifest(manifests[split]) for split in ("dev", "test")}


# --- hooks ---------------------------------------------------------------------------------------------------

def test_sanm_weights_rebuild_the_layer_output_and_ignore_padding():
    torch.manual_seed(0)
    layer = SANMAttention(32, 32, 4, kernel_size=5).eval()
    x = torch.randn(2, 12, 32)  # (B, T, D)
    mask = torch.arange(12) < torch.tensor([12, 7])[:, None]  # (B, T)
    with torch.no_grad():
        expected, A = layer(x, mask)  # (B, T, D), (B, h, T, T)
        v = layer.linear_v(x)
        rebuilt = layer.linear_out(layer.merge_heads(A @ layer.split_heads(v))) + layer.memory(v, mask)
    assert torch.allclose(rebuilt[mask], expected[mask], atol=1e-6)
    assert torch.allclose(A.sum(-1), torch.ones(2, 4, 12))
    assert A[1, :, :, 7:].abs().max() == 0  # no weight on padded keys


def test_look_inside_equals_transcribe_and_its_maps_are_distributions(book, splits):
    for entry in splits["test"][:3]:
        inside = look_inside(book, entry["audio_filepath"])
        transcript = book.transcribe(entry["audio_filepath"], timestamps=True)
        T, N = inside.alphas.size(0), len(inside.tokens)
        assert inside.tokens == transcript.tokens and inside.timestamps == transcript.timestamps
        assert len(inside.encoder_attention) == book.model.config.encoder.n_layers
        assert len(inside.cross_attention) == book.model.config.decoder_layers
        assert all(a.shape == (book.model.config.encoder.n_heads, T, T) for a in inside.encoder_attention)
        assert all(a.shape[1:] == (N, T) for a in inside.cross_attention)
        assert all(torch.allclose(a.sum(-1), torch.ones(())) for a in inside.encoder_attention + inside.cross_attention)
        assert len(inside.fires) == N and inside.fbank.size(1) == 80
        assert frame_energy(inside).shape == (T,)


def test_look_inside_leaves_no_hooks_behind_and_refuses_silence(book):
    look_inside(book, synthesize("a short test")[0], 16000)
    assert all(not m.self_attn._forward_hooks for m in book.model.encoder.layers)
    assert all(not m.src_attn._forward_hooks for m in book.model.decoder.layers)
    with pytest.raises(AudioError, match="silent"):
        look_inside(book, torch.zeros(16000), 16000)


def test_look_inside_converts_a_stereo_44k_input(book):
    wave = synthesize("the quick brown fox")[0]  # (S,) 16 kHz
    import torchaudio

    stereo = torchaudio.functional.resample(wave, 16000, 44100).repeat(2, 1).T  # (S', 2)
    a, b = look_inside(book, wave, 16000), look_inside(book, stereo.numpy(), 44100)
    n = min(len(a.wave), len(b.wave))
    assert abs(len(a.wave) - len(b.wave)) <= 1  # converted back to 16 kHz mono
    assert (a.wave[:n] - b.wave[:n]).pow(2).mean().sqrt() < 0.05 * a.wave.pow(2).mean().sqrt()
    assert abs(len(a.tokens) - len(b.tokens)) <= 1 and a.alphas.shape == b.alphas.shape


def test_look_inside_maps_equal_those_of_a_padded_batch(book, splits):
    """The hooks see one utterance alone; inside a padded batch its valid rows must be the same."""
    by_length = sorted(splits["test"][:10], key=lambda e: e["duration"])
    short, long = by_length[0]["audio_filepath"], by_length[-1]["audio_filepath"]
    inside = look_inside(book, short)
    feats = [book.features(p) for p in (short, long)]
    x = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True)  # (2, T_max, F)
    lengths = torch.tensor([len(f) for f in feats])  # (2,)
    assert lengths[0] < lengths[1], "the test needs the first utterance to be the shorter one"
    maps = []
    hooks = [layer.self_attn.register_forward_hook(
        lambda m, args, out: maps.append(out[1])) for layer in book.model.encoder.layers]
    try:
        with torch.no_grad():
            book.model.encoder(x, lengths)
    finally:
        for hook in hooks:
            hook.remove()
    T = int(lengths[0])
    for alone, batched in zip(inside.encoder_attention, maps):
        assert torch.allclose(alone, batched[0, :, :T, :T], atol=1e-5)
        assert batched[0, :, :T, T:].abs().max() == 0  # no weight on the padding


def test_attention_statistics_on_known_maps():
    assert attention_entropy(torch.ones(2, 1, 1)).tolist() == [0.0, 0.0]  # one key: nothing to choose
    T = 8
    one_hot = torch.eye(T)[None]  # (1, T, T): each query on itself
    uniform = torch.full((1, T, T), 1 / T)
    assert attention_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    assert attention_entropy(uniform).item() == pytest.approx(1.0)
    keys = torch.zeros(T, dtype=torch.bool)
    keys[:2] = True
    assert attention_share(uniform, keys).item() == pytest.approx(0.25)
    assert attention_share(one_hot, keys).item() == pytest.approx(0.25)  # two of eight queries look at keys 0, 1


# --- timestamps ----------------------------------------------------------------------------------------------

def test_reference_words_follow_the_normalised_spelling():
    entry = {"words": [["Hello", 0.0], ["state-of-the-art", 0.5], ["I'm", 1.2]]}
    assert reference_words(entry) == [("hello", 0.0), ("state", 0.5), ("of", 0.5), ("the", 0.5), ("art", 0.5),
                                      ("i'm", 1.2)]


def test_match_words_pairs_only_the_correct_words():
    reference = [("the", 0.0), ("cat", 0.3), ("sat", 0.6), ("down", 0.9)]
    hypothesis = [("the", 0.05, 0.2), ("hat", 0.3, 0.5), ("sat", 0.66, 0.8), ("town", 0.9, 1.1), ("now", 1.1, 1.2)]
    assert match_words(reference, hypothesis) == [("the", 0.0, 0.05), ("sat", 0.6, 0.66)]
    assert match_words(reference, []) == []
    # a deleted word shifts the hypothesis index, not the pairing
    assert match_words(reference, [("the", 0.0, 0.1), ("down", 1.0, 1.2)]) == [("the", 0.0, 0.0), ("down", 0.9, 1.0)]


def test_shift_words_moves_times_and_clamps_at_zero():
    assert shift_words([("a", 0.02, 0.1), ("b", 0.5, 0.7)], -0.05) == [("a", 0.0, 0.05), ("b", 0.45, 0.65)]


def test_word_timestamps_batched_equal_unbatched_and_handle_silence(book, splits):
    paths = [e["audio_filepath"] for e in splits["test"][:6]]
    batched = word_timestamps(book, paths, offset=-0.05)
    assert batched == [word_timestamps(book, p, offset=-0.05) for p in paths]
    for words, path in zip(batched, paths):
        text = book.transcribe(path)
        assert " ".join(w for w, _, _ in words) == text
        starts = [s for _, s, _ in words]
        assert starts == sorted(starts) and all(s <= e for _, s, e in words)
    assert word_timestamps(book, torch.zeros(8000), 16000) == []


def test_book_model_word_onsets_meet_the_goal_after_the_dev_bias(book, splits):
    dev_errors, _ = onset_errors(book, splits["dev"][:100])
    bias = dev_errors.median().item()
    raw, n_words = onset_errors(book, splits["test"][:100])
    corrected, _ = onset_errors(book, splits["test"][:100], offset=-bias)
    assert len(raw) == len(corrected) > 50 and n_words > len(raw)
    assert 0.02 < bias < 0.1  # word starts lag the onsets by about one 60 ms frame
    summary = error_summary(corrected)
    assert summary["mean_ms"] <= 60 and summary["p90_ms"] <= 120
    assert summary["mean_ms"] < error_summary(raw)["mean_ms"]


def test_error_summary_statistics():
    errors = torch.tensor([-0.02, 0.01, 0.03, 0.05, 0.1], dtype=torch.float64)
    summary = error_summary(errors)
    assert summary == {"words": 5, "mean_ms": 42.0, "p90_ms": pytest.approx(80.0), "bias_ms": 30.0}
    with pytest.raises(ValueError, match="no word was matched"):
        error_summary(torch.zeros(0, dtype=torch.float64))


def test_onset_errors_leave_out_the_first_word(book, splits):
    """The first word starts at 0 s in the manifest and in every transcript: it is not a measurement."""
    entries = splits["test"][:20]
    assert all(e["words"][0][1] == 0.0 for e in entries)
    errors, n_words = onset_errors(book, entries)
    assert n_words == sum(len(reference_words(e)) - 1 for e in entries)
    hypotheses = word_timestamps(book, [e["audio_filepath"] for e in entries])
    later = [start - true for e, h in zip(entries, hypotheses) for _, true, start in match_words(reference_words(e), h)
             if true > 0]
    assert errors.tolist() == pytest.approx(later)


# --- error analysis ------------------------------------------------------------------------------------------

def test_cer_by_pools_edits_and_keeps_bin_order():
    entries = [{"text": t, "duration": 1.0, "voice": v, "rate": r, "audio_filepath": "x"}
               for t, v, r in (("the cat", "a", 135), ("a dog ran", "b", 160), ("sun", "a", 185))]
    hyps = ["the hat", "a dog", "sun"]
    records = utterance_errors(entries, hyps)
    assert cer_by(records, lambda r: "all")["all"]["cer"] == pytest.approx(cer([e["text"] for e in entries], hyps))
    by_voice = cer_by(records, "voice")
    assert by_voice["a"] == {"utterances": 2, "cer": pytest.approx(1 / 10)}
    assert by_voice["b"] == {"utterances": 1, "cer": pytest.approx(4 / 9)}
    by_rate = cer_by(records, "rate", [130, 150, 170, 191])
    assert list(by_rate) == ["130-149", "150-169", "170-190"]
    assert list(cer_by(records, "rate", [100, 120, 150])) == ["120-149", "other"]  # empty bins left out
    records[0]["rate"] = None  # a manifest without espeak's settings
    assert cer_by(records, "rate", [130, 150, 170, 191])["unknown"]["utterances"] == 1
    with pytest.raises(ValueError, match="one per entry"):
        utterance_errors(entries, hyps[:2])


def test_substitution_counts():
    records = [{"reference": "cat", "hypothesis": "cut"}, {"reference": "hat", "hypothesis": "hut"},
               {"reference": "sit", "hypothesis": "sat"}]
    assert substitution_counts(records, 2) == [(("a", "u"), 2), (("i", "a"), 1)]


def test_token_audio_is_the_span_of_the_token(book, splits):
    inside = look_inside(book, splits["test"][0]["audio_filepath"])
    for k, (start, end) in enumerate(inside.timestamps):
        expected = min(round(end * 16000), len(inside.wave)) - round(start * 16000)  # the last may run past the end
        assert len(token_audio(inside, k)) == expected


# --- plots ---------------------------------------------------------------------------------------------------

def test_plots_draw_on_one_time_axis(book, splits):
    inside = look_inside(book, splits["test"][0]["audio_filepath"])
    seconds = inside.alphas.size(0) * inside.frame_shift
    fig = plots.plot_encoder_attention(inside, layers=[0, 1], heads=[0, 2])
    assert len(fig.axes) == 6 and all(ax.get_xlim() == pytest.approx((0, seconds)) for ax in fig.axes)
    fig = plots.plot_cross_attention(inside)
    top, ax = fig.axes[:2]
    assert top.get_xlim() == pytest.approx((0, seconds)) and ax.get_xlim() == pytest.approx((0, seconds))
    assert [t.get_text() for t in ax.get_yticklabels()] == [t.replace("\u2581", "_") for t in inside.tokens]
    fig = plots.plot_cif(inside)
    assert len(fig.axes) == 3 and len(fig.axes[0].texts) == len(inside.tokens)
    centres = [(min(f, inside.alphas.size(0) - 1) + 0.5) * inside.frame_shift for f in inside.fires]
    assert [t.get_position()[0] for t in fig.axes[0].texts] == pytest.approx(centres)  # each label at its fire
    assert all(ax.get_xlim() == pytest.approx((0, seconds)) for ax in fig.axes)
    matplotlib.pyplot.close("all")


def test_plots_of_logs_errors_and_groups():
    rows = [{"step": s, "loss": 3.0 / s, "loss_ce": 2.0 / s, "loss_ctc": 1.5 / s, "loss_quantity": 1.0 / s}
            for s in range(1, 5)]
    rows += [{"step": 4, "dev_cer": 0.5, "dev_length_mae": 1.2, "dev_length_exact": 0.3}]
    fig = plots.plot_training_log(rows)
    assert len(fig.axes) == 3 and len(fig.axes[0].lines) == 3
    fig = plots.plot_training_log(rows, {"SpecAugment on": 2})
    assert len(fig.axes[0].lines) == 4 and fig.axes[0].texts[0].get_text() == "SpecAugment on"
    fig = plots.plot_onset_errors({"raw": torch.tensor([0.05, 0.06]), "corrected": torch.tensor([0.0, 0.01])})
    assert len(fig.axes[0].patches) == 80  # 40 bins per histogram
    ax = plots.plot_cer_by({"x": {"utterances": 3, "cer": 0.25}, "y": {"utterances": 1, "cer": 0.5}}, "t")
    assert [p.get_height() for p in ax.patches] == pytest.approx([25.0, 50.0])
    matplotlib.pyplot.close("all")


def test_public_api_names_chapter_8():
    for name in ("Inside", "look_inside", "word_timestamps", "onset_errors", "cer_by"):
        assert getattr(paraformer_edu, name).__module__ == "paraformer_edu.inspection"
    assert "chapter 8" in paraformer_edu.inspection.look_inside.__doc__
    assert "chapter 8" in plots.plot_cif.__doc__


def test_recorded_word_onset_bias_is_what_the_dev_split_gives(book, splits):
    import json

    recorded = json.loads((BOOK_MODEL.parent / "metrics.json").read_text())["word_onsets"]
    errors, _ = onset_errors(book, splits["dev"])
    assert 1000 * errors.median().item() == pytest.approx(recorded["dev_bias_ms"], abs=1.0)
    assert recorded["test_corrected"]["mean_ms"] <= 60 and recorded["test_corrected"]["p90_ms"] <= 120
