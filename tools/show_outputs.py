"""Print a chapter notebook's code cells (first lines) and their stored text outputs.

    python tools/show_outputs.py chapters/08_seeing_inside.ipynb [--wide 100]

With --wide N, only the output lines longer than N characters (and their cells).
"""

import argparse
import json

parser = argparse.ArgumentParser()
parser.add_argument("notebook")
parser.add_argument("--wide", type=int, default=0)
args = parser.parse_args()
nb = json.load(open(args.notebook))
for i, cell in enumerate(nb["cells"]):
    if cell["cell_type"] != "code":
        continue
    texts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            texts.append("".join(out["text"]))
        elif "data" in out:
            kinds = ", ".join(sorted(out["data"]))
            texts.append("".join(out["data"].get("text/plain", "")) + f"   <{kinds}>")
    lines = "\n".join(texts).splitlines()
    if args.wide:
        lines = [f"[{len(l)}] {l}" for l in lines if len(l) > args.wide]
        if not lines:
            continue
    src = "".join(cell["source"]).splitlines()
    print(f"--- cell {i}: {src[0] if src else ''}")
    print("\n".join(lines))
