"""TinyViT: a plain Vision Transformer written from scratch (Dosovitskiy et al. 2021, Fig. 1).

    pixel_values (B, C, H, W)
      -> patch embedding: Conv2d(C, D, k=s=patch)   (or a convolutional stem, ``conv_stem``)
      -> tokens (B, 1 + h*w, D): a CLS token, then the row-major patches, h = H // patch
      -> + learned absolute position embeddings (bicubically resized for other grids)
      -> L pre-norm blocks: x + Attn(LN(x)), then x + MLP(LN(x))
      -> final LayerNorm

Also here: ``ViTConfig`` (its hyper-parameters, saved as ``config.json``) and
``VisionOutput``, what every vision backend returns. The tiny pre-trained weights are
CLIP-trained by ``mmkit.pretrain.clip``; ``mmkit.vision.encoder`` wraps TinyViT (and timm,
transformers) behind one interface.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmkit import nn as mnn

__all__ = ["ViTConfig", "VisionOutput", "Block", "conv_stem", "TinyViT", "pair",
           "TINYVIT_MODEL_TYPE", "WEIGHTS_NAME", "CONFIG_NAME"]

TINYVIT_MODEL_TYPE = "mmkit-tinyvit"  # config.json's "model_type": how a saved TinyViT is recognised
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def pair(x: int | Sequence[int]) -> tuple[int, int]:
    """An image or patch size as (H, W): an int means a square."""
    if isinstance(x, int):
        return (x, x)
    h, w = x
    return (int(h), int(w))


# --------------------------------------------------------------------------------------
# Config and output
# --------------------------------------------------------------------------------------
@dataclass
class ViTConfig:
    """Hyper-parameters of ``TinyViT``; ``image_size`` is the size it is trained at."""

    image_size: int | tuple[int, int] = 64
    patch_size: int = 8
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    num_channels: int = 3
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    stem: str = "patch"  # "patch": one Conv2d k=s=patch (ViT); "conv": 3x3 stride-2 convs (Xiao et al. 2021)

    def __post_init__(self) -> None:
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"ViTConfig: stem={self.stem!r}; choose 'patch' (ViT) or 'conv' (convolutional stem).")
        if self.stem == "conv" and (self.patch_size & (self.patch_size - 1) or self.patch_size < 2):
            raise ValueError(f"ViTConfig: stem='conv' halves the image log2(patch) times, so patch_size must be a "
                             f"power of two >= 2, got {self.patch_size}; use stem='patch' for other sizes.")
        H, W = pair(self.image_size)
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"ViTConfig: image_size {H}x{W} must be a multiple of patch_size={self.patch_size}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ViTConfig: hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}.")

    @property
    def grid(self) -> tuple[int, int]:
        H, W = pair(self.image_size)
        return (H // self.patch_size, W // self.patch_size)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return {"model_type": TINYVIT_MODEL_TYPE, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        d = dict(d)
        d.pop("model_type", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ViTConfig.from_dict: unknown keys {unknown}; expected a subset of {sorted(known)}.")
        for k in ("image_size", "image_mean", "image_std"):
            if isinstance(d.get(k), list):
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass
class VisionOutput:
    """What every backend returns.

    hidden_states: (embeddings, after block 1, ..., after block L), each
        (B, P + h*w, D), before any final norm - the transformers convention, so
        ``hidden_states[-2]`` is the penultimate block's output (LLaVA's choice).
    last_hidden_state: the backend's final sequence output. TinyViT, timm and SigLIP:
        after the final norm. transformers CLIP: its ``last_hidden_state``, which is
        *not* post-normed (CLIP only norms the pooled CLS).
    pooled: one vector per image (B, D): CLS after the final norm (TinyViT, CLIP,
        timm ``pre_logits``), SigLIP's attention-pooling head; None if the model has none.
    grid: (h, w) patch grid; num_prefix_tokens: P (1 for CLS, 0 for SigLIP, 1+R
        with R registers).
    """

    last_hidden_state: Tensor
    hidden_states: tuple[Tensor, ...]
    pooled: Tensor | None
    grid: tuple[int, int]
    num_prefix_tokens: int = 1


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.attn = mnn.Attention(D, cfg.num_heads)
        self.norm2 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.mlp = mnn.MLP(D, int(D * cfg.mlp_ratio), act="gelu")

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, T, D)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def conv_stem(in_ch: int, dim: int, patch: int) -> nn.Sequential:
    """A convolutional stem (Xiao et al. 2021, "Early Convolutions Help Transformers See
    Better", Fig. 1): log2(patch) 3x3 stride-2 convolutions, widths doubling up to ``dim``,
    then a 1x1 convolution. (B, C, H, W) -> (B, D, H/patch, W/patch), the same token grid
    as the patchify stem; but each token's receptive field (2*patch - 1 pixels wide)
    reaches into the patches above and to its left, and the stacked non-linearities
    detect edges and corners before any attention: local shape, which a linear
    patchify must leave to attention to assemble across patch borders.
    """
    n = patch.bit_length() - 1  # patch = 2**n
    widths = [max(dim // 2 ** (n - 1 - i), 8) for i in range(n)]  # e.g. 32, 64, 128
    layers: list[nn.Module] = []
    for c_in, c_out in zip([in_ch, *widths[:-1]], widths):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GELU()]
    return nn.Sequential(*layers, nn.Conv2d(widths[-1], dim, 1))


class TinyViT(nn.Module):
    """A small Vision Transformer (ViT paper, Fig. 1), pre-norm, with a CLS token.

    pixel_values (B, C, H, W), H and W multiples of ``patch_size`` (any aspect ratio):
        patch_embed: Conv2d(C, D, k=s=patch)   -> (B, D, h, w) -> (B, h*w, D)
                     (or, with stem="conv", ``conv_stem``: same output shape)
        cat CLS                                -> (B, 1 + h*w, D)
        + pos_embed (resized bicubically when (h, w) != the training grid)
        blocks x L, final LayerNorm
    """

    def __init__(self, config: ViTConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or ViTConfig()
        D, p = cfg.hidden_size, cfg.patch_size
        gh, gw = cfg.grid
        self.patch_embed = (nn.Conv2d(cfg.num_channels, D, kernel_size=p, stride=p) if cfg.stem == "patch"
                            else conv_stem(cfg.num_channels, D, p))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + gh * gw, D))  # CLS position first
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def grid(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        H, W = pair(image_size)
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(
                f"TinyViT: image size {H}x{W} is not a multiple of patch_size={p}; "
                f"resize it (e.g. encoder.preprocess(images, size=({H // p * p or p}, {W // p * p or p})))."
            )
        return (H // p, W // p)

    def position_embedding(self, grid: tuple[int, int]) -> Tensor:
        """(1, 1 + h*w, D): the learned table, bicubically resized when grid differs."""
        return mnn.resize_pos_embed(self.pos_embed, self.config.grid, grid, mode="bicubic", num_prefix_tokens=1)

    def forward(self, pixel_values: Tensor) -> VisionOutput:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(f"TinyViT expects pixel_values (B, {self.config.num_channels}, H, W), got {tuple(pixel_values.shape)}.")
        grid = self.grid(pixel_values.shape[-2:])
        x = self.patch_embed(pixel_values)  # (B, D, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, D), row-major patches
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.position_embedding(grid)  # (B, 1 + h*w, D)
        hidden_states = [x]
        for block in self.blocks:
            x = block(x)
            hidden_states.append(x)
        last = self.norm(x)
        return VisionOutput(last_hidden_state=last, hidden_states=tuple(hidden_states), pooled=last[:, 0], grid=grid, num_prefix_tokens=1)

    # ---- saving / loading -------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` to ``directory`` (created)."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(d / WEIGHTS_NAME), metadata={"format": "pt"})
        return d

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> TinyViT:
        """Load a directory written by ``save_pretrained``; every weight must fit exactly."""
        from safetensors.torch import load_file

        d = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (d / name).is_file():
                raise FileNotFoundError(f"TinyViT.from_pretrained: {d / name} not found (a TinyViT directory holds {CONFIG_NAME} and {WEIGHTS_NAME}).")
        model = cls(ViTConfig.from_dict(json.loads((d / CONFIG_NAME).read_text())))
        mnn.load_state_dict_strict(model, load_file(str(d / WEIGHTS_NAME)), source=str(d / WEIGHTS_NAME))
        return model
