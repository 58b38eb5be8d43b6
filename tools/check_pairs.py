"""Check that every chapter's .ipynb holds the same cells as its .py source.

The `py:percent` file is the source people edit; the `.ipynb` beside it carries
the outputs of a real run. They must hold the same cells (type and source), and
every code cell of the notebook must have been executed, in order. Code lines and
stored text outputs stay within the width of the rendered book's code boxes
(`WIDTH` characters; `make check-book` measures the boxes in a browser).

    python tools/check_pairs.py            # exit 1 on any difference
"""

from __future__ import annotations

import sys
from pathlib import Path

import jupytext

ROOT = Path(__file__).resolve().parent.parent
WIDTH = 100


def cells(notebook) -> list[tuple[str, str]]:
    """The (type, source) of every cell."""
    return [(c.cell_type, c.source.strip()) for c in notebook.cells]


def check(py: Path) -> list[str]:
    """The problems of one chapter pair."""
    ipynb = py.with_suffix(".ipynb")
    if not ipynb.exists():
        return [f"{ipynb.name} is missing: run `make sync` then `make execute`"]
    source, stored = jupytext.read(py), jupytext.read(ipynb)
    problems = []
    if cells(source) != cells(stored):
        problems.append(f"{ipynb.name} differs from {py.name}: run `make sync` and re-execute it")
    counts = [c.get("execution_count") for c in stored.cells if c.cell_type == "code"]
    if any(n is None for n in counts) or counts != sorted(counts):
        problems.append(f"{ipynb.name} was not executed top to bottom in one run: run `make execute`")
    problems += wide_lines(stored, ipynb.name)
    return problems


def wide_lines(notebook, name: str) -> list[str]:
    """Code lines and text-output lines wider than WIDTH characters."""
    problems = []
    for i, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        texts = [("code", cell.source)]
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                texts.append(("output", out.get("text", "")))
            elif "text/plain" in out.get("data", {}) and not set(out["data"]) & {"image/png", "text/html"}:
                texts.append(("output", out["data"]["text/plain"]))
        for kind, text in texts:
            for line in text.splitlines():
                if len(line) > WIDTH:
                    problems.append(f"{name} cell {i}: {kind} line of {len(line)} > {WIDTH} characters: "
                                    f"{line[:60]}...")
    return problems


def main() -> int:
    """Check every pair under chapters/."""
    problems = [p for py in sorted((ROOT / "chapters").glob("[0-9][0-9]_*.py")) for p in check(py)]
    print("\n".join(problems) or "pair check: every chapter's .ipynb matches its .py and was executed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
