"""Pixel shuffle: fewer image tokens by folding each s x s block of patches into one token.

Idefics3 (Laurençon et al., 2024, "Building and better understanding vision-language
models", Sec. 2.2 / Fig. 4; transformers ``Idefics3Connector``) and nanoVLM. The name
comes from super-resolution's pixel shuffle run in reverse (space-to-depth):

    patch features  (N, h*w, D_v)            one token per patch, row-major
      -> grid       (N, h, w, D_v)
      -> blocks     (N, h/s, w/s, s*s*D_v)   the s x s neighbours of a block side by side
                                             in the channels: rows of the block first,
                                             then columns, then D_v (Idefics3's order)
      -> proj       (N, (h/s)*(w/s), D_lm)   one Linear(s*s*D_v, D_lm, bias=False)

Nothing is averaged away: the block's features are all still there, stacked in the
channel dimension, and the projection decides what to keep. The LM sees s*s times fewer
tokens (Idefics3: s = 3, a 27x27 SigLIP grid -> 81 tokens per crop; SmolVLM: s = 4).

Unlike LLaVA's projector the token count depends on s; unlike a Q-Former or Qwen-VL's
adapter there is nothing learned about *where* to look: token (i, j) is always the block
(i, j) of the image. It needs a grid that s divides, and no CLS token (it would break
the grid): ``check_grid`` says so before any compute is spent.
"""
from __future__ import annotations

from torch import Tensor, nn

from mmkit.bridges import Bridge, register_bridge

__all__ = ["PixelShuffleProjector", "PixelShuffleError", "pixel_shuffle", "check_grid"]


class PixelShuffleError(ValueError):
    """A patch grid that cannot be folded into s x s blocks."""


def check_grid(grid: tuple[int, int], scale_factor: int, num_tokens: int | None = None) -> None:
    """Raise ``PixelShuffleError`` unless ``grid`` (h, w) splits into ``scale_factor`` blocks.

    ``num_tokens`` (the features' length) must be h*w: a CLS token or registers left in
    would shift every row of the grid.
    """
    h, w = int(grid[0]), int(grid[1])
    s = int(scale_factor)
    if s < 1:
        raise PixelShuffleError(f"pixel shuffle: scale_factor must be >= 1, got {scale_factor}.")
    if num_tokens is not None and num_tokens != h * w:
        raise PixelShuffleError(
            f"pixel shuffle: got {num_tokens} feature tokens for a {h}x{w} patch grid (= {h * w}); "
            "drop the CLS / register tokens first (VisionEncoder.features(..., drop_cls=True))."
        )
    if h % s or w % s:
        ok = [f for f in range(1, max(h, w) + 1) if h % f == 0 and w % f == 0]
        fix_h, fix_w = -(-h // s) * s, -(-w // s) * s
        raise PixelShuffleError(
            f"pixel shuffle: a {h}x{w} patch grid cannot be cut into {s}x{s} blocks "
            f"({h} % {s} = {h % s}, {w} % {s} = {w % s}). Use a scale factor that divides both sides "
            f"({', '.join(map(str, ok))}), or an image size whose grid is {fix_h}x{fix_w} "
            f"(image side = grid side x patch size)."
        )


def pixel_shuffle(x: Tensor, grid: tuple[int, int], scale_factor: int = 2) -> Tensor:
    """Space-to-depth on a patch grid: (N, h*w, D) -> (N, (h/s)*(w/s), s*s*D).

    Output token (i, j) holds, in its channels, the patches (i*s + r, j*s + c) for
    r = 0..s-1 (outer) and c = 0..s-1 (inner): the same order as transformers'
    ``Idefics3Connector.pixel_shuffle`` (which needs h == w; this works on any grid s divides).
    """
    N, T, D = x.shape
    h, w = int(grid[0]), int(grid[1])
    s = int(scale_factor)
    check_grid((h, w), s, T)
    x = x.reshape(N, h // s, s, w // s, s, D)  # (N, i, r, j, c, D): patch (i*s + r, j*s + c)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, i, j, r, c, D): the block's neighbours together
    return x.reshape(N, (h // s) * (w // s), s * s * D)  # (N, h*w / s^2, s^2 D), row-major blocks


@register_bridge("pixel_shuffle")
class PixelShuffleProjector(Bridge):
    """Idefics3's connector: ``pixel_shuffle`` then ``Linear(s*s*D_v, D_lm, bias=False)``.

    ``modality_projection.proj`` is named like transformers' ``Idefics3SimpleMLP`` so
    ``mmkit.convert.load_hf`` copies a real Idefics3 / SmolVLM connector across unchanged.
    """

    def __init__(self, vision_dim: int, lm_dim: int, scale_factor: int = 2):
        super().__init__()
        if int(scale_factor) < 1:
            raise PixelShuffleError(f"pixel shuffle: scale_factor must be >= 1, got {scale_factor}.")
        self.scale_factor = int(scale_factor)
        self.modality_projection = nn.Module()
        self.modality_projection.proj = nn.Linear(vision_dim * self.scale_factor**2, lm_dim, bias=False)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        check_grid(grid, self.scale_factor)
        return (grid[0] // self.scale_factor) * (grid[1] // self.scale_factor)

    def forward(self, features: Tensor, grid: tuple[int, int]) -> Tensor:
        if grid is None:
            raise PixelShuffleError("pixel shuffle needs the patch grid (h, w): call bridge(features, grid).")
        x = pixel_shuffle(features, grid, self.scale_factor)  # (N, h*w/s^2, s^2 D_v)
        return self.modality_projection.proj(x)  # (N, h*w/s^2, D_lm)

    def extra_repr(self) -> str:
        return f"scale_factor={self.scale_factor}"
