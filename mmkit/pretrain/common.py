"""Helpers both pre-training loops share (CLIP for the ViT, causal LM for the Llama):
a progress bar, one clipped optimizer step, a batch of texts tokenized."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["progress_bar", "optimizer_step", "tokenize"]


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over ``total`` steps (silent when not ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)


def optimizer_step(loss: Tensor, opt, sched, params: list, bar) -> None:
    """One optimizer step with gradient clipping; advances the schedule and the bar."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    bar.update(1)
    bar.set_postfix(loss=f"{loss.item():.3f}")


def tokenize(tokenizer, texts: list[str], max_len: int) -> tuple[Tensor, Tensor]:
    """texts -> (input_ids, attention_mask), each (N, T): padded to the longest, cut at
    ``max_len``, no special tokens added."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt",
                    add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]
