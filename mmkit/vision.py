"""The vision side: one ``VisionEncoder`` over a from-scratch tiny ViT, timm and transformers.

Every multimodal LLM in this kit starts the same way: an image becomes a grid of patch
features. This file turns pixels into those features, whatever encoder is behind them.

    pixel_values (B, 3, H, W)
      -> patches: a (h, w) grid, h = H // patch, w = W // patch
      -> tokens (B, P + h*w, D)     P prefix tokens (CLS, registers) first, then row-major patches
      -> hidden_states: (embeddings, after block 1, ..., after block L), each (B, P + h*w, D)

``TinyViT`` is a plain ViT (Dosovitskiy et al. 2021, Fig. 1) written from scratch on
top of ``mmkit.nn``: Conv2d patch embedding, a CLS token, learned absolute position
embeddings (bicubically resized for other image sizes or aspect ratios), pre-norm
blocks, a final LayerNorm. The tiny pre-trained weights live in
``assets/tiny/vision/`` (built by ``mmkit zoo build``).

``VisionEncoder`` gives the same interface to three backends:

    load_vision_encoder("tiny")                                   # TinyViT from assets/
    load_vision_encoder("timm:vit_base_patch16_clip_224.openai")  # any timm ViT by name
    load_vision_encoder("hf:openai/clip-vit-large-patch14-336")   # transformers CLIP / SigLIP / ...
    load_vision_encoder("path/to/dir")                            # a saved TinyViT, timm or HF dir

and ``features(pixel_values, layer=-2)`` returns what LLaVA feeds its projector: the
penultimate block's output, without the final norm, CLS dropped (B, h*w, D).
"""
from __future__ import annotations

import inspect as _pyinspect
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from mmkit import nn as mnn
from mmkit.paths import assets_dir

__all__ = [
    "ViTConfig",
    "VisionOutput",
    "TinyViT",
    "VisionEncoder",
    "load_vision_encoder",
    "tiny_vision_dir",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINYVIT_MODEL_TYPE = "mmkit-tinyvit"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
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
        H, W = _pair(self.image_size)
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"ViTConfig: image_size {H}x{W} must be a multiple of patch_size={self.patch_size}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ViTConfig: hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}.")

    @property
    def grid(self) -> tuple[int, int]:
        H, W = _pair(self.image_size)
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
# TinyViT, from scratch
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
        H, W = _pair(image_size)
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


def tiny_vision_dir() -> Path:
    """Where the default tiny pre-trained ViT lives: ``<assets>/tiny/vision``."""
    return assets_dir() / "tiny" / "vision"


# --------------------------------------------------------------------------------------
# One interface over three backends
# --------------------------------------------------------------------------------------
_HF_DEFAULT_NORM = {
    "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "clip_vision_model": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "siglip_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def _detect_backend(model: nn.Module) -> str:
    if isinstance(model, TinyViT):
        return "tiny"
    if type(model).__module__.startswith("timm."):
        return "timm"
    try:
        from transformers import PreTrainedModel

        if isinstance(model, PreTrainedModel):
            return "hf"
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"VisionEncoder: cannot wrap {type(model).__name__}; expected a TinyViT, a timm ViT or a transformers vision model.")


class VisionEncoder(nn.Module):
    """One interface over a TinyViT, a timm ViT or a transformers vision model.

    Usually built with ``load_vision_encoder``; ``VisionEncoder(model)`` wraps a model
    you already have. Attributes (same for every backend):

        backend            "tiny" | "timm" | "hf";  name: what it was loaded from
        hidden_size        D
        patch_size         p (square patches)
        image_size         (H, W) the encoder expects by default (preprocess target)
        num_prefix_tokens  P tokens before the patches (CLS, registers); 0 for SigLIP
        num_layers         L blocks; hidden_states has L + 1 entries
        image_mean/std     the normalisation the encoder was trained with
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        backend: str | None = None,
        name: str = "",
        image_size: int | tuple[int, int] | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.backend = backend or _detect_backend(model)
        self.name = name
        if self.backend == "tiny":
            cfg = model.config
            D, p, size, L, P = cfg.hidden_size, cfg.patch_size, cfg.image_size, cfg.num_layers, 1
            mean, std = cfg.image_mean, cfg.image_std
        elif self.backend == "timm":
            pe = getattr(model, "patch_embed", None)
            if pe is None or not hasattr(model, "blocks"):
                raise TypeError(
                    f"VisionEncoder: the timm model {type(model).__name__} is not ViT-like "
                    "(needs .patch_embed and .blocks); use a timm ViT / DeiT / EVA / CLIP-ViT / SigLIP-ViT."
                )
            ph, pw = _pair(pe.patch_size)
            if ph != pw:
                raise ValueError(f"VisionEncoder: non-square patches {ph}x{pw} are not supported.")
            D, p, size, L = model.embed_dim, ph, _pair(pe.img_size), len(model.blocks)
            P = int(getattr(model, "num_prefix_tokens", 1))
            import timm.data

            data_cfg = timm.data.resolve_model_data_config(model)
            mean, std = data_cfg["mean"], data_cfg["std"]
        elif self.backend == "hf":
            cfg = model.config
            mt = getattr(cfg, "model_type", "")
            D, p, size, L = cfg.hidden_size, cfg.patch_size, cfg.image_size, cfg.num_hidden_layers
            p = _pair(p)[0]
            P = 0 if mt.startswith("siglip") else 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
            mean, std = _HF_DEFAULT_NORM.get(mt, (IMAGENET_MEAN, IMAGENET_STD))
        else:
            raise ValueError(f"VisionEncoder: unknown backend {self.backend!r} (tiny | timm | hf).")
        self.hidden_size, self.patch_size, self.num_layers = int(D), int(p), int(L)
        self.num_prefix_tokens = int(P)
        self._native_size = _pair(size)  # what the weights were built for
        self.image_size = _pair(image_size) if image_size is not None else self._native_size
        self.image_mean = tuple(float(m) for m in (image_mean if image_mean is not None else mean))
        self.image_std = tuple(float(s) for s in (image_std if image_std is not None else std))

    def extra_repr(self) -> str:
        return (
            f"backend={self.backend!r}, name={self.name!r}, image_size={self.image_size}, patch_size={self.patch_size}, "
            f"grid={self.grid()}, hidden_size={self.hidden_size}, num_layers={self.num_layers}, "
            f"num_prefix_tokens={self.num_prefix_tokens}"
        )

    # ---- geometry ---------------------------------------------------------------------
    def grid(self, image_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
        """(h, w) patch grid for an image of ``image_size`` (default: ``self.image_size``)."""
        H, W = _pair(image_size) if image_size is not None else self.image_size
        return (H // self.patch_size, W // self.patch_size)

    def num_tokens(self, image_size: int | tuple[int, int] | None = None, drop_cls: bool = True) -> int:
        """How many feature tokens ``features`` returns per image: h*w (+ P if not dropped)."""
        h, w = self.grid(image_size)
        return h * w + (0 if drop_cls else self.num_prefix_tokens)

    # ---- forward ----------------------------------------------------------------------
    def _param(self) -> Tensor:
        return next(self.model.parameters())

    def forward(self, pixel_values: Tensor) -> VisionOutput:
        """pixel_values (B, 3, H, W), normalised (see ``preprocess``) -> ``VisionOutput``.

        The input is moved to the encoder's device and dtype.
        """
        p = self._param()
        pixel_values = pixel_values.to(device=p.device, dtype=p.dtype)
        if self.backend == "tiny":
            return self.model(pixel_values)
        if self.backend == "timm":
            out = self._forward_timm(pixel_values)
        else:
            out = self._forward_hf(pixel_values)
        T = out.hidden_states[0].shape[1]
        h, w = out.grid
        if T != self.num_prefix_tokens + h * w:
            raise RuntimeError(
                f"VisionEncoder({self.name}): got {T} tokens for a {h}x{w} grid with {self.num_prefix_tokens} prefix tokens; "
                "this model's token layout is not the ViT one this wrapper understands."
            )
        return out

    def _forward_timm(self, x: Tensor) -> VisionOutput:
        m = self.model
        H, W = x.shape[-2:]
        if (H, W) != self._native_size and not getattr(m.patch_embed, "dynamic_img_size", False):
            raise ValueError(
                f"VisionEncoder({self.name}): this timm model was built for {self._native_size[0]}x{self._native_size[1]} "
                f"images, got {H}x{W}. Load it with image_size=({H}, {W}) (timm resamples the position embeddings) "
                "or timm_kwargs={'dynamic_img_size': True}."
            )
        states: list[Tensor] = []
        # The input of block 0 is the embedding output (after pos-embed, norm_pre);
        # each block's output is one hidden state. Hooks keep timm's code untouched.
        hooks = [m.blocks[0].register_forward_pre_hook(lambda mod, args: states.append(args[0]))]
        hooks += [b.register_forward_hook(lambda mod, args, out: states.append(out)) for b in m.blocks]
        try:
            last = m.forward_features(x)  # (B, P + h*w, D) after the final norm
        finally:
            for hk in hooks:
                hk.remove()
        pooled = m.forward_head(last, pre_logits=True)
        return VisionOutput(last, tuple(states), pooled, self.grid((H, W)), self.num_prefix_tokens)

    def _forward_hf(self, x: Tensor) -> VisionOutput:
        H, W = x.shape[-2:]
        kwargs: dict[str, Any] = {"output_hidden_states": True, "return_dict": True}
        if (H, W) != self._native_size and _accepts(self.model.forward, "interpolate_pos_encoding"):
            kwargs["interpolate_pos_encoding"] = True
        out = self.model(pixel_values=x, **kwargs)
        pooled = getattr(out, "pooler_output", None)
        return VisionOutput(out.last_hidden_state, tuple(out.hidden_states), pooled, self.grid((H, W)), self.num_prefix_tokens)

    def features(self, pixel_values: Tensor, layer: int = -2, drop_cls: bool = True) -> Tensor:
        """Patch features from one layer: (B, h*w, D), or (B, P + h*w, D) if not ``drop_cls``.

        ``layer`` indexes ``hidden_states`` like transformers: 0 = embeddings,
        i = after block i, -1 = last block, -2 = penultimate (LLaVA's
        ``vision_feature_layer=-2``). No final norm is applied. ``drop_cls`` drops all
        prefix tokens (CLS and registers), LLaVA's ``vision_feature_select_strategy="default"``.
        """
        n = self.num_layers + 1
        if not -n <= layer < n:
            raise IndexError(f"features: layer={layer} out of range; this encoder has {n} hidden states (0..{n - 1}, or -1..-{n}).")
        hs = self(pixel_values).hidden_states[layer]  # (B, P + h*w, D)
        return hs[:, self.num_prefix_tokens :] if drop_cls else hs

    # ---- images -> pixel_values -------------------------------------------------------
    def preprocess(
        self,
        images: Image.Image | str | os.PathLike | Sequence[Image.Image | str | os.PathLike],
        size: int | tuple[int, int] | None = None,
        mode: str = "pad",
    ) -> Tensor:
        """PIL images -> (B, 3, H, W) float32, normalised with this encoder's mean/std.

        size: target (H, W) or an int for square; default ``self.image_size``. Must be a
            multiple of the patch size.
        mode:
            "pad"    (LLaVA-1.5 ``expand2square``) letterbox: pad the image, centred, with
                     the mean colour to the target aspect ratio, then resize (bicubic).
                     Nothing is cropped or distorted; the padding normalises to ~0.
            "resize" resize straight to (H, W) (bicubic): keeps everything, but
                     stretches the image when aspect ratios differ.
        Grayscale / palette / CMYK images become RGB; transparent pixels (RGBA, LA, P
        with transparency) are composited onto the mean colour, like the padding.
        Returns a CPU tensor; ``forward`` moves it to the encoder's device and dtype.
        """
        if mode not in ("pad", "resize"):
            raise ValueError(f"preprocess: mode must be 'pad' (letterbox, LLaVA-1.5) or 'resize', got {mode!r}.")
        H, W = _pair(size) if size is not None else self.image_size
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"preprocess: size {H}x{W} must be a multiple of the patch size {self.patch_size}.")
        if isinstance(images, (Image.Image, str, os.PathLike)):
            images = [images]
        fill = tuple(int(round(m * 255)) for m in self.image_mean)
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        out = []
        for i, img in enumerate(images):
            img = _to_rgb(_open(img, i), fill)
            if mode == "pad":
                img = _letterbox(img, W / H, fill)
            img = img.resize((W, H), Image.BICUBIC)
            x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0  # (3, H, W)
            out.append((x - mean) / std)
        if not out:
            raise ValueError("preprocess: got an empty list of images.")
        return torch.stack(out)  # (B, 3, H, W)

    # ---- saving -----------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Save so that ``load_vision_encoder(directory)`` gives this encoder back."""
        d = Path(directory)
        if self.backend == "tiny":
            return self.model.save_pretrained(d)
        if self.backend == "hf":
            self.model.save_pretrained(d)
            return d
        from timm.models import save_for_hf

        d.mkdir(parents=True, exist_ok=True)
        save_for_hf(self.model, str(d), model_args=getattr(self, "_timm_kwargs", None) or None, safe_serialization=True)
        return d


def _accepts(fn: Any, arg: str) -> bool:
    try:
        params = _pyinspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False
    return arg in params


def _open(img: Any, i: int) -> Image.Image:
    if isinstance(img, Image.Image):
        return img
    if isinstance(img, (str, os.PathLike)):
        try:
            with Image.open(img) as f:
                f.load()
                return f
        except (FileNotFoundError, OSError) as e:
            raise ValueError(f"preprocess: cannot read image {i} from {img!s}: {e}") from e
    raise TypeError(
        f"preprocess: image {i} is a {type(img).__name__}; expected a PIL.Image or a file path "
        "(convert arrays with PIL.Image.fromarray)."
    )


def _to_rgb(img: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited onto ``fill``."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (*fill, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _letterbox(img: Image.Image, aspect: float, fill: tuple[int, ...]) -> Image.Image:
    """Pad ``img`` (centred) with ``fill`` to width/height = ``aspect`` (LLaVA's expand2square when 1)."""
    w, h = img.size
    if abs(w / h - aspect) < 1e-6:
        return img
    if w / h > aspect:  # too wide: pad top and bottom
        new_w, new_h = w, max(h, round(w / aspect))
    else:  # too tall: pad left and right
        new_w, new_h = max(w, round(h * aspect)), h
    canvas = Image.new("RGB", (new_w, new_h), fill)
    canvas.paste(img, ((new_w - w) // 2, (new_h - h) // 2))
    return canvas


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------
_FORMS = (
    '"tiny" (the shipped tiny ViT), "timm:NAME" (e.g. "timm:vit_base_patch16_clip_224.openai"), '
    '"hf:NAME_OR_PATH" (e.g. "hf:openai/clip-vit-large-patch14-336"), or a local directory '
    "saved by mmkit / timm / transformers"
)


def load_vision_encoder(
    name: str | os.PathLike = "tiny",
    *,
    pretrained: bool | None = None,
    image_size: int | tuple[int, int] | None = None,
    dtype: torch.dtype | None = None,
    config: ViTConfig | Any | None = None,
    timm_kwargs: dict[str, Any] | None = None,
    hf_kwargs: dict[str, Any] | None = None,
) -> VisionEncoder:
    """Load a vision encoder by name. Accepted names:

        "tiny"              TinyViT from ``<assets>/tiny/vision`` (``mmkit zoo build`` makes it)
        "timm:NAME"         ``timm.create_model(NAME, pretrained=..., num_classes=0, **timm_kwargs)``
        "hf:NAME_OR_PATH"   a transformers vision model (CLIP, SigLIP, DINOv2, ViT, ...);
                            for a CLIP / SigLIP checkpoint only the vision tower is loaded
        a local directory   config.json decides: a TinyViT config -> tiny, timm's
                            (``architecture`` key) -> timm, otherwise transformers

    pretrained: load the weights (default) or build a random-init model of the same
        architecture. Passing ``config`` (a ``ViTConfig`` for "tiny", a transformers
        config for "hf") builds a random-init model from it; pretrained must then be
        left unset or False.
    image_size: (H, W) or int: the size ``preprocess`` targets. TinyViT and transformers
        models interpolate their position embeddings on the fly; for timm it is passed
        as ``img_size`` at creation (timm resamples the pretrained table).
    dtype: cast the weights (e.g. torch.bfloat16); pixel_values follow in ``forward``.
    """
    if config is not None:
        if pretrained:
            raise ValueError("load_vision_encoder: config= builds a random-init model; drop pretrained=True (or drop config).")
        pretrained = False
    pretrained = True if pretrained is None else pretrained
    raw = os.fspath(name)

    if isinstance(config, ViTConfig) or (raw == "tiny" and config is None):
        enc = _load_tiny(raw, pretrained, config, image_size)
    elif config is not None and hasattr(config, "model_type"):  # a transformers config
        enc = _load_hf(raw[3:] if raw.startswith("hf:") else "", pretrained, image_size, config, hf_kwargs or {})
    elif config is not None:
        raise TypeError(f"load_vision_encoder: config must be a ViTConfig or a transformers config, got {type(config).__name__}.")
    elif raw.startswith("timm:"):
        enc = _load_timm(raw[5:], pretrained, image_size, timm_kwargs or {})
    elif raw.startswith("hf:") or raw == "hf":
        enc = _load_hf(raw[3:], pretrained, image_size, config, hf_kwargs or {})
    elif Path(raw).is_dir():
        enc = _load_dir(Path(raw), pretrained, image_size, timm_kwargs or {}, hf_kwargs or {})
    else:
        hint = " (no such directory)" if (os.sep in raw or raw.startswith(".")) else ""
        raise ValueError(f"load_vision_encoder: cannot interpret {raw!r}{hint}. Use {_FORMS}.")
    if dtype is not None:
        enc = enc.to(dtype)
    return enc.eval()


def _load_tiny(raw: str, pretrained: bool, config: ViTConfig | None, image_size: Any) -> VisionEncoder:
    if config is not None:
        return VisionEncoder(TinyViT(config), name="tiny (random init)", image_size=image_size)
    d = tiny_vision_dir()
    if pretrained:
        if not (d / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"The tiny vision encoder is not built yet: {d / WEIGHTS_NAME} is missing. "
                "Run `mmkit zoo build` (a few minutes on CPU) or point MMKIT_ASSETS at a folder that has tiny/vision/."
            )
        return VisionEncoder(TinyViT.from_pretrained(d), name="tiny", image_size=image_size)
    cfg = ViTConfig.from_dict(json.loads((d / CONFIG_NAME).read_text())) if (d / CONFIG_NAME).is_file() else ViTConfig()
    return VisionEncoder(TinyViT(cfg), name="tiny (random init)", image_size=image_size)


def _load_timm(model_name: str, pretrained: bool, image_size: Any, timm_kwargs: dict[str, Any], **extra: Any) -> VisionEncoder:
    import timm

    kwargs = {k: v for k, v in timm_kwargs.items() if k != "num_classes"}
    if image_size is not None:
        kwargs["img_size"] = _pair(image_size)
    try:
        model = timm.create_model(model_name, pretrained=pretrained, num_classes=0, **kwargs, **extra)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"timm has no model {model_name!r}; list some with timm.list_models('*clip*').") from e
        raise
    enc = VisionEncoder(model, backend="timm", name=f"timm:{model_name}", image_size=image_size)
    enc._timm_kwargs = dict(timm_kwargs)
    return enc


def _hf_vision_class(model_type: str):
    import transformers

    table = {
        "clip": "CLIPVisionModel",
        "clip_vision_model": "CLIPVisionModel",
        "siglip": "SiglipVisionModel",
        "siglip_vision_model": "SiglipVisionModel",
    }
    return getattr(transformers, table[model_type]) if model_type in table else transformers.AutoModel


def _hf_norm_from_processor(path: str) -> tuple[tuple, tuple] | None:
    """image_mean/std from preprocessor_config.json (local dir) or the hub's image processor."""
    local = Path(path) / "preprocessor_config.json"
    try:
        if local.is_file():
            d = json.loads(local.read_text())
            mean, std = d.get("image_mean"), d.get("image_std")
        elif Path(path).is_dir():
            return None
        else:
            from transformers import AutoImageProcessor

            proc = AutoImageProcessor.from_pretrained(path)
            mean, std = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
    except Exception:  # a model without an image processor: fall back to per-family defaults
        return None
    if mean is None or std is None:
        return None
    return tuple(mean), tuple(std)


def _load_hf(path: str, pretrained: bool, image_size: Any, config: Any, hf_kwargs: dict[str, Any]) -> VisionEncoder:
    import transformers

    if config is not None:  # random init from a given transformers config
        if isinstance(config, ViTConfig) or not hasattr(config, "model_type"):
            raise TypeError("load_vision_encoder('hf...', config=...): config must be a transformers config (e.g. CLIPVisionConfig).")
        cls = _hf_vision_class(config.model_type)
        vcfg = getattr(config, "vision_config", None) if config.model_type in ("clip", "siglip") else None
        model = cls._from_config(vcfg or config)
        return VisionEncoder(model, backend="hf", name=f"hf:{path or config.model_type} (random init)", image_size=image_size)
    if not path:
        raise ValueError(f"load_vision_encoder: 'hf' needs a name or path, e.g. 'hf:openai/clip-vit-base-patch32', or config=. Use {_FORMS}.")
    hf_config = transformers.AutoConfig.from_pretrained(path)
    mt = hf_config.model_type
    if mt not in ("clip", "siglip") and getattr(hf_config, "vision_config", None) is not None:
        raise ValueError(
            f"load_vision_encoder: hf:{path} is a {mt!r} model, more than a vision encoder; point at a vision "
            "checkpoint instead (CLIP, SigLIP, ViT, DINOv2, ...), e.g. the one its config names as vision tower."
        )
    cls = _hf_vision_class(mt)
    if pretrained:
        model, info = cls.from_pretrained(path, output_loading_info=True, **hf_kwargs)
        # never run on silently random weights; a missing pooler / head is harmless
        missing = [k for k in info.get("missing_keys", ()) if k.split(".")[0] not in ("pooler", "head")]
        if missing:
            raise mnn.WeightsMismatchError(
                f"load_vision_encoder: {len(missing)} weights of {cls.__name__} are missing from hf:{path} "
                f"(e.g. {', '.join(sorted(missing)[:8])}); the checkpoint does not match its config."
            )
    else:
        model = cls._from_config(hf_config.vision_config if mt in ("clip", "siglip") else hf_config)
    norm = _hf_norm_from_processor(path)
    mean, std = norm if norm else (None, None)
    return VisionEncoder(model, backend="hf", name=f"hf:{path}", image_size=image_size, image_mean=mean, image_std=std)


def _load_dir(d: Path, pretrained: bool, image_size: Any, timm_kwargs: dict, hf_kwargs: dict) -> VisionEncoder:
    cfg_path = d / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"load_vision_encoder: {d} has no {CONFIG_NAME}, so it is not a saved encoder. Use {_FORMS}.")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("model_type") == TINYVIT_MODEL_TYPE:
        if pretrained:
            return VisionEncoder(TinyViT.from_pretrained(d), name=str(d), image_size=image_size)
        return VisionEncoder(TinyViT(ViTConfig.from_dict(cfg)), name=f"{d} (random init)", image_size=image_size)
    if "architecture" in cfg and "pretrained_cfg" in cfg:  # timm's save_for_hf layout
        kwargs = {**cfg.get("model_args", {}), **timm_kwargs}
        weights = next((d / f for f in (WEIGHTS_NAME, "pytorch_model.bin") if (d / f).is_file()), None)
        if pretrained and weights is None:
            raise FileNotFoundError(f"load_vision_encoder: {d} has a timm config.json but no {WEIGHTS_NAME} or pytorch_model.bin.")
        overlay = dict(cfg["pretrained_cfg"])  # keeps the saved mean/std
        if weights is not None:
            overlay["file"] = str(weights)
        enc = _load_timm(cfg["architecture"], pretrained, image_size, kwargs, pretrained_cfg_overlay=overlay)
        enc.name = str(d)
        return enc
    if "model_type" in cfg:
        return _load_hf(str(d), pretrained, image_size, None, hf_kwargs)
    raise ValueError(f"load_vision_encoder: {cfg_path} is neither a TinyViT, a timm nor a transformers config. Use {_FORMS}.")
