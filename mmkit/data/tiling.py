"""AnyRes tiling: a high-resolution image as a grid of encoder-size crops plus a global view.

LLaVA-NeXT (Liu et al., 2024, "LLaVA-NeXT: Improved reasoning, OCR, and world knowledge";
transformers ``LlavaNextImageProcessor`` / ``LlavaNextModel``) keeps the encoder at the size
it was trained at (CLIP-L/14 at 336 px) and shows it a large image piece by piece:

    image (W x H)
      -> best grid (rows, cols) among the allowed ones         ``best_grid``
         (maximise the effective resolution, then minimise the wasted area)
      -> resized to fit rows*S x cols*S, padded (centred)        ``tile_image``
      -> rows*cols crops of S x S, in reading order
         + one global view: the whole image at S x S
      -> every crop through the same encoder and bridge          (1 + rows*cols, th*tw, D)
      -> the crops' token grids put back together (rows*th, cols*tw), the rows / columns
         that only saw padding cut off (``unpadded_extent``), and a learned
         ``image_newline`` after each row                        (``mmkit.vlm.AnyRes``)
      -> LM tokens: global view's th*tw, then the unpadded grid with its newlines

``unpack_tokens`` reads that layout back (one value per LM token -> the global view's grid
and the crops' grid, as the crops tile the image), and ``canvas_view`` frames the image as
the crops cover it: together they put what the LM did with each token (``VLM.explain``'s
attention maps) back on the image.

GPT-4V's 512-px tiles and Qwen-VL's 224 -> 448 px step make the same trade: more pixels for
the encoder to read small text, paid for in image tokens (``mmkit.viz.tokens``).

The geometry here is shared by the model (``mmkit/vlm.py``) and the token calculator
(``mmkit.viz.tokens.llava_next_tokens``), so both count the same tokens for the same size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

__all__ = ["Tiles", "TilingError", "select_best_resolution", "best_grid", "parse_grids", "unpadded_extent",
           "tile_image", "anyres_tokens", "unpack_tokens", "canvas_view", "DEFAULT_GRIDS"]

#: (rows, cols) grids a tiny model may choose from: LLaVA-NeXT's five shapes, in crops.
DEFAULT_GRIDS = ((1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1))


class TilingError(ValueError):
    """Grids or sizes that AnyRes cannot use; the message says what to change."""


@dataclass
class Tiles:
    """One image, tiled: ``pixels`` (1 + rows*cols, 3, S_h, S_w) normalised (the global view
    first, then the crops row by row), the ``grid`` (rows, cols) and the image's own ``size``
    (height, width), which says which tokens only saw padding."""

    pixels: torch.Tensor
    grid: tuple[int, int]
    size: tuple[int, int]

    @property
    def num_crops(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def crop(self) -> tuple[int, int]:
        """(S_h, S_w): the size of one crop, the encoder's input size."""
        return int(self.pixels.shape[-2]), int(self.pixels.shape[-1])


def select_best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """AnyRes: the grid resolution (height, width) that keeps the most of the image (after
    fitting it in), and among those wastes the least padding (transformers'
    ``select_best_resolution``)."""
    best, best_eff, best_waste = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = pw * ph - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (int(ph), int(pw)), eff, waste
    if best is None:
        raise TilingError("select_best_resolution: no grid resolutions given")
    return best


def parse_grids(grids: Any) -> tuple[tuple[int, int], ...]:
    """``[[1, 1], [1, 2], ...]`` -> ((rows, cols), ...), checked: positive ints, no duplicates."""
    if grids is None or isinstance(grids, (str, bytes)) or not len(grids):
        raise TilingError(f"anyres_grids must be a non-empty list of [rows, cols], e.g. [[1, 1], [1, 2], "
                          f"[2, 1], [2, 2]]; got {grids!r}")
    out = []
    for g in grids:
        try:
            r, c = (int(v) for v in g)
        except (TypeError, ValueError):
            raise TilingError(f"anyres_grids: {g!r} is not [rows, cols]; write each grid as two ints, "
                              "e.g. [2, 2]") from None
        if r < 1 or c < 1 or r != g[0] or c != g[1]:
            raise TilingError(f"anyres_grids: {g!r} needs whole rows and cols >= 1")
        out.append((r, c))
    if len(set(out)) != len(out):
        raise TilingError(f"anyres_grids: {list(map(list, out))} lists a grid twice")
    return tuple(out)


def best_grid(height: int, width: int, crop: int | Sequence[int], grids: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(rows, cols) of S x S crops AnyRes chooses for a ``height`` x ``width`` image."""
    sh, sw = (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))
    grids = parse_grids(grids)
    bh, bw = select_best_resolution(height, width, [(r * sh, c * sw) for r, c in grids])
    return bh // sh, bw // sw


def unpadded_extent(height: int, width: int, cur_h: int, cur_w: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right): the rows / columns of a ``cur_h`` x ``cur_w`` token grid
    (laid over the padded canvas) that hold the ``height`` x ``width`` image; the rest only
    saw padding (transformers' ``unpad_image``: the same rounding, padding cut evenly)."""
    if width / height > cur_w / cur_h:  # wider than the canvas: padding above and below
        new_h = int(round(height * (cur_w / width), 7))
        pad = (cur_h - new_h) // 2
        return pad, cur_h - pad, 0, cur_w
    new_w = int(round(width * (cur_h / height), 7))
    pad = (cur_w - new_w) // 2
    return 0, cur_h, pad, cur_w - pad


def anyres_tokens(height: int, width: int, crop: int | Sequence[int], grids: Sequence[Sequence[int]],
                  token_grid: tuple[int, int]) -> int:
    """LM tokens of one tiled image: the global view's th*tw, plus the unpadded grid of the
    crops' tokens, plus one newline per row of it. ``token_grid`` (th, tw): one crop's tokens."""
    rows, cols = best_grid(height, width, crop, grids)
    th, tw = token_grid
    top, bottom, left, right = unpadded_extent(height, width, rows * th, cols * tw)
    h, w = bottom - top, right - left
    return th * tw + h * w + h


def tile_image(preprocess: Callable[..., torch.Tensor], image: Any, crop: int | Sequence[int],
               grids: Sequence[Sequence[int]]) -> Tiles:
    """One image (PIL, or a path) -> ``Tiles``. ``preprocess(images, size=(H, W), mode="pad")`` is the
    encoder's own (``VisionEncoder.preprocess``): it letterboxes (centred, mean colour) and
    normalises, so the canvas is the image fitted into rows*S x cols*S and padded, and the
    global view the image fitted into S x S."""
    from PIL import Image

    if not isinstance(image, Image.Image):  # a path, bytes, an array: the processor's own loading
        from mmkit.data.images import load_image

        image = load_image(image)
    sh, sw = (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))
    width, height = image.size
    rows, cols = best_grid(height, width, (sh, sw), grids)
    canvas = preprocess([image], size=(rows * sh, cols * sw), mode="pad")[0]  # (3, rows*S, cols*S)
    C = canvas.shape[0]
    crops = canvas.reshape(C, rows, sh, cols, sw).permute(1, 3, 0, 2, 4).reshape(rows * cols, C, sh, sw)
    view = preprocess([image], size=(sh, sw), mode="pad")  # (1, 3, S, S): the whole image
    return Tiles(torch.cat([view, crops]), (rows, cols), (height, width))


def unpack_tokens(values: torch.Tensor, tiles: Tiles,
                  token_grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM-side layout of one tiled image read back: ``values`` (T, ...), one entry per LM
    token in the order ``mmkit.vlm.AnyRes.pack`` wrote them (e.g. the attention each token
    got) -> (the global view's (th, tw, ...), the crops' (rows*th, cols*tw, ...)), each crop's
    tokens in its place on the crop grid, as the crops tile the canvas (``canvas_view``).

    The newline tokens end each row and saw no patch: they are left out. The rows / columns
    that only saw padding were cut before the LM (``unpadded_extent``): they stay zero."""
    (R, C), (th, tw) = tiles.grid, token_grid
    top, bottom, left, right = unpadded_extent(*tiles.size, R * th, C * tw)
    h, w = bottom - top, right - left
    n = th * tw + h * (w + 1)
    if values.shape[0] != n:
        raise TilingError(f"unpack_tokens: a {tiles.size[1]}x{tiles.size[0]} image on a {R}x{C} grid of "
                          f"{th}x{tw}-token crops has {n} LM tokens ({th * tw} global view + {h} rows of "
                          f"{w} + newline), got {values.shape[0]}; pass exactly this image's token values")
    rest = tuple(values.shape[1:])
    view = values[:th * tw].reshape(th, tw, *rest)
    crops = values.new_zeros(R * th, C * tw, *rest)
    crops[top:bottom, left:right] = values[th * tw:].reshape(h, w + 1, *rest)[:, :w]  # the newline is last
    return view, crops


def canvas_view(image: Any, tiles: Tiles, fill: tuple[int, ...] = (128, 128, 128)):
    """The image as the crops of ``tiles`` cover it -> PIL image at the image's own resolution:
    padded (centred, with ``fill``) to the canvas's proportions (rows*S_h : cols*S_w), as
    ``tile_image`` fits it before cutting. A map on the crop grid (``unpack_tokens``) drawn
    over this lands on the pixels its crops saw."""
    from mmkit.vision import letterbox

    (R, C), (sh, sw) = tiles.grid, tiles.crop
    return letterbox(image, (C * sw) / (R * sh), fill)
