"""Memory and time of long-audio transcription: block by block against one pass.

    python benchmarks/bench_long_audio.py                  # 2, 8 and 16 minutes
    python benchmarks/bench_long_audio.py --minutes 4 30 --one-pass-up-to 4

Each case runs in a fresh process, which writes a FLAC file of test-split utterances of
the book model's corpus joined by pauses (0.4-1.5 s), then transcribes it with
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CASE = r"""
import json, resource, sys, tempfile, time
from pathlib import Path
import soundfile as sf, torch
import paraformer_edu
from paraformer_edu.corpus import build_corpus, corpus_config, read_manifest
from paraformer_edu.metrics import cer
from paraformer_edu.transcription import transcribe_long

minutes, mode, checkpoint = float(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(2)
rec = paraformer_edu.load_model(checkpoint)
rows = read_manifest(build_corpus(corpus_config(rec.config.data.corpus), splits=("test",))["test"])
g = torch.Generator().manual_seed(0)
path, texts, total, i = Path(tempfile.mkdtemp()) / "long.flac", [], 0, 0
with sf.SoundFile(path, "w", 16000, 1) as f:  # written piece by piece: the recording is never whole
    while total < minutes * 60 * 16000:
        row = rows[i % len(rows)]
        wave = paraformer_edu.load_audio(row["audio_filepath"]).numpy()
        pause = round((0.4 + 1.1 * torch.rand((), generator=g).item()) * 16000)
        f.write(torch.zeros(pause).numpy()); f.write(wave)
        total, i = total + pause + len(wave), i + 1
        texts.append(row["text"])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
start = time.perf_counter()
text = transcribe_long(rec, str(path)).text if mode == "blocks" else rec.transcribe(str(path))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"minutes": total / 16000 / 60, "mode": mode, "peak_mb": peak, "before_mb": base,
                  "seconds": seconds, "rtf": seconds / (total / 16000), "cer": cer([" ".join(texts)], [text])}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "paraformer-book" / "model.pt"))
    parser.add_argument("--minutes", type=float, nargs="+", default=[2, 8, 16])
    parser.add_argument("--one-pass-up-to", type=float, default=4, help="longest recording tried in one pass")
    args = parser.parse_args()
    print(f"{'minutes':>7} {'mode':>8} {'peak MB':>8} {'wall s':>7} {'RTF':>7} {'CER':>6}")
    for minutes in args.minutes:
        for mode in ["blocks"] + (["one pass"] if minutes <= args.one_pass_up_to else []):
            run = subprocess.run([sys.executable, "-c", CASE, str(minutes), mode, args.checkpoint],
                                 capture_output=True, text=True)
            if run.returncode:
                print(f"{minutes:>7.1f} {mode:>8} failed: {run.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"{r['minutes']:>7.1f} {mode:>8} {r['peak_mb']:>8.0f} {r['seconds']:>7.1f} "
                  f"{r['rtf']:>7.4f} {r['cer']:>6.1%}")


if __name__ == "__main__":
    main()
