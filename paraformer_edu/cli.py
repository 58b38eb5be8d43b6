"""The command line: `python -m paraformer_edu train | average | prepare | evaluate | transcribe | serve`.

Hand-written (not generated): a thin layer over what chapter 7 builds
(`paraformer_edu.training`, `paraformer_edu.inference`, `paraformer_edu.metrics`).

    python -m paraformer_edu train --config configs/paraformer.yaml [--override training.lr=3e-4 ...]
                                   [--out runs/NAME] [--resume runs/NAME/latest.pt] [--init model.pt]
    torchrun --nproc-per-node=N -m paraformer_edu train ...   (chapter 11: N processes, one writes)
    python -m paraformer_edu average runs/NAME/checkpoints/step-*.pt --out runs/NAME/averaged.pt
    python -m paraformer_edu prepare librispeech|ljspeech|common-voice|jsonl SOURCE --out train.jsonl
                                   [--max-seconds 20 [--split-with CKPT]] [--on-problem skip|raise]
    python -m paraformer_edu evaluate --checkpoint CKPT --manifest dev.jsonl [--manifest test.jsonl ...]
    python -m paraformer_edu transcribe --checkpoint CKPT a.wav b.wav ... [--list files.txt] [--timestamps]
    python -m paraformer_edu transcribe --checkpoint CKPT --output results.jsonl DIR_OR_FILES ...
    python -m paraformer_edu serve --checkpoint CKPT [--port 8000] [--workers 1] [--max-mb 50] [--max-seconds 3600]
    (evaluate and transcribe: --beam N --lm-weight W decode with chapter 9's beam search and n-gram LM;
     transcribe --output and serve: chapter 10's long-audio transcription, JSON lines and HTTP service)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from paraformer_edu.audio import AudioError

from paraformer_edu.corpus import read_manifest


def _train(args) -> int:
    """Train from a config file (or resume a run) until its budget is spent."""
    import torch

    from paraformer_edu.checkpoint import load_checkpoint
    from paraformer_edu.config import apply_override, config_from_dict, load_config
    from paraformer_edu.distributed import DistributedTrainer, init_distributed
    from paraformer_edu.training import Trainer

    rank, world = init_distributed()  # several processes under torchrun (chapter 11)
    if args.resume:
        config = load_config(args.config, args.override) if args.config else None
        if config is None and args.override:  # the run's own recipe, with the overrides (threads, budget...)
            values = load_checkpoint(args.resume)["config"]
            for override in args.override:
                apply_override(values, override)
            config = config_from_dict(values)
        recipe = config or config_from_dict(load_checkpoint(args.resume)["config"])
        cls = DistributedTrainer if world > 1 or recipe.data.accumulate > 1 else Trainer
        trainer = cls.resume(args.resume, args.out, config)
        if rank == 0:
            print(f"resumed {args.resume} at step {trainer.step}", file=sys.stderr)
    else:
        config = load_config(args.config, args.override)
        out = Path(args.out or Path("runs") / Path(args.config or "default").stem)
        if (out / "latest.pt").exists():
            print(f"{out} already holds a run: resume it with --resume {out / 'latest.pt'}, "
                  f"or choose another --out", file=sys.stderr)
            return 2
        cls = DistributedTrainer if world > 1 or config.data.accumulate > 1 else Trainer
        trainer = cls(config, out, init=args.init)
    if trainer.device.type == "cpu":
        torch.set_num_threads(trainer.config.training.threads)  # the command owns its process: set it once
    trainer.train(progress=sys.stderr.isatty() and rank == 0)
    last = [row for row in trainer.log if "dev_cer" in row][-1]
    if rank == 0:
        print(json.dumps({"step": trainer.step, "train_seconds": round(trainer.train_seconds, 1),
                          "dev_cer": last["dev_cer"], "dev_wer": last["dev_wer"], "processes": world,
                          "out": str(trainer.out_dir)}))
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


def _average(args) -> int:
    """Write the mean of several checkpoints' weights (chapter 7's average_checkpoints)."""
    from paraformer_edu.checkpoint import average_checkpoints

    payload = average_checkpoints(args.checkpoints, args.out)
    print(f"averaged {len(args.checkpoints)} checkpoints into {args.out} (the last at step "
          f"{payload.get('step', '?')}); score it with: python -m paraformer_edu evaluate --checkpoint {args.out} ...")
    return 0


def _prepare(args) -> int:
    """A corpus layout into a checked manifest; the rows left out on stderr, one line each."""
    from paraformer_edu.corpora import prepare_corpus

    split_with = None
    if args.split_with:
        from paraformer_edu.inference import load_model

        split_with = load_model(args.split_with)
    report = prepare_corpus(args.layout, args.source, args.out, max_seconds=args.max_seconds,
                            on_problem=args.on_problem, split_with=split_with)
    for problem in report.problems:
        print(f"{problem.where}: {problem.reason}", file=sys.stderr)
    print(json.dumps({"manifest": str(report.manifest), "utterances": report.utterances,
                      "hours": round(report.hours, 3), "left_out": len(report.problems)}))
    return 0


def _evaluate(args) -> int:
    """Per manifest: CER, WER, sentence accuracy and real-time factor; last line one JSON object."""
    from paraformer_edu.metrics import cer, sentence_accuracy, wer
    from paraformer_edu.tokenizer import normalize_text

    recognizer = _decoder(args)
    references, hypotheses, total_audio, total_seconds = [], [], 0.0, 0.0
    for manifest in args.manifest:
        entries = read_manifest(manifest)
        start = time.perf_counter()
        features = [recognizer.features(e["audio_filepath"]) for e in entries]
        hyps = [t.text for t in recognizer.recognize_features(features, args.max_frames)]
        seconds = time.perf_counter() - start
        refs = [normalize_text(e["text"]) for e in entries]
        audio = sum(e["duration"] for e in entries)
        print(f"{manifest}: {len(entries)} utterances, CER {cer(refs, hyps):.2%}, WER {wer(refs, hyps):.2%}, "
              f"sentences right {sentence_accuracy(refs, hyps):.1%}, RTF {seconds / audio:.4f}")
        references += refs
        hypotheses += hyps
        total_audio, total_seconds = total_audio + audio, total_seconds + seconds
    print(json.dumps({"cer": cer(references, hypotheses), "wer": wer(references, hypotheses),
                      "sentence_accuracy": sentence_accuracy(references, hypotheses),
                      "utterances": len(references), "rtf": total_seconds / total_audio,
                      "decoder": args.decoder, "beam": args.beam, "lm_weight": args.lm_weight}))
    return 0


def _decoder(args):
    """The recognizer evaluate asks for: the checkpoint's model (chapter 12 records its kind) decoded
    by its parallel decoder, its CTC head, or its autoregressive decoder, greedily or with a beam."""
    from paraformer_edu.baselines import ctc_view, load_baseline

    recognizer = load_baseline(args.checkpoint, args.device)
    kind, beam = recognizer.kind, args.beam if args.beam > 1 else None
    if args.decoder == "ar" and kind != "ar":
        raise ValueError(f"{args.checkpoint} holds a {kind} model: it has no autoregressive decoder "
                         "(chapter 12's BaselineTrainer trains one: kind 'ar')")
    if args.decoder == "paraformer" and kind not in ("paraformer", "paraformer-v2"):
        raise ValueError(f"{args.checkpoint} holds a {kind} model: it has no parallel decoder; "
                         f"use --decoder {'ctc' if kind == 'ctc' else 'ar'}")
    if args.decoder == "paraformer" and kind == "paraformer-v2" and (beam or args.lm_weight > 0):
        raise ValueError("a Paraformer-v2 checkpoint decodes greedily: leave out --beam and --lm-weight")
    if args.decoder == "ctc":  # chapter 12: the encoder's CTC head, greedy or prefix beam search
        recognizer.model, recognizer.search = ctc_view(recognizer.model), beam
    elif args.decoder == "ar":
        recognizer.search = beam  # chapter 12's length-normalised beam
    elif kind == "paraformer":
        recognizer = _with_search(recognizer, args)
    return recognizer


def _with_search(recognizer, args):
    """The recognizer with chapter 9's beam search and WordNet LM when --beam or --lm-weight asks for it."""
    if args.beam > 1 or args.lm_weight > 0:
        from paraformer_edu.beam_search import LMSearch
        from paraformer_edu.language_model import book_language_model

        lm = book_language_model(recognizer.tokenizer) if args.lm_weight > 0 else None
        recognizer.search = LMSearch(lm, args.lm_weight, args.beam)
    return recognizer


def _transcribe(args) -> int:
    """One line per file: the path, a tab, the text (and the token timestamps with --timestamps)."""
    from paraformer_edu.inference import load_model

    paths = list(args.audio)
    if args.list:
        paths += [line.strip() for line in Path(args.list).read_text().splitlines() if line.strip()]
    if not paths:
        print("no audio given: name files, or --list FILE with one path a line", file=sys.stderr)
        return 2
    recognizer = _with_search(load_model(args.checkpoint, args.device), args)
    if args.output:  # chapter 10: files and folders, any length, one JSON line each, resumable
        from paraformer_edu.transcription import transcribe_files

        counts = transcribe_files(recognizer, paths, args.output, args.max_seconds, sys.stderr.isatty())
        print(json.dumps({**counts, "output": args.output}))
        return 1 if counts["failed"] else 0
    failed = 0
    features, usable = [], []
    for path in paths:
        try:
            features.append(recognizer.features(path))
            usable.append(path)
        except AudioError as error:
            print(f"{path}: {error}", file=sys.stderr)
            failed += 1
    for path, transcript in zip(usable, recognizer.recognize_features(features, args.max_frames)):
        line = f"{path}\t{transcript.text}"
        if args.timestamps:
            line += "\t" + json.dumps([[tok, s, e] for tok, (s, e) in zip(transcript.tokens, transcript.timestamps)])
        print(line)
    return 1 if failed else 0


def _serve(args) -> int:
    """Chapter 10's HTTP service on uvicorn: GET /health, POST /transcribe."""
    import os

    import uvicorn

    from paraformer_edu.checkpoint import load_checkpoint

    load_checkpoint(args.checkpoint)  # a bad checkpoint stops here, with its message
    os.environ.update({
        "PARAFORMER_EDU_SERVE_CHECKPOINT": str(Path(args.checkpoint).resolve()),
        "PARAFORMER_EDU_SERVE_MAX_MB": str(args.max_mb),
        "PARAFORMER_EDU_SERVE_MAX_SECONDS": str(args.max_seconds),
        "PARAFORMER_EDU_SERVE_THREADS": str(args.threads),
    })
    uvicorn.run("paraformer_edu.serving:app_from_environment", factory=True, host=args.host,
                port=args.port, workers=args.workers, log_level="warning")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one command."""
    parser = argparse.ArgumentParser(prog="python -m paraformer_edu", description="Paraformer from scratch")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model from a YAML config (or resume a run)")
    train.add_argument("--config", help="YAML recipe, e.g. configs/paraformer.yaml")
    train.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="e.g. training.lr=3e-4")
    train.add_argument("--resume", metavar="CKPT", help="a latest.pt written by an earlier run")
    train.add_argument("--out", help="output folder (default runs/<config name>)")
    train.add_argument("--init", metavar="CKPT", help="start from a checkpoint's weights (e.g. the book's model.pt): "
                       "its vocabulary and CMVN, a new optimiser and warm-up; the recipe's model must match it")
    average = commands.add_parser("average", help="average the weights of checkpoints of one run (chapter 7), e.g. "
                                  "those kept by training.keep_checkpoints")
    average.add_argument("checkpoints", nargs="+", help="two or more checkpoints of one model")
    average.add_argument("--out", required=True, help="the averaged checkpoint to write")
    prepare = commands.add_parser("prepare", help="turn a corpus (LibriSpeech, LJSpeech, Common Voice, JSON "
                                  "lines) into a checked manifest (chapter 11)")
    prepare.add_argument("layout", choices=["librispeech", "ljspeech", "common-voice", "jsonl"])
    prepare.add_argument("source", help="the corpus folder (LibriSpeech split, LJSpeech) or listing file "
                         "(Common Voice TSV, JSON lines)")
    prepare.add_argument("--out", required=True, help="the manifest to write, e.g. data/ls100/train.jsonl")
    prepare.add_argument("--max-seconds", type=float, default=None, help="leave out longer utterances")
    prepare.add_argument("--on-problem", choices=["skip", "raise"], default="skip",
                         help="skip: leave bad rows out and report them (default); raise: stop at the first")
    prepare.add_argument("--split-with", metavar="CKPT", help="cut utterances over --max-seconds at their pauses, "
                         "found by aligning the transcript with this checkpoint's CTC head, instead of leaving them out")
    evaluate = commands.add_parser("evaluate", help="score a checkpoint on manifests")
    transcribe = commands.add_parser("transcribe", help="transcribe audio files (without --output each file is "
                                     "decoded in one pass: use --output for long recordings)")
    for sub in (evaluate, transcribe):
        sub.add_argument("--checkpoint", required=True, help="a checkpoint (best.pt, or the book's model)")
        sub.add_argument("--device", default="cpu")
        sub.add_argument("--max-frames", type=int, default=8000, help="padded frames per decoding batch")
        sub.add_argument("--beam", type=int, default=1, help="beam width over the token positions (chapter 9)")
        sub.add_argument("--lm-weight", type=float, default=0.0,
                         help="weight of the WordNet n-gram LM in the beam search (chapter 9; 0: no LM)")
    evaluate.add_argument("--manifest", required=True, action="append", help="JSON-lines manifest (repeatable)")
    evaluate.add_argument("--decoder", choices=["paraformer", "ctc", "ar"], default="paraformer",
                          help="paraformer: the parallel decoder; ctc: the encoder's CTC head (chapter 12); "
                          "ar: an autoregressive decoder, for checkpoints that carry one")
    transcribe.add_argument("audio", nargs="*", help="audio files (WAV, FLAC, OGG; any rate, mono or stereo)")
    transcribe.add_argument("--list", help="a text file with one audio path a line")
    transcribe.add_argument("--timestamps", action="store_true", help="add each token's start and end seconds")
    transcribe.add_argument("--output", metavar="JSONL", help="write one JSON line per file (text, words with times) "
                            "to this file; folders are searched for audio; files already in it are skipped")
    transcribe.add_argument("--max-seconds", type=float, default=20.0,
                            help="with --output: longest block decoded in one pass (files are cut into stretches "
                            "of speech, at most this long; --max-frames does not apply)")
    serve = commands.add_parser("serve", help="serve a checkpoint over HTTP (needs the [serve] extra)")
    serve.add_argument("--checkpoint", required=True, help="a checkpoint (best.pt, or the book's model)")
    serve.add_argument("--host", default="127.0.0.1", help="interface (0.0.0.0 to accept other machines)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="processes, each with its own copy of the model")
    serve.add_argument("--threads", type=int, default=1, help="PyTorch threads per worker")
    serve.add_argument("--max-mb", type=float, default=50.0, help="largest upload (MiB); larger: 413")
    serve.add_argument("--max-seconds", type=float, default=3600.0, help="longest audio (s); longer: 413")
    args = parser.parse_args(argv)
    if args.command == "prepare" and args.split_with and not args.max_seconds:
        parser.error("--split-with cuts utterances longer than --max-seconds: give --max-seconds too")
    if args.command == "serve" and (args.workers < 1 or args.threads < 1 or args.max_mb <= 0 or args.max_seconds <= 0):
        parser.error("--workers and --threads must be at least 1, --max-mb and --max-seconds positive")
    if args.command == "transcribe" and args.max_seconds < 1:
        parser.error(f"--max-seconds must be at least 1 (got {args.max_seconds})")
    if args.command == "evaluate" and args.decoder != "paraformer" and args.lm_weight > 0:
        parser.error("--lm-weight fuses the n-gram LM into the Paraformer's beam: use it with --decoder paraformer")
    if args.command in ("evaluate", "transcribe") and (args.beam < 1 or args.lm_weight < 0):
        parser.error(f"--beam must be at least 1 and --lm-weight at least 0 (got {args.beam} and {args.lm_weight})")
    try:
        commands = {"train": _train, "average": _average, "prepare": _prepare, "evaluate": _evaluate, "transcribe": _transcribe,
                    "serve": _serve}
        return commands[args.command](args)
    except (ValueError, FileNotFoundError) as error:  # CheckpointError, AudioError, config errors
        print(f"error: {error}", file=sys.stderr)
        return 2
