"""Chapter 11: real-corpus layouts into checked manifests, features on disk, the real recordings."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from paraformer_edu.corpora import (CorpusError, Problem, Row, check_row, common_voice_rows, librispeech_rows, ljspeech_rows, prepare_corpus, prepare_manifest)
from paraformer_edu.corpus import read_manifest
from paraformer_edu.features import DiskFeatures, Frontend, cached_features

ROOT = Path(__file__).resolve().parent.parent


def tone(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A short noisy tone: audio that every format can hold."""
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).normal(0, 0.01, t.size)
    return (0.3 * np.sin(2 * np.pi * 220 * t) + noise).astype("float32")


def write(path: Path, seconds: float, rate: int = 16000, fmt=None, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, tone(seconds, rate, seed), rate, format=fmt)


@pytest.fixture
def librispeech(tmp_path):
    """A LibriSpeech split: two chapters; a missing file, an empty transcript, a 30 s file, a broken one."""
    root = tmp_path / "LibriSpeech" / "dev-clean"
    listing = {"84/121123": ["84-121123-0000 GO DO YOU HEAR", "84-121123-0001 BUT IN LESS THAN FIVE MINUTES",
                             "84-121123-0002 "],
               "174/50561": ["174-50561-0000 FORGOTTEN TOO THE NAME OF GILLIAN", "174-50561-0001 A LONG ONE",
                             "174-50561-0002 NOT AUDIO AT ALL"]}
    for chapter, lines in listing.items():
        folder = root / chapter
        folder.mkdir(parents=True)
        (folder / f"{chapter.replace('/', '-')}.trans.txt").write_text("\n".join(lines) + "\n")
    write(root / "84/121123/84-121123-0000.flac", 1.5)
    write(root / "84/121123/84-121123-0002.flac", 1.0)  # 0001 is missing; 0002 has no text
    write(root / "174/50561/174-50561-0000.flac", 2.0, seed=1)
    write(root / "174/50561/174-50561-0001.flac", 30.0)
    (root / "174/50561/174-50561-0002.flac").write_bytes(b"fLaC but not really")
    return root


def test_librispeech_rows_follow_the_layout(librispeech):
    rows = list(librispeech_rows(librispeech))
    assert [r.audio.name for r in rows] == ["174-50561-0000.flac", "174-50561-0001.flac", "174-50561-0002.flac",
                                            "84-121123-0000.flac", "84-121123-0001.flac", "84-121123-0002.flac"]
    assert rows[3].text == "GO DO YOU HEAR" and rows[3].where.endswith("84-121123.trans.txt:1")


def test_every_bad_row_is_reported_with_its_line_and_the_good_ones_kept(librispeech, tmp_path):
    report = prepare_corpus("librispeech", librispeech, tmp_path / "out" / "dev.jsonl", max_seconds=20)
    assert report.utterances == 2
    reasons = {Path(p.where).name: p.reason for p in report.problems}
    assert set(reasons) == {"174-50561.trans.txt:2", "174-50561.trans.txt:3", "84-121123.trans.txt:2",
                            "84-121123.trans.txt:3"}
    assert reasons["174-50561.trans.txt:2"].startswith("30.0 s, longer than max_seconds=20")
    assert reasons["174-50561.trans.txt:3"].startswith("unreadable audio 174-50561-0002.flac")
    assert reasons["84-121123.trans.txt:2"] == "missing audio file 84-121123-0001.flac"
    assert reasons["84-121123.trans.txt:3"] == "empty transcript"
    entries = read_manifest(report.manifest)
    assert [e["text"] for e in entries] == ["FORGOTTEN TOO THE NAME OF GILLIAN", "GO DO YOU HEAR"]
    assert [e["duration"] for e in entries] == [2.0, 1.5]
    assert report.hours == pytest.approx(3.5 / 3600)
    tsv = (tmp_path / "out" / "dev.problems.tsv").read_text().splitlines()
    assert len(tsv) == 4 and all(line.count("\t") == 1 for line in tsv)


def test_without_a_limit_the_long_file_is_kept(librispeech, tmp_path):
    report = prepare_corpus("librispeech", librispeech, tmp_path / "dev.jsonl")
    assert report.utterances == 3 and len(report.problems) == 3


def test_raise_stops_at_the_first_bad_row_and_writes_nothing(librispeech, tmp_path):
    with pytest.raises(CorpusError, match=r"174-50561.trans.txt:3: unreadable audio"):
        prepare_corpus("librispeech", librispeech, tmp_path / "dev.jsonl", on_problem="raise")
    assert not (tmp_path / "dev.jsonl").exists()
    with pytest.raises(ValueError, match="on_problem must be 'skip' or 'raise'"):
        prepare_corpus("librispeech", librispeech, tmp_path / "dev.jsonl", on_problem="ignore")


def test_wrong_folders_and_layouts_get_clear_errors(tmp_path):
    with pytest.raises(CorpusError, match="no \\*.trans.txt here"):
        list(librispeech_rows(tmp_path))
    with pytest.raises(CorpusError, match="no metadata.csv"):
        list(ljspeech_rows(tmp_path))
    with pytest.raises(CorpusError, match="no such file"):
        list(common_voice_rows(tmp_path / "validated.tsv"))
    with pytest.raises(CorpusError, match="unknown layout 'timit'"):
        prepare_corpus("timit", tmp_path, tmp_path / "x.jsonl")
    (tmp_path / "validated.tsv").write_text("client_id\tfile\ttext\n")
    with pytest.raises(CorpusError, match="needs 'path' and 'sentence' columns"):
        list(common_voice_rows(tmp_path / "validated.tsv"))
    with pytest.raises(CorpusError, match="no usable utterance in 1 rows"):
        prepare_manifest([Row("x:1", tmp_path / "none.wav", "hello")], tmp_path / "x.jsonl")


def test_ljspeech_prefers_the_normalised_text(tmp_path):
    root = tmp_path / "LJSpeech-1.1"
    write(root / "wavs" / "LJ001-0001.wav", 1.0, rate=22050)
    write(root / "wavs" / "LJ001-0002.wav", 1.2, rate=22050)
    (root / "metadata.csv").write_text("LJ001-0001|In 1878, Mr. Smith|In eighteen seventy-eight, Mister Smith\n"
                                       "LJ001-0002|No normalised text|\n\nLJ001-0003|missing|missing\n")
    report = prepare_corpus("ljspeech", root, tmp_path / "lj.jsonl")
    entries = read_manifest(report.manifest)
    assert [e["text"] for e in entries] == ["In eighteen seventy-eight, Mister Smith", "No normalised text"]
    assert entries[0]["duration"] == pytest.approx(1.0, abs=1e-3)
    assert [(Path(p.where).name, p.reason) for p in report.problems] == [
        ("metadata.csv:4", "missing audio file LJ001-0003.wav")]


def test_common_voice_reads_mp3_clips_and_reports_broken_lines(tmp_path):
    root = tmp_path / "cv" / "en"
    write(root / "clips" / "a.mp3", 1.0, rate=48000, fmt="MP3")
    write(root / "clips" / "b.mp3", 1.5, rate=48000, fmt="MP3", seed=2)
    lines = ["client_id\tpath\tsentence\tup_votes", 'x\ta.mp3\tShe said "hello" there\t2',
             "x\tb.mp3\tA second clip\t3", "", "x\tc.mp3\ttoo few fields"]
    (root / "train.tsv").write_text("\n".join(lines) + "\n")
    report = prepare_corpus("common-voice", root / "train.tsv", tmp_path / "cv.jsonl")
    entries = read_manifest(report.manifest)
    assert [e["text"] for e in entries] == ['She said "hello" there', "A second clip"]  # quotes kept as written
    assert entries[1]["duration"] == pytest.approx(1.5, abs=0.06)  # MP3 frames round the length
    assert report.problems == [Problem(f"{root / 'train.tsv'}:5", "3 fields, the header has 4")]
    from paraformer_edu.audio import load_audio
    wave = load_audio(entries[0]["audio_filepath"])  # decoded and resampled to 16 kHz
    assert abs(wave.numel() - 16000) < 0.06 * 16000


def test_jsonl_listing_paths_are_relative_to_it_and_durations_measured(tmp_path):
    write(tmp_path / "data" / "audio" / "0.wav", 1.25)
    lines = [json.dumps({"audio_filepath": "audio/0.wav", "text": "one", "duration": 99.0}),
             '{"audio_filepath": "audio/1.wav"', json.dumps({"text": "no audio"}), json.dumps([1, 2])]
    (tmp_path / "data" / "listing.jsonl").write_text("\n".join(lines) + "\n")
    report = prepare_corpus("jsonl", tmp_path / "data" / "listing.jsonl", tmp_path / "out.jsonl")
    entry = read_manifest(report.manifest)[0]
    assert entry["duration"] == 1.25 and Path(entry["audio_filepath"]).is_absolute()
    assert [p.reason for p in report.problems] == ["not JSON (Expecting ',' delimiter)",
                                                   "needs audio_filepath and text", "needs audio_filepath and text"]


def test_check_row_refuses_empty_audio_and_text_of_punctuation_only(tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype="float32"), 16000)
    write(tmp_path / "ok.wav", 0.5)
    assert check_row(Row("l:1", tmp_path / "empty.wav", "words")).reason == "empty audio empty.wav"
    assert check_row(Row("l:2", tmp_path / "ok.wav", " ... ")).reason == "empty transcript"
    assert check_row(Row("l:3", tmp_path / "ok.wav", "  two   words ")) == {
        "audio_filepath": str((tmp_path / "ok.wav").resolve()), "text": "two words", "duration": 0.5}


def test_cli_prepare_prints_one_json_line_and_the_problems(librispeech, tmp_path):
    out = tmp_path / "ls" / "train.jsonl"
    done = subprocess.run([sys.executable, "-m", "paraformer_edu", "prepare", "librispeech", str(librispeech),
                           "--out", str(out), "--max-seconds", "20"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["utterances"] == 2 and summary["left_out"] == 4
    assert done.stderr.count("\n") == 4 and "missing audio file" in done.stderr
    done = subprocess.run([sys.executable, "-m", "paraformer_edu", "prepare", "librispeech", str(librispeech),
                           "--out", str(out), "--on-problem", "raise"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr


def test_disk_features_equal_the_in_memory_cache(tmp_path):
    entries = []
    for i, seconds in enumerate([0.8, 1.3, 0.5]):
        write(tmp_path / f"{i}.wav", seconds, seed=i)
        entries.append(json.dumps({"audio_filepath": f"{i}.wav", "text": "x", "duration": seconds}))
    manifest = tmp_path / "m.v2.jsonl"  # a dot in the name: the cache keeps its digest
    manifest.write_text("\n".join(entries) + "\n")
    other = tmp_path / "m.v3.jsonl"
    other.write_text("\n".join(entries[:1]) + "\n")
    frontend = Frontend()
    memory = cached_features(manifest, frontend, root=tmp_path / "cache")
    disk = cached_features(manifest, frontend, root=tmp_path / "cache", on_disk=True)
    assert isinstance(disk, DiskFeatures) and len(disk) == 3
    assert disk.lengths == [x.shape[0] for x in memory]
    assert all(torch.equal(a, b) for a, b in zip(memory, disk)) and all(b.dtype == torch.float16 for b in disk)
    assert [x.shape for x in disk[1:]] == [x.shape for x in memory[1:]]
    again = cached_features(manifest, frontend, root=tmp_path / "cache", on_disk=True)  # from the cache
    assert torch.equal(again[2], memory[2])
    assert not list((tmp_path / "cache").glob("*partial*"))
    assert len(cached_features(other, frontend, root=tmp_path / "cache", on_disk=True)) == 1


def test_the_real_recordings_manifest_lists_eleven_read_and_spoken_utterances():
    from paraformer_edu.corpora import real_recordings

    try:
        entries = read_manifest(real_recordings())
    except CorpusError as error:  # a cold cache and no package registry
        if "could not download" not in str(error):
            raise
        pytest.skip(str(error))
    assert len(entries) == 11
    assert entries[0]["text"].startswith("and mister john dashwood")
    assert entries[-1]["text"] == "go forward ten meters"
    assert sum(e["duration"] for e in entries) == pytest.approx(37.2, abs=0.1)


def test_the_source_archive_falls_back_to_pip_and_must_be_pypis_file(tmp_path, monkeypatch):
    import subprocess

    from paraformer_edu import corpora

    monkeypatch.setattr(corpora, "SIMPLE_INDEX", "http://127.0.0.1:9")  # nothing answers there
    calls = []

    def pip(command, returncode, **kwargs):
        calls.append(command)
        (tmp_path / "pocketsphinx-5.1.1.tar.gz").write_bytes(b"not the published archive")
        return subprocess.CompletedProcess(command, returncode)

    monkeypatch.setattr(subprocess, "run", lambda command, **kw: pip(command, 0, **kw))
    with pytest.raises(CorpusError, match="not the file PyPI published"):
        corpora._download_sdist(corpora.POCKETSPHINX, corpora.POCKETSPHINX_SHA256, str(tmp_path))
    assert calls and calls[0][1:4] == ["-m", "pip", "download"]
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: pip(command, 1, **kw))
    with pytest.raises(CorpusError, match="could not download pocketsphinx==5.1.1"):
        corpora._download_sdist(corpora.POCKETSPHINX, corpora.POCKETSPHINX_SHA256, str(tmp_path))


def test_ctc_forced_align_equals_torchaudio_and_brute_force():
    import itertools
    import warnings

    import torchaudio

    from paraformer_edu.corpora import ctc_forced_align

    def collapse(path):
        out = [k for k, _ in itertools.groupby(path)]
        return [k for k in out if k != 0]

    g = torch.Generator().manual_seed(1)
    for trial in range(40):
        T, U = int(torch.randint(4, 30, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        log_probs = torch.randn(T, 6, generator=g).log_softmax(-1)  # (T, V)
        tokens = torch.randint(1, 3, (U,), generator=g).tolist()
        repeats = sum(a == b for a, b in zip(tokens, tokens[1:]))
        if T < U + repeats:
            with pytest.raises(ValueError, match="cannot be aligned"):
                ctc_forced_align(log_probs, tokens)
            continue
        spans = ctc_forced_align(log_probs, tokens)
        labels = [0] * T
        for (a, b), tok in zip(spans, tokens):
            assert a <= b and labels[a:b + 1] == [0] * (b - a + 1)  # spans in order, not overlapping
            labels[a:b + 1] = [tok] * (b - a + 1)
        assert [s[0] for s in spans] == sorted(s[0] for s in spans)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference, _ = torchaudio.functional.forced_align(log_probs[None], torch.tensor([tokens]))
        assert labels == reference[0].tolist()
        if T <= 7:  # every path of the trellis: ours scores as high as the best of them
            best = max(sum(float(log_probs[t, k]) for t, k in enumerate(path))
                       for path in itertools.product(range(3), repeat=T) if collapse(path) == tokens)
            ours = sum(float(log_probs[t, k]) for t, k in enumerate(labels))
            assert ours == pytest.approx(best, abs=1e-5)


def test_pause_cuts_take_the_longest_pause_and_respect_the_limit():
    from paraformer_edu.corpora import pause_cuts

    starts = [0, 6, 30, 36, 41, 60]  # the first frame of six words
    silent = torch.zeros(70, dtype=torch.bool)
    for a, b in [(12, 29), (47, 57), (35, 35)]:  # pauses of 18, 11 and 1 silent frames
        silent[a:b + 1] = True
    assert pause_cuts(starts, silent, limit=60) == [(0, 0), (21, 2), (70, 6)]  # 21 + 49 frames
    assert pause_cuts(starts, silent, limit=40) == [(0, 0), (21, 2), (52, 5), (70, 6)]
    assert pause_cuts(starts, silent, limit=10) == [(0, 0), (21, 2), (52, 5), (70, 6)]  # no more pauses
    assert pause_cuts(starts, silent, limit=100) == [(0, 0), (70, 6)]
    assert pause_cuts(starts, silent, limit=40, min_pause=12) == [(0, 0), (21, 2), (70, 6)]


@pytest.fixture(scope="module")
def book_recognizer():
    from paraformer_edu.inference import load_model

    return load_model(ROOT / "models" / "paraformer-book" / "model.pt")


def test_a_long_recording_is_cut_in_its_silences_with_the_words_of_each_piece(book_recognizer, tmp_path):
    from paraformer_edu.corpus import build_corpus, corpus_config

    test = read_manifest(build_corpus(corpus_config("everyday-large"), splits=("test",))["test"])[:8]
    pause = np.zeros(8000, dtype="float32")
    waves = [sf.read(e["audio_filepath"], dtype="float32")[0] for e in test]
    import torchaudio

    waves = [torchaudio.functional.resample(torch.from_numpy(w), 22050, 16000).numpy() for w in waves]
    ends = np.cumsum([len(w) + len(pause) for w in waves]) / 16000
    sf.write(tmp_path / "long.wav", np.concatenate([np.concatenate([w, pause]) for w in waves]), 16000)
    text = " ".join(e["text"] for e in test)
    (tmp_path / "l.jsonl").write_text(json.dumps({"audio_filepath": "long.wav", "text": text}) + "\n")
    report = prepare_corpus("jsonl", tmp_path / "l.jsonl", tmp_path / "out.jsonl", max_seconds=6,
                            split_with=book_recognizer)
    pieces = read_manifest(report.manifest)
    assert len(pieces) > 2 and not report.problems and all(e["duration"] <= 6 for e in pieces)
    from paraformer_edu.tokenizer import normalize_text

    starts = np.concatenate([[0.0], np.cumsum([e["duration"] for e in pieces])])
    spoken = ends - 0.5  # where each utterance's speech ends, before its half second of silence
    said = [len(normalize_text(u["text"]).split()) for u in test]
    truth = [sum(n for n, t in zip(said, spoken) if t < b) for b in starts[1:-1]]  # words before each cut
    found = np.cumsum([len(e["text"].split()) for e in pieces])[:-1]
    # the alignment of a model with 30% CER is approximate: a word next to a cut may land on its other side
    assert all(abs(f - t) <= 2 for f, t in zip(found, truth)), (found, truth)
    assert sum(f == t for f, t in zip(found, truth)) >= len(truth) // 2
    cuts = np.cumsum([e["duration"] for e in pieces])[:-1]
    assert all(any(end - 0.56 <= c <= end + 0.06 for end in ends) for c in cuts)  # each in a silence
    assert sum(e["duration"] for e in pieces) == pytest.approx(ends[-1], abs=1e-3)
    names = sorted(p.name for p in (tmp_path / "out-pieces").iterdir())
    assert len(names) == len(pieces) and names[0].startswith("long-") and names[0].endswith("-00.flac")
    # without split_with the same recording is left out, and said why
    report = prepare_corpus("jsonl", tmp_path / "l.jsonl", tmp_path / "out2.jsonl", max_seconds=60)
    assert report.utterances == 1
    with pytest.raises(CorpusError, match="l.jsonl:1: .* s, longer than max_seconds=6"):
        prepare_corpus("jsonl", tmp_path / "l.jsonl", tmp_path / "out3.jsonl", max_seconds=6, on_problem="raise")


def test_a_single_word_longer_than_the_limit_is_a_problem(book_recognizer, tmp_path):
    from paraformer_edu.corpus import build_corpus, corpus_config

    e = read_manifest(build_corpus(corpus_config("everyday-large"), splits=("test",))["test"])[0]
    wave, rate = sf.read(e["audio_filepath"], dtype="float32")
    sf.write(tmp_path / "a.wav", wave, rate)
    (tmp_path / "l.jsonl").write_text(json.dumps({"audio_filepath": "a.wav", "text": "supercalifragilistic"}) + "\n")
    with pytest.raises(CorpusError, match="l.jsonl:1: no pause cuts it into pieces of at most 0.5 s"):
        prepare_corpus("jsonl", tmp_path / "l.jsonl", tmp_path / "o.jsonl", max_seconds=0.5,
                       split_with=book_recognizer, on_problem="raise")
    assert not (tmp_path / "o-pieces").exists()  # nothing written for a refused utterance
