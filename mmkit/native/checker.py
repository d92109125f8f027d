"""Read a drawing back: which (colour, shape) objects does an image show?

A model that *writes* images (a VQ-VAE decoder, a unified decoder drawing VQ codes) is judged
the way ShapesWorld judges a caption: did it draw what was asked? ShapesWorld drew every test
image itself, so the judge can be the renderer run backwards, with no learned component that
could share the model's mistakes:

1. **Colour.** Every pixel is explained as a blend of the image's light background ``b`` and one
   ink ``c``: ``p = b + alpha * (c - b)`` (this is exactly what the renderer's anti-aliasing
   does). The inks are the palette (:data:`mmkit.data.shapes.COLORS`) *and* the dark OCR text
   colours, so a half-covered text pixel is explained as text, not as purple. A pixel belongs to
   colour ``c`` when ``c`` leaves the smallest residual ``|p - b - alpha (c - b)|`` and covers at
   least half of it (``alpha >= 0.5``). Background textures are ``b`` darkened by 10-16 levels:
   their ``alpha`` towards any colour is tiny, so they never become blobs.
2. **Blobs.** Connected components (8-neighbourhood) of each colour above a minimum area.
3. **Shape.** For each blob, every candidate shape is drawn by the renderer itself
   (:func:`mmkit.data.shapes.render_scene` with a one-object scene) with the radius that gives
   the blob's area (``sum(alpha)``) and the centre that puts the shape's centroid on the
   blob's; the shape whose coverage map has the best soft IoU with the blob's ``alpha`` map
   wins (on a true render the right shape scores ~1).
4. **Size.** The fitted radius, in units of the shorter image side, against
   :data:`SIZE_RADIUS` (small <= 0.102 < 0.136 < 0.17 <= large).

    parse_drawing(image) -> [{"color", "shape", "size", "center": (cx, cy) in [0, 1],
                              "bbox": (x1, y1, x2, y2) pixels, "pixels": area, "iou": fit}, ...]
    check_drawing(image, [("red", "circle"), ...] | Scene) -> {"found", "missing", "extra", "ok"}

Validated on true renders (measured): colour, shape *and* size of 100% of the objects of 1000
test scenes and 300 holdout scenes at 64 px (200 test scenes at 48 and 32 px: 100% too), with
no false blobs from textured backgrounds or OCR text. ``tests/test_native_vq.py`` checks 40 of
them; ``mmkit.native.vq.evaluate_vqvae`` reports this ceiling as ``checker_recall_original``
next to the recall on reconstructions. What it rejects in blurry drawings is mostly the outline
of small objects (a small star drawn as a blob reads as a circle or a hexagon).
"""
from __future__ import annotations

import math
from collections import deque
from typing import Sequence

import numpy as np
from PIL import Image

from mmkit.data.shapes import (
    _TEXT_COLORS, COLORS, SHAPE_POLYGONS, SHAPES, SIZE_RADIUS, Background, Obj, Scene, ShapesConfig,
    render_scene,
)

__all__ = ["parse_drawing", "check_drawing", "score_drawings", "MIN_AREA_64", "MAX_RESIDUAL"]

#: Smallest blob kept, in pixels of a 64 px image (scaled with the image area). The smallest
#: object ShapesWorld draws (a small star) covers ~55 px at 64 px.
MIN_AREA_64 = 20
#: A pixel farther than this (RGB levels) from every background-ink blend is no colour at all.
MAX_RESIDUAL = 60.0
_SIZE_SPLIT = (SIZE_RADIUS["small"][1] + SIZE_RADIUS["large"][0]) / 2   # 0.136 of the short side


def _unit_geometry(shape: str) -> tuple[float, float, float]:
    """(area, centroid x, centroid y) of a shape of radius 1, centred on its bounding box as the
    renderer draws it (shoelace formula on SHAPE_POLYGONS; the circle is exact)."""
    poly = SHAPE_POLYGONS[shape]
    if poly is None:
        return math.pi, 0.0, 0.0
    a = cx = cy = 0.0
    for (x0, y0), (x1, y1) in zip(poly, poly[1:] + poly[:1]):
        c = x0 * y1 - x1 * y0
        a, cx, cy = a + c, cx + (x0 + x1) * c, cy + (y0 + y1) * c
    return abs(a) / 2, cx / (3 * a), cy / (3 * a)


_GEOMETRY = {s: _unit_geometry(s) for s in SHAPES}


def _background(px: np.ndarray) -> np.ndarray:
    """The light background colour: median of bright, grey pixels (ShapesWorld's are >= 222)."""
    flat = px.reshape(-1, 3)
    bright = flat[(flat.min(1) >= 200) & (flat.max(1) - flat.min(1) <= 24)]
    return np.median(bright, 0) if len(bright) >= 16 else np.array([240.0, 240.0, 240.0])


def _unmix(px: np.ndarray, bg: np.ndarray, inks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """alpha, residual (H, W, K) of p = b + alpha (c_k - b) for every ink c_k."""
    d = inks - bg                                             # (K, 3)
    pb = px - bg                                              # (H, W, 3)
    alpha = np.clip(pb @ d.T / (d * d).sum(1), 0.0, 1.0)      # (H, W, K)
    res = np.linalg.norm(pb[..., None, :] - alpha[..., None] * d, axis=-1)   # (H, W, K)
    return alpha, res


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, each as an (n, 2) array of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    H, W = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        q, comp = deque([(y0, x0)]), []
        while q:
            y, x = q.popleft()
            comp.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    v, u = y + dy, x + dx
                    if 0 <= v < H and 0 <= u < W and mask[v, u] and not seen[v, u]:
                        seen[v, u] = True
                        q.append((v, u))
        out.append(np.array(comp))
    return out


def _coverage(shape: str, cx: float, cy: float, r: float, size: tuple[int, int]) -> np.ndarray:
    """(H, W) in [0, 1]: how much of each pixel the renderer's own ``shape`` covers."""
    obj = Obj(shape, "red", "small", cx, cy, r, (0, 0, 0))
    bg = Background(kind="plain", rgb=(255, 255, 255), ink=(255, 255, 255))
    img = render_scene(Scene(objects=[obj], background=bg), size)
    return 1.0 - np.asarray(img, dtype=np.float32)[..., 0] / 255.0


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(1e-6, np.maximum(a, b).sum()))


def parse_drawing(image: Image.Image, world_config: ShapesConfig | None = None) -> list[dict]:
    """The objects an image shows: one dict per blob, largest first (see module docstring).

    ``world_config`` restricts the palette and the shapes to a ShapesWorld's configuration.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"parse_drawing expects a PIL image, got {type(image).__name__}; "
                        "convert tensors with VQVAE.to_images(pixels)")
    cfg = world_config or ShapesConfig()
    colors, shapes = list(cfg.colors), list(cfg.shapes)
    W, H = image.size
    S = min(W, H)
    px = np.asarray(image.convert("RGB"), dtype=np.float32)              # (H, W, 3)
    bg = _background(px)
    inks = np.array([COLORS[c] for c in colors] + list(_TEXT_COLORS), dtype=np.float32)   # (K+T, 3)
    alpha, res = _unmix(px, bg, inks)
    best = res.argmin(-1)                                                 # (H, W): the best ink
    a_best = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    ok = (a_best >= 0.5) & (res.min(-1) <= MAX_RESIDUAL)
    min_area = max(4, round(MIN_AREA_64 * S * S / 64 ** 2))
    found = []
    for k, color in enumerate(colors):
        for comp in _components(ok & (best == k)):
            if len(comp) < min_area:
                continue
            ys, xs = comp[:, 0], comp[:, 1]
            x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1     # pixel edges
            # the blob's soft map: its colour's alpha on the blob and a 1-px ring around it
            # (the anti-aliased edge, alpha < 0.5), where that colour is still the best ink
            ring = np.zeros((H + 2, W + 2), dtype=bool)
            for dy in (0, 1, 2):
                for dx in (0, 1, 2):
                    ring[ys + dy, xs + dx] = True
            blob = np.where(ring[1:-1, 1:-1] & (best == k), alpha[..., k], 0.0)   # (H, W)
            area = blob.sum()
            gy, gx = np.mgrid[0:H, 0:W] + 0.5                                  # pixel centres
            mx, my = (blob * gx).sum() / area, (blob * gy).sum() / area       # centroid
            fit = []
            for shape in shapes:
                # radius from the area, centre from the centroid: exact for a true render
                unit_area, ox, oy = _GEOMETRY[shape]
                r = math.sqrt(area / unit_area)                                 # pixels
                # Rasterising adds a rim and rounds the circle's box to whole canvas pixels, so
                # the drawn area is not exactly unit_area * r^2: rescale r towards the blob's area
                # twice more and keep the best of the three fits.
                for _ in range(3):
                    cx, cy = (mx - ox * r) / W, (my - oy * r) / H               # bbox centre
                    cov = _coverage(shape, cx, cy, r / S, (W, H))
                    fit.append((_soft_iou(blob, cov), shape, r / S, cx, cy))
                    r = r * math.sqrt(area / max(float(cov.sum()), 1e-6))
            iou, shape, r, cx, cy = max(fit)
            found.append({"color": color, "shape": shape,
                          "size": "small" if r < _SIZE_SPLIT else "large",
                          "center": (float(cx), float(cy)),
                          "bbox": (int(x0), int(y0), int(x1), int(y1)),
                          "pixels": int(len(comp)), "iou": round(iou, 4)})
    return sorted(found, key=lambda o: -o["pixels"])


def _wanted_pairs(wanted: Sequence[tuple[str, str]] | Scene) -> list[tuple[str, str]]:
    if isinstance(wanted, Scene):
        return [o.pair for o in wanted.objects]
    pairs = [tuple(p) for p in wanted]
    bad = [p for p in pairs if len(p) != 2 or p[0] not in COLORS or p[1] not in SHAPES]
    if bad:
        raise ValueError(f"check_drawing: wanted must be (colour, shape) pairs with colours from "
                         f"{list(COLORS)} and shapes from {list(SHAPES)}, got {bad}")
    return pairs  # type: ignore[return-value]


def check_drawing(image: Image.Image, wanted: Sequence[tuple[str, str]] | Scene,
                  world_config: ShapesConfig | None = None) -> dict:
    """Did the image draw what was asked? ``wanted``: (colour, shape) pairs or a Scene.

    Returns ``found`` / ``missing`` (wanted pairs recovered / not), ``extra`` (pairs drawn but
    not asked for), ``ok`` (nothing missing) and ``objects`` (the full parse).
    """
    want = _wanted_pairs(wanted)
    objects = parse_drawing(image, world_config)
    got = [(o["color"], o["shape"]) for o in objects]
    found = [p for p in want if p in got]
    return {"found": found, "missing": [p for p in want if p not in got],
            "extra": [p for p in got if p not in want], "ok": len(found) == len(want),
            "objects": objects}


def score_drawings(images: Sequence[Image.Image], wanted: Sequence[Sequence[tuple[str, str]] | Scene],
                   world_config: ShapesConfig | None = None) -> dict:
    """Checker figures over many drawings: ``recall`` (share of wanted objects recovered),
    ``all_ok`` (share of images with every object), ``extra_per_image`` (false or unasked blobs)."""
    if len(images) != len(wanted):
        raise ValueError(f"score_drawings: {len(images)} images but {len(wanted)} wanted lists")
    n_want = n_found = n_ok = n_extra = 0
    for img, w in zip(images, wanted):
        r = check_drawing(img, w, world_config)
        n_want += len(r["found"]) + len(r["missing"])
        n_found += len(r["found"])
        n_ok += r["ok"]
        n_extra += len(r["extra"])
    n = max(1, len(images))
    return {"recall": n_found / max(1, n_want), "all_ok": n_ok / n, "extra_per_image": n_extra / n,
            "objects": n_want, "images": len(images)}
