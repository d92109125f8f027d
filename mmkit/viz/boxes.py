"""Boxes on an image: where a grounding answer points, next to the truth.

``draw_boxes(image, {"truth": box, "model": box})`` upscales the image (nearest neighbour, so
its pixels stay visible) and outlines boxes in the grounding text format's 0-1000 integers
(:mod:`mmkit.data.grounding`), one colour per box. It returns a PIL image;
``mmkit.viz.show_images`` puts several side by side. ``grounding_panels(records, answers)``
does that for a model's answers to ShapesWorld ``ground`` records: one panel per record, the
truth in black, the model's first box in magenta, the IoU in the title.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from mmkit.data.grounding import box_to_pixels

__all__ = ["draw_boxes", "grounding_panels"]


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


def grounding_panels(records: Sequence[Mapping[str, Any]], answers: Sequence[str]) -> dict[str, Any]:
    """``{title: image}`` for ``show_images``: each ``ground`` record's image with its true box
    (black) and the first box of the model's answer (magenta, none if it wrote no usable box).
    The title names the object, the IoU and ✓ when IoU >= 0.5 (the Acc@0.5 rule), and says
    "(malformed)" when the answer also held a box that could not be read."""
    from mmkit.data.grounding import box_iou, parse_grounding

    if len(records) != len(answers):
        raise ValueError(f"grounding_panels: {len(records)} records but {len(answers)} answers")
    panels = {}
    for i, (r, answer) in enumerate(zip(records, answers)):
        boxes, bad = parse_grounding(answer)
        got = boxes[0][1] if boxes else None
        iou = box_iou(got, r["meta"]["box"]) if got else 0.0
        ref = r["meta"]["ref"].removeprefix("the ")
        label = f"{ref}: IoU {iou:.2f} {'✓' if iou >= 0.5 else '✗'}" + (" (malformed)" if bad else "")
        if label in panels:
            label = f"{i}. {label}"
        panels[label] = draw_boxes(r["image"], {"truth": r["meta"]["box"], "model": got})
    return panels
