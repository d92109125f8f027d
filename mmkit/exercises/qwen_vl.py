"""Exercises of notebook 05 (Qwen-VL): boxes in Qwen-VL's 0-1000 format, token budgets,
and the adapter's key positions.

    from mmkit.exercises import check, solution
    check("pixel_box_to_qwen", pixel_box_to_qwen)
    check("token_budget", token_budget)
    check("key_positions", key_positions)
"""
from __future__ import annotations

from typing import Callable

import torch

from mmkit.exercises.core import Exercise, _call, _guard, _say, register

_BOX = '''\
import math

def pixel_box_to_qwen(box, width, height):
    """(x1, y1, x2, y2) in pixels on a width x height image -> Qwen-VL ints in [0, 1000).
    Rounded outwards (floor the top-left corner, ceil the bottom-right) and clamped to 999."""
    x1, y1, x2, y2 = box
    clamp = lambda v: min(999, max(0, v))
    return (clamp(math.floor(x1 / width * 1000)), clamp(math.floor(y1 / height * 1000)),
            clamp(math.ceil(x2 / width * 1000)), clamp(math.ceil(y2 / height * 1000)))
'''

_BUDGET = '''\
import math

def token_budget(width, height):
    """Image tokens for one width x height image under five schemes."""
    # GPT-4o, high detail: fit in 2048 x 2048, shortest side down to 768, 85 + 170 per 512-px tile
    w, h = width, height
    if max(w, h) > 2048:
        s = 2048 / max(w, h)
        w, h = int(w * s), int(h * s)
    if min(w, h) > 768:
        s = 768 / min(w, h)
        w, h = int(w * s), int(h * s)
    gpt4o = 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)
    # Fuyu: fit in 1920 x 1080 (down only), 30-px patches, one newline token per row
    s = min(1, 1920 / width, 1080 / height)
    fw, fh = (int(width * s), int(height * s)) if s < 1 else (width, height)
    fuyu = math.ceil(fh / 30) * (math.ceil(fw / 30) + 1)
    # EVE: longer side down to 672, 14-px patches pooled 2 x 2, CLS + one <SPL> per row
    s = min(1, 672 / max(width, height))
    ew, eh = (int(width * s), int(height * s)) if s < 1 else (width, height)
    eve = 1 + math.ceil(eh / 28) * (math.ceil(ew / 28) + 1)
    return {"gpt4o_high": gpt4o,
            "llava_1.5": (336 // 14) ** 2,      # resized to 336 px whatever came in
            "fuyu": fuyu, "eve": eve,
            "qwen_vl": 256 + 2}                 # 256 queries + <img> and </img>
'''

_KEYPOS = '''\
import torch.nn.functional as F

def key_positions(pos_embed, query_grid, patch_grid):
    """(g*g, D) query-grid table -> (h*w, D) for the patch grid: bicubic, align_corners=False."""
    (g1, g2), (h, w) = query_grid, patch_grid
    D = pos_embed.shape[-1]
    img = pos_embed.reshape(1, g1, g2, D).permute(0, 3, 1, 2)        # (1, D, g, g): an image with D channels
    img = F.interpolate(img, size=(h, w), mode="bicubic", align_corners=False)
    return img.permute(0, 2, 3, 1).reshape(h * w, D)                  # back to row-major tokens
'''


@_guard
def check_pixel_box_to_qwen(fn: Callable) -> bool:
    """``pixel_box_to_qwen(box, width, height)`` against ``mmkit.data.grounding.box_from_pixels``."""
    from mmkit.data.grounding import box_from_pixels

    cases = [  # (box, W, H, what)
        ((32, 16, 96, 64), 128, 128, "a box on a 128 px square image"),
        ((10.3, 20.7, 50.2, 60.9), 128, 128, "fractional pixel corners"),
        ((100, 50, 300, 150), 400, 200, "a 400 x 200 (W x H) image"),
        ((0, 0, 448, 448), 448, 448, "the whole image"),
        ((3, 5, 7, 9), 1024, 768, "a small box on a 1024 x 768 photo"),
    ]
    for box, W, H, what in cases:
        want = tuple(box_from_pixels(box, (W, H)))
        got = _call(fn, box, W, H, what=f"({box}, {W}, {H})")
        try:
            got = tuple(int(v) for v in got)
        except (TypeError, ValueError):
            return _say(False, f"{what}: returned {got!r}; return four ints (x1, y1, x2, y2).")
        if got == want:
            continue
        x1, y1, x2, y2 = box
        if W != H and got == tuple(box_from_pixels(box, (H, W))):
            hint = "x is divided by the width and y by the height; you swapped them"
        elif any(v > 999 for v in got):
            hint = "coordinates live in [0, 1000): clamp 1000 to 999"
        elif got == tuple(min(999, round(v)) for v in (x1 / W * 1000, y1 / H * 1000, x2 / W * 1000, y2 / H * 1000)):
            hint = "round outwards (floor x1, y1; ceil x2, y2) so the box still covers the object, not to nearest"
        elif max(got) <= 1:
            hint = "scale to 1000, not to 1"
        else:
            hint = "each corner is pixel / side * 1000"
        return _say(False, f"{what}: pixel box {box} on {W} x {H} -> {got}, expected {want}: {hint}.")
    return _say(True, f"{len(cases)} boxes right, square and non-square images.")


_SIZES = [(1024, 768), (1024, 1024), (2048, 4096), (512, 512), (336, 336), (4000, 3000), (300, 1200)]


@_guard
def check_token_budget(fn: Callable) -> bool:
    """``token_budget(width, height) -> dict`` against ``mmkit.viz.tokens``, for several sizes."""
    from mmkit.viz import tokens as T

    ref = {
        "gpt4o_high": lambda w, h: T.gpt4v_tokens(w, h, "high"),
        "llava_1.5": T.llava_tokens,
        "fuyu": T.fuyu_tokens,
        "eve": T.eve_tokens,
        "qwen_vl": T.qwen_vl_tokens,
    }
    hints = {
        "gpt4o_high": "fit in 2048 x 2048, then the *shortest* side down to 768 (never up), then 85 + 170 per "
                      "512 x 512 tile, partial tiles count (ceil)",
        "llava_1.5": "LLaVA-1.5 resizes every image to 336 px: (336 / 14)^2 tokens whatever the input",
        "fuyu": "fit in 1920 x 1080 (down only), rows = ceil(h / 30), cols = ceil(w / 30), one newline per row: "
                "rows * (cols + 1)",
        "eve": "longer side down to 672, cells of 14 x 2 = 28 px, 1 CLS + rows * (cols + 1)",
        "qwen_vl": "256 queries whatever the size, plus the <img> and </img> tokens",
    }
    for W, H in _SIZES:
        got = _call(fn, W, H, what=f"({W}, {H})")
        if not isinstance(got, dict):
            return _say(False, f"token_budget({W}, {H}) returned {type(got).__name__}; return a dict "
                               f"with the keys {list(ref)}.")
        missing = [k for k in ref if k not in got]
        if missing:
            return _say(False, f"token_budget({W}, {H}) has no {missing}; return all of {list(ref)}.")
        for k, f in ref.items():
            want = f(W, H)
            if int(got[k]) != want:
                return _say(False, f"{k} for a {W} x {H} image: {got[k]}, expected {want}: {hints[k]}.")
    return _say(True, f"all five schemes right for {len(_SIZES)} sizes; 1024 x 768 costs "
                      + ", ".join(f"{k} {ref[k](1024, 768)}" for k in ref) + ".")


@_guard
def check_key_positions(fn: Callable) -> bool:
    """``key_positions(pos_embed, query_grid, patch_grid)`` against ``PositionAwareAdapter.key_positions``."""
    from mmkit.bridges.qwen_vl import PositionAwareAdapter

    for Q, grid in ((64, (16, 16)), (16, (8, 8)), (64, (8, 8)), (16, (6, 10))):
        ad = PositionAwareAdapter(32, 32, num_queries=Q, num_heads=2)
        want = ad.key_positions(grid)
        got = _call(fn, ad.pos_embed.clone(), ad.query_grid, grid, what=f"(Q={Q}, patch grid {grid})")
        if not isinstance(got, torch.Tensor):
            return _say(False, f"returned {type(got).__name__}; return a tensor (h*w, D).")
        if tuple(got.shape) != tuple(want.shape):
            return _say(False, f"{ad.query_grid} queries, patch grid {grid}: shape {tuple(got.shape)}, expected "
                               f"{tuple(want.shape)} = (h*w, D).")
        err = (got.float() - want).abs().max().item()
        if err > 1e-5:
            hint = ("equal grids must give the table back unchanged" if grid == ad.query_grid else
                    "view the table as a (1, D, g, g) image, F.interpolate(..., mode='bicubic', "
                    "align_corners=False), then back to (h*w, D) in row-major order")
            return _say(False, f"{ad.query_grid} queries, patch grid {grid}: max difference {err:.3g}: {hint}.")
    return _say(True, "same key positions as the adapter, for upsampled, equal and non-square grids.")


register(Exercise("pixel_box_to_qwen", "05_qwen_vl_grounding",
                  "pixel_box_to_qwen(box, width, height) -> Qwen-VL box, ints in [0, 1000)",
                  check_pixel_box_to_qwen), _BOX)
register(Exercise("token_budget", "05_qwen_vl_grounding",
                  "token_budget(width, height) -> {scheme: image tokens} for GPT-4o, LLaVA-1.5, Fuyu, EVE, Qwen-VL",
                  check_token_budget), _BUDGET)
register(Exercise("key_positions", "05_qwen_vl_grounding",
                  "key_positions(pos_embed, query_grid, patch_grid) -> the adapter's key positions",
                  check_key_positions), _KEYPOS)


# ---------------------------------------------------------------- build-up: the adapter's 2D positions
_POSITIONS_2D = '''\
import torch

def positions_2d(embed_dim, grid_h, grid_w):
    """Qwen-VL's (and MAE's) fixed 2D sin-cos table: (grid_h * grid_w, embed_dim), rows in
    row-major token order. The first half of the dims encodes the column x, the second half
    the row y; within each half, D/4 sines then D/4 cosines of pos * 10000^(-k / (D/4))."""
    def one_axis(dim, pos):                                         # (M,) -> (M, dim)
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
        angles = pos.to(torch.float64)[:, None] * omega[None]       # (M, dim/2)
        return torch.cat([angles.sin(), angles.cos()], dim=1)
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    half = embed_dim // 2
    return torch.cat([one_axis(half, cols.reshape(-1)), one_axis(half, rows.reshape(-1))], dim=1).float()
'''


@_guard
def check_positions_2d(fn: Callable) -> bool:
    """fn(embed_dim, grid_h, grid_w) -> (h*w, D); compared with ``mmkit.nn.sincos_2d`` (a
    square and a non-square grid), then put into a ``PositionAwareAdapter`` in place of its
    own table: the adapter's output must not change."""
    from mmkit.bridges.qwen_vl import PositionAwareAdapter
    from mmkit.nn import sincos_2d

    for D, h, w in ((16, 3, 3), (8, 2, 5)):
        want = sincos_2d(D, h, w)
        got = _call(fn, D, h, w, what=f"({D}, {h}, {w})")
        if not torch.is_tensor(got):
            return _say(False, f"positions_2d returned a {type(got).__name__}; return a ({h * w}, {D}) tensor.")
        if tuple(got.shape) != tuple(want.shape):
            return _say(False, f"({D}, {h}, {w}): expected shape {tuple(want.shape)} (one row per token, "
                               f"h*w = {h * w}), got {tuple(got.shape)}.")
        got = got.float()
        if torch.allclose(got, want, atol=1e-5):
            continue
        H = D // 2
        if torch.allclose(got, torch.cat([want[:, H:], want[:, :H]], 1), atol=1e-5):
            return _say(False, f"({D}, {h}, {w}): the two halves are swapped: the first D/2 dims encode "
                               "the column (x), the second the row (y) (MAE's convention, kept by Qwen-VL).")
        if torch.allclose(got, sincos_2d(D, w, h).view(w, h, D).transpose(0, 1).reshape(-1, D), atol=1e-5) \
                and h != w:
            return _say(False, f"({D}, {h}, {w}): tokens are in column-major order; token t = row * grid_w + col.")
        inter = want.clone()
        for a in (0, H):  # sin and cos interleaved instead of concatenated
            inter[:, a:a + H] = torch.stack([want[:, a:a + H // 2], want[:, a + H // 2:a + H]], -1).reshape(-1, H)
        if torch.allclose(got, inter, atol=1e-5):
            return _say(False, f"({D}, {h}, {w}): sin and cos are interleaved; within each half put all the "
                               "sines first, then all the cosines.")
        t, d = (int(i) for i in torch.nonzero((got - want).abs() > 1e-5)[0])
        return _say(False, f"({D}, {h}, {w}): token {t} (row {t // w}, col {t % w}), dim {d}: expected "
                           f"{float(want[t, d]):.5f}, got {float(got[t, d]):.5f}.")
    torch.manual_seed(0)
    adapter = PositionAwareAdapter(12, 16, num_queries=9, num_heads=2).eval()
    feats = torch.randn(2, 9, 12)
    with torch.no_grad():
        want = adapter(feats, (3, 3))
        adapter.pos_embed.copy_(_call(fn, 16, 3, 3))
        got = adapter(feats, (3, 3))
    if not torch.allclose(got, want, atol=1e-5):
        return _say(False, "your table differs from the adapter's own inside PositionAwareAdapter.")
    return _say(True, "same table as mmkit.nn.sincos_2d; inside the Qwen-VL adapter it gives the same output.")


register(Exercise("positions_2d", "05_qwen_vl_grounding",
                  "positions_2d(embed_dim, grid_h, grid_w) -> (h*w, D): the adapter's fixed 2D sin-cos table",
                  check_positions_2d), _POSITIONS_2D)
