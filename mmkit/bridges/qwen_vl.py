"""Qwen-VL's position-aware vision-language adapter.

Paper: Bai et al., 2023, "Qwen-VL: A Versatile Vision-Language Model for Understanding,
Localization, Text Reading, and Beyond", Sec. 2.1 and Fig. 3 (the adapter), Sec. 2.2
(image and box tokens). Reference code: ``Resampler`` in Qwen-VL's ``visual.py``.

The adapter (one cross-attention layer, Sec. 2.1)::

    patch features  Z      (N, h*w, D_v)       ViT output, CLS dropped
    K/V input       X = LN_kv(W_kv Z)        (N, h*w, D)      D = the LM width
    queries         Q0 = LN_q(query)         (Q, D)           Q learned vectors (256 in
                                                              Qwen-VL, trunc-normal 0.02)
    positions       P_q = sincos_2d(g, g)    (Q, D)           g = sqrt(Q): each query
                                                              owns a cell of a g x g grid
                    P_k = resize(P_q -> h x w, bicubic)       (h*w, D)  same frame, the
                                                              patch grid's resolution
    cross-attention O = Attn(q = Q0 + P_q, k = X + P_k, v = X)   (N, Q, D)
                                                              positions on queries and keys,
                                                              never on the values
    output          H = LN_post(O) W_out      (N, Q, D_lm)    written between <img> </img>

Why "position-aware": compressing h*w patches into Q tokens throws away *where* things
were unless something keeps it. The sin-cos terms make the score q.k larger when a
query's cell and a patch's position are close (sin-cos embeddings of nearby positions
have large dot products), so query i *can* learn to read its own part of the image, and
the LM can then tell the queries apart by where they looked. (It is a prior, not a given:
through a fresh adapter's random W_q, W_k little of it survives; docs/benchmarks.md
measures how local the trained attention is.) Grounding (writing box
coordinates) needs exactly that. Qwen-VL's ViT is trained at 224 px (16x16 patches =
the 256 queries' grid) and then run at 448 px (32x32): the key positions are resized,
the queries stay. The tiny world does the same: 64 queries on the 64 px encoder's 8x8
grid, run at 128 px (16x16 patches) for grounding.

Each image is wrapped in ``<img> ... </img>`` (the recipe's ``image_wrap``); several
images are named in the text, ``Picture 1: <img>...</img>\\nPicture 2: <img>...</img>``.

Grounding (Sec. 2.2) is text, not adapter: ``<ref>the red circle</ref><box>(x1,y1),(x2,y2)</box>``,
corners as integers in [0, 1000) normalised by the image's width and height. The format lives
in :mod:`mmkit.data.grounding` (``box_from_pixels``, ``format_grounding``, ``parse_grounding``,
``box_iou``), and ``mmkit.viz.boxes.draw_boxes`` draws the boxes on an image.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mmkit.bridges import Bridge, register_bridge
from mmkit.nn import Attention, resize_pos_embed, sincos_2d

__all__ = ["PositionAwareAdapter"]


@register_bridge("qwen_vl")
class PositionAwareAdapter(Bridge):
    """Qwen-VL's adapter: Q learned queries cross-attend once to the patch features.

    Args:
        vision_dim: D_v, width of the patch features.
        lm_dim: D, the LM width (the adapter works in it, as Qwen-VL's does).
        num_queries: Q, a square number (the queries sit on a sqrt(Q) x sqrt(Q) grid);
            also the number of LM tokens per image, at any resolution.
        num_heads: attention heads (Qwen-VL: D / 128).
        positions: add the 2D sin-cos positions to queries and keys (``False`` is the
            ablation: the adapter then knows only what the ViT's features say about
            position).
        eps: LayerNorm epsilon (1e-6 in Qwen-VL).

    ``forward(features (N, h*w, D_v), grid (h, w)) -> (N, Q, D_lm)``.
    """

    def __init__(self, vision_dim: int, lm_dim: int, num_queries: int = 64, num_heads: int = 4,
                 positions: bool = True, eps: float = 1e-6):
        super().__init__()
        g = math.isqrt(int(num_queries))
        if g * g != num_queries or num_queries < 1:
            near = sorted({max(1, g) ** 2, (g + 1) ** 2})
            raise ValueError(
                f"qwen_vl adapter: num_queries={num_queries} is not a square number; the queries sit on "
                f"a g x g grid of positions (Qwen-VL: 256 = 16 x 16). Use e.g. {' or '.join(map(str, near))}."
            )
        if lm_dim % num_heads:
            raise ValueError(f"qwen_vl adapter: lm_dim={lm_dim} is not divisible by num_heads={num_heads}.")
        self.num_queries, self.query_grid, self.positions = int(num_queries), (g, g), bool(positions)
        self.query = nn.Parameter(torch.empty(num_queries, lm_dim))  # (Q, D)
        nn.init.trunc_normal_(self.query, std=0.02)
        # K/V come from the ViT width; Qwen-VL projects them without bias, then normalises.
        self.kv_proj = nn.Linear(vision_dim, lm_dim, bias=False) if vision_dim != lm_dim else nn.Identity()
        self.ln_q = nn.LayerNorm(lm_dim, eps=eps)
        self.ln_kv = nn.LayerNorm(lm_dim, eps=eps)
        self.attn = Attention(lm_dim, num_heads)
        self.ln_post = nn.LayerNorm(lm_dim, eps=eps)
        self.proj = nn.Linear(lm_dim, lm_dim, bias=False)  # Qwen-VL's ``x @ proj``
        # Fixed, not learned: MAE's 2D sin-cos on the query grid (recomputed, so not saved).
        self.register_buffer("pos_embed", sincos_2d(lm_dim, g, g), persistent=False)  # (Q, D)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return self.num_queries  # the same at every resolution

    def key_positions(self, grid: tuple[int, int]) -> Tensor:
        """(h*w, D): the query grid's sin-cos table resized (bicubic) to the patch grid.

        Equal grids give the table itself; for 8x8 queries over 16x16 patches, query
        (i, j) covers the same piece of the image as patches 2i..2i+1 x 2j..2j+1, and
        the resized table puts them next to each other (align_corners=False: cell centres
        line up).
        """
        return resize_pos_embed(self.pos_embed, self.query_grid, tuple(grid), mode="bicubic")

    def forward(self, features: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        N, T, _ = features.shape
        if grid is None:
            side = math.isqrt(T)
            if side * side != T:
                raise ValueError(f"qwen_vl adapter: {T} patch features are not a square grid; pass grid=(h, w).")
            grid = (side, side)
        if grid[0] * grid[1] != T:
            fix = ("drop the CLS token (VisionEncoder.features(..., drop_cls=True))" if 0 < T - grid[0] * grid[1] <= 8
                   else "pass the grid of the images the features came from (VLM.image_grid(pixel_values), "
                        "or VisionEncoder.grid(image_size))")
            raise ValueError(f"qwen_vl adapter: {T} patch features do not fill a {grid[0]}x{grid[1]} grid; {fix}.")
        x = self.ln_kv(self.kv_proj(features))  # (N, h*w, D): keys and values before positions
        q = self.ln_q(self.query)  # (Q, D)
        keys = x
        if self.positions:
            q = q + self.pos_embed.to(q.dtype)  # (Q, D)
            keys = x + self.key_positions(grid).to(x.dtype)  # (N, h*w, D)
        q = q.unsqueeze(0).expand(N, -1, -1)  # (N, Q, D)
        if self.recording:
            out, weights = self.attn(q, context=keys, value=x, return_weights=True)  # weights (N, H, Q, h*w)
            self.record("query_attention", weights.mean(dim=1))  # (N, Q, h*w), rows sum to 1
        else:
            out = self.attn(q, context=keys, value=x)  # (N, Q, D)
        return self.proj(self.ln_post(out))  # (N, Q, D_lm)

    def attention_maps(self, seen: dict):
        """(N_img, Q, h*w): which patches each query read (mean over heads; one layer)."""
        keys = [k for k in seen if k == "query_attention" or k.endswith(".query_attention")]
        if not keys:
            return None
        value = seen[keys[0]]
        return torch.cat(value, dim=0) if isinstance(value, list) else value

    def extra_repr(self) -> str:
        return f"num_queries={self.num_queries}, query_grid={self.query_grid}, positions={self.positions}"
