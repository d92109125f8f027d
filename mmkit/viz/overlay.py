"""Where did the model look? Heatmaps over the image, shared by every family.

One patch-grid map (h, w) -- an attention row, a Q-Former query's cross-attention, a
resampler latent, the LM's attention to image tokens -- is stretched over the image the
model saw and blended with it. The same pixels serve the notebooks (``show_heatmaps``,
a matplotlib Figure) and the Gradio demo (``heatmap_image``, a PIL image).

    heatmap_image(image, values)            -> PIL.Image (values: (h, w) or (h*w,) + grid)
    show_heatmaps(image, {"query 0": m0, ...}) -> Figure, one panel per map
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mmkit.viz.core import _finish, _plt, _to_array

__all__ = ["as_grid", "heatmap_image", "heatmap_array", "show_heatmaps", "show_images"]


def as_grid(values: Any, grid: tuple[int, int] | None = None) -> np.ndarray:
    """(h, w) array, or a flat (h*w,) vector + ``grid`` -> (h, w) float array."""
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    a = np.asarray(values, dtype=np.float32)
    if a.ndim == 1:
        if grid is None:
            side = int(round(a.size ** 0.5))
            if side * side != a.size:
                raise ValueError(f"a flat map of {a.size} values is not square; pass grid=(h, w)")
            grid = (side, side)
        if grid[0] * grid[1] != a.size:
            raise ValueError(f"a flat map of {a.size} values does not fill a {grid[0]}x{grid[1]} grid")
        a = a.reshape(grid)
    if a.ndim != 2:
        raise ValueError(f"a heatmap is (h, w) or (h*w,), got shape {tuple(a.shape)}")
    return a


def _colormap(x: np.ndarray, name: str) -> np.ndarray:
    import matplotlib

    return matplotlib.colormaps[name](x)[..., :3].astype(np.float32)


def heatmap_array(image: Any, values: Any, grid: tuple[int, int] | None = None, *,
                  alpha: float = 0.55, cmap: str = "inferno", normalize: bool = True) -> np.ndarray:
    """Blend a patch-grid map over ``image`` -> (H, W, 3) floats in [0, 1].

    Each grid cell covers the pixels of its patch (nearest-neighbour, so students see
    the patches, not a blur). ``normalize`` scales the map to [0, 1] (min to max).
    """
    img = _to_array(image)
    H, W = img.shape[:2]
    m = as_grid(values, grid)
    if normalize:
        lo, hi = float(m.min()), float(m.max())
        m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    m = np.clip(m, 0.0, 1.0)
    ys = np.minimum((np.arange(H) * m.shape[0]) // H, m.shape[0] - 1)
    xs = np.minimum((np.arange(W) * m.shape[1]) // W, m.shape[1] - 1)
    big = m[ys][:, xs]  # (H, W)
    return (1 - alpha) * img + alpha * _colormap(big, cmap)


def heatmap_image(image: Any, values: Any, grid: tuple[int, int] | None = None, *,
                  alpha: float = 0.55, cmap: str = "inferno", min_size: int = 256):
    """The same blend as a PIL image, upscaled (nearest) to at least ``min_size`` px."""
    from PIL import Image

    a = heatmap_array(image, values, grid, alpha=alpha, cmap=cmap)
    out = Image.fromarray((a * 255).round().astype(np.uint8))
    scale = max(1, -(-min_size // max(out.size)))
    if scale > 1:
        out = out.resize((out.width * scale, out.height * scale), Image.NEAREST)
    return out


def show_heatmaps(image: Any, maps: Mapping[str, Any] | Any, grid: tuple[int, int] | None = None, *,
                  cols: int = 4, panel_size: float = 2.2, title: str | None = None,
                  alpha: float = 0.55, cmap: str = "inferno"):
    """One panel per map, each over the same image. ``maps``: {label: (h, w)} or a (K, h, w) stack."""
    if not isinstance(maps, Mapping):
        stack = maps.detach().float().cpu().numpy() if hasattr(maps, "detach") else np.asarray(maps)
        if stack.ndim == 2 and grid is not None:
            stack = stack.reshape(stack.shape[0], *grid)
        maps = {str(i): m for i, m in enumerate(stack)}
    if not maps:
        raise ValueError("show_heatmaps: no maps to draw")
    blended = {str(label): heatmap_array(image, m, grid, alpha=alpha, cmap=cmap) for label, m in maps.items()}
    return show_images(blended, cols=cols, panel_size=panel_size, title=title)


def show_images(images: Mapping[str, Any] | Any, *, cols: int = 4, panel_size: float = 2.4,
                title: str | None = None):
    """Images side by side, one panel each: ``{label: image}`` or a list (e.g. the boxes of
    ``mmkit.viz.boxes.draw_boxes`` drawn on test images, labelled with their IoU)."""
    items = list(images.items()) if isinstance(images, Mapping) else [("", im) for im in images]
    if not items:
        raise ValueError("show_images: no images to draw")
    cols = max(1, min(cols, len(items)))
    rows = -(-len(items) // cols)
    plt = _plt()
    fig, axes = plt.subplots(rows, cols, figsize=(cols * panel_size, rows * panel_size + (0.4 if title else 0)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (label, im) in zip(axes.flat, items):
        ax.imshow(_to_array(im), interpolation="nearest")
        ax.set_title(str(label), fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _finish(fig)
