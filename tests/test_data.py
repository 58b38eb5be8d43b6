"""Tests of chapter 1's audio, synthesis, corpus and dataset modules: audio loading, the corpus, batching."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import paraformer_edu.corpus as corpus_module
from paraformer_edu.audio import AudioError, is_silent, load_audio
from paraformer_edu.synthesis import synthesize
from paraformer_edu.corpus import (augment, build_corpus, clean_example, corpus_config, corpus_plan, near_duplicate_groups,
                                   nonspeech, read_manifest, sentence_splits, sentence_words, voice_pool, word_list,
                                   wordnet_sentences)
from paraformer_edu.dataset import BucketBatchSampler, SpeechDataset, collate
from paraformer_edu.features import Frontend


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The 'tiny' corpus, built once into a temporary folder."""
    root = tmp_path_factory.mktemp("corpus")
    return root, build_corpus(corpus_config("tiny"), root=root)


# --- load_audio: every kind of input gets a defined answer -------------------------------------

def tone(seconds=0.5, rate=16000, freq=440.0):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_wav_at_16k_is_returned_as_is(tmp_path):
    x = tone()
    sf.write(tmp_path / "a.wav", x, 16000, subtype="FLOAT")
    y = load_audio(tmp_path / "a.wav")
    assert y.dtype == torch.float32 and y.shape == (8000,)
    assert torch.equal(y, torch.from_numpy(x))


@pytest.mark.parametrize("fmt", ["FLAC", "OGG"])
def test_other_sound_formats_are_read(tmp_path, fmt):
    x = tone()
    sf.write(tmp_path / f"a.{fmt.lower()}", x, 16000, format=fmt)
    y = load_audio(tmp_path / f"a.{fmt.lower()}")
    assert y.shape == (8000,) and torch.allclose(y, torch.from_numpy(x), atol=0.05)


def test_stereo_is_averaged(tmp_path):
    x = tone()
    sf.write(tmp_path / "s.wav", np.stack([x, 0 * x], axis=1), 16000, subtype="FLOAT")
    assert torch.allclose(load_audio(tmp_path / "s.wav"), torch.from_numpy(x) / 2)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_other_rates_are_resampled(tmp_path, rate):
    sf.write(tmp_path / "r.wav", tone(rate=rate), rate)
    y = load_audio(tmp_path / "r.wav")
    assert abs(y.numel() - 8000) <= 1
    peak = torch.fft.rfft(y).abs().argmax().item() * 16000 / y.numel()
    assert abs(peak - 440) < 5  # the tone keeps its pitch


def test_array_input_needs_a_rate_and_ints_are_scaled():
    x = tone()
    with pytest.raises(AudioError, match="sample_rate"):
        load_audio(x)
    pcm = (x * 32768).astype(np.int16)
    assert torch.allclose(load_audio(pcm, sample_rate=16000), torch.from_numpy(x), atol=1e-4)
    stereo_tc = np.stack([x, x], axis=1)  # (T, C) as soundfile returns it
    assert torch.allclose(load_audio(stereo_tc, 16000), torch.from_numpy(x))
    assert torch.allclose(load_audio(torch.from_numpy(x)[None], 16000), torch.from_numpy(x))


def test_8_bit_pcm_is_unsigned_and_centred_on_128():
    x = tone()
    pcm8 = np.clip(np.round(x * 128 + 128), 0, 255).astype(np.uint8)  # 8-bit WAV samples: silence is 128
    assert torch.allclose(load_audio(pcm8, 16000), torch.from_numpy(x), atol=1 / 128)
    assert load_audio(np.full(16000, 128, np.uint8), 16000).abs().max() == 0  # silence stays silence


@pytest.mark.parametrize("shape", [(4, 16000), (16000, 4), (3, 2, 8000)])
def test_an_array_that_is_not_one_clip_is_refused(shape):
    with pytest.raises(AudioError, match="not one clip.*list"):
        load_audio(np.zeros(shape, np.float32), 16000)


@pytest.mark.parametrize("samples, message", [(0, "empty"), (100, "ms long"), (399, "ms long")])
def test_empty_and_too_short_are_refused(tmp_path, samples, message):
    sf.write(tmp_path / "e.wav", np.zeros(samples, np.float32), 16000)
    with pytest.raises(AudioError, match=message):
        load_audio(tmp_path / "e.wav")


def test_silence_is_valid_and_detected(tmp_path):
    sf.write(tmp_path / "z.wav", np.zeros(16000, np.float32), 16000)
    y = load_audio(tmp_path / "z.wav")
    assert y.numel() == 16000 and is_silent(y) and not is_silent(torch.from_numpy(tone()))


def test_unreadable_missing_and_damaged_files(tmp_path):
    (tmp_path / "t.wav").write_text("not audio at all")
    with pytest.raises(AudioError, match="not a readable audio file.*WAV"):
        load_audio(tmp_path / "t.wav")
    with pytest.raises(AudioError, match="no such file"):
        load_audio(tmp_path / "missing.wav")
    x = tone()
    x[10] = np.nan
    with pytest.raises(AudioError, match="NaN"):
        load_audio(x, 16000)


def test_audio_error_is_a_value_error():
    assert issubclass(AudioError, ValueError)


# --- synthesis and the corpus ------------------------------------------------------------------

def test_synthesize_returns_16k_audio_and_ordered_word_times():
    wave, words = synthesize("hello brave new world", voice="en-us+f2", rate=150)
    assert wave.dtype == torch.float32 and wave.dim() == 1 and wave.abs().max() <= 1
    assert [w for w, _ in words] == ["hello", "brave", "new", "world"]
    times = [t for _, t in words]
    assert times == sorted(times) and times[-1] < wave.numel() / 16000
    with pytest.raises(ValueError, match="no voice"):
        synthesize("hello", voice="xx-nonexistent")


def test_synthesize_is_repeatable_in_a_fresh_process():
    code = ("import hashlib; from paraformer_edu.synthesis import synthesize\n"
            "w, t = synthesize('hello brave new world', voice='en-us+f2', rate=150)\n"
            "print(hashlib.sha1(w.numpy().tobytes()).hexdigest(), t)")
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) > 40


def test_manifests_have_the_common_form(tiny):
    root, manifests = tiny
    assert set(manifests) == {"train", "dev", "test", "test-voices"}
    for split, path in manifests.items():
        lines = [json.loads(l) for l in path.read_text().splitlines()]
        assert len(lines) == corpus_config("tiny").sizes[split]
        for entry in lines:
            assert not entry["audio_filepath"].startswith("/")  # relative to the manifest
            info = sf.info(path.parent / entry["audio_filepath"])
            assert info.samplerate == 16000 and info.channels == 1 and info.subtype == "PCM_16"
            assert math.isclose(entry["duration"], info.frames / 16000)
            assert entry["text"] and entry["words"]


def test_read_manifest_resolves_paths_and_checks_fields(tiny, tmp_path):
    _, manifests = tiny
    entry = read_manifest(manifests["dev"])[0]
    assert load_audio(entry["audio_filepath"]).numel() == round(entry["duration"] * 16000)
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="audio_filepath"):
        read_manifest(tmp_path / "bad.jsonl")


def test_splits_are_disjoint_and_voices_held_out(tiny):
    _, manifests = tiny
    corpus = {s: read_manifest(p) for s, p in manifests.items()}
    train_texts = {u["text"] for u in corpus["train"]}
    train_voices = set(voice_pool(held_out=False))
    for split in ("dev", "test", "test-voices"):
        assert not {u["text"] for u in corpus[split]} & train_texts
    assert {u["voice"] for u in corpus["test"]} <= train_voices
    assert not {u["voice"] for u in corpus["test-voices"]} & train_voices
    assert not set(voice_pool(held_out=True)) & train_voices


def test_random_word_corpus_text_is_broad_and_deterministic():
    config = corpus_config("words")
    plan = corpus_plan(config)
    words = {w.strip(",.?").lower() for u in plan["train"] for w in u["text"].split()}
    assert len(words) == config.n_words == 1000  # every word of the vocabulary is heard in training
    large = corpus_plan(corpus_config("words-large", sizes={"train": 8000, "dev": 0, "test": 0, "test-voices": 0}))
    assert len({w.strip(",.?").lower() for u in large["train"] for w in u["text"].split()}) >= 5000
    lengths = [len(u["text"].split()) for u in plan["train"]]
    assert min(lengths) == config.min_words and max(lengths) == config.max_words
    assert corpus_plan(config) == plan
    assert corpus_plan(corpus_config("words", seed=1))["train"] != plan["train"]


def test_book_corpus_is_natural_sentences_of_frequent_words():
    config = corpus_config("book")
    plan = corpus_plan(config)
    speech = [u["text"] for u in plan["train"] if u["text"]]
    words = {w for t in speech for w in sentence_words(t)}
    assert set(speech) <= set(wordnet_sentences()) and 3000 < len(words) <= 5000
    assert corpus_plan(config) == plan


def test_corpus_is_cached_and_rebuilt_identically(tiny, tmp_path, monkeypatch):
    root, manifests = tiny
    calls = []
    monkeypatch.setattr(corpus_module, "_synthesize_plan", lambda *a, **k: calls.append(a))
    assert build_corpus(corpus_config("tiny"), root=root) == manifests
    assert calls == []  # the second call synthesises nothing
    monkeypatch.undo()
    small = corpus_config("tiny", sizes={"train": 3, "dev": 2, "test": 0, "test-voices": 2})
    synthesize("something else first", voice="en-us+f4")  # state left in this process must not matter
    a = build_corpus(small, root=tmp_path / "a")
    b = build_corpus(small, root=tmp_path / "b")
    assert set(a) == {"train", "dev", "test-voices"}
    for split in a:
        assert a[split].read_bytes() == b[split].read_bytes()
        for entry in read_manifest(a[split]):
            other = entry["audio_filepath"].replace(str(tmp_path / "a"), str(tmp_path / "b"))
            assert open(entry["audio_filepath"], "rb").read() == open(other, "rb").read()


def test_an_interrupted_build_leaves_no_corpus(tmp_path, monkeypatch):
    config = corpus_config("tiny", sizes={"train": 3, "dev": 1, "test": 1, "test-voices": 1})
    real = corpus_module._synthesize_plan

    def interrupted(folder, plan, **kwargs):
        real(folder, {"train": plan["train"]})  # some files are written, then the run dies
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus_module, "_synthesize_plan", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_corpus(config, root=tmp_path)
    assert [p for p in tmp_path.iterdir() if ".partial" not in p.name] == []
    monkeypatch.undo()
    manifests = build_corpus(config, root=tmp_path)  # starts again and completes
    assert len(read_manifest(manifests["train"])) == 3
    assert len(read_manifest(manifests["test-voices"])) == 1


def test_unknown_corpus_name():
    with pytest.raises(ValueError, match="unknown corpus"):
        corpus_config("huge")


# --- datasets and batching ---------------------------------------------------------------------

def test_bucket_sampler_covers_everything_once_within_budget():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 100, (500,), generator=g).tolist()
    sampler = BucketBatchSampler(lengths, max_frames=400, seed=3)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(500))
        assert all(max(lengths[i] for i in b) * len(b) <= 400 for b in batches)
        assert len(batches) == len(sampler)
    sampler.set_epoch(1)
    first = list(sampler)
    again = BucketBatchSampler(lengths, max_frames=400, seed=3)
    again.set_epoch(1)
    assert list(again) == first  # deterministic from seed and epoch
    again.set_epoch(2)
    assert list(again) != first  # a new order each epoch
    with pytest.raises(ValueError, match="max_frames"):
        BucketBatchSampler([10, 500], max_frames=400)


def test_collate_pads_features_and_targets():
    items = [{"index": i, "text": "ab"[:n], "features": torch.full((n, 3), float(n)),
              "targets": torch.arange(1, n + 1)} for i, n in enumerate([2, 5, 1])]
    batch = collate(items)
    assert batch["features"].shape == (3, 5, 3) and batch["feature_lengths"].tolist() == [2, 5, 1]
    assert batch["targets"].tolist() == [[1, 2, 0, 0, 0], [1, 2, 3, 4, 5], [1, 0, 0, 0, 0]]
    assert batch["target_lengths"].tolist() == [2, 5, 1]
    assert not batch["features"][0, 2:].any() and torch.equal(batch["features"][1], torch.full((5, 3), 5.0))


def test_dataset_lengths_match_features_and_batched_equals_unbatched(tiny):
    _, manifests = tiny
    frontend = Frontend.fit(manifests["train"])
    dataset = SpeechDataset(manifests["dev"], frontend, encode=lambda t: [ord(c) % 7 + 1 for c in t])
    items = [dataset[i] for i in range(len(dataset))]
    assert [it["features"].shape[0] for it in items] == dataset.lengths
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=BucketBatchSampler(dataset.lengths, 600),
                                         collate_fn=collate)
    seen = 0
    for batch in loader:
        for b, i in enumerate(batch["index"].tolist()):
            T, N = batch["feature_lengths"][b], batch["target_lengths"][b]
            assert torch.equal(batch["features"][b, :T], items[i]["features"])
            assert torch.equal(batch["targets"][b, :N], items[i]["targets"])
            seen += 1
    assert seen == len(dataset)


# --- natural sentences: WordNet's examples, split by sentence ------------------------------------

@pytest.fixture(scope="module")
def sentences():
    return wordnet_sentences()


def test_wordnet_sentences_are_many_clean_and_broad(sentences):
    assert len(sentences) > 30_000 and len(set(sentences)) == len(sentences)
    assert all(clean_example(s) == s for s in sentences[:2000])  # cleaning is idempotent
    assert len({w for s in sentences for w in sentence_words(s)}) > 10_000
    assert clean_example("the U.S. army") is None and clean_example("he ran 3 miles") is None
    assert clean_example("leave lots of time for the trip") == "Leave lots of time for the trip."
    assert clean_example("a well-known fact of life") == "A well known fact of life."


def test_near_duplicates_share_a_group_and_a_split():
    texts = ["The party went with a bang.", "The party went with a swing.", "the party, went with a bang",
             "A completely different sentence here.", "Short one two."]
    groups = near_duplicate_groups(texts)
    assert groups[0] == groups[1] == groups[2] and len({groups[0], groups[3], groups[4]}) == 3
    splits = sentence_splits(texts)
    split_of = {s: name for name, ss in splits.items() for s in ss}
    assert split_of[texts[0]] == split_of[texts[1]] == split_of[texts[2]]


def test_sentence_splits_are_disjoint_stable_and_keep_groups_together(sentences):
    splits = sentence_splits(sentences)
    assert sum(map(len, splits.values())) == len(sentences)
    assert all(0.04 < len(splits[s]) / len(sentences) < 0.06 for s in ("dev", "test", "test-voices"))
    train = {" ".join(sentence_words(s)) for s in splits["train"]}
    for split in ("dev", "test", "test-voices"):
        assert not any(" ".join(sentence_words(s)) in train for s in splits[split])
    assert sentence_splits(list(reversed(sentences)))["test"] == list(reversed(splits["test"]))  # order-free


def test_everyday_plans_keep_test_sentences_out_of_training():
    for name in ("book", "everyday-large"):
        config = corpus_config(name)
        plan = corpus_plan(config)
        train = {u["text"] for u in plan["train"]}
        for split in ("dev", "test", "test-voices"):
            texts = [u["text"] for u in plan[split]]
            assert len(texts) == config.sizes[split] == len(set(texts)) and not set(texts) & train
            assert not any("nonspeech" in u or "augment" in u for u in plan[split])  # evaluation stays clean
        held_out = set(voice_pool(held_out=True, variants="all"))
        assert {u["voice"] for u in plan["test-voices"]} <= held_out
        assert not {u["voice"] for u in plan["train"] if "voice" in u} & held_out
        noise = [u for u in plan["train"] if "nonspeech" in u]
        assert 0.01 < len(noise) / len(plan["train"]) < 0.03 and all(u["text"] == "" for u in noise)
    top = set(word_list(5000)[0])
    assert all(all(w in top for w in sentence_words(u["text"])) for u in corpus_plan(corpus_config("book"))["test"])


def test_nonspeech_and_augment_are_deterministic_at_the_asked_level():
    for kind in ("white", "pink", "hum", "clicks"):
        clip = nonspeech(kind, 0.5, -30.0, seed=1)
        assert clip.numel() == 8000 and torch.equal(clip, nonspeech(kind, 0.5, -30.0, seed=1))
        level = 20 * math.log10(clip.pow(2).mean().sqrt())
        assert clip.abs().max() < 1 and (abs(level + 30.0) < 0.5 if kind != "clicks" else level < -29.5)
    wave = torch.from_numpy(tone(1.0))
    out = augment(wave, speed=0.9, seed=3, snr=10.0, rt60=0.3)
    assert abs(out.numel() - 16000 / 0.9) < 2 and torch.equal(out, augment(wave, speed=0.9, seed=3, snr=10.0, rt60=0.3))
    assert torch.allclose(out.abs().max(), wave.abs().max())


def test_an_everyday_corpus_with_nonspeech_and_augmentation_builds(tmp_path):
    config = corpus_config("book", sizes={"train": 10, "dev": 2, "test": 0, "test-voices": 2},
                           nonspeech_share=0.3, augment_share=1.0)
    manifests = build_corpus(config, root=tmp_path)
    train = read_manifest(manifests["train"])
    noise = [e for e in train if "nonspeech" in e]
    assert noise and all(e["text"] == "" and e["words"] == [] for e in noise)
    augmented = [e for e in train if "augment" in e]
    assert augmented and all(e["words"][-1][1] < e["duration"] for e in augmented)  # word times scaled with the speed
    fast = [e for e in augmented if e["augment"]["speed"] != 1.0]
    for e in fast:  # the same sentence and voice, unaugmented: word times differ by the speed factor
        _, words = synthesize(e["text"], e["voice"], e["rate"], e["pitch"], e["pitch_range"])
        assert all(abs(t * e["augment"]["speed"] - t0) < 0.02 for (_, t), (_, t0) in zip(e["words"], words))  # espeak drifts by ms


def test_only_the_splits_asked_for_are_built(tmp_path, monkeypatch):
    config = corpus_config("tiny", sizes={"train": 3, "dev": 2, "test": 0, "test-voices": 2})
    built = []
    real = corpus_module._synthesize_plan
    monkeypatch.setattr(corpus_module, "_synthesize_plan", lambda folder, plan, **k: (built.append(sorted(plan)),
                                                                                      real(folder, plan, **k)))
    dev = build_corpus(config, root=tmp_path, splits=("dev", "test-voices"))
    assert sorted(dev) == ["dev", "test-voices"] and built == [["dev", "test-voices"]]
    whole = build_corpus(config, root=tmp_path)  # only train is missing: only train is synthesised
    assert built[-1] == ["train"] and whole["dev"] == dev["dev"] and len(read_manifest(whole["train"])) == 3
    assert build_corpus(config, root=tmp_path) == whole and len(built) == 2  # cached
    alone = build_corpus(config, root=tmp_path / "alone")  # the same corpus built in one go
    for split in ("train", "dev", "test-voices"):
        assert [e["text"] for e in read_manifest(alone[split])] == [e["text"] for e in read_manifest(whole[split])]
