"""Chapter 7: metrics against jiwer and torchaudio, configuration, checkpoints, exact resume, the recognizer, the CLI."""

import json
from dataclasses import replace
import random
import shutil
import subprocess
import sys
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

import paraformer_edu
from paraformer_edu.audio import AudioError
from paraformer_edu.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from paraformer_edu.config import apply_override, load_config, save_config
from paraformer_edu.corpus import build_corpus, corpus_config, read_manifest
from paraformer_edu.dataset import SpeechDataset
from paraformer_edu.features import cached_features
from paraformer_edu.inference import load_model
from paraformer_edu.metrics import align, cer, edit_distance, sentence_accuracy, wer
from paraformer_edu.training import Trainer, warmup_lr

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "paraformer.yaml"
BOOK_MODEL = ROOT / "models" / "paraformer-book"
TINY = ["data.corpus=tiny", "model.vocab_size=60", "model.encoder.n_layers=2", "model.encoder.d_model=64",
        "model.encoder.d_ffn=128", "model.decoder_layers=1", "model.decoder_ffn=128", "data.max_frames=600",
        "training.eval_utterances=4", "training.eval_every=1000", "training.log_every=2", "training.warmup_steps=2"]


# --- metrics -------------------------------------------------------------------------------------------------

def random_pairs(n=200, seed=0):
    rng = random.Random(seed)
    words = "a an the cat sat on mat dog ran far away".split()
    pairs = []
    for _ in range(n):
        ref = " ".join(rng.choices(words, k=rng.randint(1, 8)))
        hyp = " ".join(rng.choices(words, k=rng.randint(0, 8)))
        pairs.append((ref, hyp))
    return pairs


def test_edit_distance_equals_torchaudio_on_characters_and_words():
    for ref, hyp in random_pairs():
        assert edit_distance(ref, hyp) == torchaudio.functional.edit_distance(ref, hyp)
        assert edit_distance(ref.split(), hyp.split()) == torchaudio.functional.edit_distance(ref.split(), hyp.split())


def test_alignment_counts_add_up_to_the_distance():
    for ref, hyp in random_pairs():
        counts = align(ref.split(), hyp.split()).counts()
        assert counts["S"] + counts["D"] + counts["I"] == edit_distance(ref.split(), hyp.split())
        assert counts["="] + counts["S"] + counts["D"] == len(ref.split())
        assert counts["="] + counts["S"] + counts["I"] == len(hyp.split())


def test_cer_and_wer_equal_jiwer_over_a_corpus():
    pairs = [(r, h) for r, h in random_pairs() if h]  # jiwer refuses empty hypotheses in some versions
    refs, hyps = zip(*pairs)
    assert cer(refs, hyps) == pytest.approx(jiwer.cer(list(refs), list(hyps)), abs=1e-12)
    assert wer(refs, hyps) == pytest.approx(jiwer.wer(list(refs), list(hyps)), abs=1e-12)


def test_error_rates_of_known_cases():
    assert wer(["the cat sat"], ["a cat sat down"]) == pytest.approx(2 / 3)
    assert cer(["abc"], [""]) == 1.0 and cer(["abc"], ["abc"]) == 0.0
    assert wer(["a"], ["b c d"]) == 3.0  # insertions make it exceed 100%
    assert sentence_accuracy(["a b", "c"], ["a b", "d"]) == 0.5
    with pytest.raises(ValueError, match="references are empty"):
        cer([""], ["x"])
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        wer(["a", "b"], ["a"])


# --- configuration -----------------------------------------------------------------------------------------

def test_recipe_loads_and_overrides_apply():
    config = load_config(RECIPE, ["training.lr=3e-4", "model.encoder.n_layers=4", "data.spec_augment=false"])
    assert config.training.lr == 3e-4 and config.model.encoder.n_layers == 4 and config.data.spec_augment is False
    assert load_config(RECIPE).training.lr == 2e-3


@pytest.mark.parametrize("override, message", [
    ("training.lrate=1", "unknown setting training.lrate"),
    ("model.encoder.width=1", "unknown setting model.encoder.width"),
    ("training.lr=fast", "training.lr must be float"),
    ("model.encoder.n_layers=4.5", "model.encoder.n_layers must be int"),
    ("training.max_steps=true", "training.max_steps must be int"),
    ("training.lr", "not of the form section.key=value"),
])
def test_bad_overrides_are_refused_by_name(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(RECIPE, [override])


def test_config_round_trips_through_yaml(tmp_path):
    config = load_config(RECIPE, ["training.seed=7"])
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config
    assert apply_override({}, "a.b=1") == {"a": {"b": 1}}


def test_warmup_schedule():
    assert warmup_lr(1, 1e-3, 100) == pytest.approx(1e-5)
    assert warmup_lr(100, 1e-3, 100) == pytest.approx(1e-3)
    assert warmup_lr(400, 1e-3, 100) == pytest.approx(5e-4)
    assert max(warmup_lr(s, 1e-3, 100) for s in range(1, 1000)) == pytest.approx(1e-3)


# --- features, trainer, resume --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A trained-for-a-few-steps tiny model and its run folder."""
    folder = tmp_path_factory.mktemp("tiny")
    trainer = Trainer(load_config(RECIPE, TINY), folder / "run")
    trainer.train(max_minutes=0, max_steps=6)
    return trainer


def test_cached_features_equal_the_front_end(tiny):
    manifest = tiny.manifests["dev"]
    raw = cached_features(manifest, paraformer_edu.Frontend())
    for entry, x in zip(read_manifest(manifest)[:3], raw):
        fresh = paraformer_edu.Frontend().raw(paraformer_edu.load_audio(entry["audio_filepath"]))
        assert x.dtype == torch.float16 and x.shape == fresh.shape
        assert (x.float() - fresh).abs().max() < 0.02
    fitted = paraformer_edu.Frontend.fit(manifest, max_utterances=3)
    expected = torch.cat([x.float() for x in raw[:3]])  # (T, 560): the cached features of the first 3
    assert torch.allclose(fitted.cmvn.mean, expected.mean(0), atol=1e-4)


def test_spec_augment_is_a_function_of_seed_epoch_and_utterance(tiny):
    dataset = tiny.train_set
    assert not dataset.augment, "the recipe starts SpecAugment only at step 4000"
    clean = dataset[3]["features"]
    dataset.augment = True
    a = dataset[3]["features"]
    assert not torch.equal(a, clean)
    epoch = dataset.epoch
    dataset.epoch = epoch + 1
    b = dataset[3]["features"]
    dataset.epoch = epoch
    assert torch.equal(a, dataset[3]["features"]) and not torch.equal(a, b)
    dataset.augment = False


def test_spec_augment_starts_at_its_step(tmp_path):
    trainer = Trainer(load_config(RECIPE, TINY + ["data.spec_augment_from=3"]), tmp_path / "run")
    seen = []
    batches = trainer.batches()
    for _ in range(5):
        next(batches)
        seen.append(trainer.train_set.augment)
        trainer.step += 1
    assert seen == [False, False, False, True, True]


def test_training_logs_every_loss_part_and_checkpoints(tiny):
    rows = [r for r in tiny.log if "loss" in r]
    assert rows and all(k in rows[0] for k in ("loss", "loss_ce", "loss_ctc", "loss_quantity", "glm_replaced", "lr"))
    assert any("dev_cer" in r for r in tiny.log)
    assert (tiny.out_dir / "latest.pt").exists() and (tiny.out_dir / "best.pt").exists()
    lines = (tiny.out_dir / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == len(tiny.log) and json.loads(lines[-1])["step"] == 6


def test_precision_auto_is_float32_on_cpu_and_bfloat16_trains_close_to_it(tmp_path):
    """training.precision (mixed precision on GPUs): auto changes nothing on a CPU; bfloat16 autocast
    gives the same first loss within bfloat16's rounding; an unknown format is refused by name."""
    losses, chosen = {}, {}
    for precision in ("float32", "auto", "bfloat16"):
        settings = TINY + [f"training.precision={precision}", "training.device=cpu"]
        trainer = Trainer(load_config(RECIPE, settings), tmp_path / precision)
        trainer.train(max_minutes=0, max_steps=2)
        losses[precision], chosen[precision] = [r["loss"] for r in trainer.log if "loss" in r], trainer.precision
    assert chosen == {"float32": "float32", "auto": "float32", "bfloat16": "bfloat16"}
    assert losses["auto"] == losses["float32"]
    assert all(np.isfinite(losses["bfloat16"]))
    assert losses["bfloat16"][0] == pytest.approx(losses["float32"][0], rel=0.03)
    with pytest.raises(ValueError, match="training.precision='fp8'.*auto, float32 or bfloat16"):
        Trainer(load_config(RECIPE, TINY + ["training.precision=fp8"]), tmp_path / "bad")


def test_the_front_end_stacks_frames_as_the_model_config_says(tmp_path):
    """LFR m/n follow model.encoder.d_input and model.frame_shift (40-ms frames: 5 stacked every 4)."""
    trainer = Trainer(load_config(RECIPE, TINY + ["model.encoder.d_input=400", "model.frame_shift=0.04"]), tmp_path)
    assert (trainer.frontend.lfr_m, trainer.frontend.lfr_n) == (5, 4)
    item = trainer.train_set[0]
    assert item["features"].shape[1] == 400
    trainer.train(max_minutes=0, max_steps=1)
    with pytest.raises(ValueError, match="d_input=500 must be a multiple of 80"):
        Trainer(load_config(RECIPE, TINY + ["model.encoder.d_input=500"]), tmp_path / "bad")


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    config = load_config(RECIPE, TINY)
    straight = Trainer(config, tmp_path / "a")
    straight.train(max_minutes=0, max_steps=7)
    first = Trainer(config, tmp_path / "b")
    first.train(max_minutes=0, max_steps=3)
    resumed = Trainer.resume(tmp_path / "b" / "latest.pt")
    assert (resumed.step, resumed.epoch, resumed.batch_in_epoch) == (first.step, first.epoch, first.batch_in_epoch)
    resumed.train(max_minutes=0, max_steps=7)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda t: [r["loss"] for r in t.log if "loss" in r and r["step"] > 4]  # noqa: E731
    assert losses(straight) == losses(resumed)


def test_resume_drops_log_rows_written_after_the_checkpoint(tmp_path):
    """A run killed after its checkpoint logged more rows: resuming keeps the log file free of repeated steps."""
    config = load_config(RECIPE, TINY)
    first = Trainer(config, tmp_path / "run")
    first.train(max_minutes=0, max_steps=3)  # latest.pt at step 3
    shutil.copy(tmp_path / "run" / "latest.pt", tmp_path / "step3.pt")
    first.train(max_minutes=0, max_steps=6)  # rows of steps 4 and 6 logged, then "killed"
    shutil.copy(tmp_path / "step3.pt", tmp_path / "run" / "latest.pt")
    resumed = Trainer.resume(tmp_path / "run" / "latest.pt")
    resumed.train(max_minutes=0, max_steps=6)
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    keys = [(r["step"], "loss" in r) for r in rows]
    assert len(keys) == len(set(keys)) and rows == resumed.log


def test_a_resume_with_other_settings_logs_what_changed(tmp_path):
    first = Trainer(load_config(RECIPE, TINY), tmp_path / "run")
    first.train(max_minutes=0, max_steps=2)
    same = Trainer.resume(tmp_path / "run" / "latest.pt")
    assert not any("resumed_with" in r for r in same.log)  # nothing changed, nothing logged
    other = load_config(RECIPE, TINY + ["training.lr=1e-4", "data.spec_augment=false"])
    resumed = Trainer.resume(tmp_path / "run" / "latest.pt", config=other)
    assert resumed.log[-1] == {"step": 2, "resumed_with": {"data.spec_augment": [True, False],
                                                           "training.lr": [0.002, 0.0001]}}
    resumed.train(max_minutes=0, max_steps=4)
    rows = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert rows == resumed.log and sum("resumed_with" in r for r in rows) == 1


def test_resume_refuses_another_model_configuration(tiny):
    other = load_config(RECIPE, TINY + ["model.encoder.n_layers=3"])
    with pytest.raises(CheckpointError, match=r"model.encoder.n_layers: checkpoint 2, config 3"):
        Trainer.resume(tiny.out_dir / "latest.pt", config=other)
    with pytest.raises(ValueError, match="no training state"):
        Trainer.resume(tiny.out_dir / "best.pt")


# --- checkpoints ------------------------------------------------------------------------------------------------

def test_checkpoint_round_trip_in_float32_and_float16(tiny, tmp_path):
    for half in (False, True):
        path = tmp_path / f"m{half}.pt"
        save_checkpoint(path, tiny.model, tiny.tokenizer, tiny.frontend, tiny.config, half=half)
        model, tokenizer, frontend, config = model_from_checkpoint(load_checkpoint(path))
        assert config == tiny.config and tokenizer.tokens == tiny.tokenizer.tokens
        assert torch.equal(frontend.cmvn.mean, tiny.frontend.cmvn.mean)
        ours, theirs = model.state_dict(), tiny.model.state_dict()
        worst = max((ours[k] - theirs[k].float()).abs().max().item() for k in ours)
        assert worst == 0 if not half else worst < 1e-2
    assert not list(tmp_path.glob("*.partial-*")), "no half-written files are left behind"


def test_bad_checkpoints_get_clear_errors(tiny, tmp_path):
    good = tiny.out_dir / "best.pt"
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:5000])
    (tmp_path / "text.pt").write_text("hello")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    for name in ("cut.pt", "text.pt"):
        with pytest.raises(CheckpointError, match="not a readable paraformer_edu checkpoint"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="expected a 'paraformer-edu checkpoint 1' file"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save(Path("x"), tmp_path / "unsafe.pt")  # a pickled object: weights_only refuses it
    with pytest.raises(CheckpointError, match="refused for safety"):
        load_checkpoint(tmp_path / "unsafe.pt")
    payload = load_checkpoint(good)
    payload["model"]["decoder.output.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"do not fit .*decoder.output.weight: checkpoint \(3, 3\), model \(60, 64\)"):
        model_from_checkpoint(payload)
    del payload["model"]["decoder.output.weight"]
    with pytest.raises(CheckpointError, match="decoder.output.weight: checkpoint missing"):
        model_from_checkpoint(payload)


def test_kept_checkpoints_are_the_last_evaluations_and_average_to_their_mean(tmp_path):
    config = load_config(RECIPE, TINY + ["training.eval_every=2", "training.keep_checkpoints=2"])
    trainer = Trainer(config, tmp_path / "run")
    trainer.train(max_minutes=0, max_steps=6)
    kept = sorted((tmp_path / "run" / "checkpoints").glob("*.pt"))
    assert [p.name for p in kept] == ["step-0000004.pt", "step-0000006.pt"]  # step 2's was dropped
    assert [load_checkpoint(p)["step"] for p in kept] == [4, 6]
    # a float16 copy of one of them averages like its float32 self (to float16's precision)
    save_checkpoint(tmp_path / "half.pt", trainer.model, trainer.tokenizer, trainer.frontend, config, half=True)
    for paths, tolerance in ((kept, 1e-7), ([kept[0], tmp_path / "half.pt"], 1e-3)):
        payload = paraformer_edu.average_checkpoints(paths, tmp_path / "mean.pt")
        a, b = (load_checkpoint(p)["model"] for p in paths)
        worst = max((payload["model"][k] - (a[k].float() + b[k].float()) / 2).abs().max().item() for k in a)
        assert worst < tolerance and payload["averaged_from"] == [str(p) for p in paths]
    # a checkpoint like any other: it loads, transcribes, and has no training state to resume from
    recognizer = load_model(tmp_path / "mean.pt")
    assert all(torch.equal(v, payload["model"][k]) for k, v in recognizer.model.state_dict().items())
    audio = read_manifest(trainer.manifests["test"])[0]["audio_filepath"]
    assert isinstance(recognizer.transcribe(audio), str)
    with pytest.raises(ValueError, match="no training state"):
        Trainer.resume(tmp_path / "mean.pt")
    # a latest.pt (weights and training state) averages too; its step is the trainer's
    latest = paraformer_edu.average_checkpoints([kept[0], tmp_path / "run" / "latest.pt"], tmp_path / "m2.pt")
    assert latest["step"] == 6 and "trainer" not in latest


def test_averaging_refuses_one_checkpoint_and_checkpoints_of_other_models(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="two or more checkpoints, got 1"):
        paraformer_edu.average_checkpoints([tiny.out_dir / "best.pt"], tmp_path / "x.pt")
    other = paraformer_edu.Paraformer(replace(tiny.config.model, decoder_layers=2))
    save_checkpoint(tmp_path / "other.pt", other, tiny.tokenizer, tiny.frontend,
                    replace(tiny.config, model=replace(tiny.config.model, decoder_layers=2)))
    with pytest.raises(CheckpointError, match="hold different models .*average checkpoints of one run"):
        paraformer_edu.average_checkpoints([tiny.out_dir / "best.pt", tmp_path / "other.pt"], tmp_path / "x.pt")
    misfit = paraformer_edu.Paraformer(replace(tiny.config.model, vocab_size=50))  # its config says 60
    save_checkpoint(tmp_path / "misfit.pt", misfit, tiny.tokenizer, tiny.frontend, tiny.config)
    with pytest.raises(CheckpointError, match="weight shapes"):
        paraformer_edu.average_checkpoints([tiny.out_dir / "best.pt", tmp_path / "misfit.pt"], tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
    done = run_cli("average", tiny.out_dir / "best.pt", tiny.out_dir / "latest.pt", "--out", tmp_path / "y.pt")
    assert done.returncode == 0 and "averaged 2 checkpoints" in done.stdout, done.stderr
    done = run_cli("average", tiny.out_dir / "best.pt", tmp_path / "other.pt", "--out", tmp_path / "z.pt")
    assert done.returncode == 2 and done.stderr.startswith("error:") and "Traceback" not in done.stderr


# --- the recognizer ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def recognizer(tiny):
    return load_model(tiny.out_dir / "best.pt")


def test_transcribe_paths_waveforms_and_lists_alike(recognizer, tiny, tmp_path):
    entries = read_manifest(tiny.manifests["test"])[:4]
    paths = [e["audio_filepath"] for e in entries]
    one_by_one = [recognizer.transcribe(p) for p in paths]
    assert recognizer.transcribe(paths) == one_by_one  # batched equals unbatched
    wave = paraformer_edu.load_audio(paths[0])
    assert recognizer.transcribe(wave, sample_rate=16000) == one_by_one[0]
    assert recognizer.transcribe(wave.numpy(), sample_rate=16000) == one_by_one[0]
    t = recognizer.transcribe(paths[0], timestamps=True)
    assert t.text == one_by_one[0] and len(t.tokens) == len(t.timestamps)
    assert all(0 <= s <= e for s, e in t.timestamps)
    assert " ".join(w for w, _, _ in t.words) == t.text


def test_words_merge_tokens_at_word_boundaries():
    t = paraformer_edu.Transcript("the cats", ["\u2581the", "\u2581ca", "ts", "<sos>"],
                                  [(0.0, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 0.4)])
    assert t.words == [("the", 0.0, 0.1), ("cats", 0.1, 0.3)]


def test_transcribe_converts_rate_and_channels(recognizer, tiny, tmp_path):
    path = read_manifest(tiny.manifests["test"])[0]["audio_filepath"]
    wave = paraformer_edu.load_audio(path)
    stereo_44k = torchaudio.functional.resample(wave, 16000, 44100)
    sf.write(tmp_path / "s.wav", torch.stack([stereo_44k, stereo_44k], 1).numpy(), 44100)
    text = recognizer.transcribe(tmp_path / "s.wav")
    assert isinstance(text, str)  # converted, not refused; the words may differ slightly after resampling


def test_one_input_or_a_list_is_the_explicit_rule(recognizer, tiny):
    wave = paraformer_edu.load_audio(read_manifest(tiny.manifests["dev"])[0]["audio_filepath"])  # (S,)
    text = recognizer.transcribe(wave, sample_rate=16000)
    assert recognizer.transcribe((wave, wave), sample_rate=16000) == [text, text]  # a tuple is a batch
    assert recognizer.transcribe(torch.stack([wave, wave]), sample_rate=16000) == text  # (2, S): one stereo clip
    with pytest.raises(AudioError, match="not one clip"):
        recognizer.transcribe(torch.stack([wave] * 3), sample_rate=16000)  # (3, S): a batch? refused
    with pytest.raises(AudioError, match="cannot transcribe a dict"):
        recognizer.transcribe({"audio": wave}, sample_rate=16000)


def test_training_on_empty_transcripts_and_init_from_a_checkpoint(tiny, tmp_path):
    """Non-speech clips (transcript "") train with finite losses; --init starts from a checkpoint's weights."""
    config = corpus_config("book", sizes={"train": 24, "dev": 4, "test": 0, "test-voices": 0},
                           nonspeech_share=0.5, augment_share=0.5)
    manifests = build_corpus(config, root=tmp_path / "corpus")
    assert any(e["text"] == "" for e in read_manifest(manifests["train"]))
    recipe = load_config(RECIPE, TINY + ["data.max_frames=2000"])
    trainer = Trainer(recipe, tmp_path / "run", manifests=manifests, init=tiny.out_dir / "latest.pt")
    assert trainer.tokenizer.tokens == tiny.tokenizer.tokens  # the checkpoint's vocabulary, not a new BPE
    assert all(torch.equal(a, b) for a, b in zip(trainer.model.state_dict().values(), tiny.model.state_dict().values()))
    assert trainer.step == 0  # a new run: new optimiser, new warm-up
    trainer.train(max_minutes=0, max_steps=3)
    rows = [r for r in trainer.log if "loss" in r]
    assert rows and all(np.isfinite(r[k]) for r in rows for k in ("loss", "loss_ce", "loss_ctc", "loss_quantity"))
    resumed = Trainer.resume(tmp_path / "run" / "latest.pt", manifests=manifests)  # keeps the run's own vocabulary
    assert resumed.step == 3 and resumed.tokenizer.tokens == tiny.tokenizer.tokens
    with pytest.raises(CheckpointError, match="another model configuration"):
        Trainer(load_config(RECIPE, TINY + ["model.encoder.n_layers=3"]), tmp_path / "x", manifests=manifests,
                init=tiny.out_dir / "latest.pt")


def test_trainer_leaves_the_callers_threads_and_random_state_alone(tmp_path):
    torch.set_num_threads(1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    trainer = Trainer(load_config(RECIPE, TINY), tmp_path / "run")
    trainer.train(max_minutes=0, max_steps=2)
    assert torch.get_num_threads() == 1 and torch.equal(torch.get_rng_state(), before)
    torch.set_num_threads(2)


def test_silence_gives_empty_text_and_bad_audio_a_clear_error(recognizer, tmp_path):
    assert recognizer.transcribe(torch.zeros(32000), sample_rate=16000) == ""
    assert recognizer.transcribe([torch.zeros(16000), torch.zeros(8000)], sample_rate=16000) == ["", ""]
    with pytest.raises(AudioError, match="ms long"):
        recognizer.transcribe(torch.zeros(100), sample_rate=16000)
    with pytest.raises(AudioError, match="empty"):
        recognizer.transcribe(np.zeros(0, dtype=np.float32), sample_rate=16000)
    with pytest.raises(AudioError, match="without its sample rate"):
        recognizer.transcribe(torch.zeros(16000))
    (tmp_path / "x.wav").write_text("not audio")
    with pytest.raises(AudioError, match="not a readable audio file"):
        recognizer.transcribe(tmp_path / "x.wav")


# --- the command line -----------------------------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "paraformer_edu", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)


def test_cli_transcribe_prints_path_tab_text(tiny, recognizer, tmp_path):
    paths = [e["audio_filepath"] for e in read_manifest(tiny.manifests["test"])[:2]]
    (tmp_path / "list.txt").write_text(paths[1] + "\n")
    done = run_cli("transcribe", "--checkpoint", tiny.out_dir / "best.pt", paths[0], "--list", tmp_path / "list.txt")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == paths
    assert [line.split("\t")[1] for line in lines] == recognizer.transcribe(paths)
    bad = run_cli("transcribe", "--checkpoint", tiny.out_dir / "best.pt", tmp_path / "missing.wav", paths[0])
    assert bad.returncode == 1 and "no such file" in bad.stderr and bad.stdout.startswith(paths[0])


def test_cli_evaluate_ends_with_one_json_line(tiny):
    done = run_cli("evaluate", "--checkpoint", tiny.out_dir / "best.pt", "--manifest", tiny.manifests["test"])
    assert done.returncode == 0, done.stderr
    final = json.loads(done.stdout.splitlines()[-1])
    assert {"cer", "wer", "utterances", "rtf"} <= final.keys() and final["utterances"] == 8
    assert final["rtf"] > 0  # reported; how fast is the benchmarks' business, not a test's


def test_cli_reports_bad_checkpoints_and_configs_without_a_traceback(tmp_path):
    (tmp_path / "bad.pt").write_text("x")
    done = run_cli("transcribe", "--checkpoint", tmp_path / "bad.pt", "a.wav")
    assert done.returncode == 2 and done.stderr.startswith("error:") and "Traceback" not in done.stderr
    done = run_cli("train", "--config", RECIPE, "--override", "training.lrate=1", "--out", tmp_path / "r")
    assert done.returncode == 2 and "unknown setting training.lrate" in done.stderr


def test_cli_train_and_resume(tmp_path):
    args = ["--config", RECIPE, "--out", tmp_path / "run", "--override", *TINY, "training.max_minutes=0",
            "training.max_steps=2"]
    done = run_cli("train", *args)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["step"] == 2
    again = run_cli("train", *args)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = run_cli("train", "--resume", tmp_path / "run" / "latest.pt", "--config", RECIPE, "--override", *TINY,
                      "training.max_minutes=0", "training.max_steps=4")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.splitlines()[-1])["step"] == 4
    more = run_cli("train", "--resume", tmp_path / "run" / "latest.pt", "--override", "training.max_steps=5",
                   "training.threads=1")  # no --config: the run's own recipe, overridden
    assert more.returncode == 0, more.stderr
    assert json.loads(more.stdout.splitlines()[-1])["step"] == 5


def test_a_release_counts_every_run_it_continued(tiny, tmp_path):
    """tools/release_model.py --continues RELEASED RUN: steps, time, log and settings of the whole chain."""
    sys.path.insert(0, str(ROOT / "tools"))
    from release_model import earlier_training

    released = tmp_path / "released"
    released.mkdir()
    save_config(tiny.config, released / "config.yaml")
    (released / "metrics.json").write_text(json.dumps({"steps": 4, "train_hours": 1.0}))
    rows = [{"step": s, "train_seconds": 10.0 * s, "loss": 1.0} for s in (2, 4, 6)]  # 6: after its weights
    (released / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    more = Trainer(replace(tiny.config, training=replace(tiny.config.training, lr=1e-4)), tmp_path / "more",
                   init=tiny.out_dir / "best.pt")
    more.train(max_minutes=0, max_steps=3)
    resumed = Trainer.resume(tmp_path / "more" / "latest.pt", config=replace(
        more.config, data=replace(more.config.data, spec_augment=False)))  # resumed with SpecAugment off
    resumed.train(max_minutes=0, max_steps=5)
    steps, seconds, log, history = earlier_training([released, tmp_path / "more"])
    assert steps == 4 + 5 and seconds == pytest.approx(3600 + resumed.train_seconds)
    assert [r["step"] for r in log if "loss" in r] == [2, 4, 4 + 2, 4 + 3, 4 + 4, 4 + 5]
    assert [r.get("continued_from") for r in log if r["step"] > 4][0] == str(released)
    assert [h["steps"] for h in history] == [[0, 4], [4, 7], [7, 9]]
    assert history[1]["settings"] == {"training.lr": 1e-4}  # only what the continuation changed
    assert history[2] == {"run": str(tmp_path / "more"), "steps": [7, 9], "resumed": True,
                          "settings": {"data.spec_augment": False}}


# --- the book's committed model ------------------------------------------------------------------------------

def test_book_model_is_small_and_reaches_its_recorded_dev_cer():
    assert (BOOK_MODEL / "model.pt").stat().st_size < 20 * 2**20
    recorded = json.loads((BOOK_MODEL / "metrics.json").read_text())
    book = load_model(BOOK_MODEL / "model.pt")
    manifests = build_corpus(corpus_config(book.config.data.corpus), splits=("dev",))
    from paraformer_edu.training import evaluate

    scores = evaluate(book.model, SpeechDataset(manifests["dev"], book.frontend, book.tokenizer.encode), book.tokenizer)
    assert abs(scores["cer"] - recorded["dev"]["cer"]) < 0.005
    assert scores["cer"] < 0.4, "the committed model transcribes (the random-word model made 42% of such sentences)"


def test_book_model_says_nothing_for_noise_hum_and_clicks():
    """The corpus's non-speech clips taught it silence: fresh clips (seeds no training clip used) give ''."""
    from paraformer_edu.corpus import NONSPEECH, nonspeech

    book = load_model(BOOK_MODEL / "model.pt")
    clips = [nonspeech(kind, 2.0, level, seed=2**31 + i) for i, kind in enumerate(NONSPEECH) for level in (-40, -20)]
    assert book.transcribe(clips, sample_rate=16000) == [""] * len(clips)


def test_book_model_with_the_language_model_beats_greedy_on_dev():
    """Chapter 9: beam search with the WordNet n-gram LM, at the weight recorded at release, lowers the dev CER."""
    from paraformer_edu.beam_search import LMSearch
    from paraformer_edu.language_model import book_language_model
    from paraformer_edu.training import evaluate

    recorded = json.loads((BOOK_MODEL / "metrics.json").read_text())
    book = load_model(BOOK_MODEL / "model.pt")
    dev = SpeechDataset(build_corpus(corpus_config(book.config.data.corpus), splits=("dev",))["dev"], book.frontend,
                        book.tokenizer.encode)
    search = LMSearch(book_language_model(book.tokenizer), recorded["lm"]["weight"], recorded["lm"]["beam"])
    fused = evaluate(book.model, dev, book.tokenizer, max_utterances=200, search=search)
    greedy = evaluate(book.model, dev, book.tokenizer, max_utterances=200)
    assert fused["cer"] < greedy["cer"] and fused["wer"] < greedy["wer"]


def test_step_seconds_leaves_out_a_pause():
    """A step paused with SIGSTOP counts the CPU time it ran, not the pause (train_seconds)."""
    import signal
    import time

    from paraformer_edu.training import step_seconds

    assert step_seconds(0.3, 0.6) == 0.3 and step_seconds(0.3, 0.01) == 0.3  # short steps: wall clock
    assert step_seconds(120.0, 0.9) == 0.9 and step_seconds(2.0, 1.5) == 2.0
    child = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time\n"
            "from paraformer_edu.training import step_seconds\n"
            "tick, cpu = time.perf_counter(), time.process_time()\n"
            "print('go', flush=True)  # the clocks run before the pause can come\n"
            "x = 0\n"
            "while time.process_time() - cpu < 1.0: x += 1\n"
            "wall, cpu = time.perf_counter() - tick, time.process_time() - cpu\n"
            "print(wall, step_seconds(wall, cpu))\n")],
        stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "go"
    child.send_signal(signal.SIGSTOP)
    time.sleep(4.0)
    child.send_signal(signal.SIGCONT)
    wall, counted = map(float, child.communicate(timeout=120)[0].split())
    assert wall > 4.0 and counted < wall - 3.0, (wall, counted)


# --- the auxiliary phoneme CTC loss (training.phoneme_ctc) ---------------------------------------------------

def test_espeak_phonemes_and_their_ctc_targets():
    from paraformer_edu.phonemes import OTHER_PHONEME, PHONEME_IDS, espeak_phonemes, phoneme_targets
    assert espeak_phonemes("Tomorrow morning.") == ("t", "ə", "m", "ɑː", "ɹ", "oʊ", "m", "ɔːɹ", "n", "ɪ", "ŋ")
    assert espeak_phonemes("") == ()
    flat, lengths = phoneme_targets(["the cat", "", "the"])
    assert lengths.tolist() == [5, 0, 2] and flat.tolist()[:2] == flat.tolist()[-2:]
    assert phoneme_targets(["THE CAT!"])[0].tolist() == phoneme_targets(["the cat"])[0].tolist()  # as spoken
    assert flat.min() >= 1 and OTHER_PHONEME == len(PHONEME_IDS) + 1 and OTHER_PHONEME not in flat.tolist()


def test_phoneme_head_reads_its_layer_and_trains_only_the_layers_below():
    from paraformer_edu.encoder import EncoderConfig, SANMEncoder
    from paraformer_edu.phonemes import PhonemeCTC
    torch.manual_seed(0)
    encoder = SANMEncoder(EncoderConfig(d_model=32, n_heads=2, n_layers=3, d_ffn=64, dropout=0.0)).train()
    head = PhonemeCTC(encoder, layer=1)
    x, lengths = torch.randn(2, 40, 560), torch.tensor([40, 30])
    encoder(x, lengths)
    texts = ["a cat", "the dog ran"]
    loss = head.loss(lengths, texts)
    assert head.hidden is None
    alone = []  # each utterance on its own, without padding: batched equals unbatched
    for i, n in enumerate(lengths.tolist()):
        encoder(x[i : i + 1, :n], lengths[i : i + 1])
        alone.append(head.loss(lengths[i : i + 1], texts[i : i + 1]))
    assert torch.allclose(loss, torch.stack(alone).mean(), atol=1e-5)
    loss.backward()
    assert [any(p.grad is not None for p in layer.parameters()) for layer in encoder.layers] == [True, False, False]
    with pytest.raises(ValueError, match="phoneme_layer=4: the encoder has 3 layers; choose 1..3"):
        PhonemeCTC(encoder, layer=4)
    encoder.eval()(x, lengths)
    assert head.hidden is None  # inference keeps nothing
    with pytest.raises(RuntimeError, match="training-mode pass of the encoder"):
        head.loss(lengths, texts)
    head.hook.remove()
    encoder.train()(x, lengths)
    assert head.hidden is None  # detached
    one = SANMEncoder(EncoderConfig(d_model=32, n_heads=2, n_layers=1, d_ffn=64))
    assert PhonemeCTC(one).k == 1 and PhonemeCTC(encoder).k == 1  # the middle of 1 and of 3 layers


def test_phoneme_ctc_trains_logs_and_resumes_exactly(tmp_path):
    settings = TINY + ["training.phoneme_ctc=0.3"]
    config = load_config(RECIPE, settings)
    straight = Trainer(config, tmp_path / "a")
    straight.train(max_minutes=0, max_steps=6)
    rows = [r for r in straight.log if "loss" in r]
    assert all(np.isfinite(r["loss_phoneme"]) and r["loss_phoneme"] > 0 for r in rows)
    plain = Trainer(load_config(RECIPE, TINY), tmp_path / "plain")
    plain.train(max_minutes=0, max_steps=2)
    assert rows[0]["loss"] != [r for r in plain.log if "loss" in r][0]["loss"]  # the head adds its loss
    first = Trainer(config, tmp_path / "b")
    first.train(max_minutes=0, max_steps=3)
    resumed = Trainer.resume(tmp_path / "b" / "latest.pt")
    resumed.train(max_minutes=0, max_steps=6)
    for a, b in ((straight.phoneme_ctc, resumed.phoneme_ctc), (straight.model, resumed.model)):
        a, b = a.state_dict(), b.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda t: [r["loss_phoneme"] for r in t.log if "loss" in r and r["step"] > 4]  # noqa: E731
    assert losses(straight) == losses(resumed)
    # the model a checkpoint stores is the same with or without the head
    assert set(load_checkpoint(tmp_path / "a" / "best.pt")["model"]) == set(plain.model.state_dict())
    with pytest.raises(ValueError, match="trained with training.phoneme_ctc: resume with the run's own setting"):
        Trainer.resume(tmp_path / "b" / "latest.pt", config=load_config(RECIPE, TINY))
    with pytest.raises(ValueError, match="reads encoder layer 1, the recipe's layer 2: .*phoneme_layer=1"):
        Trainer.resume(tmp_path / "b" / "latest.pt", config=load_config(RECIPE, settings + ["training.phoneme_layer=2"]))
    with pytest.raises(ValueError, match="trained without training.phoneme_ctc.*train --init"):
        Trainer.resume(tmp_path / "plain" / "latest.pt", config=config)
    from paraformer_edu.baselines import BaselineTrainer
    from paraformer_edu.distributed import DistributedTrainer
    for other in (lambda: BaselineTrainer(config, tmp_path / "ctc", "ctc"), lambda: DistributedTrainer(config, tmp_path / "d")):
        with pytest.raises(ValueError, match="only chapter 7's Trainer trains it; set it to 0"):
            other()
