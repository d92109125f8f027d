"""LLaVA's projector: the simplest bridge, and the one most open VLMs still use.

Papers: LLaVA (Liu et al., 2023, "Visual Instruction Tuning", Fig. 1), LLaVA-1.5
(Liu et al., 2023, "Improved Baselines with Visual Instruction Tuning", Sec. 3.2) and
Yi-VL (01.AI, 2024).

    image -> ViT -> patch features Z_v (N, h*w, D_v)    [layer -2, CLS dropped]
                 -> projector W                        -> H_v (N, h*w, D_lm)
                 -> written into the LM's input embeddings at the <image> positions

Every patch becomes one LM token: a 24x24 grid (CLIP-L/14 at 336 px) costs 576 tokens,
the tiny encoder's 8x8 grid costs 64. The projector learns nothing about *which*
patches matter; the LM's own attention does that.

Three projectors, in the order the papers introduced them:

    linear        LLaVA-1.0   Linear(D_v, D_lm)
    mlp           LLaVA-1.5   Linear(D_v, D_lm) -> GELU -> Linear(D_lm, D_lm)
    mlp_norm      Yi-VL       Linear -> LayerNorm -> GELU -> Linear -> LayerNorm

The ``mlp`` weights are named like transformers' ``LlavaMultiModalProjector``
(``linear_1``, ``linear_2``), so ``mmkit.convert.load_hf`` copies a real LLaVA-1.5
projector across unchanged.
"""
from __future__ import annotations

from torch import Tensor, nn

from mmkit.bridges import Bridge, register_bridge

__all__ = ["LinearProjector", "MLPProjector", "NormMLPProjector"]


class _PerPatch(Bridge):
    """A projector maps each patch on its own: one token per patch."""

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return grid[0] * grid[1]


@register_bridge("linear")
class LinearProjector(_PerPatch):
    """LLaVA-1.0: one linear layer, Z_v (N, P, D_v) -> H_v (N, P, D_lm)."""

    def __init__(self, vision_dim: int, lm_dim: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(vision_dim, lm_dim, bias=bias)

    def forward(self, features: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        return self.linear(features)  # (N, P, D_lm)


@register_bridge("mlp")
class MLPProjector(_PerPatch):
    """LLaVA-1.5: two linear layers with an exact GELU between them (``mlp2x_gelu``)."""

    def __init__(self, vision_dim: int, lm_dim: int, bias: bool = True):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, lm_dim, bias=bias)
        self.act = nn.GELU()  # exact erf GELU, as transformers' "gelu"
        self.linear_2 = nn.Linear(lm_dim, lm_dim, bias=bias)

    def forward(self, features: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        return self.linear_2(self.act(self.linear_1(features)))  # (N, P, D_lm)



@register_bridge("mlp_norm")
class NormMLPProjector(_PerPatch):
    """Yi-VL: the LLaVA-1.5 MLP with a LayerNorm after each linear layer.

    The final LayerNorm fixes the scale of every image token by construction (normalised,
    then a learned gain), whatever the scale of the vision features.
    """

    def __init__(self, vision_dim: int, lm_dim: int, bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, lm_dim, bias=bias)
        self.norm_1 = nn.LayerNorm(lm_dim, eps=eps)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(lm_dim, lm_dim, bias=bias)
        self.norm_2 = nn.LayerNorm(lm_dim, eps=eps)

    def forward(self, features: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        h = self.act(self.norm_1(self.linear_1(features)))  # (N, P, D_lm)
        return self.norm_2(self.linear_2(h))  # (N, P, D_lm)
