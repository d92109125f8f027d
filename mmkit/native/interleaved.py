"""Interleaved continuous embeddings: KOSMOS-1 and PaLM-E.

Papers: Huang et al., 2023, "Language Is Not All You Need: Aligning Perception with
Language Models" (KOSMOS-1, Sec. 2 and Table 1); Driess et al., 2023, "PaLM-E: An
Embodied Multimodal Language Model" (Sec. 3, "multimodal sentences").

Both models feed a decoder a *document* in which images sit anywhere among the words,
each image turned into a few continuous vectors that take the place of tokens::

    KOSMOS-1   <s> <image> [image embeddings] </image> A red circle. <image> ... </s>
               loss on every text token; the decoder is trained from scratch on
               web documents, image-caption pairs and text (multimodal from step one)
    PaLM-E     "Q: What happened between <img_1> and <img_2>? A:" + answer
               observation slots anywhere in the prefix, loss only after it; the LM
               is a pre-trained PaLM (a stitched model, trained further end to end)

In mmkit this is the prefix path of ``mmkit.vlm`` with two switches of the shared
processor (``text_format="document"``, ``loss_on="text" | "assistant"``): no new merge
code. What this family adds is the choice of *where the decoder comes from*:

    ``lm_init="scratch"``     KOSMOS-1: the LM's config, freshly initialised weights
    ``lm_init="pretrained"``  PaLM-E: the pre-trained tiny LM

and the tools to count what an interleaved document costs (``token_budget``). Few-shot
evaluation is Flamingo's ``evaluate_few_shot`` (any model with ``generate`` works): a
model trained on interleaved documents has seen "example, example, query" and can pick
up the task from the examples.

Recipes: ``kosmos-tiny`` (scratch decoder + Perceiver Resampler, 16 tokens per image,
loss on all text) and ``palme-tiny`` (pre-trained LM + MLP projector, loss after the
prefix), both on ShapesWorld's interleaved documents, captions and questions.
"""
from __future__ import annotations

from typing import Any

from mmkit.language import IMAGE_TOKEN
from mmkit.vlm import VLM, build_prefix

__all__ = ["build_interleaved", "token_budget", "LM_INIT"]

LM_INIT = ("pretrained", "scratch")


def _reinitialise(lm):
    """The same architecture and vocabulary with fresh weights (KOSMOS-1 trains from scratch)."""
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_config(lm.config)  # transformers' own init (normal, std 0.02)
    fresh.generation_config = lm.generation_config
    return fresh


def build_interleaved(recipe, pretrained: bool = True) -> VLM:
    """A document-reading VLM (KOSMOS-1 / PaLM-E) from a recipe.

    ``bridge_kwargs["lm_init"]``: "scratch" (KOSMOS-1) or "pretrained" (PaLM-E, default);
    the other ``bridge_kwargs`` go to the bridge (``recipe.bridge``: "perceiver" for
    KOSMOS-1's resampler, "mlp" / "linear" for PaLM-E's projector).
    """
    kwargs = dict(recipe.bridge_kwargs)
    lm_init = kwargs.pop("lm_init", "pretrained")
    if lm_init not in LM_INIT:
        raise ValueError(f"recipe {recipe.name!r}: bridge_kwargs.lm_init must be one of {LM_INIT}, got {lm_init!r}")
    if recipe.text_format != "document":
        raise ValueError(f"recipe {recipe.name!r}: the interleaved family reads documents; set "
                         "text_format='document' (and loss_on='text' for KOSMOS-1, 'assistant' for PaLM-E)")
    if lm_init == "scratch" and (recipe.quantization or recipe.lora):
        raise ValueError(f"recipe {recipe.name!r}: a decoder trained from scratch is trained in full; "
                         "4-bit weights and LoRA adapters only make sense on a pre-trained LM")
    model = build_prefix(recipe, pretrained=pretrained, bridge_kwargs=kwargs,
                         lm_hook=_reinitialise if lm_init == "scratch" else None)
    model.lm_init = lm_init
    return model


def token_budget(model, record: dict) -> dict[str, Any]:
    """What one document costs the decoder, by kind of token.

    Works for any model whose processor lays images out as token ids (every prefix model,
    the interleaved family, the unified decoder). Returns ``images`` (how many),
    ``per_image`` (ids each image became, wrap tokens included), ``image_tokens``,
    ``text_tokens``, ``total`` and ``labelled`` (positions that carry the loss), and
    ``fits``: whether the model's ``max_length`` holds it (counted even when it does not).
    """
    import copy

    from mmkit.data.processor import IGNORE_INDEX, images_of

    proc = copy.copy(model.processor)
    proc.max_length = 1 << 30  # count, do not refuse: a long document is what this is for
    enc = proc.encode(record)
    n_img = len(images_of(record))
    per = [len(model.processor.expand(p)) for p in enc.pixel_values] if n_img else []
    image_tokens = sum(per)
    return {
        "images": n_img,
        "per_image": per,
        "image_tokens": image_tokens,
        "text_tokens": len(enc.input_ids) - image_tokens,
        "total": len(enc.input_ids),
        "labelled": sum(1 for t in enc.labels if t != IGNORE_INDEX),
        "placeholders": sum(t["value"].count(IMAGE_TOKEN) for t in record["conversations"]),
        "fits": len(enc.input_ids) <= model.processor.max_length,
    }
