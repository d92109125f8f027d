"""Pixels from a scene graph: the ShapesWorld renderer.

:func:`render_scene` draws a :class:`~mmkit.data.shapes.scene.Scene` at any size. The light
background gets its faint texture (stripes, a grid or dots), the shapes are filled polygons
(circles are ellipses) drawn at 2-4x the resolution and box-downsampled, so their edges are
anti-aliased, and the OCR text is drawn by FreeType at the final resolution with the bundled
DejaVu Sans Bold (:data:`FONT_PATH`), laid out the same way on every machine. Positions and
radii are fractions of the image, so the same scene renders at 32 px or 448 px, square or not.
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from mmkit.data.shapes.scene import _CAP_HEIGHT, SHAPE_POLYGONS, Background, Rng, Scene, Size, _parse_size

__all__ = ["FONT_PATH", "render_scene", "looks_like_shapesworld"]

#: The bundled font (DejaVu Sans Bold, Bitstream Vera license, see mmkit/fonts/).
FONT_PATH = Path(__file__).resolve().parents[2] / "fonts" / "DejaVuSans-Bold.ttf"


@lru_cache(maxsize=None)
def _font(px: int) -> ImageFont.FreeTypeFont:
    """The bundled font at a pixel size (cached: loading a font file costs ~1 ms)."""
    if not FONT_PATH.is_file():
        raise FileNotFoundError(
            f"ShapesWorld font not found at {FONT_PATH}. It ships with mmkit (mmkit/fonts/); "
            f"reinstall mmkit or copy DejaVuSans-Bold.ttf (e.g. from matplotlib's mpl-data/fonts/ttf) there.")
    # BASIC layout: identical glyph placement whether or not libraqm is installed
    return ImageFont.truetype(str(FONT_PATH), px, layout_engine=ImageFont.Layout.BASIC)


def _supersample(short_side: int) -> int:
    """Draw at k x resolution then box-downsample (k*k coverage levels per edge pixel):
    anti-aliased edges at small cost. 3x at 64 px: a 192x192 canvas."""
    return 4 if short_side <= 48 else 3 if short_side <= 112 else 2


def _draw_background(d: ImageDraw.ImageDraw, bg: Background, W: int, H: int, S: int) -> None:
    if bg.kind == "plain":
        return
    lw = max(1, round(bg.width * S))
    step = max(2, bg.spacing * S)
    if bg.kind in ("stripes", "grid"):
        angles = (bg.angle,) if bg.kind == "stripes" else (0, 90)
        for ang in angles:
            if ang == 0:                                   # horizontal lines
                y = step / 2
                while y < H:
                    d.line([(0, y), (W, y)], fill=bg.ink, width=lw)
                    y += step
            elif ang == 90:                                # vertical lines
                x = step / 2
                while x < W:
                    d.line([(x, 0), (x, H)], fill=bg.ink, width=lw)
                    x += step
            else:                                          # diagonals: 45 = "/" , 135 = "\"
                diag = step * math.sqrt(2)
                x = -H + diag / 2
                while x < W + H:
                    if ang == 45:
                        d.line([(x, H), (x + H, 0)], fill=bg.ink, width=lw)
                    else:
                        d.line([(x, 0), (x + H, H)], fill=bg.ink, width=lw)
                    x += diag
    elif bg.kind == "dots":
        rng = Rng(f"dots/{bg.seed}")
        n = max(4, int(round((W * H) / (2 * step * step))))   # one dot per 2 spacing^2
        rad = max(1.0, bg.width * S)
        for _ in range(n):
            x, y = rng.random() * W, rng.random() * H
            d.ellipse((x - rad, y - rad, x + rad, y + rad), fill=bg.ink)


def render_scene(scene: Scene, size: Size) -> Image.Image:
    """Draw a scene as an RGB image of ``size`` (int or (W, H)). See ShapesWorld.render."""
    W, H = _parse_size(size)
    S = min(W, H)
    k = _supersample(S)
    Wk, Hk, Sk = W * k, H * k, S * k
    img = Image.new("RGB", (Wk, Hk), scene.background.rgb)
    d = ImageDraw.Draw(img)
    _draw_background(d, scene.background, Wk, Hk, Sk)
    for o in scene.objects:
        X, Y, R = o.cx * Wk, o.cy * Hk, o.r * Sk          # centre and radius in canvas pixels
        poly = SHAPE_POLYGONS[o.shape]
        if poly is None:
            d.ellipse((X - R, Y - R, X + R, Y + R), fill=o.rgb)
        else:
            d.polygon([(X + ux * R, Y + uy * R) for ux, uy in poly], fill=o.rgb)
    if k > 1:
        img = img.reduce(k)                                 # box filter: k*k pixels -> 1
    t = scene.text
    if t is not None:
        # FreeType anti-aliases text itself, so it is drawn at the final resolution. The font
        # size is chosen so that the cap height is t.h * S; "ms" anchors at the baseline centre.
        font = _font(max(4, round(t.h / _CAP_HEIGHT * S)))
        ImageDraw.Draw(img).text((t.cx * W, t.cy * H + t.h * S / 2), t.text, fill=t.rgb,
                                 font=font, anchor="ms")
    return img


def looks_like_shapesworld(image, *, light_share: float = 0.35, known_share: float = 0.85) -> bool:
    """Could ``image`` be a ShapesWorld scene? A cheap pixel test, no model.

    A scene is mostly its light background (every channel >= 222, texture ink a little
    darker) and the rest is drawn in :data:`COLORS` or the OCR inks (anti-aliased edges
    aside). The image is box-downsampled to 64 px; it passes when at least ``light_share``
    of its pixels are light and at least ``known_share`` are light or within 48 (per
    channel) of a palette colour. A photo fails both: its colours are everywhere.
    """
    import numpy as np

    from mmkit.data.shapes.scene import _TEXT_COLORS, COLORS

    img = image.convert("RGB")
    if max(img.size) > 64:
        img = img.resize((64, 64), Image.BOX)
    a = np.asarray(img, dtype=np.int16).reshape(-1, 1, 3)                      # (P, 1, 3)
    palette = np.array([*COLORS.values(), *_TEXT_COLORS], dtype=np.int16)[None]  # (1, K, 3)
    light = a[:, 0].min(-1) >= 200
    near = np.abs(a - palette).max(-1).min(-1) <= 48
    return bool(light.mean() >= light_share and (light | near).mean() >= known_share)
