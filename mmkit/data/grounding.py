"""Grounding as text: boxes written into a model's answer, and read back out of it.

Qwen-VL (Bai et al., 2023, Sec. 2.2) writes a box as plain text,
``<ref>the red circle</ref><box>(x1,y1),(x2,y2)</box>``, its corners as integers in [0, 1000)
normalised by the image's width and height, so one string means the same box at any
resolution. This module is that format and nothing else (no model, no torch)::

    to_box(x1, y1, x2, y2)           normalised floats -> ints in [0, 1000), rounded outwards
    box_from_pixels / box_to_pixels  a pixel box on a W x H image <-> the 0-1000 ints
    format_box / format_ref_box      ints -> "<box>...</box>" / "<ref>...</ref><box>...</box>"
    format_grounding                 a phrase and a pixel box -> the text
    find_boxes / parse_boxes         text -> boxes; lenient (reports malformed ones) / strict (raises)
    parse_grounding                  a model's answer -> boxes, in pixels or 0-1000 ints; never raises
    box_iou                          intersection over union, the grounding score

ShapesWorld writes its ``ground`` and ``region`` turns with it, evaluation reads model output
with it, and ``mmkit.viz.boxes.draw_boxes`` draws the boxes on an image.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

__all__ = [
    "Box", "to_box", "box_from_pixels", "box_to_pixels", "format_box", "format_ref_box", "format_grounding",
    "find_boxes", "parse_boxes", "parse_grounding", "box_iou",
]

#: (x1, y1, x2, y2), integers in [0, 1000): top-left and bottom-right corner.
Box = tuple[int, int, int, int]


def _wh(size: int | Sequence[int]) -> tuple[int, int]:
    """(width, height) from an int, a (width, height) pair, or a PIL image."""
    if hasattr(size, "size") and not isinstance(size, (tuple, list)):
        size = size.size  # PIL.Image: (width, height)
    if isinstance(size, int):
        return size, size
    W, H = (int(v) for v in size)
    return W, H


def to_box(x1: float, y1: float, x2: float, y2: float) -> Box:
    """Normalised float box -> integer box in [0, 1000), rounded outwards so it covers the object."""
    def clamp(v: int) -> int:
        return min(999, max(0, v))
    a, b = clamp(math.floor(x1 * 1000)), clamp(math.ceil(x2 * 1000))
    c, d = clamp(math.floor(y1 * 1000)), clamp(math.ceil(y2 * 1000))
    if b <= a:                                             # degenerate (tiny object at the border)
        a, b = (a, a + 1) if a < 999 else (998, 999)
    if d <= c:
        c, d = (c, c + 1) if c < 999 else (998, 999)
    return (a, c, b, d)


def box_from_pixels(box: Sequence[float], size: int | Sequence[int]) -> Box:
    """Pixel box (x1, y1, x2, y2) on an image of ``size`` = (width, height) -> Qwen-VL ints.

    Each corner is divided by the image side and scaled to 1000; the box is rounded
    *outwards* (floor the top-left, ceil the bottom-right, clamp to [0, 999]) so it still
    covers the object: :func:`to_box`, the rule ShapesWorld writes its answers with.

    >>> box_from_pixels((32, 16, 96, 64), (128, 128))
    (250, 125, 750, 500)
    """
    W, H = _wh(size)
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (x1 < x2 and y1 < y2):
        raise ValueError(f"box {tuple(box)} is empty: need x1 < x2 and y1 < y2 (pixels, top-left origin)")
    return to_box(x1 / W, y1 / H, x2 / W, y2 / H)


def box_to_pixels(box: Sequence[int], size: int | Sequence[int]) -> tuple[float, float, float, float]:
    """Qwen-VL box (ints in [0, 1000)) -> pixel box on an image of ``size`` = (width, height)."""
    W, H = _wh(size)
    x1, y1, x2, y2 = box
    return (x1 * W / 1000, y1 * H / 1000, x2 * W / 1000, y2 * H / 1000)


def format_box(box: Sequence[int]) -> str:
    """(x1, y1, x2, y2) ints in [0, 1000) -> "<box>(x1,y1),(x2,y2)</box>" (Qwen-VL format)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    if not (0 <= x1 < x2 < 1000 and 0 <= y1 < y2 < 1000):
        raise ValueError(f"box {tuple(box)} is invalid: need integers 0 <= x1 < x2 < 1000 and 0 <= y1 < y2 < 1000")
    return f"<box>({x1},{y1}),({x2},{y2})</box>"


def format_ref_box(phrase: str, box: Sequence[int]) -> str:
    """ "<ref>the red circle</ref><box>(x1,y1),(x2,y2)</box>" """
    return f"<ref>{phrase}</ref>{format_box(box)}"


def format_grounding(phrase: str, pixel_box: Sequence[float], size: int | Sequence[int]) -> str:
    """``"<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>"`` for a pixel box."""
    return format_ref_box(phrase, box_from_pixels(pixel_box, size))


_TAG_RE = re.compile(r"<ref>(?P<ref>.*?)</ref>|<box>(?P<box>.*?)</box>|(?P<stray></?(?:box|ref)>)", re.S)
_COORDS_RE = re.compile(r"\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*")


def find_boxes(text: str) -> tuple[list[tuple[str | None, Box]], list[str]]:
    """Lenient parser: ``(boxes, malformed)``.

    ``boxes`` is a list of ``(phrase, (x1, y1, x2, y2))`` in order of appearance; ``phrase`` is the
    text of the ``<ref>...</ref>`` right before the box (a ref applies to every box that follows
    it directly, as in Qwen-VL's ``<ref>cats</ref><box>..</box><box>..</box>``), else ``None``.
    ``malformed`` lists the offending fragments: a ``<box>`` whose content is not
    ``(x1,y1),(x2,y2)``, coordinates outside [0, 1000), x1 >= x2 or y1 >= y2, or a stray/unclosed
    tag. Use this to score model outputs (a malformed box simply counts as a miss).
    """
    boxes: list[tuple[str | None, Box]] = []
    bad: list[str] = []
    phrase: str | None = None
    last = 0
    for m in _TAG_RE.finditer(text):
        if text[last:m.start()].strip():       # other text in between: the ref no longer applies
            phrase = None
        last = m.end()
        if m.group("ref") is not None:
            phrase = m.group("ref").strip()
        elif m.group("box") is not None:
            c = _COORDS_RE.fullmatch(m.group("box"))
            if c is None:
                bad.append(m.group(0))
                continue
            x1, y1, x2, y2 = (int(v) for v in c.groups())
            if not (0 <= x1 < x2 < 1000 and 0 <= y1 < y2 < 1000):
                bad.append(m.group(0))
                continue
            boxes.append((phrase, (x1, y1, x2, y2)))
        else:
            bad.append(m.group(0))
    return boxes, bad


def parse_boxes(text: str) -> list[tuple[str | None, Box]]:
    """Strict parser: like :func:`find_boxes` but raises ``ValueError`` naming the first malformed
    box and the expected format. Use it on data you wrote; use ``find_boxes`` on model output."""
    boxes, bad = find_boxes(text)
    if bad:
        raise ValueError(
            f"malformed box {bad[0]!r} in {text[:120]!r}: expected "
            f"'<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>' with integers 0 <= x1 < x2 < 1000 and "
            f"0 <= y1 < y2 < 1000 (the <ref> part is optional)")
    return boxes


def parse_grounding(text: str, size: int | Sequence[int] | None = None) -> tuple[list[tuple[str | None, tuple]], list[str]]:
    """Boxes in a model's answer: ``(boxes, malformed)``, never raises.

    ``boxes``: ``(phrase or None, box)`` in order, in pixels when ``size`` is given, else in
    the 0-1000 ints. ``malformed``: the fragments that look like a box but are not one
    (``<box>(12,40)</box>``, a corner >= 1000, x1 >= x2, an unclosed tag): report them.
    """
    boxes, bad = find_boxes(text)
    if size is not None:
        boxes = [(phrase, box_to_pixels(b, size)) for phrase, b in boxes]
    return boxes, bad


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes (any units, same for both)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
