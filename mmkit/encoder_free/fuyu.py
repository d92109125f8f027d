"""Fuyu: no vision encoder, raw image patches go straight into the decoder.

Adept, "Fuyu-8B: A Multimodal Architecture for AI Agents" (2023), the architecture
figure: image patches are linearly projected into the first layer of the transformer,
and a special image-newline token marks the end of every patch row. There is no
ViT, no CLIP, no resampler: one ``Linear`` is the entire image-specific part.

    image (any H x W)
      -> pad bottom/right to a multiple of the patch size p           (3, H', W')
      -> patchify: each p x p patch flattened (row, col, channel)      (h*w, p*p*3)
      -> vision_embed_tokens = Linear(p*p*3, D_lm)                      (h*w, D_lm)
      -> written into the LM input at the image-token positions:

         row 0:   <image> <image> ... <image> |NEWLINE|      (w image tokens + 1)
         row 1:   <image> <image> ... <image> |NEWLINE|
         ...                                                  h rows: h * (w + 1) tokens

The newline positions keep their word embedding (``|NEWLINE|`` is a vocabulary
token); only the image-token positions get patch embeddings. The LM's RoPE is the
only position signal: the newline tokens are what tell it where a row ends, which
is why Fuyu takes any aspect ratio without resizing or letterboxing: a 96 x 48 image
is 6 rows of 12 patches, a 48 x 96 one 12 rows of 6.

In mmkit Fuyu is a ``VLM`` whose "vision encoder" is the weightless ``Patchify`` and
whose "bridge" is the one linear layer (``FuyuPatchEmbed``), so the shared processor,
Trainer, ``generate`` and ``explain`` all apply. What differs: images keep their own
size (a batch may hold several grids, so ``pixel_values`` may be a list), and
``expand_image`` lays the newline tokens out.

Parity: ``FuyuPatchEmbed.patchify`` and the linear embedding match transformers'
``FuyuImageProcessor.patchify_image`` + ``FuyuModel.vision_embed_tokens``
(tests/test_fuyu.py); ``mmkit.convert.from_hf`` copies the weights of a real
``FuyuForCausalLM``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from mmkit.bridges import Bridge
from mmkit.language import NEWLINE_TOKEN
from mmkit.vlm import VLM, load_parts, vlm_options

__all__ = ["Patchify", "FuyuPatchEmbed", "FuyuVLM", "build_fuyu", "patchify"]


def patchify(pixel_values: Tensor, patch_size: int) -> Tensor:
    """(N, C, H, W) -> (N, h*w, p*p*C): row-major patches, each flattened (row, col, channel).

    The same order as transformers' ``FuyuImageProcessor.patchify_image``, so weights of
    a real Fuyu's ``vision_embed_tokens`` read the patches the way they were trained.
    """
    N, C, H, W = pixel_values.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"patchify: a {H}x{W} image is not a multiple of the patch size {p}; "
                         "pad it first (Patchify.preprocess pads bottom/right)")
    x = pixel_values.reshape(N, C, H // p, p, W // p, p)  # (N, C, h, p, w, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (N, h, w, p_row, p_col, C)
    return x.reshape(N, (H // p) * (W // p), p * p * C)  # (N, h*w, p*p*C)


class Patchify(nn.Module):
    """Fuyu's whole "image processor": no resize to a fixed size, no encoder.

    ``preprocess`` normalises each image and pads it bottom/right (with the mean colour,
    which normalises to 0) to a multiple of ``patch_size``. Images larger than
    ``max_size`` (H, W) are first scaled down, keeping the aspect ratio (Fuyu caps at
    1080 x 1920); smaller ones are never scaled up. No weights.

    Args:
        patch_size: p (Fuyu-8B: 30).
        max_size: optional (H, W) cap or an int for both sides.
        image_mean / image_std: normalisation (Fuyu: 0.5 / 0.5, i.e. pixels in [-1, 1]).
    """

    def __init__(self, patch_size: int = 8, max_size: int | Sequence[int] | None = None,
                 image_mean: Sequence[float] = (0.5, 0.5, 0.5), image_std: Sequence[float] = (0.5, 0.5, 0.5)):
        super().__init__()
        self.patch_size = int(patch_size)
        if max_size is not None and isinstance(max_size, int):
            max_size = (max_size, max_size)
        self.max_size = tuple(int(s) for s in max_size) if max_size is not None else None
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, max_size={self.max_size}"

    def grid(self, image_size: Sequence[int]) -> tuple[int, int]:
        """(h, w) patch grid of a padded (H, W) image."""
        H, W = image_size[-2:]
        return (int(H) // self.patch_size, int(W) // self.patch_size)

    def frame(self, image: Image.Image) -> Image.Image:
        """The image as the model sees it (capped, padded bottom/right), as a PIL image."""
        image = image if image.mode == "RGB" else image.convert("RGB")
        W, H = image.size
        if self.max_size is not None:
            mh, mw = self.max_size
            scale = min(mh / H, mw / W)
            if scale < 1:  # only ever scale down, keeping the aspect ratio
                W, H = max(1, int(W * scale)), max(1, int(H * scale))
                image = image.resize((W, H), Image.BICUBIC)
        p = self.patch_size
        H2, W2 = math.ceil(H / p) * p, math.ceil(W / p) * p
        if (H2, W2) != (H, W):
            fill = tuple(int(round(m * 255)) for m in self.image_mean)
            canvas = Image.new("RGB", (W2, H2), fill)
            canvas.paste(image, (0, 0))  # image top-left: padding only bottom and right
            image = canvas
        return image

    def preprocess(self, images: Sequence[Image.Image]) -> list[Tensor]:
        """PIL images -> a list of (3, H_i, W_i) tensors, each its own padded size."""
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        out = []
        for img in images:
            x = np.asarray(self.frame(img), dtype=np.uint8).copy()
            x = torch.from_numpy(x).permute(2, 0, 1).float() / 255.0  # (3, H, W)
            out.append((x - mean) / std)
        return out


class FuyuPatchEmbed(Bridge):
    """``vision_embed_tokens``: one ``Linear(p*p*3, D_lm)`` from raw patches to the LM width.

    ``forward(pixel_values (N, 3, H, W), grid)`` -> (N, h*w, D_lm): patchify, then project.
    """

    def __init__(self, patch_size: int, lm_dim: int, num_channels: int = 3):
        super().__init__()
        self.patch_size, self.num_channels = patch_size, num_channels
        self.vision_embed_tokens = nn.Linear(patch_size * patch_size * num_channels, lm_dim)

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return grid[0] * grid[1]  # the newlines are word tokens, not outputs of this layer

    def forward(self, pixel_values: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        w = self.vision_embed_tokens.weight
        patches = patchify(pixel_values.to(device=w.device, dtype=w.dtype), self.patch_size)  # (N, h*w, p*p*3)
        return self.vision_embed_tokens(patches)  # (N, h*w, D_lm)



class FuyuVLM(VLM):
    """Fuyu as a ``VLM``: ``vision`` = ``Patchify`` (no weights), ``bridge`` = ``FuyuPatchEmbed``.

    One ``<image>`` placeholder becomes ``h * (w + 1)`` ids (``expand_image``), the
    grid being that image's own. ``pixel_values`` is a (N, 3, H, W) tensor when all
    images of a batch share a size, else a list of (3, H_i, W_i) tensors (the shared
    ``collate`` does this); ``embed`` handles both.

    Module groups: ``bridge`` (the linear layer) and ``lm``. ``fuyu-tiny`` trains both
    from the start: there is no pre-trained image side to protect.
    """

    def __init__(self, patchifier: Patchify, patch_embed: Bridge, lm: nn.Module, tokenizer, **vlm_kwargs: Any):
        vlm_kwargs.setdefault("image_mode", "any")  # no letterbox: images keep their aspect ratio
        super().__init__(patchifier, patch_embed, lm, tokenizer, **vlm_kwargs)
        self.newline_token_id = tokenizer.convert_tokens_to_ids(NEWLINE_TOKEN)
        if self.newline_token_id is None or self.newline_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {NEWLINE_TOKEN!r} token; load the LM with "
                             "mmkit.language.load_language_model, which adds it")

    # ------------------------------------------------------------------ images
    def preprocess(self, images: list) -> list[Tensor]:
        """PIL images -> list of (3, H_i, W_i): each padded to a multiple of the patch size."""
        return self.vision.preprocess(images)

    def image_grid(self, pixel_values: Tensor) -> tuple[int, int]:
        return self.vision.grid(tuple(pixel_values.shape[-2:]))

    def num_image_tokens(self, pixel_values: Tensor | None = None) -> int:
        """LM tokens of one image: rows x (cols + 1)."""
        h, w = self.vision.grid(self.image_size if pixel_values is None else pixel_values.shape)
        return h * (w + 1)

    def expand_image(self, pixel_values: Tensor) -> list[int]:
        """Row by row: ``w`` image tokens, then ``|NEWLINE|``; ``h * (w + 1)`` ids."""
        h, w = self.image_grid(pixel_values)
        ids = ([self.image_token_id] * w + [self.newline_token_id]) * h
        if self.image_wrap_ids:
            ids = [self.image_wrap_ids[0], *ids, self.image_wrap_ids[1]]
        return ids

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, H, W) of one size -> (N, T_img, D_lm) bridge outputs."""
        return self.bridge(pixel_values, self.image_grid(pixel_values))

    def image_embeds(self, pixel_values: Tensor | Sequence[Tensor]) -> list[Tensor]:
        """Per image (T_i, D_lm), in order: one call per group of equal-size images.

        ``VLM.embed`` writes them at the image-token positions; the ``|NEWLINE|``
        positions are not image tokens, so they keep their word embedding."""
        if isinstance(pixel_values, Tensor):
            return list(self.encode_images(pixel_values))
        out: list[Tensor | None] = [None] * len(pixel_values)
        sizes: dict[tuple, list[int]] = {}
        for i, p in enumerate(pixel_values):
            sizes.setdefault(tuple(p.shape), []).append(i)
        for idx in sizes.values():  # batch the images that share a grid
            emb = self.encode_images(torch.stack([pixel_values[i] for i in idx]))
            for j, i in enumerate(idx):
                out[i] = emb[j]
        return out  # type: ignore[return-value]

    # ----------------------------------------------------------------- inspect
    def explain(self, images: Sequence, messages: str | list[dict], answer: str) -> dict[str, Any]:
        """``VLM.explain`` (the LM's attention from the answer to each patch token; the
        newline tokens are left out of the maps), with the views framed as Fuyu frames
        them: capped and padded bottom/right, never letterboxed."""
        from mmkit.data.images import load_image

        views = [self.vision.frame(load_image(im)) for im in images]
        if len({v.size for v in views}) > 1:
            raise ValueError(
                "explain: the images have different sizes after framing "
                f"({', '.join(f'{v.size[0]}x{v.size[1]}' for v in views)}), so their patch grids differ; "
                "explain one image at a time (or images of one size)")
        out = super().explain(images, messages, answer)
        out["views"] = views
        return out

    def module_groups(self) -> dict[str, nn.Module]:
        return {"bridge": self.bridge, "lm": self.lm}


# --------------------------------------------------------------------------- builder
def build_fuyu(recipe, pretrained: bool = True) -> FuyuVLM:
    """A ``FuyuVLM`` from a recipe: ``bridge_kwargs`` = ``{"patch_size": 8, "max_size": 128}``.

    ``recipe.image_size`` is only the size ShapesWorld renders training images at; the
    model itself takes any size up to ``max_size``.
    """
    kwargs = dict(recipe.bridge_kwargs)
    patch_size = int(kwargs.pop("patch_size", 8))
    max_size = kwargs.pop("max_size", None)
    if kwargs:
        raise ValueError(f"recipe {recipe.name!r}: unknown fuyu bridge_kwargs {sorted(kwargs)}; "
                         "known: patch_size, max_size")
    _, lm, tokenizer = load_parts(recipe, pretrained=pretrained, vision=False)
    patch_embed = FuyuPatchEmbed(patch_size, lm.config.get_text_config().hidden_size)
    return FuyuVLM(Patchify(patch_size, max_size), patch_embed, lm, tokenizer, **vlm_options(recipe, encoder=False))
