"""Bridges: how image features become something the language model can read.

Every bridge is an ``nn.Module`` with the same two methods, so the VLM, the processor
and the Trainer never need to know which paper a bridge comes from:

    num_tokens(grid)          how many LM tokens one image becomes, for a (h, w) patch grid
    forward(features, grid)   (N, h*w, D_vision) -> (N, num_tokens, D_lm)
    attention_maps(seen)      (optional) what each output token looked at, for the demo's
                              "Inspect" panel and the notebooks

Bridges mix in ``mmkit.nn.Inspectable``: they call ``self.record(...)`` where a teacher
wants to look (attention maps, gates) and ``mmkit.nn.inspect(model)`` collects it.

``build_bridge(name, vision_dim, lm_dim, **kwargs)`` makes one by its recipe name.
"""
from __future__ import annotations

from torch import nn

from mmkit.nn import Inspectable

__all__ = ["Bridge", "BRIDGES", "build_bridge", "register_bridge"]


class Bridge(nn.Module, Inspectable):
    """Base class: vision features -> LM input embeddings."""

    def num_tokens(self, grid: tuple[int, int]) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, features, grid):  # pragma: no cover - interface
        raise NotImplementedError

    def attention_maps(self, seen: dict):
        """Which patches each bridge output read, from what ``inspect()`` recorded.

        ``seen`` is the dict an ``inspect(model)`` context collected during one forward.
        Returns (N_img, T_img, h*w) weights (averaged over heads and layers; rows sum
        to 1) for bridges that attend (Q-Former queries, resampler latents, adapter
        queries), or None for bridges that map patch i to token i (LLaVA's projector):
        there the LM's own attention to the image tokens is what to show.
        """
        return None


BRIDGES: dict[str, type] = {}


def register_bridge(name: str):
    """Class decorator: make a bridge buildable from a recipe by ``name``."""

    def deco(cls):
        BRIDGES[name] = cls
        return cls

    return deco


def build_bridge(name: str, vision_dim: int, lm_dim: int, **kwargs) -> Bridge:
    # Importing the family modules fills the registry.
    from mmkit.bridges import blip2, flamingo, llava, pixel_shuffle, qwen_vl  # noqa: F401

    if name not in BRIDGES:
        raise ValueError(f"unknown bridge {name!r}; known bridges: {', '.join(sorted(BRIDGES))}")
    return BRIDGES[name](vision_dim, lm_dim, **kwargs)
