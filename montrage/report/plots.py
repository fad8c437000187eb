"""Figures and image encoding for the HTML report: matplotlib (Agg) and PIL, returned as data URIs."""
from __future__ import annotations

import base64
import io
import logging
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

THUMB = 96  # side of the image thumbnails on the page (pixels)
GRID_THUMB = 64  # side of the checkpoint-grid cells
OTHER_COLOR = "#9e9e9e"


class _Figures:
    """The few pyplot calls used here, on ``matplotlib.figure.Figure``: no pyplot state and no backend switch
    (a library must not change its caller's matplotlib backend)."""

    @staticmethod
    def subplots(*args, figsize=None, **kwargs):
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        return fig, fig.subplots(*args, **kwargs)

    @staticmethod
    def close(fig) -> None:  # a Figure without pyplot is garbage-collected like any object
        return None

    @staticmethod
    def get_cmap(name: str):
        import matplotlib

        return matplotlib.colormaps[name]


def _plt():
    return _Figures


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def image_data_uri(image: np.ndarray, size: int = THUMB) -> str:
    """A uint8 (H, W, 3) image as a PNG data URI of side ``size``.

    Small images are upscaled with nearest-neighbour so their pixels stay visible (16 px -> 96 px);
    larger ones are downscaled with LANCZOS.
    """
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    im = Image.fromarray(arr[..., :3] if arr.ndim == 3 else arr).convert("RGB")
    if im.size != (size, size):
        resample = Image.NEAREST if max(im.size) <= size else Image.LANCZOS
        im = im.resize((size, size), resample)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return png_data_uri(buf.getvalue())


def fig_data_uri(fig, dpi: int = 100) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return png_data_uri(buf.getvalue())


def concept_colors(concepts: Sequence[str]) -> Dict[str, str]:
    """One stable colour per concept (sorted names, tab10/tab20), shared by every figure and the page."""
    plt = _plt()
    names = sorted(set(concepts) - {""})
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    out = {}
    for i, c in enumerate(names):
        r, g, b, _ = cmap(i % cmap.N)
        out[c] = "#%02x%02x%02x" % (int(r * 255), int(g * 255), int(b * 255))
    return out


def color_of(colors: Dict[str, str], concept: str) -> str:
    return colors.get(concept, OTHER_COLOR)


def _style(ax) -> None:
    ax.title.set_fontsize(8)
    ax.xaxis.label.set_fontsize(7)
    ax.yaxis.label.set_fontsize(7)
    ax.tick_params(labelsize=6)
    ax.grid(alpha=0.25)


def concept_bars(values: Dict[str, float], colors: Dict[str, str], expected: str = "", as_shares: bool = False,
                 shares: Optional[Dict[str, float]] = None) -> str:
    """Horizontal bars of a query's concept scores (or shares, for mixed prompts) as a data URI.

    The expected concept (if any) is outlined and marked with '*'; score labels carry the share.
    """
    plt = _plt()
    names = list(values)
    fig, ax = plt.subplots(figsize=(3.0, 0.5 + 0.24 * max(1, len(names))))
    y = np.arange(len(names))
    vals = np.nan_to_num(np.array([values[c] for c in names], dtype=np.float64))
    bars = ax.barh(y, vals, color=[color_of(colors, c) for c in names], height=0.65)
    for b, c in zip(bars, names):
        if expected and c == expected:
            b.set_edgecolor("black")
            b.set_linewidth(1.2)
    ax.set_yticks(y)
    ax.set_yticklabels([c + (" *" if expected and c == expected else "") for c in names], fontsize=7)
    ax.invert_yaxis()
    ax.tick_params(axis="x", labelsize=6)
    lo = 0.0 if as_shares else min(0.0, float(vals.min()) if len(vals) else 0.0)
    hi = float(vals.max()) if len(vals) else 1.0
    hi = hi if hi > 0 else 1.0
    ax.set_xlim(lo, hi * 1.6)
    for yi, c, v in zip(y, names, vals):
        label = f"{v:.0%}" if as_shares else f"{v:.3f}"
        if not as_shares and shares is not None and c in shares:
            label += f" ({shares[c]:.0%})"
        ax.text(max(v, 0.0), yi, " " + label, va="center", fontsize=6)
    ax.set_title("concept shares" if as_shares else "concept score (share)", fontsize=7, loc="left")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    # fixed margins instead of tight_layout: it costs a second render, and there is one chart per probe
    height = fig.get_figheight()
    longest = max([len(c) + 2 for c in names] or [4])
    fig.subplots_adjust(left=min(0.55, 0.05 + 0.0185 * longest), right=0.97, top=1 - 0.22 / height,
                        bottom=0.3 / height)
    return fig_data_uri(fig, dpi=100)


def dynamics_figure(steps: Sequence[int], title: str, sim_lines: List[dict], loss_lines: List[dict]) -> str:
    """Two panels over checkpoints: similarity probe <-> training images, and denoising losses.

    Each line is a dict: label, values (K,), and optional color, style (matplotlib ls), marker, lw.
    """
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8.8, 3.3))
    x = np.asarray(steps)
    for ax, lines in zip(axes, (sim_lines, loss_lines)):
        for ln in lines:
            ax.plot(x, ln["values"], marker=ln.get("marker", "o"), ms=3, lw=ln.get("lw", 1.4),
                    color=ln.get("color"), ls=ln.get("style", "-"), label=ln["label"])
        _style(ax)
        # below the axes, so the legend never hides a trajectory
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    axes[0].set(title="similarity to the probe (z-normalised features)", xlabel="training step", ylabel="(1 + cos) / 2")
    axes[1].set(title="denoising loss (null prompt, mean over timesteps)", xlabel="training step", ylabel="loss")
    for ax in axes:
        _style(ax)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(pad=0.4)
    return fig_data_uri(fig, dpi=100)


def training_curve(steps: Sequence[int], wall: Sequence[float], loss: Sequence[float]) -> str:
    """Training loss and wall time per checkpoint."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 2.4))
    x = np.asarray(steps)
    ax.plot(x, loss, marker="o", ms=3, color="#1f77b4", label="train loss")
    ax.set_xlabel("training step")
    ax.set_ylabel("train loss (mean since previous checkpoint)", color="#1f77b4")
    _style(ax)
    ax2 = ax.twinx()
    ax2.plot(x, wall, marker="s", ms=3, color="#ff7f0e", ls="--", label="wall time")
    ax2.set_ylabel("wall time since start (s)", color="#ff7f0e", fontsize=7)
    ax2.tick_params(labelsize=6)
    ax.set_title("training loss and wall time per checkpoint")
    ax.title.set_fontsize(8)
    fig.tight_layout(pad=0.4)
    return fig_data_uri(fig, dpi=100)


def learning_curves(compare_result: dict) -> str:
    """``montrage.analysis.compare.plot_curves`` of a compare result, as a data URI."""
    from montrage.analysis.compare import plot_curves

    with tempfile.TemporaryDirectory(prefix="montrage-report-") as tmp:
        path = plot_curves(compare_result, Path(tmp) / "curves.png")
        return png_data_uri(path.read_bytes())
