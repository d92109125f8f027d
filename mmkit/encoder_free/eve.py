"""EVE: an encoder-free VLM whose LM learns to see, guided by a frozen encoder it never uses.

Diao et al., "Unveiling Encoder-Free Vision-Language Models" (EVE, NeurIPS 2024),
Fig. 3 (architecture) and Sec. 3.2-3.3 (training procedure).

Patch Embedding Layer (PEL), the only image-specific part at inference:

    image (3, H, W), any aspect ratio, padded bottom/right to a multiple of p*s
      -> Conv2d(3, C, kernel=stride=p) + 2D sin-cos positions          (C, H/p, W/p)
      -> CA1: a query per s x s window = the average of its sub-patches;
              it attends only to those s*s sub-patches (local field)      (h, w, C)
      -> <CLS>: a learned token attending to all H/p * W/p patches (CA2) (1, C)
      -> <SPL>: a learned token appended after every row                 (h, w + 1, C)
      -> [CLS, row 0, SPL, row 1, SPL, ...] -> LayerNorm -> Linear-GELU-Linear
                                                                         (1 + h*(w+1), D_lm)

    h = H / (p*s), w = W / (p*s): every one of the 1 + h*(w+1) positions is an image
    token of the LM input (the CLS and SPL embeddings come from the PEL, not the vocabulary).

Patch Aligning Layer (PAL), training only (Fig. 3, right; Eq. 2):

    LM hidden states at the image positions, from several layers        (1 + h*(w+1), L, D_lm)
      -> drop CLS and the SPL column, pool to the target's grid         (g_h*g_w, L, D_lm)
      -> CA3: the last layer's state attends across the L layers        (g_h*g_w, D_lm)
      -> Linear to the target width                                     (g_h*g_w, D_t)
    loss_align = mean(1 - cos(pred, frozen CLIP patch features at layer -2, CLS dropped))

    loss = loss_lm + align_weight * loss_align       (EVE's code uses this cosine form;
                                                      the paper's text says MSE)

Three stages (Sec. 3.3): (1) LLM-guided pre-alignment: the LM frozen, PEL + PAL learn;
(2) generative pre-training: everything but the frozen target encoder; (3) supervised
fine-tuning, without the PAL. The ``eve-tiny`` recipe follows them; its
``bridge_kwargs["align_weight"]`` is the weight above (0 = EVE without PAL).

``EVEVLM`` reuses Fuyu's any-size image path (``mmkit.encoder_free.fuyu``): images keep
their aspect ratio, a batch may mix grids, and the shared processor, Trainer, generate
and explain apply unchanged.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkit.bridges import Bridge
from mmkit.encoder_free.fuyu import FuyuVLM, Patchify
from mmkit.nn import MLP, Attention, sincos_2d
from mmkit.vision import load_vision_encoder
from mmkit.vlm import VLMOutput, load_parts, vlm_options

__all__ = ["PatchEmbeddingLayer", "PatchAligningLayer", "EVEVLM", "build_eve", "OBJECTIVES",
           "window_partition", "patch_rows", "patch_states"]

OBJECTIVES = ("lm", "lm+align")


def window_partition(fine: Tensor, grid: tuple[int, int], s: int) -> Tensor:
    """(N, Hf*Wf, C) row-major patches -> (N*h*w, s*s, C): the s x s sub-patches under each
    window, windows in row-major order (h = Hf/s, w = Wf/s). CA1's keys and values."""
    N, _, C = fine.shape
    Hf, Wf = grid
    h, w = Hf // s, Wf // s
    return fine.view(N, h, s, w, s, C).permute(0, 1, 3, 2, 4, 5).reshape(N * h * w, s * s, C)


def patch_rows(cls: Tensor, local: Tensor, spl: Tensor) -> Tensor:
    """The PEL's token layout: <CLS> (N, 1, C), window tokens (N, h, w, C), <SPL> (C,) ->
    (N, 1 + h*(w+1), C) = [CLS, row 0, SPL, row 1, SPL, ...]. ``patch_states`` undoes it."""
    N, h, _, C = local.shape
    split = spl.to(local).expand(N, h, 1, C)
    rows = torch.cat([local, split], dim=2).reshape(N, -1, C)  # (N, h*(w+1), C)
    return torch.cat([cls, rows], dim=1)  # (N, 1 + h*(w+1), C)


def patch_states(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """One image's ``1 + h*(w+1)`` positions (T, ...) -> its h*w patch positions (h, w, ...):
    the <CLS> in front and the <SPL> column at the end of every row dropped."""
    h, w = grid
    return x[1:].reshape(h, w + 1, *x.shape[1:])[:, :w]


class PatchEmbeddingLayer(Bridge):
    """EVE's PEL: pixels (N, 3, H, W) -> (N, 1 + h*(w+1), D_lm); see the module docstring.

    Args:
        lm_dim: D_lm.
        patch_size: p, the convolution's kernel and stride (EVE-7B: 14).
        pool: s, the CA1 window (EVE: 2x2), so one LM token covers p*s pixels a side.
        dim: C, the PEL's own width.
        num_heads: heads of CA1 and CA2.
    """

    def __init__(self, lm_dim: int, *, patch_size: int = 4, pool: int = 2, dim: int = 128, num_heads: int = 4):
        super().__init__()
        if dim % 4:
            raise ValueError(f"PatchEmbeddingLayer: dim={dim} must be divisible by 4 (2D sin-cos positions)")
        self.patch_size, self.pool, self.dim = patch_size, pool, dim
        self.patch_embedding = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.norm_patches = nn.LayerNorm(dim)
        self.ca1 = Attention(dim, num_heads)  # window query -> its s*s sub-patches
        self.ca2 = Attention(dim, num_heads)  # <CLS> -> all patches
        self.class_embedding = nn.Parameter(torch.randn(dim) * 0.02)  # <CLS>
        self.split_embedding = nn.Parameter(torch.randn(dim) * 0.02)  # <SPL>, ends every row
        self.norm_out = nn.LayerNorm(dim)
        self.mlp = MLP(dim, lm_dim, lm_dim, act="gelu")  # Linear-GELU-Linear into the LM width

    @property
    def stride(self) -> int:
        """Pixels per LM token along each side: p * s."""
        return self.patch_size * self.pool

    def num_tokens(self, grid: tuple[int, int]) -> int:
        h, w = grid
        return 1 + h * (w + 1)

    def forward(self, pixel_values: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        w0 = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(device=w0.device, dtype=w0.dtype))  # (N, C, Hf, Wf)
        N, C, Hf, Wf = x.shape
        s = self.pool
        if Hf % s or Wf % s:
            raise ValueError(f"PatchEmbeddingLayer: a {Hf}x{Wf} patch grid does not split into {s}x{s} "
                             f"windows; pad images to a multiple of {self.stride} px (Patchify does)")
        h, w = Hf // s, Wf // s
        if self.recording:  # attention_maps folds CA2's weights with it
            self.record("fine_grid", torch.tensor([Hf, Wf]))
        # Positions: fixed 2D sin-cos, so any H x W works without resizing a learned table.
        pos = sincos_2d(C, Hf, Wf).to(x)  # (Hf*Wf, C)
        fine = self.norm_patches(x.flatten(2).transpose(1, 2) + pos)  # (N, Hf*Wf, C)

        # CA1: each window's average-pooled query sees only the s*s sub-patches under it.
        sub = window_partition(fine, (Hf, Wf), s)  # (N*h*w, s*s, C)
        q = sub.mean(1, keepdim=True)  # (N*h*w, 1, C)
        local = (q + self.ca1(q, sub)).view(N, h, w, C)  # (N, h, w, C)

        # CA2: <CLS> attends to every patch: a global summary at the front.
        cls = self.class_embedding.to(fine).expand(N, 1, C)
        cls = cls + self.ca2(cls, fine)  # (N, 1, C)

        # <SPL> after every row, so the LM can tell where a row of a non-square image ends.
        tokens = patch_rows(cls, local, self.split_embedding)  # (N, 1 + h*(w+1), C)
        return self.mlp(self.norm_out(tokens))  # (N, 1 + h*(w+1), D_lm)

    def attention_maps(self, seen: dict) -> Tensor | None:
        """(N_img, 1, h*w): where <CLS> looked (CA2, mean over heads), summed over each s x s
        window so the map lies on the LM-token grid; sums to 1."""
        for key in ("bridge.ca2.weights", "ca2.weights"):
            if key in seen:
                break
        else:
            return None
        wts = seen[key][-1] if isinstance(seen[key], list) else seen[key]  # (N, H, 1, Hf*Wf)
        grid = seen.get(key.replace("ca2.weights", "fine_grid"))
        if grid is None:
            return None
        grid = grid[-1] if isinstance(grid, list) else grid
        wts = wts.float().mean(1)  # (N, 1, Hf*Wf)
        Hf, Wf = (int(v) for v in grid)
        s = self.pool
        m = wts.view(-1, 1, Hf, Wf)
        m = F.avg_pool2d(m, s) * (s * s)  # (N, 1, h, w): attention mass per window
        return m.flatten(2)  # (N, 1, h*w)


class PatchAligningLayer(nn.Module):
    """EVE's PAL: LM image states of several layers -> the frozen encoder's features.

    ``forward(states (M, L, D_lm))`` -> (M, D_t): CA3, the last layer's state as the query
    over all L layers' states, plus that query (residual), then a linear layer to D_t.
    """

    def __init__(self, lm_dim: int, target_dim: int, num_heads: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(lm_dim)
        self.ca3 = Attention(lm_dim, num_heads)
        self.proj = nn.Linear(lm_dim, target_dim)

    def forward(self, states: Tensor) -> Tensor:
        x = self.norm(states)  # (M, L, D)
        q = x[:, -1:]  # (M, 1, D): the deepest layer asks ...
        out = q + self.ca3(q, x)  # ... the others what they know about this patch
        return self.proj(out[:, 0])  # (M, D_t)


class EVEVLM(FuyuVLM):
    """EVE as a ``VLM``: ``vision`` = ``Patchify`` (pad only), ``bridge`` = the PEL; for
    training also a frozen ``target`` encoder and the ``pal``.

    ``forward(..., objective="lm+align")`` returns ``loss = lm + align_weight * align`` and
    ``losses = {"lm", "align"}`` (the Trainer logs both); ``objective="lm"`` is the plain
    next-token loss (stage 3, and evaluation).

    Module groups: ``bridge`` (PEL), ``pal``, ``lm``. The target encoder is in no group,
    so the Trainer never unfreezes it.
    """

    def __init__(self, patchifier: Patchify, pel: PatchEmbeddingLayer, lm: nn.Module, tokenizer, *,
                 target: nn.Module | None = None, pal: PatchAligningLayer | None = None,
                 align_weight: float = 1.0, align_layers: Sequence[int] | None = None,
                 target_layer: int = -2, **vlm_kwargs: Any):
        super().__init__(patchifier, pel, lm, tokenizer, **vlm_kwargs)
        self.pal = pal
        self.align_weight = float(align_weight)
        n_layers = lm.config.get_text_config().num_hidden_layers
        # hidden_states[0] is the embedding output; 1..L are the decoder layers
        self.align_layers = list(align_layers) if align_layers else list(range(1, n_layers + 1))
        self.target_layer = target_layer
        self.target = target
        if target is not None:
            target.requires_grad_(False)
            target.eval()

    # ------------------------------------------------------------------ images
    def expand_image(self, pixel_values: Tensor) -> list[int]:
        """``1 + h*(w+1)`` image tokens: the PEL writes CLS, every patch and every SPL."""
        ids = [self.image_token_id] * self.bridge.num_tokens(self.image_grid(pixel_values))
        if self.image_wrap_ids:
            ids = [self.image_wrap_ids[0], *ids, self.image_wrap_ids[1]]
        return ids

    def num_image_tokens(self, pixel_values: Tensor | None = None) -> int:
        size = self.image_size if pixel_values is None else pixel_values.shape
        return self.bridge.num_tokens(self.vision.grid(size))

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, H, W) of one size -> (N, 1 + h*(w+1), D_lm)."""
        return self.bridge(pixel_values, self.image_grid(pixel_values))

    # ---------------------------------------------------------------- training
    def train(self, mode: bool = True) -> "EVEVLM":
        super().train(mode)
        if self.target is not None:
            self.target.eval()  # frozen teacher: always in eval mode
        return self

    def module_groups(self) -> dict[str, nn.Module]:
        groups = {"bridge": self.bridge, "lm": self.lm}
        if self.pal is not None:
            groups["pal"] = self.pal
        return groups

    @torch.no_grad()
    def target_features(self, pixel_values: Tensor) -> Tensor:
        """Frozen encoder patch features (N, g_h*g_w, D_t) of images (N, 3, H, W) in our
        normalisation; each image is resized to the encoder's own size (and its normalisation)."""
        t = self.target
        p = next(t.parameters())
        x = pixel_values.to(device=p.device, dtype=torch.float32)
        mean = torch.tensor(self.vision.image_mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.vision.image_std, device=x.device).view(1, 3, 1, 1)
        x = x * std + mean  # back to [0, 1]
        x = F.interpolate(x, size=tuple(t.image_size), mode="bilinear", align_corners=False, antialias=True)
        tmean = torch.tensor(t.image_mean, device=x.device).view(1, 3, 1, 1)
        tstd = torch.tensor(t.image_std, device=x.device).view(1, 3, 1, 1)
        return t.features(((x - tmean) / tstd).to(p.dtype), layer=self.target_layer, drop_cls=True).float()

    def align_loss(self, hidden_states: Sequence[Tensor], input_ids: Tensor,
                   pixel_values: Tensor | Sequence[Tensor]) -> Tensor:
        """mean(1 - cos(PAL(LM image states), frozen encoder features)) over all patches."""
        if self.pal is None or self.target is None:
            raise RuntimeError("objective 'lm+align' needs the PAL and the target encoder; build the "
                               "model with build_model(get_recipe('eve-tiny'))")
        images = list(pixel_values) if not isinstance(pixel_values, Tensor) else list(pixel_values)
        states = torch.stack([hidden_states[i] for i in self.align_layers], dim=2)  # (B, T, L, D)
        flat = states[input_ids == self.image_token_id]  # (sum T_i, L, D), image 0 first
        gh, gw = self.target.grid(tuple(self.target.image_size))
        preds, start = [], 0
        for img in images:
            h, w = self.image_grid(img)
            T = 1 + h * (w + 1)
            x = patch_states(flat[start:start + T], (h, w))  # drop CLS, SPL: (h, w, L, D)
            start += T
            L, D = x.shape[-2:]
            x = x.permute(2, 3, 0, 1).reshape(1, L * D, h, w)
            x = F.adaptive_avg_pool2d(x, (gh, gw))  # (1, L*D, g_h, g_w): the target's grid
            preds.append(x.reshape(L, D, gh * gw).permute(2, 0, 1))  # (g_h*g_w, L, D)
        pred = self.pal(torch.cat(preds))  # (N*g_h*g_w, D_t)
        target = torch.cat([self.target_features(img[None]) for img in images]).flatten(0, 1)  # (N*g_h*g_w, D_t)
        return (1 - F.cosine_similarity(pred.float(), target.to(pred.device), dim=-1)).mean()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                pixel_values: Tensor | Sequence[Tensor] | None = None, objective: str = "lm",
                **lm_kwargs: Any) -> VLMOutput:
        """``objective="lm"``: next-token loss; ``"lm+align"``: plus ``align_weight`` x PAL loss."""
        if objective not in OBJECTIVES:
            raise ValueError(f"EVE: unknown objective {objective!r}; choose one of {OBJECTIVES}")
        use_align = objective == "lm+align" and self.align_weight > 0 and pixel_values is not None
        want_states = bool(lm_kwargs.pop("output_hidden_states", False)) or use_align
        embeds = self.embed(input_ids, pixel_values)
        out = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels,
                      output_hidden_states=want_states, **lm_kwargs)
        if objective == "lm":
            return VLMOutput(loss=out.loss, logits=out.logits)
        losses = {"lm": out.loss.detach()}
        loss = out.loss
        if use_align:
            align = self.align_loss(out.hidden_states, input_ids, pixel_values)
            losses["align"] = align.detach()
            loss = loss + self.align_weight * align
        return VLMOutput(loss=loss, logits=out.logits, losses=losses)


# --------------------------------------------------------------------------- builder
PEL_KWARGS = ("patch_size", "pool", "dim", "num_heads")


def build_eve(recipe, pretrained: bool = True) -> EVEVLM:
    """An ``EVEVLM`` from a recipe. ``bridge_kwargs``: the PEL's ``patch_size``, ``pool``,
    ``dim``, ``num_heads``; ``max_size`` (image cap); ``align_weight`` and ``align_layers``
    (the PAL). ``recipe.vision`` names the frozen target encoder, ``recipe.feature_layer``
    its layer (EVE: CLIP, -2)."""
    kwargs = dict(recipe.bridge_kwargs)
    pel_kwargs = {k: kwargs.pop(k) for k in PEL_KWARGS if k in kwargs}
    max_size = kwargs.pop("max_size", None)
    align_weight = float(kwargs.pop("align_weight", 1.0))
    align_layers = kwargs.pop("align_layers", None)
    if kwargs:
        raise ValueError(f"recipe {recipe.name!r}: unknown eve bridge_kwargs {sorted(kwargs)}; known: "
                         f"{[*PEL_KWARGS, 'max_size', 'align_weight', 'align_layers']}")
    _, lm, tokenizer = load_parts(recipe, pretrained=pretrained, vision=False)
    lm_dim = lm.config.get_text_config().hidden_size
    pel = PatchEmbeddingLayer(lm_dim, **pel_kwargs)
    target = load_vision_encoder(recipe.vision, pretrained=pretrained)  # the frozen encoder the PAL aligns to
    pal = PatchAligningLayer(lm_dim, target.hidden_size)
    return EVEVLM(Patchify(pel.stride, max_size), pel, lm, tokenizer, target=target, pal=pal,
                  align_weight=align_weight, align_layers=align_layers, target_layer=recipe.feature_layer,
                  **vlm_options(recipe, encoder=False))
