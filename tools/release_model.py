"""Release a trained checkpoint as the book's model: float16 weights, config, vocabulary, log, metrics.

    python tools/release_model.py runs/book/best.pt models/paraformer-book [--log runs/book/train_log.jsonl]
    python tools/release_model.py runs/more/best.pt models/paraformer-book --continues models/paraformer-book
                                  # a run that started from the released model (train --init)
    python tools/release_model.py runs/c/best.pt models/paraformer-book --continues models/paraformer-book runs/b
                                  # runs/b started from the released model, runs/c from runs/b/latest.pt
    python tools/release_model.py --remeasure models/paraformer-book
                                  # the same file scored again, after a change to decoding

Writes into the folder:
- model.pt        one file for `paraformer_edu.load_model`: float16 weights, configuration,
                  vocabulary and CMVN statistics (loaded with weights_only=True);
- config.yaml     the training configuration, as `--config` reads it;
- vocab.txt       the tokenizer's vocabulary file (chapter 2's format);
- train_log.jsonl the training log (one JSON object per logged step or dev evaluation);
- metrics.json    CER/WER/sentence accuracy on dev, test and test-voices, measured now from
                  model.pt itself, greedy and with chapter 9's beam search and n-gram LM (its
                  weight tuned on dev), with parameters, steps and training time, the real-time
                  factor at batch 1 and 16, and the word-onset bias on dev with the corrected
                  onset errors on test (chapter 8); the greedy CER on 300 training utterances
                  (beside dev's: underfitting or overfitting); and the training history, each
                  stretch of it (run, or resumed run) with the settings it changed.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

from paraformer_edu.beam_search import LMSearch
from paraformer_edu.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from paraformer_edu.config import config_to_dict, flat_settings, load_config, save_config
from paraformer_edu.corpus import build_corpus, corpus_config, read_manifest
from paraformer_edu.dataset import SpeechDataset
from paraformer_edu.inference import Recognizer
from paraformer_edu.inspection import error_summary, onset_errors
from paraformer_edu.language_model import book_language_model
from paraformer_edu.metrics import cer, wer
from paraformer_edu.tokenizer import normalize_text
from paraformer_edu.training import choose_device, evaluate


LM_WEIGHTS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def real_time_factor(model, dataset, batch: int, n: int = 96) -> float:
    """Seconds of model time (features cached) per second of audio, n test utterances in batches of `batch`."""
    items = [dataset[i] for i in range(min(n, len(dataset)))]
    start = time.perf_counter()
    for b in range(0, len(items), batch):
        chunk = items[b:b + batch]
        X = torch.nn.utils.rnn.pad_sequence([it["features"] for it in chunk], batch_first=True)  # (B, T, F)
        model.recognize(X, torch.tensor([len(it["features"]) for it in chunk]))
    seconds = time.perf_counter() - start
    return seconds / sum(dataset.entries[i]["duration"] for i in range(len(items)))


def settings(config) -> dict:
    """A configuration's dotted settings: {'training.lr': 0.0006, ...}."""
    return flat_settings(config_to_dict(config))


def stretches(folder, first: int, last: int, config, rows: list, before: list) -> list:
    """A run's stretches of the training history (split where it was resumed with other settings): their
    steps, and the settings each changed from the stretch before."""
    resumes = [r for r in rows if "resumed_with" in r and r["step"] < last - first]
    current = settings(config)  # the run's settings at its end; undo the resumes for its start
    for row in reversed(resumes):
        current |= {k: was for k, (was, _) in row["resumed_with"].items()}
    earlier = {}
    for stretch in before:  # the settings in force at the end of the history so far
        earlier |= stretch["settings"]
    out = [{"run": str(folder), "steps": [first, last],
            "settings": {k: v for k, v in current.items() if earlier.get(k, object()) != v}}]
    for row in resumes:
        out[-1]["steps"][1] = first + row["step"]
        out.append({"run": str(folder), "steps": [first + row["step"], last], "resumed": True,
                    "settings": {k: now for k, (_, now) in row["resumed_with"].items()}})
    return out


def shifted(row: dict, steps: int, seconds: float) -> dict:
    """A log row of a continued run, on the clock and step count of the whole training."""
    return {**row, "step": row["step"] + steps,
            **({"train_seconds": row["train_seconds"] + seconds} if "train_seconds" in row else {})}


def continued(rows: list, steps: int, seconds: float, source) -> list:
    """A continued run's log rows on the whole training's steps and clock; the first names its source."""
    return [{**shifted(row, steps, seconds), **({"continued_from": str(source)} if j == 0 and source else {})}
            for j, row in enumerate(rows)]


def earlier_training(folders: list[Path]) -> tuple[int, float, list[dict], list[dict]]:
    """Steps, training seconds, log rows and history of what a run continued: a released folder, then runs."""
    steps, seconds, log, history = 0, 0.0, [], []
    for i, folder in enumerate(folders):
        rows = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines() if line.strip()]
        if (folder / "metrics.json").exists():  # a released model: its log is already the whole story
            if i:
                raise SystemExit(f"{folder}: a released model can only come first in --continues")
            metrics = json.loads((folder / "metrics.json").read_text())
            steps, seconds = metrics["steps"], 3600 * metrics["train_hours"]
            log = [row for row in rows if row["step"] <= steps]  # up to its weights
            history = metrics.get("history") or stretches(folder, 0, steps, load_config(folder / "config.yaml"),
                                                          log, [])
            continue
        state = load_checkpoint(folder / "latest.pt")["trainer"]  # the next run started from it
        rows = [row for row in rows if row["step"] <= state["step"]]
        log += continued(rows, steps, seconds, folders[i - 1] if i else None)
        history += stretches(folder, steps, steps + state["step"], load_config(folder / "config.yaml"), rows, history)
        steps, seconds = steps + state["step"], seconds + state["train_seconds"]
    return steps, seconds, log, history


def train_sample_scores(recognizer: Recognizer, corpus: str, n: int = 300) -> dict:
    """Greedy CER and WER on a fixed sample of training utterances (augmented and non-speech ones included,
    as the model heard them): beside dev's, it tells underfitting from overfitting."""
    train = read_manifest(build_corpus(corpus_config(corpus), splits=("train",))["train"])
    entries = random.Random(0).sample(train, min(n, len(train)))
    transcripts = recognizer.recognize_features([recognizer.features(e["audio_filepath"]) for e in entries])
    hypotheses = [t.text for t in transcripts]
    references = [normalize_text(e["text"]) for e in entries]
    # the predictor's token count against the truth, as evaluate() reports it for dev
    errors = [len(t.tokens) - len(recognizer.tokenizer.encode(r)) for t, r in zip(transcripts, references)]
    return {"cer": cer(references, hypotheses), "wer": wer(references, hypotheses), "utterances": len(entries),
            "length_exact": sum(e == 0 for e in errors) / len(errors),
            "length_mae": sum(abs(e) for e in errors) / len(errors)}


def main(argv: list[str] | None = None) -> int:
    """Convert, copy and measure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, nargs="?")
    parser.add_argument("folder", type=Path, nargs="?")
    parser.add_argument("--remeasure", type=Path, metavar="FOLDER",
                        help="score a released model again with today's code (after a change to decoding): "
                             "its model.pt, steps, training time and history are kept")
    parser.add_argument("--log", type=Path, help="training log (default: train_log.jsonl beside the checkpoint)")
    parser.add_argument("--continues", type=Path, nargs="+", default=[], metavar="FOLDER",
                        help="what the run started from (train --init), oldest first: a released model's "
                             "folder, then any run folders whose latest.pt the next run started from; their "
                             "steps, training time and logs come first, so the figures count the whole training")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.remeasure:
        return remeasure(args.remeasure)
    if args.checkpoint is None or args.folder is None:
        parser.error("give CHECKPOINT FOLDER, or --remeasure FOLDER")
    # read before the folder is overwritten (it may be the same folder)
    earlier_steps, earlier_seconds, earlier_log, history = earlier_training(args.continues)
    payload = load_checkpoint(args.checkpoint)
    model, tokenizer, frontend, config = model_from_checkpoint(payload)
    args.folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(args.folder / "model.pt", model, tokenizer, frontend, config, half=True)
    save_config(config, args.folder / "config.yaml")
    tokenizer.save(args.folder / "vocab.txt")
    log_path = args.log or args.checkpoint.parent / "train_log.jsonl"
    log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    step = payload.get("step", max(row["step"] for row in log))
    seconds = max(row["train_seconds"] for row in log if row["step"] <= step and "train_seconds" in row)
    # a continued run's rows carry on from the released model's last step and time
    moved = continued(log, earlier_steps, earlier_seconds, args.continues[-1] if args.continues else None)
    (args.folder / "train_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in earlier_log + moved))
    history += stretches(args.checkpoint.parent, earlier_steps, step + earlier_steps, config,
                         [row for row in log if row["step"] <= step], history)
    metrics = {"checkpoint": args.checkpoint.name, "steps": step + earlier_steps,
               "train_hours": (seconds + earlier_seconds) / 3600,
               "device": "cuda" if choose_device(config.training.device).type == "cuda"
               else f"{platform.machine()} CPU, {config.training.threads} threads",
               "history": history}  # each stretch of training: its steps and the settings it changed
    measure(args.folder, metrics)
    return 0


def measure(folder: Path, metrics: dict) -> dict:
    """Score the released file in folder (what users load is what is scored) into metrics.json."""
    model, tokenizer, frontend, config = model_from_checkpoint(load_checkpoint(folder / "model.pt"))
    manifests = build_corpus(corpus_config(config.data.corpus), splits=("dev", "test", "test-voices"))
    metrics |= {"parameters": sum(p.numel() for p in model.parameters()),
                "size_mb": (folder / "model.pt").stat().st_size / 2**20}
    datasets = {split: SpeechDataset(manifests[split], frontend, tokenizer.encode) for split in manifests}
    lm = book_language_model(tokenizer)
    dev_cer = {w: evaluate(model, datasets["dev"], tokenizer, search=LMSearch(lm, w, 4))["cer"] for w in LM_WEIGHTS}
    weight = min(dev_cer, key=dev_cer.get)
    metrics["lm"] = {"order": lm.order, "beam": 4, "weight": weight, "dev_cer_by_weight": dev_cer}
    for split in ("dev", "test", "test-voices"):
        scores = evaluate(model, datasets[split], tokenizer)
        metrics[split] = {k: v for k, v in scores.items() if not isinstance(v, list)}
        fused = evaluate(model, datasets[split], tokenizer, search=LMSearch(lm, weight, 4))
        metrics[split]["with_lm"] = {k: v for k, v in fused.items() if not isinstance(v, list)}
        print(f"{split}: CER {scores['cer']:.2%} WER {scores['wer']:.2%}; with the LM: CER {fused['cer']:.2%} "
              f"WER {fused['wer']:.2%}", file=sys.stderr)
    recognizer = Recognizer(model, tokenizer, frontend, config)
    sample = metrics["train_sample"] = train_sample_scores(recognizer, config.data.corpus)
    print(f"{sample['utterances']} training utterances: CER {sample['cer']:.2%}", file=sys.stderr)
    metrics["rtf_cpu"] = {f"batch_{b}": real_time_factor(model, datasets["test"], b) for b in (1, 16)}
    dev_errors, _ = onset_errors(recognizer, read_manifest(manifests["dev"]))
    bias = dev_errors.median().item()
    test_errors, _ = onset_errors(recognizer, read_manifest(manifests["test"]), offset=-bias)
    metrics["word_onsets"] = {"dev_bias_ms": round(1000 * bias, 1), "test_corrected": error_summary(test_errors)}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(json.dumps(metrics))
    return metrics


def remeasure(folder: Path) -> int:
    """Score a released model again with today's code (its file, steps, hours and history kept)."""
    kept = ("checkpoint", "steps", "train_hours", "device", "history")
    old = json.loads((folder / "metrics.json").read_text())
    measure(folder, {k: old[k] for k in kept if k in old})
    return 0


if __name__ == "__main__":
    sys.exit(main())
