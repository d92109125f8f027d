"""Exercises of notebook 10 (high resolution and OCR): AnyRes's choice of grid, the
tokens a tiled image costs, and the bill of a GPT-4V request.

    from mmkit.exercises import check, solution
    check("tile_grid", tile_grid)
    check("anyres_token_count", anyres_token_count)
    check("gpt4v_request_tokens", gpt4v_request_tokens)
"""
from __future__ import annotations

from typing import Callable

from mmkit.exercises.core import Exercise, _call, _guard, _say, register

_GRID = '''\
def tile_grid(height, width, crop, grids):
    """AnyRes (LLaVA-NeXT): the (rows, cols) of crop x crop tiles for a height x width image.
    Each grid is a canvas of rows*crop x cols*crop; fit the image in (keep its ratio, scale
    up or down), its effective resolution is the fitted area but never more than the
    image's own; keep the grid with the largest effective resolution, and on a tie the
    one that wastes the least canvas area."""
    best, best_eff, best_waste = None, 0, float("inf")
    for rows, cols in grids:
        ch, cw = rows * crop, cols * crop
        scale = min(cw / width, ch / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = ch * cw - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (rows, cols), eff, waste
    return best
'''

_COUNT = '''\
def anyres_token_count(height, width, crop, patch, grids):
    """LM tokens of one image tiled AnyRes-style with a per-patch projector: the global
    view's (crop/patch)^2, then the crops' token grid with the rows (or columns) that
    only saw padding removed, plus one newline token per remaining row."""
    from mmkit.data.tiling import best_grid

    side = crop // patch
    rows, cols = best_grid(height, width, crop, grids)
    cur_h, cur_w = rows * side, cols * side
    if width / height > cur_w / cur_h:          # wider than the canvas: padding above and below
        new_h = int(round(height * cur_w / width, 7))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:                                        # taller (or equal): padding left and right
        new_w = int(round(width * cur_h / height, 7))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    return side * side + cur_h * cur_w + cur_h
'''

_GPT4V = '''\
import math

def gpt4v_request_tokens(images):
    """Image tokens of one GPT-4V / GPT-4o request: images = [(width, height, detail), ...].
    low: 85. high: fit in 2048 x 2048, shortest side down to 768 (never up),
    85 + 170 per 512 x 512 tile (partial tiles count)."""
    total = 0
    for width, height, detail in images:
        if detail == "low":
            total += 85
            continue
        w, h = width, height
        if max(w, h) > 2048:
            s = 2048 / max(w, h)
            w, h = int(w * s), int(h * s)
        if min(w, h) > 768:
            s = 768 / min(w, h)
            w, h = int(w * s), int(h * s)
        total += 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)
    return total
'''

_GRIDS = ((1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1))
_CASES = [  # (height, width, crop, what)
    (128, 128, 64, "a 128 px square scene, 64-px crops"),
    (100, 200, 64, "a wide 200 x 100 (W x H) image"),
    (300, 100, 64, "a tall 100 x 300 (W x H) image"),
    (40, 40, 64, "an image smaller than one crop"),
    (768, 1024, 336, "a 1024 x 768 photo, 336-px crops"),
    (1000, 3000, 336, "a 3000 x 1000 panorama"),
]


def _grid_hint(got, height, width, crop) -> str:
    rows, cols = got
    if [rows, cols] not in [list(g) for g in _GRIDS]:
        return f"{got} is not one of the allowed grids {[list(g) for g in _GRIDS]}: choose among them"
    if height != width and (cols, rows) == _ref_grid(width, height, crop):
        return "rows go with the height and cols with the width; you swapped them"
    if rows * cols > 1 and max(height, width) <= crop:
        return ("the image is no bigger than one crop, so every grid keeps all of it (the effective resolution "
                "is capped at the image's own area): the tie goes to the grid that wastes the least")
    return ("for each grid, scale = min(cols*crop / width, rows*crop / height); effective = "
            "min(int(width*scale) * int(height*scale), width*height); waste = canvas area - effective; keep the "
            "largest effective, then the smallest waste")


def _ref_grid(height, width, crop):
    from mmkit.data.tiling import best_grid

    return best_grid(height, width, crop, _GRIDS)


@_guard
def check_tile_grid(fn: Callable) -> bool:
    """``tile_grid(height, width, crop, grids)`` against ``mmkit.data.tiling.best_grid``."""
    for h, w, crop, what in _CASES:
        want = _ref_grid(h, w, crop)
        got = _call(fn, h, w, crop, [list(g) for g in _GRIDS], what=f"({h}, {w}, {crop})")
        try:
            got = tuple(int(v) for v in got)
        except (TypeError, ValueError):
            return _say(False, f"{what}: returned {got!r}; return (rows, cols).")
        if got != want:
            return _say(False, f"{what}: grid {got}, expected {want}: {_grid_hint(got, h, w, crop)}.")
    return _say(True, f"the same grid as the library for {len(_CASES)} images (square, wide, tall, tiny, photos).")


@_guard
def check_anyres_token_count(fn: Callable) -> bool:
    """``anyres_token_count(height, width, crop, patch, grids)`` against the model's own count
    (``mmkit.data.tiling.anyres_tokens``, which the tiled VLM and ``llava_next_tokens`` share)."""
    from mmkit.data.tiling import anyres_tokens

    for h, w, crop, what in _CASES:
        patch = 8 if crop == 64 else 14
        side = crop // patch
        want = anyres_tokens(h, w, crop, _GRIDS, (side, side))
        got = _call(fn, h, w, crop, patch, [list(g) for g in _GRIDS], what=f"({h}, {w}, {crop}, {patch})")
        try:
            got = int(got)
        except (TypeError, ValueError):
            return _say(False, f"{what}: returned {got!r}; return an int.")
        if got == want:
            continue
        rows, cols = _ref_grid(h, w, crop)
        full = side * side + rows * side * cols * side
        if got == full:
            hint = "the padding's rows / columns carry no image: cut them, and add one newline per kept row"
        elif got == full + rows * side:
            hint = "cut the rows (or columns) that only saw padding before counting them"
        elif got == want - side * side:
            hint = "the global view (the whole image at one crop) comes first: add its (crop/patch)^2 tokens"
        else:
            hint = ("global view (crop/patch)^2 + kept rows x kept cols + one newline per kept row; padding is cut "
                    "evenly from both sides: (full - new) // 2 each")
        return _say(False, f"{what}: {got} tokens, expected {want}: {hint}.")
    return _say(True, f"same count as the tiled model for {len(_CASES)} images; a 128 px scene costs "
                      f"{anyres_tokens(128, 128, 64, _GRIDS, (8, 8))} tokens in 64-px crops.")


_REQUESTS = [
    ([(1024, 1024, "high")], "one 1024 x 1024 image, high detail"),
    ([(1024, 1024, "low")], "the same image, low detail"),
    ([(2048, 4096, "high"), (512, 512, "high")], "a 2048 x 4096 page and a 512 px icon"),
    ([(4000, 3000, "high"), (300, 1200, "high"), (800, 600, "low")], "three images, one at low detail"),
    ([(200, 100, "high")], "a small 200 x 100 image (never scaled up)"),
]


@_guard
def check_gpt4v_request_tokens(fn: Callable) -> bool:
    """``gpt4v_request_tokens(images)`` against ``mmkit.viz.tokens.gpt4v_tokens`` summed."""
    from mmkit.viz.tokens import gpt4v_tokens

    for images, what in _REQUESTS:
        want = sum(gpt4v_tokens(w, h, d) for w, h, d in images)
        got = _call(fn, [tuple(i) for i in images], what=f"({images})")
        try:
            got = int(got)
        except (TypeError, ValueError):
            return _say(False, f"{what}: returned {got!r}; return the total as an int.")
        if got == want:
            continue
        per = [gpt4v_tokens(w, h, d) for w, h, d in images]
        if any(d == "low" for *_s, d in images) and got == sum(gpt4v_tokens(w, h) for w, h, _d in images):
            hint = "a low-detail image costs 85 tokens whatever its size"
        elif len(images) > 1 and got in per:
            hint = "add up every image of the request"
        else:
            hint = ("fit in 2048 x 2048, then scale the *shortest* side down to 768 (never up), then 85 + 170 per "
                    "512 x 512 tile, partial tiles count (ceil)")
        return _say(False, f"{what}: {got} tokens, expected {want}: {hint}.")
    return _say(True, f"{len(_REQUESTS)} requests right; a 1024 x 1024 image costs "
                      f"{gpt4v_tokens(1024, 1024)} tokens at high detail, 85 at low.")


register(Exercise("tile_grid", "10_high_resolution_ocr",
                  "tile_grid(height, width, crop, grids) -> (rows, cols): AnyRes's best-fit grid",
                  check_tile_grid), _GRID)
register(Exercise("anyres_token_count", "10_high_resolution_ocr",
                  "anyres_token_count(height, width, crop, patch, grids) -> LM tokens of one tiled image",
                  check_anyres_token_count), _COUNT)
register(Exercise("gpt4v_request_tokens", "10_high_resolution_ocr",
                  "gpt4v_request_tokens([(width, height, detail), ...]) -> image tokens of the request",
                  check_gpt4v_request_tokens), _GPT4V)
