"""Token budgets: how many LM tokens one image costs, scheme by scheme.

An image's tokens are the biggest item of a VLM's bill: they fill the context window,
and attention's cost grows with their square. Each family pays differently:

    scheme                  tokens for a W x H image
    ----------------------  -------------------------------------------------------------
    GPT-4V / GPT-4o, low    85, whatever the size
    GPT-4V / GPT-4o, high   fit in 2048 x 2048, shortest side down to 768, then
                            85 + 170 per 512 x 512 tile         (1024x1024 -> 4 tiles -> 765)
    LLaVA-1.5               (336 / 14)^2 = 576, any size (the image is resized to 336)
    LLaVA-NeXT AnyRes       a base 336 crop (576) + the best grid of 336 crops, the tiles'
                            feature map cut back to the image's aspect ratio, plus one
                            newline token per feature row
    Fuyu                    fit in 1920 x 1080, then rows * (cols + 1) 30-px patches
                            (one |NEWLINE| per row)
    EVE                     1 CLS + h * (w + 1): patches of 14 px pooled 2 x 2, one <SPL>
                            per row
    Qwen-VL                 256 queries (+ <img> </img>), any size (the ViT runs at 448)
    mmkit bridges           ``bridge.num_tokens(grid)``: mlp = h*w, pixel_shuffle = h*w/s^2,
                            qwen_vl = Q, ...

``image_tokens(scheme, width, height)`` gives one number; ``token_table`` a table for a
list of sizes; ``plot_token_budgets`` the curves of tokens against resolution.

Sources: OpenAI's vision pricing guide (GPT-4V / GPT-4o tiles), transformers'
``LlavaNextProcessor._get_number_of_features`` and ``select_best_resolution`` (AnyRes),
``FuyuProcessor`` (Fuyu), the EVE paper (Diao et al., 2024, Sec. 3.1), the Qwen-VL paper.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from mmkit.data import tiling

__all__ = [
    "gpt4v_tokens", "llava_tokens", "llava_next_tokens", "select_best_resolution", "fuyu_tokens",
    "eve_tokens", "qwen_vl_tokens", "bridge_tokens", "image_tokens", "SCHEMES", "token_table",
    "plot_token_budgets", "LLAVA_NEXT_PINPOINTS",
]


def _fit_within(width: int, height: int, max_w: int, max_h: int) -> tuple[int, int]:
    """Scale down (never up), keeping the aspect ratio, to fit in max_w x max_h."""
    if width <= max_w and height <= max_h:
        return width, height
    scale = min(max_w / width, max_h / height)
    return int(width * scale), int(height * scale)


def gpt4v_tokens(width: int, height: int, detail: str = "high") -> int:
    """GPT-4V / GPT-4o image tokens (OpenAI's published rule).

    low: 85. high: fit in 2048 x 2048, scale the shortest side down to 768 (never up),
    count 512 x 512 tiles (partial tiles count), 85 + 170 per tile.
    """
    if detail == "low":
        return 85
    if detail != "high":
        raise ValueError(f"gpt4v_tokens: detail must be 'high' or 'low', got {detail!r}")
    w, h = _fit_within(width, height, 2048, 2048)
    if min(w, h) > 768:
        scale = 768 / min(w, h)
        w, h = int(w * scale), int(h * scale)
    tiles = math.ceil(w / 512) * math.ceil(h / 512)
    return 85 + 170 * tiles


def llava_tokens(width: int, height: int, image_size: int = 336, patch: int = 14) -> int:
    """LLaVA-1.5: the image is padded / resized to ``image_size``: one token per patch."""
    return (image_size // patch) ** 2


#: LLaVA-NeXT's (llava-v1.6) grid resolutions, (height, width).
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def select_best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]] = LLAVA_NEXT_PINPOINTS
                           ) -> tuple[int, int]:
    """AnyRes: the grid resolution (height, width) that keeps the most of the image (after
    fitting it in), and among those wastes the least padding (``mmkit.data.tiling``, the
    rule the tiling models use)."""
    return tiling.select_best_resolution(height, width, pinpoints)


def llava_next_tokens(width: int, height: int, crop: int = 336, patch: int = 14,
                      pinpoints: Sequence[Sequence[int]] = LLAVA_NEXT_PINPOINTS) -> int:
    """LLaVA-NeXT AnyRes: base crop + unpadded tile features + one newline per feature row.

    The tiles' feature map is (rows * 24, cols * 24) for 336 crops of 14-px patches; the
    image was padded (centred) to the grid's aspect ratio, so the padded feature rows (or
    columns) are removed before the newline tokens are added (``mmkit.data.tiling``;
    an mmkit model with ``image_mode="anyres"`` counts the same, ``patch`` = crop side /
    tokens per crop side).
    """
    side = crop // patch  # 24 features per crop side
    bh, bw = select_best_resolution(height, width, pinpoints)
    top, bottom, left, right = tiling.unpadded_extent(height, width, side * (bh // crop), side * (bw // crop))
    rows = bottom - top
    return side * side + rows * (right - left) + rows  # base + unpadded tiles + newlines


def fuyu_tokens(width: int, height: int, patch: int = 30, max_w: int = 1920, max_h: int = 1080) -> int:
    """Fuyu: fit in 1920 x 1080 (down only), then one token per 30-px patch (the last
    row / column padded) and one ``|NEWLINE|`` per row: rows * (cols + 1)."""
    w, h = _fit_within(width, height, max_w, max_h)
    rows, cols = math.ceil(h / patch), math.ceil(w / patch)
    return rows * (cols + 1)


def eve_tokens(width: int, height: int, patch: int = 14, pool: int = 2, max_side: int = 672) -> int:
    """EVE: 1 CLS + h * (w + 1) (an <SPL> token per row); h, w = patch grid after the 2 x 2
    pooling of 14-px patches, on the image scaled down (keeping its ratio) so its longer
    side is at most ``max_side`` (672 in EVE-7B)."""
    w, h = _fit_within(width, height, max_side, max_side)
    cell = patch * pool
    gh, gw = max(1, math.ceil(h / cell)), max(1, math.ceil(w / cell))
    return 1 + gh * (gw + 1)


def qwen_vl_tokens(width: int, height: int, num_queries: int = 256, wrap: bool = True) -> int:
    """Qwen-VL: the adapter's queries, whatever the size, plus ``<img>`` and ``</img>``."""
    return num_queries + (2 if wrap else 0)


def bridge_tokens(bridge: str, width: int, height: int, *, patch: int = 14, max_size: int | None = None,
                  **bridge_kwargs: Any) -> int:
    """An mmkit bridge's count: ``build_bridge(bridge, ...).num_tokens(grid)``.

    The ViT (``patch``-pixel patches) runs at the image's own size, scaled down (keeping
    the ratio) to fit ``max_size`` x ``max_size`` if given, rounded down to whole patches.
    """
    from mmkit.bridges import build_bridge

    if max_size is not None:
        width, height = _fit_within(width, height, max_size, max_size)
    grid = (max(1, height // patch), max(1, width // patch))
    dims = 64  # the count does not depend on the widths; small ones keep this cheap
    return int(build_bridge(bridge, dims, dims, **bridge_kwargs).num_tokens(grid))


#: name -> tokens(width, height). The mmkit bridges run a patch-14 ViT at the image size,
#: scaled down to fit 448 x 448 (Qwen-VL's input), so they compare with the papers' encoders.
SCHEMES: dict[str, Callable[[int, int], int]] = {
    "GPT-4o (low)": lambda w, h: gpt4v_tokens(w, h, "low"),
    "GPT-4o (high)": gpt4v_tokens,
    "LLaVA-1.5": llava_tokens,
    "LLaVA-NeXT AnyRes": llava_next_tokens,
    "Fuyu": fuyu_tokens,
    "EVE": eve_tokens,
    "Qwen-VL": qwen_vl_tokens,
    "mmkit mlp": lambda w, h: bridge_tokens("mlp", w, h, max_size=448),
    "mmkit pixel_shuffle s=2": lambda w, h: bridge_tokens("pixel_shuffle", w, h, max_size=448, scale_factor=2),
    "mmkit qwen_vl Q=64": lambda w, h: bridge_tokens("qwen_vl", w, h, max_size=448, num_queries=64),
}


def image_tokens(scheme: str, width: int, height: int) -> int:
    """Tokens one ``width`` x ``height`` image costs under ``scheme`` (a key of ``SCHEMES``)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    return int(SCHEMES[scheme](int(width), int(height)))


def token_table(sizes: Sequence[tuple[int, int]], schemes: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Rows ``{"image": "WxH", scheme: tokens, ...}`` for each (width, height) in ``sizes``
    (render with ``mmkit.viz.md_table``)."""
    schemes = list(schemes or SCHEMES)
    return [{"image": f"{w}x{h}", **{s: image_tokens(s, w, h) for s in schemes}} for w, h in sizes]


def plot_token_budgets(sides: Sequence[int] = (224, 336, 448, 672, 896, 1024, 1344, 1536, 2048), *,
                       aspect: float = 1.0, schemes: Sequence[str] | None = None, logy: bool = True,
                       title: str | None = None):
    """Image tokens against resolution for every scheme: one line each, x = the image's
    width (height = width / ``aspect``), log scale by default (85 to thousands)."""
    from mmkit.viz.core import plot_curves

    schemes = list(schemes or SCHEMES)
    series = {s: {w: image_tokens(s, w, max(1, round(w / aspect))) for w in sides} for s in schemes}
    fig = plot_curves(series, xlabel="image width (px)" + (f", aspect {aspect:g}:1" if aspect != 1 else ", square"),
                      ylabel="image tokens", title=title or "what one image costs the LM", figsize=(7.0, 4.2))
    ax = fig.axes[0]
    for j, line in enumerate(ax.lines):  # the palette repeats: later lines get their own dashes
        line.set_linestyle(["-", "--", ":"][(j // 8) % 3])
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig
