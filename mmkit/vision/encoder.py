"""``VisionEncoder``: one interface over a TinyViT, a timm ViT or a transformers vision model.

    load_vision_encoder("tiny")                                   # TinyViT from assets/
    load_vision_encoder("timm:vit_base_patch16_clip_224.openai")  # any timm ViT by name
    load_vision_encoder("hf:openai/clip-vit-large-patch14-336")   # transformers CLIP / SigLIP / ...
    load_vision_encoder("path/to/dir")                            # a saved TinyViT, timm or HF dir

Whatever the backend, ``forward`` returns a ``VisionOutput`` with the same token layout,
``features(pixel_values, layer=-2)`` returns what LLaVA feeds its projector, and
``preprocess`` turns PIL images into normalised pixel values (letterboxed by default,
``letterbox``). Also here: the backends' normalisation constants and the loaders.
"""
from __future__ import annotations

import inspect as _pyinspect
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from mmkit import nn as mnn
from mmkit.data.images import to_rgb
from mmkit.paths import assets_dir
from mmkit.vision.tiny_vit import (
    CONFIG_NAME,
    TINYVIT_MODEL_TYPE,
    WEIGHTS_NAME,
    TinyViT,
    ViTConfig,
    VisionOutput,
    pair,
)

__all__ = [
    "VisionEncoder",
    "load_vision_encoder",
    "tiny_vision_dir",
    "letterbox",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
            ph, pw = pair(pe.patch_size)
            if ph != pw:
                raise ValueError(f"VisionEncoder: non-square patches {ph}x{pw} are not supported.")
            D, p, size, L = model.embed_dim, ph, pair(pe.img_size), len(model.blocks)
            P = int(getattr(model, "num_prefix_tokens", 1))
            import timm.data

            data_cfg = timm.data.resolve_model_data_config(model)
            mean, std = data_cfg["mean"], data_cfg["std"]
        elif self.backend == "hf":
            cfg = model.config
            mt = getattr(cfg, "model_type", "")
            D, p, size, L = cfg.hidden_size, cfg.patch_size, cfg.image_size, cfg.num_hidden_layers
            p = pair(p)[0]
            P = 0 if mt.startswith("siglip") else 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
            mean, std = _HF_DEFAULT_NORM.get(mt, (IMAGENET_MEAN, IMAGENET_STD))
        else:
            raise ValueError(f"VisionEncoder: unknown backend {self.backend!r} (tiny | timm | hf).")
        self.hidden_size, self.patch_size, self.num_layers = int(D), int(p), int(L)
        self.num_prefix_tokens = int(P)
        self._native_size = pair(size)  # what the weights were built for
        self.image_size = pair(image_size) if image_size is not None else self._native_size
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
        H, W = pair(image_size) if image_size is not None else self.image_size
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
        H, W = pair(size) if size is not None else self.image_size
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"preprocess: size {H}x{W} must be a multiple of the patch size {self.patch_size}.")
        if isinstance(images, (Image.Image, str, os.PathLike)):
            images = [images]
        fill = tuple(int(round(m * 255)) for m in self.image_mean)
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        out = []
        for i, img in enumerate(images):
            img = to_rgb(_open(img, i), fill)
            if mode == "pad":
                img = letterbox(img, W / H, fill)
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


# --------------------------------------------------------------------------------------
# Images -> pixels
# --------------------------------------------------------------------------------------
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


def letterbox(img: Image.Image, aspect: float, fill: tuple[int, ...]) -> Image.Image:
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


def tiny_vision_dir() -> Path:
    """Where the default tiny pre-trained ViT lives: ``<assets>/tiny/vision``."""
    return assets_dir() / "tiny" / "vision"


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
        kwargs["img_size"] = pair(image_size)
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
