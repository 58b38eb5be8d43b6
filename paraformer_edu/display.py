"""How the chapters show things: figure defaults, labelled audio players, text tables.

Hand-written (not generated from a chapter): the book's presentation in one place, so
that every chapter's figures, players and tables look alike on the page.

- `book_style()`: matplotlib defaults (size, resolution, fonts) and sharp inline figures;
  every chapter calls it in its set-up cell.
- `listen(audio, label)`: an audio player with its label in the same output, so the
  rendered book keeps each label beside its player.
- `format_table(rows, headers)` / `print_table(...)`: aligned plain-text tables instead of
  printed lists and dicts.
"""

from __future__ import annotations

import html
import numbers

# Code and printed output are kept within this many characters: the width of a code box
# of the rendered book (`make check-book` measures it) and of a laptop's notebook cell.
LINE_WIDTH = 100
# Figures: at most this wide (inches at 72 CSS px each: 11.5 in = 828 px, inside the
# book's 900-px column), drawn at twice the resolution for high-density screens.
MAX_FIGURE_WIDTH = 11.5
_STYLE = {
    "figure.dpi": 72,
    "savefig.dpi": 144,
    "figure.figsize": (8.0, 3.5),
    "font.size": 10,
    "axes.titlesize": 10.5,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "legend.framealpha": 0.85,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "image.cmap": "viridis",
}


def book_style() -> None:
    """Set the book's matplotlib defaults; in a notebook, draw figures at 2x (retina) PNG."""
    import matplotlib as mpl

    mpl.rcParams.update(_STYLE)
    try:
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:  # plain Python: the rcParams are enough
        return
    if get_ipython() is not None:
        set_matplotlib_formats("retina")
        mpl.rcParams.update(_STYLE)  # the inline backend resets figure.dpi when it starts


def _audio_class():
    from IPython.display import Audio

    class LabelledAudio(Audio):
        """`IPython.display.Audio` with its label in the same output (HTML and text)."""

        def __init__(self, data, label: str, rate: int | None = None):
            super().__init__(data, rate=rate)
            self.label = label

        def _repr_html_(self):
            player = super()._repr_html_()
            label = html.escape(self.label)
            return f'<div class="labelled-audio"><div class="audio-label">{label}</div>{player}</div>'

        def __repr__(self):
            return f"[audio] {self.label}"

    return LabelledAudio


def listen(audio, label: str, rate: int = 16000):
    """A player for audio (a 1-D tensor/array or a file path) with its label above it."""
    if hasattr(audio, "detach"):
        audio = audio.detach().cpu().numpy()  # (S,)
    if isinstance(audio, str) or hasattr(audio, "__fspath__"):
        return _audio_class()(str(audio), label)
    return _audio_class()(audio, label, rate=rate)


def _cell(value, spec: str | None) -> str:
    if spec is not None and value is not None and value != "":
        return format(value, spec)
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def format_table(rows, headers=None, formats: dict | None = None) -> str:
    """Rows (sequences or dicts) as an aligned text table; numbers right-aligned.

    formats maps a column (header or index) to a format spec, e.g. {"CER": ".1%"}.
    """
    rows = list(rows)
    if rows and isinstance(rows[0], dict):
        headers = list(headers or rows[0].keys())
        rows = [[row.get(h) for h in headers] for row in rows]
    formats = formats or {}
    n_cols = len(headers) if headers else max((len(r) for r in rows), default=0)
    specs = [formats.get(headers[j] if headers else j, formats.get(j)) for j in range(n_cols)]
    cells = [[_cell(row[j], specs[j]) for j in range(n_cols)] for row in rows]
    numeric = [all(isinstance(r[j], numbers.Number) for r in rows if r[j] is not None) for j in range(n_cols)]
    head = [str(h) for h in headers] if headers else None
    widths = [max([len(c[j]) for c in cells] + ([len(head[j])] if head else [])) for j in range(n_cols)]

    def line(values):
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [line(head), line(["-" * w for w in widths])] if head else []
    return "\n".join(out + [line(c) for c in cells])


def print_table(rows, headers=None, formats: dict | None = None) -> None:
    """Print `format_table(rows, headers, formats)`."""
    print(format_table(rows, headers, formats))
