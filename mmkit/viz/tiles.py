"""High resolution: the AnyRes crop grid drawn over an image, and what more pixels buy.

``draw_tiles(image, grid)`` shows how LLaVA-NeXT's AnyRes (``mmkit.data.tiling``) cuts an
image: the image fitted (centred) into a ``rows x cols`` canvas of encoder-size crops, each
crop outlined and numbered in the order its tokens reach the LM, the padding greyed; the
global view comes first (crop 0, the whole image downsized). ``plot_resolution(rows)``
draws ``mmkit bench resolution``'s results: OCR and VQA accuracy, image tokens and
seconds per step, one bar per way of seeing the scene.
"""
from __future__ import annotations

from typing import Any, Sequence

__all__ = ["draw_tiles", "plot_resolution"]


def draw_tiles(image: Any, grid: Sequence[int], *, crop: int = 336, color: str = "#ff00ff", width: int = 2,
               label: bool = True):
    """The image as AnyRes tiles it into ``grid`` = (rows, cols) crops -> PIL image.

    The canvas is rows*crop x cols*crop (pass the encoder's input size as ``crop``; only the
    proportions matter for the picture): the image scaled to fit, centred, the padding in
    grey; a line between crops, and each crop's number (1.. in reading order) in its corner.
    """
    from PIL import Image, ImageDraw

    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    img = img.convert("RGB")
    try:
        rows, cols = (int(v) for v in grid)
    except (TypeError, ValueError):
        raise ValueError(f"draw_tiles: grid must be (rows, cols), got {grid!r}") from None
    if rows < 1 or cols < 1 or crop < 1:
        raise ValueError(f"draw_tiles: rows, cols and crop must be >= 1, got grid {grid!r}, crop {crop}")
    W, H = cols * crop, rows * crop
    scale = min(W / img.width, H / img.height)
    fitted = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    canvas = Image.new("RGB", (W, H), (150, 150, 150))
    canvas.paste(fitted, ((W - fitted.width) // 2, (H - fitted.height) // 2))
    d = ImageDraw.Draw(canvas)
    for r in range(rows):
        for c in range(cols):
            x, y = c * crop, r * crop
            d.rectangle([x, y, x + crop - 1, y + crop - 1], outline=color, width=width)
            if label:
                d.text((x + 3 * width, y + 2 * width), str(r * cols + c + 1), fill=color)
    return canvas


def plot_resolution(rows: Sequence[dict[str, Any]], *, title: str = ""):
    """Three panels for ``mmkit bench resolution``'s rows: OCR exact match and VQA accuracy,
    image tokens per scene, and seconds per training step."""
    from mmkit.viz.core import _SERIES, _finish, _plt

    if not rows:
        raise ValueError("plot_resolution: no rows (run mmkit.bench.resolution_bench first)")
    plt = _plt()
    names = [r["model"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    x = list(range(len(names)))
    for j, (key, label) in enumerate([("ocr_exact", "OCR exact match"), ("vqa", "VQA accuracy")]):
        pos = [i + (j - 0.5) * 0.38 for i in x]
        bars = axes[0].bar(pos, [r[key] for r in rows], 0.36, label=label, color=_SERIES[j])
        for b, r in zip(bars, rows):
            axes[0].text(b.get_x() + b.get_width() / 2, r[key], f"{r[key]:.2f}", ha="center", va="bottom", fontsize=7)
    axes[0].set_ylim(0, 1.1)
    axes[0].legend(fontsize=7, frameon=False)
    axes[0].set_title("what it reads", fontsize=9)
    for ax, key, t in ((axes[1], "image_tokens", "image tokens per scene"), (axes[2], "s_per_step", "seconds per step")):
        bars = ax.bar(x, [r[key] for r in rows], 0.6, color=_SERIES[2 if key == "image_tokens" else 3])
        for b, r in zip(bars, rows):
            ax.text(b.get_x() + b.get_width() / 2, r[key], f"{r[key]:.3g}", ha="center", va="bottom", fontsize=7)
        ax.set_title(t, fontsize=9)
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=20, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _finish(fig)
