"""Flamingo: a Perceiver Resampler and gated cross-attention into a frozen language model.

Paper: Alayrac et al., 2022, "Flamingo: a Visual Language Model for Few-Shot Learning"
(Fig. 3 the model, Fig. 4 GATED XATTN-DENSE, Fig. 5 the Perceiver Resampler, Fig. 6 the
tanh gates over training, Fig. 7 the media mask). Reference implementations:
transformers' Idefics (``IdeficsPerceiverResampler``, ``IdeficsGatedCrossAttentionLayer``,
weights loadable with ``from_hf``) and open_flamingo.

Where the prefix family (LLaVA, BLIP-2) writes image tokens *into* the LM's input, Flamingo
leaves the LM's input alone: the text carries one ``<image>`` marker per image, and the
LM reads the pictures through new cross-attention layers put in front of its own layers::

    image (N_img, 3, H, W) -> frozen ViT -> X_f (N_img, [F frames,] h*w, D_v)
        -> Perceiver Resampler -> media X (N_img, L, D_v)        L latents, whatever h*w or F
    text  "<image> A red circle. <image> A blue"  -> ids (B, T)
        -> frozen LM layer 0..n-1, each k-th one preceded by GATED XATTN-DENSE:
             y = y + tanh(alpha_xattn) * XAttn(norm(y), X | media mask)      (B, T, D)
             y = y + tanh(alpha_dense) * FFW(norm(y))
        -> logits (B, T, V)

* **Perceiver Resampler** (Fig. 5): ``L`` learned latents read the patch features with
  attention whose keys and values are ``cat[features, latents]``, then an FFW; a final
  norm. The LM's cost per image is ``L`` keys, fixed, at any resolution or video length.
* **GATED XATTN-DENSE** (Fig. 4): the alphas start at 0, so at step 0 ``tanh(0) = 0``
  and the wrapped LM computes *exactly* what the frozen LM did; training opens the gates.
* **The media mask** (Fig. 7): text token ``t`` cross-attends only to the latest image at
  or before it (``text_time = cumsum(ids == <image>)``, image ``m`` visible iff
  ``text_time == m``); tokens before any image see nothing and get a zero output.

``FlamingoVLM`` wraps any transformers decoder with ``model.get_decoder().layers`` (the
tiny Llama; SmolLM2, Qwen2 and other Llama-family hub models): the gated blocks run in
forward pre-hooks of the chosen decoder layers, so the LM's modules, weight names,
4-bit layers and LoRA adapters stay untouched, and the LM's own ``generate`` (KV cache)
works: each call's media mask is computed from the token ids seen so far.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from mmkit.bridges import Bridge, register_bridge
from mmkit.nn import ACTIVATIONS, MLP, Attention, Inspectable, RMSNorm
from mmkit.vlm import VLM, MergeError, load_parts, vlm_options

__all__ = [
    "media_mask", "PerceiverResampler", "PerceiverBlock", "GatedMLP", "GatedXAttnDense",
    "FlamingoVLM", "build_flamingo", "XATTN_KWARGS",
]


# ------------------------------------------------------------------------------ media mask
def media_mask(input_ids: Tensor, image_token_id: int, num_media: int | None = None,
               only_latest: bool = True) -> Tensor:
    """Which image each text token may cross-attend to (Flamingo Fig. 7, the function phi).

    input_ids: (B, T). Returns a bool (B, T, N): ``[b, t, m]`` is True when token ``t`` of
    row ``b`` may see image ``m`` of that row (images numbered in reading order).
    ``only_latest``: only the latest image at or before the token (Flamingo); else every
    image so far. A row of all False (text before the first image) receives nothing.
    ``num_media``: N (default: the most images in one row).
    """
    text_time = torch.cumsum(input_ids == image_token_id, dim=1)  # (B, T): images seen so far
    if num_media is None:
        num_media = int(text_time[:, -1].max()) if text_time.numel() else 0
    image_number = torch.arange(1, num_media + 1, device=input_ids.device)  # (N,) 1-based
    if only_latest:
        return text_time[..., None] == image_number  # (B, T, N)
    return text_time[..., None] >= image_number  # (B, T, N)


# ------------------------------------------------------------------ Perceiver Resampler
class PerceiverBlock(nn.Module):
    """One resampler layer (Fig. 5): latents attend to ``cat[features, latents]``, then an FFW.

        x_f, x = LN(features), LN(latents)
        latents = latents + Attention(q = x, kv = cat[x_f, x])     (no biases)
        latents = latents + FFW(latents)                             LN -> Linear -> act -> Linear

    The keys include the latents themselves, so a latent can also keep what it holds.
    """

    def __init__(self, dim: int, num_heads: int, ff_mult: int = 4, act: str = "relu", eps: float = 1e-5):
        super().__init__()
        self.norm_media = nn.LayerNorm(dim, eps=eps)
        self.norm_latents = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=False, out_bias=False)
        self.norm_ff = nn.LayerNorm(dim, eps=eps)
        self.ff = MLP(dim, ff_mult * dim, act=act, bias=False)

    def forward(self, features: Tensor, latents: Tensor) -> Tensor:
        x_f = self.norm_media(features)  # (N, S, D)
        x = self.norm_latents(latents)  # (N, L, D)
        latents = latents + self.attn(x, context=torch.cat([x_f, x], dim=1))  # (N, L, D)
        return latents + self.ff(self.norm_ff(latents))  # (N, L, D)


@register_bridge("perceiver")
class PerceiverResampler(Bridge):
    """Flamingo's Perceiver Resampler: any number of patch features -> ``num_latents`` tokens.

    Args:
        vision_dim: D_v, the width of the features and of the latents.
        lm_dim: if given, a Linear(D_v, lm_dim) after the final norm, so the resampler can
            also serve as a prefix-family bridge; Flamingo leaves it None (its
            cross-attention reads the media at width D_v).
        num_latents: L (Flamingo: 64). depth: blocks (Flamingo: 6). num_heads: heads.
        ff_mult: FFW width = ff_mult * D_v. act: "relu" (Idefics) or "gelu" (open_flamingo).
        max_frames: video: learned time embeddings for up to this many frames, added to
            each frame's features before they are flattened (Fig. 5); None: images only.

    forward(features, grid): (N, S, D_v) or (N, F, S, D_v) frames -> (N, L, D_v | lm_dim).
    """

    def __init__(self, vision_dim: int, lm_dim: int | None = None, *, num_latents: int = 64, depth: int = 2,
                 num_heads: int = 4, ff_mult: int = 4, act: str = "relu", max_frames: int | None = None,
                 eps: float = 1e-5):
        super().__init__()
        self.dim, self.num_latents = vision_dim, num_latents
        self.latents = nn.Parameter(torch.randn(num_latents, vision_dim))  # (L, D), as Idefics
        self.time_embeds = nn.Parameter(torch.zeros(max_frames, 1, vision_dim)) if max_frames else None
        self.blocks = nn.ModuleList(PerceiverBlock(vision_dim, num_heads, ff_mult, act, eps) for _ in range(depth))
        self.norm = nn.LayerNorm(vision_dim, eps=eps)
        self.proj = nn.Linear(vision_dim, lm_dim) if lm_dim else None

    def num_tokens(self, grid: tuple[int, int] | None = None) -> int:
        return self.num_latents  # the point of the resampler: not a function of the grid

    def forward(self, features: Tensor, grid: tuple[int, int] | None = None) -> Tensor:
        if features.dim() == 4:  # (N, F, S, D): frames of a video
            n_frames = features.shape[1]
            if self.time_embeds is None or n_frames > self.time_embeds.shape[0]:
                have = 0 if self.time_embeds is None else self.time_embeds.shape[0]
                raise ValueError(f"PerceiverResampler got {n_frames} frames but has time embeddings for "
                                 f"{have}; build it with max_frames >= {n_frames}")
            features = (features + self.time_embeds[:n_frames]).flatten(1, 2)  # (N, F*S, D)
        elif features.dim() != 3:
            raise ValueError(f"PerceiverResampler expects (N, S, D) or (N, F, S, D) features, got {tuple(features.shape)}")
        latents = self.latents.to(features.dtype).expand(features.shape[0], -1, -1)  # (N, L, D)
        for block in self.blocks:
            latents = block(features, latents)
        out = self.norm(latents)  # (N, L, D_v)
        return self.proj(out) if self.proj is not None else out

    def attention_maps(self, seen: dict) -> Tensor | None:
        """(N_img, L, S): what each latent read, mean over heads and blocks; rows sum to 1
        over the patches (the share a latent kept on the latents themselves is left out)."""
        # recorded under "bridge." inside a VLM, bare when inspect() was given the resampler
        for prefix in ("bridge.", ""):
            keys = [f"{prefix}blocks.{i}.attn.weights" for i in range(len(self.blocks))]
            if all(k in seen for k in keys):
                break
        else:
            return None
        maps = []
        for k in keys:
            w = seen[k][0] if isinstance(seen[k], list) else seen[k]  # (N, H, L, S + L)
            w = w.float().mean(1)[..., : w.shape[-1] - self.num_latents]  # (N, L, S)
            maps.append(w / w.sum(-1, keepdim=True).clamp_min(1e-12))
        return torch.stack(maps).mean(0)



# ------------------------------------------------------------------ GATED XATTN-DENSE
class GatedMLP(nn.Module):
    """The Llama-style FFW Idefics uses in its gated block: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden: int, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        if act not in ACTIVATIONS:
            raise ValueError(f"GatedMLP: unknown activation {act!r}; choose one of {sorted(ACTIVATIONS)}")
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))


class GatedXAttnDense(Inspectable, nn.Module):
    """GATED XATTN-DENSE (Fig. 4), put in front of a frozen LM layer.

        y = y + tanh(alpha_xattn) * XAttn(RMSNorm(y), media | media mask)     (B, T, D)
        y = y + tanh(alpha_dense) * FFW(RMSNorm(y))

    Args:
        dim: the LM width D. media_dim: width of the media (the resampler's D_v).
        num_heads: cross-attention heads. ffn_hidden: FFW width (Idefics: the LM's).
        alpha_type: "scalar" (one gate per sublayer, Flamingo) or "vector" (one per channel).
        gating: "tanh" (alphas start at 0: the LM is unchanged at step 0) or "open" (no
            gate: both sublayers are added at full strength from the first step; the ablation).

    forward(y (B, T, D), media (B, M, D_v), mask (B, T, M) bool) -> (B, T, D). Tokens whose
    mask row is all False get a zero cross-attention output (mmkit.nn.Attention does that).
    """

    def __init__(self, dim: int, media_dim: int, num_heads: int, ffn_hidden: int, *, act: str = "silu",
                 eps: float = 1e-6, alpha_type: str = "scalar", gating: str = "tanh"):
        super().__init__()
        if gating not in ("tanh", "open"):
            raise ValueError(f"gating must be 'tanh' or 'open', got {gating!r}")
        if alpha_type not in ("scalar", "vector"):
            raise ValueError(f"alpha_type must be 'scalar' or 'vector', got {alpha_type!r}")
        self.gating = gating
        self.norm_xattn = RMSNorm(dim, eps)
        self.xattn = Attention(dim, num_heads, kv_dim=media_dim, qkv_bias=False, out_bias=False)
        self.norm_dense = RMSNorm(dim, eps)
        self.ffn = GatedMLP(dim, ffn_hidden, act)
        if gating == "tanh":
            shape = (1,) if alpha_type == "scalar" else (1, 1, dim)
            self.alpha_xattn = nn.Parameter(torch.zeros(shape))
            self.alpha_dense = nn.Parameter(torch.zeros(shape))
        else:
            self.alpha_xattn = self.alpha_dense = None

    def gates(self) -> tuple[Tensor, Tensor]:
        """The multipliers of the two sublayers: tanh(alpha), or 1 when ``gating="open"``."""
        if self.gating == "open":
            one = self.norm_xattn.weight.new_ones(1)
            return one, one
        return torch.tanh(self.alpha_xattn), torch.tanh(self.alpha_dense)

    def forward(self, y: Tensor, media: Tensor, mask: Tensor, return_weights: bool = False):
        g_xattn, g_dense = self.gates()
        out = self.xattn(self.norm_xattn(y), context=media, mask=mask[:, None], return_weights=return_weights)
        x, weights = out if return_weights else (out, None)  # x (B, T, D); weights (B, H, T, M)
        y = y + g_xattn * x
        y = y + g_dense * self.ffn(self.norm_dense(y))
        return (y, weights) if return_weights else y



# ------------------------------------------------------------------------ the model
class _MediaState:
    """What the gated blocks read during one forward / generate call (not a module)."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.active = False  # inside FlamingoVLM.media(...): LM calls cross-attend
        self.media: Tensor | None = None  # (B, N * L, D_v): every image's latents, row by row
        self.num_media = 0  # N: image slots per row (rows with fewer images are zero-padded)
        self.history: Tensor | None = None  # (B, T_so_far): token ids seen so far (KV-cache decoding)
        self.mask: Tensor | None = None  # (B, T_call, N * L) for the current call
        self.calls = 0  # decoder calls so far within this media(...) context


class FlamingoVLM(Inspectable, VLM):
    """A frozen vision encoder + Perceiver Resampler + a frozen LM with GATED XATTN-DENSE blocks.

    Reuses ``VLM``'s processor, preprocessing and module-group pattern; differs in three
    places: one ``<image>`` marker per image in the text (``expand_image``), the images
    enter through cross-attention (``forward``), and ``generate`` decodes from token ids.

    Args (beyond ``VLM``'s):
        cross_every: a gated block before every ``cross_every``-th LM layer: layers
            0, k, 2k, ... (as Idefics; Flamingo-3B: every layer, 9B: every 4th).
        only_latest: media mask: only the latest image (Flamingo) or all previous ones.
        alpha_type / gating: see ``GatedXAttnDense``. xattn_heads: default the LM's heads.

    Module groups: ``vision``, ``bridge`` (the resampler), ``xattn`` (the gated blocks),
    ``lm``. The ``flamingo-tiny`` recipe trains ``bridge + xattn``.
    """

    def __init__(self, vision: nn.Module, resampler: PerceiverResampler, lm: nn.Module, tokenizer, *,
                 cross_every: int = 1, only_latest: bool = True, alpha_type: str = "scalar",
                 gating: str = "tanh", xattn_heads: int | None = None, **vlm_kwargs: Any):
        super().__init__(vision, resampler, lm, tokenizer, **vlm_kwargs)
        if cross_every < 1:
            raise ValueError(f"cross_every must be >= 1, got {cross_every}")
        cfg = lm.config.get_text_config()
        layers = self.decoder_layers()
        self.cross_every, self.only_latest = cross_every, only_latest
        self.xattn_layers = list(range(0, len(layers), cross_every))  # LM layer index of each block
        self.xattn = nn.ModuleList(
            GatedXAttnDense(cfg.hidden_size, resampler.dim, xattn_heads or cfg.num_attention_heads,
                            cfg.intermediate_size, act=getattr(cfg, "hidden_act", "silu"),
                            eps=getattr(cfg, "rms_norm_eps", 1e-6), alpha_type=alpha_type, gating=gating)
            for _ in self.xattn_layers
        )
        # Full precision, whatever the LM's dtype (a 4-bit LM computes in bf16 on a GPU).
        self.xattn.float()
        self._media = _MediaState()
        self._hooks = [self.lm.get_decoder().register_forward_pre_hook(self._start_call, with_kwargs=True)]
        for j, i in enumerate(self.xattn_layers):
            self._hooks.append(layers[i].register_forward_pre_hook(partial(self._cross_attend, j), with_kwargs=True))

    # ------------------------------------------------------------------ plumbing
    def decoder_layers(self) -> nn.ModuleList:
        decoder = self.lm.get_decoder()
        layers = getattr(decoder, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(f"FlamingoVLM: {type(decoder).__name__} has no `.layers` list of decoder layers; "
                            "use a Llama-family causal LM (Llama, SmolLM2, Qwen2, Mistral, ...)")
        return layers

    def expand_image(self, pixel_values: Tensor) -> list[int]:
        """One ``<image>`` marker per image: the pictures enter through cross-attention."""
        ids = [self.image_token_id]
        if self.image_wrap_ids:
            ids = [self.image_wrap_ids[0], *ids, self.image_wrap_ids[1]]
        return ids

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None = None) -> Tensor:
        """The LM's own word embeddings: Flamingo never changes the LM's input."""
        return self.lm.get_input_embeddings()(input_ids)

    def encode_media(self, input_ids: Tensor, pixel_values: Tensor | None) -> Tensor | None:
        """Resampled images per row: (B, N, L, D_v), N = most images in a row (zero-padded)."""
        counts = (input_ids == self.image_token_id).sum(1)  # (B,)
        n_markers = int(counts.sum())
        if pixel_values is None or (isinstance(pixel_values, (list, tuple)) and not pixel_values):
            if n_markers:
                raise MergeError(f"the text has {n_markers} <image> marker(s) but no image was given")
            return None
        latents = self.encode_images(pixel_values)  # (N_img, L, D_v)
        if latents.shape[0] != n_markers:
            raise MergeError(f"the text has {n_markers} <image> marker(s) but {latents.shape[0]} image(s) were "
                             "given; build the text with this model's processor (one <image> per image)")
        B, N = input_ids.shape[0], int(counts.max())
        media = latents.new_zeros(B, N, *latents.shape[1:])  # (B, N, L, D_v)
        for b, chunk in enumerate(torch.split(latents, counts.tolist())):
            media[b, : chunk.shape[0]] = chunk  # row b's images, in reading order
        return media

    @contextlib.contextmanager
    def media(self, input_ids: Tensor, pixel_values: Tensor | None) -> Iterator[Tensor | None]:
        """Within this context the LM's layers cross-attend to these images.

        On exit LM calls are plain again, but the last media and mask are kept until the
        next call: gradient checkpointing re-runs the layers (and their pre-hooks) during
        ``backward``, after the forward has returned.
        """
        media = self.encode_media(input_ids, pixel_values)
        self._media.clear()
        if media is not None:
            B, N, L, D = media.shape
            self._media.media = media.reshape(B, N * L, D).float()  # (B, N*L, D_v)
            self._media.num_media = N
        self._media.active = True
        try:
            yield media
        finally:
            self._media.active = False

    def _start_call(self, decoder: nn.Module, args: tuple, kwargs: dict):
        """Pre-hook of the LM's decoder: the media mask for the tokens of this call.

        The first call of a generation (or a training forward) holds the whole prompt; later
        calls with a KV cache hold only the new tokens, so the ids seen so far are kept and
        ``text_time`` is counted over all of them. Which of the two a call is comes from the
        cache among its arguments (``_call_continues``), checked against the ids seen so far.
        """
        st = self._media
        st.mask = None
        if not st.active or st.media is None:
            return None  # a text-only call, or the LM called on its own: the plain LM
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, Tensor):
            raise RuntimeError("FlamingoVLM: call the LM with input_ids, not inputs_embeds: the media mask "
                               "is computed from the <image> markers in the token ids")
        if self._call_continues(ids, args, kwargs):
            st.history = torch.cat([st.history, ids], dim=1)
        else:
            st.history = ids
        st.calls += 1
        if st.history.shape[0] != st.media.shape[0]:
            raise RuntimeError(f"FlamingoVLM: {st.history.shape[0]} sequences but media for "
                               f"{st.media.shape[0]}; beam search / num_return_sequences > 1 are not supported")
        mm = media_mask(st.history, self.image_token_id, st.num_media, self.only_latest)[:, -ids.shape[1]:]
        self.record("media_mask", mm)  # (B, T_call, N)
        L = st.media.shape[1] // max(1, st.num_media)
        st.mask = mm.repeat_interleave(L, dim=-1)  # (B, T_call, N*L): every latent of a visible image
        return None

    def _call_continues(self, ids: Tensor, args: tuple, kwargs: dict) -> bool:
        """Does this decoder call continue the previous one from a KV cache (True), or hold
        the whole sequence so far (False)?

        The cache is found by its type, not by the keyword transformers passes it under
        (``past_key_values`` until 5.23, ``cache`` from 5.24). Every call is checked
        against the ids seen so far, so an argument layout this hook does not understand
        raises here instead of silently decoding without the images.
        """
        from transformers.cache_utils import Cache

        st = self._media
        caches = [v for v in (*args, *kwargs.values()) if isinstance(v, Cache)]
        if len(caches) > 1:
            raise RuntimeError(f"FlamingoVLM: the LM's decoder got {len(caches)} KV caches in one call "
                               f"(arguments: {sorted(kwargs)}); this layout is not supported")
        past = caches[0].get_seq_length() if caches else 0
        if past == 0:
            if st.calls and ids.shape[1] <= st.history.shape[1]:
                # a later call of one generation that holds no more than the ids already seen:
                # it must be continuing from a cache this hook did not find
                raise RuntimeError(
                    f"FlamingoVLM: decoder call {st.calls + 1} of a generation holds {ids.shape[1]} new token(s) "
                    f"after {st.history.shape[1]} seen, but no KV cache was found among its arguments "
                    f"({sorted(kwargs)}); this transformers version passes the cache in a way FlamingoVLM "
                    "does not know. Pass use_cache=False to generate, or install the locked versions "
                    "(requirements.lock)")
            return False
        if st.history is None or past != st.history.shape[1]:
            seen = 0 if st.history is None else st.history.shape[1]
            raise RuntimeError(f"FlamingoVLM: the KV cache holds {past} token(s) but this generation has seen "
                               f"{seen}; the media mask cannot be placed (was the cache reused across calls?)")
        return True

    def _cross_attend(self, j: int, layer: nn.Module, args: tuple, kwargs: dict):
        """Pre-hook of LM layer ``xattn_layers[j]``: run GATED XATTN-DENSE on its input."""
        st = self._media
        if st.mask is None:
            return None  # no images in this call: the plain LM
        y = args[0] if args else kwargs["hidden_states"]
        block = self.xattn[j]
        dtype = block.norm_xattn.weight.dtype
        y_new = block(y.to(dtype), st.media.to(dtype), st.mask).to(y.dtype)
        if args:
            return (y_new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": y_new}

    # ------------------------------------------------------------------ forward
    @contextlib.contextmanager
    def lm_inputs(self, input_ids: Tensor, pixel_values: Tensor | None) -> Iterator[dict[str, Tensor]]:
        """The LM reads its own token ids (Flamingo never changes the LM's input); the images
        reach it through the gated blocks while ``VLM.forward`` / ``VLM.generate`` run inside.
        ``generate`` decodes with the LM's KV cache (``use_cache=False`` recomputes every step:
        the same greedy answers, slower)."""
        with self.media(input_ids, pixel_values):
            yield {"input_ids": input_ids}

    @torch.no_grad()
    def explain(self, images: Sequence, messages: str | list[dict], answer: str) -> dict[str, Any]:
        """``VLM.explain``'s dict for Flamingo: one teacher-forced pass over prompt + answer.

        maps per image: "answer -> image" (the gated cross-attention from the positions that
        predict the answer, through the latents, onto the patches; mean over heads and
        blocks), "mean over latents" and the most focused latents (the resampler's own
        attention). gates: |tanh(alpha)| per LM layer. media_tokens: latents per image
        (what the cross-attention reads; the text holds one marker per image).
        """
        from mmkit.nn import inspect
        from mmkit.vlm import answer_rows

        record, ids, mask, pv, labels = self.explain_batch(images, messages, answer)
        predicts = answer_rows(labels)  # (T,): the positions that predict the answer
        was_training = self.training
        self.eval()
        try:
            with inspect(self) as seen:
                self(input_ids=ids, attention_mask=mask, pixel_values=pv)
        finally:
            self.train(was_training)
        grid = tuple(self.image_grid(pv))
        latent_maps = self.bridge.attention_maps(seen).float()  # (N_img, L, S)
        through = self.token_to_image(seen)[predicts]  # (|answer|, N, S)

        def on_grid(flat: Tensor):
            m = flat.float().clamp_min(0).reshape(grid)
            return (m / m.sum().clamp_min(1e-12)).numpy()

        maps = []
        for i in range(pv.shape[0]):
            m = {"answer -> image": on_grid(through[:, i].mean(0)) if through.numel() else None,
                 "mean over latents": on_grid(latent_maps[i].mean(0))}
            for q in latent_maps[i].amax(-1).topk(min(3, latent_maps.shape[1])).indices.tolist():
                m[f"latent {q}"] = on_grid(latent_maps[i, q])
            maps.append({k: v for k, v in m.items() if v is not None and float(v.sum()) > 0})
        gates = {f"{kind} layer {i}": v for kind, per in self.gate_values().items() for i, v in per.items()}
        return {"image_tokens": [len(self.expand_image(p)) for p in pv], "grid": grid, "maps": maps,
                "views": self.framed_views(record["images"]), "gates": gates, "image_share": None,
                "media_tokens": self.bridge.num_latents,
                "source": (f"gated cross-attention from the answer to each image's {self.bridge.num_latents} "
                           "latents, carried onto the patches by the resampler's attention; and what the "
                           "latents read")}

    # ------------------------------------------------------------------ groups, gates
    def module_groups(self) -> dict[str, nn.Module]:
        return {"vision": self.vision, "bridge": self.bridge, "xattn": self.xattn, "lm": self.lm}

    def param_group(self, name: str) -> str | None:
        """The tanh gates' alphas form the optimizer group "gates" (trained with ``xattn``),
        so a recipe can give them their own learning rate (flamingo-tiny does)."""
        return "gates" if name.rsplit(".", 1)[-1] in ("alpha_xattn", "alpha_dense") else None

    @torch.no_grad()
    def gate_values(self) -> dict[str, dict[int, float]]:
        """|tanh(alpha)| per LM layer (mean over channels for vector alphas), as Fig. 6 plots."""
        out: dict[str, dict[int, float]] = {"xattn": {}, "dense": {}}
        for i, block in zip(self.xattn_layers, self.xattn):
            g_x, g_d = block.gates()
            out["xattn"][i] = float(g_x.abs().mean())
            out["dense"][i] = float(g_d.abs().mean())
        return out

    def token_to_image(self, seen: dict, row: int = 0, layer: int | None = None) -> Tensor:
        """Cross-attention of each text token of ``row``, through the latents, onto the patches.

        weights(token -> latent) of the gated blocks (mean over heads, and over blocks
        unless ``layer`` names one LM layer) times the resampler's (latent -> patch) maps.
        Returns (T, N, S): for token t, a map over the S patches of each of the row's N image
        slots (zero where the media mask hides the image). ``seen``: what one forward (not
        generate) recorded inside ``with mmkit.nn.inspect(model) as seen:``.
        """
        keys = [f"xattn.{j}.xattn.weights" for j, i in enumerate(self.xattn_layers) if layer in (None, i)]
        if not keys or any(k not in seen for k in keys) or "media_mask" not in seen:
            raise KeyError("token_to_image: no cross-attention recorded" + (f" at layer {layer}" if keys == [] else "")
                           + "; run one forward inside `with mmkit.nn.inspect(model) as seen:`")
        w = torch.stack([seen[k] for k in keys]).float().mean(dim=(0, 2))[row]  # (T, N*L)
        mm = seen["media_mask"]  # (B, T, N)
        n_per_row = mm.any(dim=1).sum(-1)  # (B,) images in each row (the marker sees its own image)
        N, first = mm.shape[-1], int(n_per_row[:row].sum())
        L = w.shape[-1] // N
        maps = self.bridge.attention_maps(seen)  # (N_img, L, S): every image of the batch, in order
        out = torch.zeros(w.shape[0], N, maps.shape[-1])
        for m in range(int(n_per_row[row])):
            out[:, m] = w[:, m * L:(m + 1) * L] @ maps[first + m]  # (T, L) @ (L, S)
        return out


# --------------------------------------------------------------------------- builder
# recipe.bridge_kwargs keys that configure the gated blocks; the rest go to the resampler.
XATTN_KWARGS = ("cross_every", "only_latest", "alpha_type", "gating", "xattn_heads")


def build_flamingo(recipe, pretrained: bool = True) -> FlamingoVLM:
    """A ``FlamingoVLM`` from a recipe: ``recipe.bridge_kwargs`` holds the resampler's
    arguments and the gated blocks' (``XATTN_KWARGS``), e.g. ``{"num_latents": 16,
    "depth": 2, "cross_every": 1, "gating": "tanh"}``."""
    if recipe.bridge != "perceiver":
        raise ValueError(f"recipe {recipe.name!r}: the flamingo family uses bridge='perceiver', got {recipe.bridge!r}")
    kwargs = dict(recipe.bridge_kwargs)
    xattn = {k: kwargs.pop(k) for k in XATTN_KWARGS if k in kwargs}
    vision, lm, tokenizer = load_parts(recipe, pretrained=pretrained)
    resampler = PerceiverResampler(vision.hidden_size, None, **kwargs)
    return FlamingoVLM(vision, resampler, lm, tokenizer, **xattn, **vlm_options(recipe))
