"""Helpers both pre-training loops share (CLIP for the ViT, causal LM for the Llama):
a progress bar, one clipped optimizer step, a batch of texts tokenized, length buckets."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["progress_bar", "optimizer_step", "apply_step", "tokenize", "length_buckets"]


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over ``total`` steps (silent when not ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)


def optimizer_step(loss: Tensor, opt, sched, params: list, bar) -> None:
    """One optimizer step with gradient clipping; advances the schedule and the bar."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    apply_step(float(loss.detach()), opt, sched, params, bar)


def apply_step(loss: float, opt, sched, params: list, bar) -> None:
    """The second half of a step, once the gradients are in: clip, step, schedule, bar."""
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.3f}")


def tokenize(tokenizer, texts: list[str], max_len: int) -> tuple[Tensor, Tensor]:
    """texts -> (input_ids, attention_mask), each (N, T): padded to the longest, cut at
    ``max_len``, no special tokens added."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt",
                    add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def length_buckets(lengths: Sequence[int], overhead: float = 100.0) -> list[list[int]]:
    """Split a batch into groups of similar length, so that each group is padded only to
    its own longest row: the rows' indices, one list per group.

    A padded batch costs (rows x longest row) tokens of compute, however short most rows
    are: in the LM's corpus with reading documents a text is ~46 tokens on average while a
    batch of 32 pads to ~106. The groups are contiguous runs of the rows sorted by length,
    chosen by dynamic programming to minimise ``sum(len(group) * longest(group)) + overhead *
    number_of_groups`` (``overhead``, in tokens, prices a model call). Splitting is exact:
    with right padding every real token keeps its position and a padded key is masked, so
    per-row outputs do not change; only the floating-point summation order does.
    """
    runs: dict[int, list[int]] = {}  # rows of equal length always share a group
    for i, n in enumerate(lengths):
        runs.setdefault(int(n), []).append(i)
    keys = sorted(runs)
    size = [0]
    for k in keys:
        size.append(size[-1] + len(runs[k]))
    K = len(keys)
    best, cut = [0.0] + [math.inf] * K, [0] * (K + 1)
    for j in range(1, K + 1):  # best[j]: the cheapest split of the rows of the j shortest lengths
        for i in range(j):
            c = best[i] + (size[j] - size[i]) * keys[j - 1] + overhead
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], K
    while j > 0:
        groups.append([r for k in keys[cut[j]:j] for r in runs[k]])
        j = cut[j]
    return groups[::-1]
