"""Draw the Paraformer architecture figure of the introduction (book/figures/paraformer.svg).

    python book/figures/make_architecture.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

HERE = Path(__file__).resolve().parent
COLORS = {"data": "#eef2f7", "enc": "#dbe9f6", "pred": "#fde8c8", "dec": "#dff0d8", "loss": "#f8dede"}


def box(ax, x, y, w, h, text, kind, dashed=False):
    """A rounded box with centred text; returns its centre-edge anchors."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=COLORS[kind], ec="#333333", lw=1.2, ls="--" if dashed else "-"))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=10.5)
    return {"top": (x + w / 2, y + h), "bottom": (x + w / 2, y), "left": (x, y + h / 2), "right": (x + w, y + h / 2)}


def arrow(ax, a, b, text="", dashed=False, rad=0.0):
    """An arrow from point a to point b with an optional label at its middle."""
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=14, lw=1.2, color="#333333",
                                 ls="--" if dashed else "-", connectionstyle=f"arc3,rad={rad}"))
    if text:
        ax.text((a[0] + b[0]) / 2 + 0.08, (a[1] + b[1]) / 2, text, fontsize=9, color="#555555", va="center")


def main():
    """Draw and save the figure."""
    fig, ax = plt.subplots(figsize=(9, 5.6))
    ax.set_xlim(0, 9), ax.set_ylim(0, 5.6), ax.axis("off")
    wave = box(ax, 0.3, 0.2, 2.4, 0.55, "waveform, 16 kHz", "data")
    front = box(ax, 0.3, 1.15, 2.4, 0.75, "fbank (80) → LFR (7, 6)\n→ CMVN   [ch. 1]", "data")
    enc = box(ax, 0.3, 2.35, 2.4, 1.0, "SAN-M encoder × N\n(self-attention + FSMN)\n[ch. 3, 4]", "enc")
    ctc = box(ax, 0.3, 4.3, 2.4, 0.6, "CTC head (aux. loss)", "loss", dashed=True)
    pred = box(ax, 3.35, 2.35, 2.3, 1.0, "predictor: CIF\nα_t, integrate & fire\n[ch. 5]", "pred")
    glm = box(ax, 3.35, 4.2, 2.3, 0.8, "GLM sampler (training):\nmix target embeddings\ninto E_ac", "loss", dashed=True)
    dec = box(ax, 6.3, 2.35, 2.4, 1.0, "parallel decoder × M\n(self + cross-attention)\n[ch. 6]", "dec")
    out = box(ax, 6.3, 4.3, 2.4, 0.6, "tokens, all at once", "data")
    mae = box(ax, 3.35, 0.2, 2.3, 0.75, "MAE: |y| vs Σα_t\n(training only)", "loss", dashed=True)
    arrow(ax, wave["top"], front["bottom"])
    arrow(ax, front["top"], enc["bottom"], "X (B, T', 560)")
    arrow(ax, enc["top"], ctc["bottom"], "H (B, T', D)")
    arrow(ax, enc["right"], pred["left"])
    arrow(ax, pred["right"], dec["left"])
    ax.text(5.97, 3.0, "E_ac\n(B, N, D)", fontsize=8.5, color="#555555", ha="center", va="bottom")
    arrow(ax, (2.7, 2.5), (6.3, 2.5), "", rad=0.3)
    ax.text(4.4, 1.75, "H (cross-attention)", fontsize=9, color="#555555", ha="right")
    arrow(ax, pred["bottom"], mae["top"], dashed=True)
    arrow(ax, glm["right"], (6.8, 3.35), dashed=True)
    arrow(ax, dec["top"], out["bottom"], "logits (B, N, V)")
    fig.tight_layout()
    fig.savefig(HERE / "paraformer.svg", metadata={"Date": None})
    fig.savefig("/tmp/paraformer.png", dpi=90)


if __name__ == "__main__":
    main()
