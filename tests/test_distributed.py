"""Chapter 11: batches split over processes and over time train the same model as one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paraformer_edu.config import load_config
from paraformer_edu.corpus import build_corpus, corpus_config
from paraformer_edu.dataset import SpeechDataset, collate
from paraformer_edu.distributed import DistributedTrainer, shard_batch
from paraformer_edu.features import Frontend
from paraformer_edu.training import Trainer

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "paraformer.yaml"
TINY = ["data.corpus=tiny", "model.vocab_size=60", "model.encoder.n_layers=2", "model.encoder.d_model=64",
        "model.encoder.d_ffn=128", "model.decoder_layers=1", "model.decoder_ffn=128", "data.max_frames=600",
        "training.eval_utterances=4", "training.eval_every=1000", "training.log_every=1", "training.warmup_steps=2",
        "training.threads=1", "training.device=cpu", "training.max_minutes=0"]
# the same function on both sides: no GLM sampling, no SpecAugment (dropout is 0 in the recipe)
EXACT = ["model.glm_lambda=0", "data.spec_augment=false"]
TOLERANCE = 1e-5  # relative, per logged loss: float summation order is all that differs


def losses(log) -> list[float]:
    return [row["loss"] for row in log if "loss" in row]


def close(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) and a
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


def test_shard_batch_keeps_every_row_once_and_trims_the_padding():
    manifests = build_corpus(corpus_config("tiny"), splits=("dev",))
    frontend = Frontend.fit(manifests["dev"], 8)
    data = SpeechDataset(manifests["dev"], frontend, lambda text: [5] * (len(text) % 7))
    batch = collate([data[i] for i in range(8)])
    for parts in (1, 3, 8, 10):
        pieces = shard_batch(batch, parts)
        assert len(pieces) == parts
        assert torch.cat([p["index"] for p in pieces]).tolist() == batch["index"].tolist()
        for piece in pieces:
            if not piece["texts"]:
                continue
            alone = collate([data[int(i)] for i in piece["index"]])
            for key in ("features", "feature_lengths", "targets", "target_lengths"):
                assert torch.equal(piece[key], alone[key]), key  # the same as collating the rows alone


def test_accumulating_pieces_trains_the_same_model_as_whole_batches(tmp_path):
    config = load_config(RECIPE, TINY + EXACT)
    whole = Trainer(config, tmp_path / "whole")
    whole.train(max_steps=5)
    for accumulate in (2, 3):
        split = DistributedTrainer(load_config(RECIPE, TINY + EXACT + [f"data.accumulate={accumulate}"]),
                                   tmp_path / f"acc{accumulate}")
        split.train(max_steps=5)
        assert close(losses(whole.log), losses(split.log)) < TOLERANCE
        # Adam turns float noise in a near-zero gradient into a step of about lr: compare the whole vector
        a, b = (torch.cat([p.detach().flatten() for p in t.model.parameters()]) for t in (whole, split))
        assert ((a - b).norm() / a.norm()).item() < 1e-3


def test_the_plain_trainer_refuses_accumulation(tmp_path):
    with pytest.raises(ValueError, match="data.accumulate needs paraformer_edu.distributed"):
        Trainer(load_config(RECIPE, TINY + ["data.accumulate=2"]), tmp_path)
    with pytest.raises(ValueError, match="data.accumulate must be at least 1"):
        DistributedTrainer(load_config(RECIPE, TINY + ["data.accumulate=0"]), tmp_path)


def train(out: Path, overrides: list, processes: int = 1, resume: bool = False) -> subprocess.CompletedProcess:
    """python -m paraformer_edu train, in one process or under torchrun with the gloo backend."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    what = ["--resume", str(out / "latest.pt")] if resume else ["--config", str(RECIPE), "--out", str(out)]
    done = subprocess.run(launcher + ["-m", "paraformer_edu", "train", *what, "--override", *overrides],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def log_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_two_processes_train_the_same_model_as_one_and_one_of_them_writes(tmp_path):
    build_corpus(corpus_config("tiny"))  # once, before the processes start
    overrides = TINY + EXACT + ["training.max_steps=5"]
    one = train(tmp_path / "one", overrides)
    two = train(tmp_path / "two", overrides, processes=2)
    assert close(losses(log_of(tmp_path / "one")), losses(log_of(tmp_path / "two"))) < TOLERANCE
    summary = [line for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(summary) == 1 and json.loads(summary[0])["processes"] == 2  # one process reports
    assert json.loads(one.stdout.strip().splitlines()[-1])["processes"] == 1
    log = log_of(tmp_path / "two")
    assert [row["step"] for row in log if "loss" in row] == [1, 2, 3, 4, 5]  # each row written once
    assert [row["step"] for row in log if "dev_cer" in row] == [5]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "best.pt", "config.yaml", "latest.pt", "train_log.jsonl"]  # no partial files left


def test_a_two_process_run_resumes_exactly_with_glm_sampling(tmp_path):
    build_corpus(corpus_config("tiny"))
    overrides = TINY + ["data.spec_augment=false"]  # GLM on: each process draws its own choices
    train(tmp_path / "straight", overrides + ["training.max_steps=6"], processes=2)
    train(tmp_path / "stopped", overrides + ["training.max_steps=3"], processes=2)
    train(tmp_path / "stopped", ["training.max_steps=6"], processes=2, resume=True)
    straight, resumed = log_of(tmp_path / "straight"), log_of(tmp_path / "stopped")
    assert losses(straight) == losses(resumed)  # bit for bit
    assert [r["glm_replaced"] for r in straight if "loss" in r] == [r["glm_replaced"] for r in resumed if "loss" in r]
    assert any(r["glm_replaced"] > 0 for r in straight if "loss" in r)


def test_two_processes_accumulating_small_batches_equal_one_process(tmp_path):
    """Batches of two or three utterances in 2 x 2 pieces: some pieces are empty (weight-0 stand-ins)."""
    build_corpus(corpus_config("tiny"))
    overrides = TINY + EXACT + ["training.max_steps=4", "data.max_frames=100"]
    train(tmp_path / "one", overrides)
    train(tmp_path / "two", overrides + ["data.accumulate=2"], processes=2)
    log = log_of(tmp_path / "one")
    assert min(row["utterances_per_second"] for row in log if "loss" in row) > 0
    assert close(losses(log), losses(log_of(tmp_path / "two"))) < TOLERANCE


def test_a_time_budget_stops_every_process_at_the_same_step_and_disk_features_build_once(tmp_path):
    build_corpus(corpus_config("tiny"))
    overrides = TINY + ["training.max_steps=0", "training.max_minutes=0.05", "data.features_on_disk=true"]
    done = train(tmp_path / "timed", overrides, processes=2)  # would hang if the processes disagreed
    log = log_of(tmp_path / "timed")
    assert log[-1]["step"] >= 1 and "dev_cer" in log[-1]
    assert json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][0])["processes"] == 2
