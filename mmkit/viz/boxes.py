"""Boxes on an image: where a grounding answer points, next to the truth.

``draw_boxes(image, {"truth": box, "model": box})`` upscales the image (nearest neighbour, so
its pixels stay visible) and outlines boxes in the grounding text format's 0-1000 integers
(:mod:`mmkit.data.grounding`), one colour per box. It returns a PIL image;
``mmkit.viz.show_images`` puts several side by side.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from mmkit.data.grounding import box_to_pixels

__all__ = ["draw_boxes"]


def draw_boxes(image: Any, boxes: Mapping[str, Sequence[int] | None] | Sequence, *, colors: Sequence[str] | None = None,
               width: int = 2, scale: int = 2):
    """The image (upscaled ``scale`` x, nearest) with Qwen-VL boxes drawn on it -> PIL image.

    ``boxes``: {label: box in 0-1000 ints, or None (skipped)} drawn in order with
    ``colors`` (default: black for the first, e.g. the truth, then magenta, blue, ...;
    no ShapesWorld object has these colours), or a plain list.
    """
    from PIL import Image, ImageDraw

    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    img = img.convert("RGB")
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    items = list(boxes.items()) if isinstance(boxes, Mapping) else [(str(i), b) for i, b in enumerate(boxes)]
    palette = list(colors or ["#000000", "#ff00ff", "#1f77b4", "#d62728", "#9467bd"])
    d = ImageDraw.Draw(img)
    for i, (_label, b) in enumerate(items):
        if b is None:
            continue
        x1, y1, x2, y2 = box_to_pixels(b, img.size)
        d.rectangle([x1, y1, x2 - 1, y2 - 1], outline=palette[i % len(palette)], width=width)
    return img
