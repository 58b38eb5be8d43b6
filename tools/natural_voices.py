"""Experiment (chapter 11): do more natural synthetic voices narrow the gap to real speech?

Fine-tunes the book's model (train --init) on the book corpus with and without utterances spoken
by Festival's English voices (diphone: kal, ked; HTS: slt), for the same number of steps, and
scores the three models on the real recordings of chapter 11, on Festival voices and on espeak-ng
voices. Festival comes from Debian, not PyPI, so this is a script, not a chapter cell:

    apt-get install festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts
    python tools/natural_voices.py [--steps 2000] [--sentences 4000] [--out runs/natural]

It writes OUT/results.json and benchmarks/results/natural_voices.json (the copy chapter 11
shows) and prints one table.
"""

import argparse
import json
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from paraformer_edu.corpora import real_recordings  # noqa: E402
from paraformer_edu.corpus import build_corpus, corpus_config, read_manifest  # noqa: E402
from paraformer_edu.inference import load_model  # noqa: E402
from paraformer_edu.metrics import cer, wer  # noqa: E402
from paraformer_edu.tokenizer import normalize_text  # noqa: E402

VOICES = ["kal_diphone", "ked_diphone", "cmu_us_slt_arctic_hts"]


def scheme_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def synthesize(jobs: list, folder: Path, voice: str) -> None:
    """One festival process speaks every (name, text, stretch) of one voice into folder/name.wav."""
    lines = [f"(voice_{voice})"]
    for name, text, stretch in jobs:
        lines.append(f"(Parameter.set 'Duration_Stretch {stretch:.2f})")
        lines.append(f'(utt.save.wave (utt.synth (Utterance Text {scheme_string(text)})) "{folder / name}.wav" \'riff)')
    script = folder / f"{voice}.scm"
    script.write_text("\n".join(lines) + "\n")
    subprocess.run(["festival", "-b", str(script)], check=True, capture_output=True)


def festival_split(texts: list, folder: Path, seed: int) -> Path:
    """A manifest of texts spoken by Festival's voices in turn, at varied speed."""
    manifest = folder / "manifest.jsonl"
    if manifest.exists():
        return manifest
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    jobs = {v: [] for v in VOICES}
    for i, text in enumerate(texts):
        jobs[VOICES[i % len(VOICES)]].append((f"{i:05d}", text, rng.uniform(0.85, 1.2)))
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda v: synthesize(jobs[v], folder, v), VOICES))
    rows = []
    for voice, items in jobs.items():
        for name, text, stretch in items:
            info = sf.info(str(folder / f"{name}.wav"))
            rows.append({"audio_filepath": str(folder / f"{name}.wav"), "text": text,
                         "duration": round(info.frames / info.samplerate, 3), "voice": voice,
                         "stretch": round(stretch, 2)})
    rows.sort(key=lambda r: r["audio_filepath"])
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def train(out: Path, folder: Path, steps: int) -> Path:
    """Fine-tune the book's model on a manifest folder; the best checkpoint by dev CER."""
    if not (out / "best.pt").exists():
        command = [sys.executable, "-m", "paraformer_edu", "train", "--config", str(ROOT / "configs/paraformer-book.yaml"),
                   "--init", str(ROOT / "models/paraformer-book/model.pt"), "--out", str(out), "--override",
                   f"data.corpus={folder}", "training.lr=5e-4", "training.warmup_steps=200",
                   f"training.max_steps={steps}", "data.spec_augment_from=0", "training.eval_every=500",
                   "training.eval_utterances=300", "training.threads=2",
                   "training.phoneme_ctc=0"]  # as the recorded results were made (the recipe has it now)
        subprocess.run(command, check=True, cwd=ROOT)
    return out / "best.pt"


def score(checkpoint, manifest) -> dict:
    recognizer = load_model(checkpoint)
    entries = read_manifest(manifest)
    features = [recognizer.features(e["audio_filepath"]) for e in entries]
    hyps = [t.text for t in recognizer.recognize_features(features)]
    refs = [normalize_text(e["text"]) for e in entries]
    return {"cer": cer(refs, hyps), "wer": wer(refs, hyps), "utterances": len(refs)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--sentences", type=int, default=4000)
    parser.add_argument("--out", default=str(ROOT / "runs" / "natural"))
    args = parser.parse_args()
    out = Path(args.out)
    book = build_corpus(corpus_config("book"))
    train_texts = sorted({e["text"] for e in read_manifest(book["train"])})
    random.Random(0).shuffle(train_texts)
    festival = {
        "train": festival_split(train_texts[: args.sentences], out / "festival" / "train", 1),
        "dev": festival_split([e["text"] for e in read_manifest(book["dev"])][:150], out / "festival" / "dev", 2),
        "test": festival_split([e["text"] for e in read_manifest(book["test"])], out / "festival" / "test", 3),
    }
    dev = read_manifest(book["dev"])[:150] + read_manifest(festival["dev"])  # half espeak, half festival
    for name, extra in [("espeak", []), ("mixed", read_manifest(festival["train"]))]:
        folder = out / "data" / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in read_manifest(book["train"]) + extra))
        (folder / "dev.jsonl").write_text("".join(json.dumps(e) + "\n" for e in dev))
    models = {
        "the book's model": ROOT / "models/paraformer-book/model.pt",
        f"+{args.steps} steps, espeak-ng only": train(out / "espeak", out / "data" / "espeak", args.steps),
        f"+{args.steps} steps, with Festival": train(out / "mixed", out / "data" / "mixed", args.steps),
    }
    sets = {"real recordings": real_recordings(), "Festival voices (test)": festival["test"],
            "espeak-ng voices (test)": book["test"]}
    results = {m: {s: score(ckpt, manifest) for s, manifest in sets.items()} for m, ckpt in models.items()}
    text = json.dumps({"steps": args.steps, "festival_sentences": args.sentences, "voices": VOICES,
                       "results": results}, indent=1)
    (out / "results.json").write_text(text)
    (ROOT / "benchmarks" / "results" / "natural_voices.json").write_text(text + "\n")
    print(f"{'model':34}" + "".join(f"{s:>26}" for s in sets))
    for m, r in results.items():
        print(f"{m:34}" + "".join(f"{r[s]['cer']:>26.1%}" for s in sets))


if __name__ == "__main__":
    main()
