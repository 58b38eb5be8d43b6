"""Memory and time of long-audio transcription: block by block against one pass.

    python benchmarks/bench_long_audio.py                  # 2, 8 and 16 minutes
    python benchmarks/bench_long_audio.py --minutes 4 30 --one-pass-up-to 4

This script writes a FLAC file of test-split utterances of the book model's corpus joined
by pauses (0.4-1.5 s); each case then runs in a fresh process that only transcribes it, with
`transcribe_long` (blocks of speech, at most 20 s), or in one pass with
`Recognizer.transcribe` (only up to --one-pass-up-to minutes: its attention memory grows
with the square of the length). Printed: the peak resident memory of the process (MB),
the wall time, the real-time factor and the CER against the joined references. Not a
test: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import paraformer_edu
from paraformer_edu.corpus import build_corpus, corpus_config, read_manifest

ROOT = Path(__file__).resolve().parent.parent

CASE = r"""
import json, resource, sys, time
import torch
import paraformer_edu
from paraformer_edu.metrics import cer
from paraformer_edu.tokenizer import normalize_text
from paraformer_edu.transcription import transcribe_long

path, reference, mode, checkpoint = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
torch.set_num_threads(2)
rec = paraformer_edu.load_model(checkpoint)
start = time.perf_counter()
text = transcribe_long(rec, path).text if mode == "blocks" else rec.transcribe(path)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MB, the process's high-water mark
print(json.dumps({"peak_mb": peak, "seconds": seconds, "cer": cer([reference], [normalize_text(text)])}))
"""


def write_recording(rows: list, minutes: float, path: Path) -> tuple[float, str]:
    """Test utterances joined by pauses of 0.4-1.5 s into a FLAC file: (seconds, normalised text)."""
    import soundfile as sf
    import torch

    from paraformer_edu.tokenizer import normalize_text

    g = torch.Generator().manual_seed(0)
    texts, total, i = [], 0, 0
    with sf.SoundFile(path, "w", 16000, 1) as f:  # written piece by piece
        while total < minutes * 60 * 16000:
            row = rows[i % len(rows)]
            wave = paraformer_edu.load_audio(row["audio_filepath"]).numpy()
            pause = round((0.4 + 1.1 * torch.rand((), generator=g).item()) * 16000)
            f.write(torch.zeros(pause).numpy())
            f.write(wave)
            total, i = total + pause + len(wave), i + 1
            texts.append(normalize_text(row["text"]))
    return total / 16000, " ".join(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "paraformer-book" / "model.pt"))
    parser.add_argument("--minutes", type=float, nargs="+", default=[2, 8, 16])
    parser.add_argument("--one-pass-up-to", type=float, default=4, help="longest recording tried in one pass")
    args = parser.parse_args()
    recognizer = paraformer_edu.load_model(args.checkpoint)
    manifest = build_corpus(corpus_config(recognizer.config.data.corpus), splits=("test",))["test"]
    rows = read_manifest(manifest)
    folder = Path(tempfile.mkdtemp(prefix="bench-long-audio-"))
    print(f"{'minutes':>7} {'mode':>8} {'peak MB':>8} {'wall s':>7} {'RTF':>7} {'CER':>6}")
    for minutes in args.minutes:
        path = folder / f"{minutes:g}-minutes.flac"
        seconds, reference = write_recording(rows, minutes, path)  # in this process, not the measured one
        for mode in ["blocks"] + (["one pass"] if minutes <= args.one_pass_up_to else []):
            run = subprocess.run([sys.executable, "-c", CASE, str(path), reference, mode, args.checkpoint],
                                 capture_output=True, text=True)
            if run.returncode:
                print(f"{seconds / 60:>7.1f} {mode:>8} failed: {run.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"{seconds / 60:>7.1f} {mode:>8} {r['peak_mb']:>8.0f} {r['seconds']:>7.1f} "
                  f"{r['seconds'] / seconds:>7.4f} {r['cer']:>6.1%}")


if __name__ == "__main__":
    main()
