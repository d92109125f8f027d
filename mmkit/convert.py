"""Weights from transformers' reference classes into mmkit's modules.

Each family file implements its paper's mechanism; this module is the bookkeeping that
proves it equal to the reference (the parity tests build both from one tiny random
config, copy the weights across with these functions and compare outputs) and lets a
user start from a real checkpoint. It follows the pattern of transformers' own
``convert_*`` scripts: a table of name rewrites per class, then a strict load.

    from_hf(hf_module)              any supported reference module -> the mmkit module
    load_hf(module, state_dict)     copy a reference state dict (its own keys, or a whole
                                    checkpoint's) into an existing mmkit module

| transformers class                                  | mmkit module                      |
|-----------------------------------------------------|-----------------------------------|
| ``LlavaMultiModalProjector``                        | ``bridges.llava.MLPProjector``    |
| ``Idefics3Connector``                               | ``bridges.pixel_shuffle.PixelShuffleProjector`` |
| ``Blip2QFormerModel`` / ``InstructBlipQFormerModel``| ``bridges.blip2.QFormer``         |
| ``Blip2ForConditionalGeneration`` state dict        | ``bridges.blip2.QFormerBridge``   |
| ``IdeficsPerceiverResampler``                       | ``bridges.flamingo.PerceiverResampler`` |
| ``IdeficsGatedCrossAttentionLayer``                 | ``bridges.flamingo.GatedXAttnDense`` |
| ``FuyuForCausalLM`` / ``FuyuModel``                 | ``encoder_free.fuyu.FuyuPatchEmbed`` |

Every load is strict (``mmkit.nn.load_state_dict_strict``): a missing, unexpected or
misshapen weight is an error that names it, never a silently half-loaded model.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch import Tensor, nn

from mmkit.nn import load_state_dict_strict

__all__ = ["from_hf", "load_hf", "qformer_config_from_hf"]


# ------------------------------------------------------------------ LLaVA-1.5 projector
def _load_mlp_projector(proj: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """``LlavaMultiModalProjector`` (same names: ``linear_1``, ``linear_2``); its own keys or
    a whole LLaVA checkpoint's (``multi_modal_projector.*``)."""
    prefix = "multi_modal_projector."
    own = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()
           if k.startswith(prefix) or k.startswith("linear_")}
    load_state_dict_strict(proj, own, source="LlavaMultiModalProjector")


def _mlp_projector_from_hf(hf: nn.Module) -> nn.Module:
    from mmkit.bridges.llava import MLPProjector

    l1, l2 = hf.linear_1, hf.linear_2
    proj = MLPProjector(l1.in_features, l2.out_features, bias=l1.bias is not None)
    _load_mlp_projector(proj, hf.state_dict())
    return proj.to(l1.weight.dtype)


# ------------------------------------------------------------------ Idefics3 connector
def _load_pixel_shuffle(bridge: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """``Idefics3Connector``: its own keys (``modality_projection.proj.weight``) or a whole
    checkpoint's (``model.connector.modality_projection.proj.weight``)."""
    key = "modality_projection.proj.weight"
    own = {key: v for k, v in state_dict.items() if k == key or k.endswith("connector." + key)}
    if not own:
        own = dict(state_dict)  # let the strict loader list what is missing / unexpected
    load_state_dict_strict(bridge, own, source="Idefics3Connector")


def _pixel_shuffle_from_hf(hf: nn.Module) -> nn.Module:
    from mmkit.bridges.pixel_shuffle import PixelShuffleProjector

    proj = hf.modality_projection.proj
    s = int(hf.scale_factor)
    bridge = PixelShuffleProjector(proj.in_features // (s * s), proj.out_features, scale_factor=s)
    _load_pixel_shuffle(bridge, hf.state_dict())
    return bridge.to(proj.weight.dtype)


# ------------------------------------------------------------------ BLIP-2 Q-Former
# transformers (BERT) names -> ours, applied in order to one key
_QFORMER_RENAMES = [
    ("embeddings.word_embeddings.", "word_embeddings."),
    ("embeddings.position_embeddings.", "position_embeddings."),
    ("embeddings.layernorm.", "layernorm."),  # InstructBLIP keeps the input LayerNorm in its embeddings
    ("encoder.layer.", "layers."),
    (".attention.attention.query.", ".self_attn.q_proj."),
    (".attention.attention.key.", ".self_attn.k_proj."),
    (".attention.attention.value.", ".self_attn.v_proj."),
    (".attention.output.dense.", ".self_attn.out_proj."),
    (".attention.output.LayerNorm.", ".self_attn_norm."),
    (".crossattention.attention.query.", ".cross_attn.q_proj."),
    (".crossattention.attention.key.", ".cross_attn.k_proj."),
    (".crossattention.attention.value.", ".cross_attn.v_proj."),
    (".crossattention.output.dense.", ".cross_attn.out_proj."),
    (".crossattention.output.LayerNorm.", ".cross_attn_norm."),
    (".intermediate_query.dense.", ".ffn_query.fc1."),
    (".output_query.dense.", ".ffn_query.fc2."),
    (".output_query.LayerNorm.", ".ffn_query_norm."),
    (".intermediate.dense.", ".ffn_text.fc1."),
    (".output.dense.", ".ffn_text.fc2."),
    (".output.LayerNorm.", ".ffn_text_norm."),
]


def qformer_config_from_hf(hf_config, *, with_text: bool | None = None):
    """A ``QFormerConfig`` from a transformers ``Blip2QFormerConfig`` / ``InstructBlipQFormerConfig``.

    ``with_text``: build the word/position embeddings (``vocab_size`` from the config);
    default: yes for InstructBLIP (they live inside its Q-Former), yes for BLIP-2 when
    ``use_qformer_text_input`` is set.
    """
    from mmkit.bridges.blip2 import QFormerConfig

    instruct = "instructblip" in type(hf_config).__name__.lower()
    text_ffn = instruct or bool(getattr(hf_config, "use_qformer_text_input", False))
    with_text = text_ffn if with_text is None else with_text
    return QFormerConfig(
        hidden_size=hf_config.hidden_size,
        num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size,
        cross_attention_frequency=hf_config.cross_attention_frequency,
        encoder_hidden_size=hf_config.encoder_hidden_size,
        vocab_size=hf_config.vocab_size if with_text else None,
        max_position_embeddings=hf_config.max_position_embeddings,
        layer_norm_eps=hf_config.layer_norm_eps,
        hidden_dropout_prob=hf_config.hidden_dropout_prob,
        attention_probs_dropout_prob=hf_config.attention_probs_dropout_prob,
        hidden_act=hf_config.hidden_act,
        text_ffn=text_ffn,
        initializer_range=hf_config.initializer_range,
    )


def _load_qformer(qformer: nn.Module, state_dict: dict[str, Tensor], source: str = "transformers Q-Former") -> None:
    """A ``Blip2QFormerModel`` / ``InstructBlipQFormerModel`` state dict: the Q-Former's own
    keys (``encoder.layer.0.attention.attention.query.weight`` ...), or a whole BLIP-2 /
    InstructBLIP checkpoint's (``qformer.`` prefix; BLIP-2's text embeddings sit outside its
    Q-Former as ``embeddings.*``, e.g. in ``Blip2ForImageTextRetrieval``). Every weight this
    Q-Former has must be there with the right shape, and nothing of the Q-Former left over."""
    own: dict[str, Tensor] = {}
    for k, v in state_dict.items():
        if k.startswith("qformer."):
            k = k[len("qformer."):]
        elif not k.startswith(("embeddings.", "layernorm.", "encoder.")):
            continue  # query_tokens, language_projection, vision model, LM: not the Q-Former's
        if k.startswith("embeddings.position_ids"):
            continue
        for old, new in _QFORMER_RENAMES:
            k = k.replace(old, new)
        own[k] = v
    if qformer.word_embeddings is None:  # a query-only Q-Former ignores a checkpoint's text embeddings
        own = {k: v for k, v in own.items() if not k.startswith(("word_embeddings", "position_embeddings"))}
    load_state_dict_strict(qformer, own, source=source)


def _qformer_from_hf(hf: nn.Module, embeddings: nn.Module | None = None) -> nn.Module:
    """``embeddings``: for BLIP-2, the ``Blip2TextEmbeddings`` that live next to the Q-Former
    (InstructBLIP's are inside it)."""
    from mmkit.bridges.blip2 import QFormer

    sd = dict(hf.state_dict())
    with_text = embeddings is not None or any(k.startswith("embeddings.word") for k in sd)
    if embeddings is not None:
        sd.update({f"embeddings.{k}": v for k, v in embeddings.state_dict().items()})
    cfg = qformer_config_from_hf(hf.config, with_text=with_text)
    if embeddings is not None:
        cfg.vocab_size = embeddings.word_embeddings.num_embeddings
    q = QFormer(cfg)
    _load_qformer(q, sd)
    return q.to(next(hf.parameters()).dtype)


def _load_qformer_bridge(bridge: nn.Module, state_dict: dict[str, Tensor], source: str = "BLIP-2 checkpoint") -> None:
    """The bridge part of a transformers BLIP-2 / InstructBLIP checkpoint: ``query_tokens``,
    ``qformer.*`` and ``language_projection.*``; from ``Blip2ForImageTextRetrieval`` also
    ``vision_projection`` / ``text_projection`` / ``itm_head``. ``ln_vision`` stays as it is:
    transformers' vision model already ends in its own ``post_layernorm``."""
    if "query_tokens" not in state_dict:
        raise KeyError(f"{source}: no 'query_tokens'; pass a whole Blip2ForConditionalGeneration / "
                       "InstructBlipForConditionalGeneration state dict")
    _load_qformer(bridge.qformer, state_dict, source=source)
    with torch.no_grad():
        bridge.query_tokens.copy_(state_dict["query_tokens"])
        pairs = [("language_projection", bridge.language_projection)]
        if bridge.text_vocab is not None:
            pairs += [("vision_projection", bridge.vision_proj), ("text_projection", bridge.text_proj),
                      ("itm_head", bridge.itm_head)]
        for name, mod in pairs:
            sub = {k[len(name) + 1:]: v for k, v in state_dict.items() if k.startswith(name + ".")}
            if sub:
                load_state_dict_strict(mod, sub, source=f"{source} ({name})")


# ------------------------------------------------------------------ Flamingo (Idefics)
_PERCEIVER_RENAMES = [  # transformers Idefics names -> ours
    (r"^blocks\.(\d+)\.0\.context_layer_norm\.", r"blocks.\1.norm_media."),
    (r"^blocks\.(\d+)\.0\.latents_layer_norm\.", r"blocks.\1.norm_latents."),
    (r"^blocks\.(\d+)\.0\.(q|k|v)_proj\.", r"blocks.\1.attn.\2_proj."),
    (r"^blocks\.(\d+)\.0\.output_proj\.", r"blocks.\1.attn.out_proj."),
    (r"^blocks\.(\d+)\.1\.ln\.", r"blocks.\1.norm_ff."),
    (r"^blocks\.(\d+)\.1\.fc\.", r"blocks.\1.ff.fc1."),
    (r"^blocks\.(\d+)\.1\.c_proj\.", r"blocks.\1.ff.fc2."),
    (r"^layer_norm\.", "norm."),
]


def _load_perceiver(resampler: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """An ``IdeficsPerceiverResampler`` state dict (its own keys, or a whole Idefics
    checkpoint's ``model.perceiver_resampler.*``)."""
    own = {}
    for k, v in state_dict.items():
        for prefix in ("model.perceiver_resampler.", "perceiver_resampler."):
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        for pat, rep in _PERCEIVER_RENAMES:
            k = re.sub(pat, rep, k)
        own[k] = v
    if not any(k.startswith("blocks.") for k in own):
        raise ValueError("no IdeficsPerceiverResampler weights found (expected keys like "
                         "'blocks.0.0.q_proj.weight' or 'model.perceiver_resampler.*')")
    own = {k: v for k, v in own.items() if k == "latents" or k.startswith(("blocks.", "norm."))}
    load_state_dict_strict(resampler, own, source="IdeficsPerceiverResampler")


def _perceiver_from_hf(hf: nn.Module) -> nn.Module:
    from mmkit.bridges.flamingo import PerceiverResampler

    if hf.qk_layer_norms:
        raise ValueError("from_hf: qk_layer_norms_perceiver=True is not supported (Flamingo has none)")
    if hf.n_heads * hf.head_dim != hf.embed_dim:
        raise ValueError(f"from_hf: n_heads * head_dim ({hf.n_heads} x {hf.head_dim}) must equal embed_dim "
                         f"({hf.embed_dim}) for mmkit.nn.Attention")
    ff = hf.blocks[0][1]
    res = PerceiverResampler(hf.embed_dim, num_latents=hf.n_latents, depth=len(hf.blocks), num_heads=hf.n_heads,
                             ff_mult=ff.fc.out_features // hf.embed_dim, act="relu", eps=hf.layer_norm.eps)
    _load_perceiver(res, hf.state_dict())
    return res.to(hf.latents.dtype)


_GATED_RENAMES = [  # transformers Idefics names -> ours (first match wins)
    (r"^input_layernorm\.", "norm_xattn."), (r"^post_attention_layernorm\.", "norm_dense."),
    (r"^cross_attn\.o_proj\.", "xattn.out_proj."), (r"^cross_attn\.", "xattn."),
    (r"^mlp\.", "ffn."), (r"^alpha_cross_attn$", "alpha_xattn"), (r"^alpha_dense$", "alpha_dense"),
]


def _load_gated_xattn(block: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """One ``IdeficsGatedCrossAttentionLayer`` state dict. Idefics' float alphas are (1,) and
    its vector alphas (1, 1, D), the shapes ``GatedXAttnDense`` uses."""
    own = {}
    for k, v in state_dict.items():
        if "rotary_emb" in k:  # Idefics builds a rotary table it never uses for cross-attention
            continue
        for pat, rep in _GATED_RENAMES:
            k2 = re.sub(pat, rep, k)
            if k2 != k:
                k = k2
                break
        own[k] = v
    load_state_dict_strict(block, own, source="IdeficsGatedCrossAttentionLayer")


def _gated_xattn_from_hf(hf: nn.Module) -> nn.Module:
    from mmkit.bridges.flamingo import GatedXAttnDense

    attn = hf.cross_attn
    if attn.qk_layer_norms:
        raise ValueError("from_hf: qk_layer_norms=True is not supported (Flamingo has none)")
    block = GatedXAttnDense(attn.hidden_size, attn.k_proj.in_features, attn.num_heads,
                            hf.mlp.gate_proj.out_features, act=attn.config.hidden_act,
                            eps=hf.input_layernorm.variance_epsilon,
                            alpha_type="vector" if hf.alpha_cross_attn.dim() == 3 else "scalar")
    _load_gated_xattn(block, hf.state_dict())
    return block.to(attn.q_proj.weight.dtype)


# ------------------------------------------------------------------ Fuyu
def _load_fuyu_patch_embed(embed: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """A transformers ``FuyuModel.vision_embed_tokens`` state dict (keys ``weight``, ``bias``)."""
    load_state_dict_strict(embed, {f"vision_embed_tokens.{k}": v for k, v in state_dict.items()},
                           source="transformers FuyuModel.vision_embed_tokens")


def _fuyu_patch_embed_from_hf(hf: nn.Module) -> nn.Module:
    from mmkit.encoder_free.fuyu import FuyuPatchEmbed

    lin = getattr(hf, "model", hf).vision_embed_tokens
    out = FuyuPatchEmbed(hf.config.patch_size, lin.out_features, hf.config.num_channels)
    _load_fuyu_patch_embed(out, lin.state_dict())
    return out


# ------------------------------------------------------------------ dispatch
# transformers class name -> builder; mmkit class name -> loader
_FROM_HF: dict[str, Callable[..., nn.Module]] = {
    "LlavaMultiModalProjector": _mlp_projector_from_hf,
    "Idefics3Connector": _pixel_shuffle_from_hf,
    "Blip2QFormerModel": _qformer_from_hf,
    "InstructBlipQFormerModel": _qformer_from_hf,
    "IdeficsPerceiverResampler": _perceiver_from_hf,
    "IdeficsGatedCrossAttentionLayer": _gated_xattn_from_hf,
    "FuyuForCausalLM": _fuyu_patch_embed_from_hf,
    "FuyuModel": _fuyu_patch_embed_from_hf,
}
_LOADERS: dict[str, Callable[..., None]] = {
    "MLPProjector": _load_mlp_projector,
    "PixelShuffleProjector": _load_pixel_shuffle,
    "QFormer": _load_qformer,
    "QFormerBridge": _load_qformer_bridge,
    "PerceiverResampler": _load_perceiver,
    "GatedXAttnDense": _load_gated_xattn,
    "FuyuPatchEmbed": _load_fuyu_patch_embed,
}


def from_hf(hf: nn.Module, **kwargs) -> nn.Module:
    """The mmkit module equal to a transformers reference module, with its weights copied
    (and its dtype). ``kwargs`` go to the converter (BLIP-2: ``embeddings=`` the
    ``Blip2TextEmbeddings`` that sit next to its Q-Former)."""
    name = type(hf).__name__
    if name not in _FROM_HF:
        raise TypeError(f"from_hf: no conversion for {name}; supported: {', '.join(sorted(_FROM_HF))}")
    return _FROM_HF[name](hf, **kwargs)


def load_hf(module: nn.Module, state_dict: dict[str, Tensor], **kwargs) -> None:
    """Copy a transformers state dict (the reference module's own keys, or a whole
    checkpoint's) into an mmkit module, strictly. ``kwargs``: ``source=`` for messages
    (Q-Former loaders)."""
    name = type(module).__name__
    if name not in _LOADERS:
        raise TypeError(f"load_hf: no conversion into {name}; supported: {', '.join(sorted(_LOADERS))}")
    _LOADERS[name](module, state_dict, **kwargs)
