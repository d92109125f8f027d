"""Exercises of notebook 00 (the tour): image tokens per image, VQA accuracy.

    from mmkit.exercises import check_count_image_tokens, check_vqa_accuracy, solution
    check_count_image_tokens(count_image_tokens)
    check_vqa_accuracy(vqa_accuracy)
"""
from __future__ import annotations

import math
from typing import Callable

from mmkit.exercises.core import Exercise, _call, _guard, _say, register

_COUNT = '''\
def count_image_tokens(image_size, patch_size, keep_cls=False):
    """Tokens a ViT turns one image into: one per patch (+ the CLS token if kept)."""
    H, W = (image_size, image_size) if isinstance(image_size, int) else image_size
    grid_h, grid_w = H // patch_size, W // patch_size    # the patch grid, e.g. 8 x 8
    return grid_h * grid_w + (1 if keep_cls else 0)
'''

_VQA = '''\
import re

def normalize(text):
    """lower case, punctuation -> spaces, drop a / an / the, single spaces."""
    text = re.sub(r"[^\\w\\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))
    # (mmkit.data.shapes.normalize_answer does this and also maps colour -> color, two -> 2)

def vqa_accuracy(predictions, answers):
    """Share of predictions that equal their answer after normalisation, in [0, 1]."""
    if not answers:
        return 0.0
    hits = sum(normalize(p) == normalize(a) for p, a in zip(predictions, answers))
    return hits / len(answers)
'''


@_guard
def check_count_image_tokens(fn: Callable) -> bool:
    """fn(image_size, patch_size, keep_cls=False) -> int. Checked on the tiny ViT, CLIP and
    SigLIP sizes, a non-square image, and against a real TinyViT's token count."""
    cases = [  # (image_size, patch, keep_cls, expected, what)
        (64, 8, False, 64, "the tiny encoder"),
        (64, 8, True, 65, "the tiny encoder, CLS kept"),
        (224, 16, False, 196, "ViT-B/16 at 224 px"),
        (224, 14, False, 256, "CLIP ViT-L/14 at 224 px"),
        (336, 14, False, 576, "LLaVA-1.5's CLIP ViT-L/14 at 336 px"),
        (336, 14, True, 577, "CLIP ViT-L/14 at 336 px, CLS kept"),
        ((64, 128), 8, False, 128, "a 64 x 128 (H x W) image"),
    ]
    for size, p, cls, want, what in cases:
        got = _call(fn, size, p, cls, what=f"({size!r}, {p}, keep_cls={cls})")
        if isinstance(got, float) and got.is_integer():
            return _say(False, f"count_image_tokens({size!r}, {p}, keep_cls={cls}) returned the float {got}; "
                               "a token count is an int (use // for the grid, not /).")
        if not isinstance(got, int) and not (hasattr(got, "item") and float(got) == int(got)):
            return _say(False, f"count_image_tokens({size!r}, {p}, keep_cls={cls}) returned {got!r} "
                               f"({type(got).__name__}); return one int.")
        got = int(got)
        if got == want:
            continue
        H, W = (size, size) if isinstance(size, int) else size
        h, w = H // p, W // p
        why = f"the grid is {h} x {w} = {h * w} patches" + (", plus 1 CLS token" if cls else ", CLS dropped")
        if got == want + 1 and not cls:
            why += "; with keep_cls=False the CLS token is not counted (LLaVA drops it)"
        elif got == want - 1 and cls:
            why += "; keep_cls=True adds the CLS token"
        elif got in (h, w, h + cls, w + cls):
            why += "; you counted one side of the grid: tokens = rows x columns"
        elif got in (H * W // p, H * W // p + cls):
            why += "; a patch covers p x p pixels, so divide the area by p**2"
        elif got == (H * W) + cls:
            why += "; that is the number of pixels: one token per patch, not per pixel"
        return _say(False, f"{what}: count_image_tokens({size!r}, {p}, keep_cls={cls}) returned {got}, "
                           f"expected {want}: {why}.")
    # the real thing: a (random) TinyViT's sequence length for a 32 x 48 image, 8 px patches
    import torch

    from mmkit.vision import TinyViT, ViTConfig

    vit = TinyViT(ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_layers=1, num_heads=2))
    with torch.no_grad():
        T = vit(torch.zeros(1, 3, 32, 48)).hidden_states[0].shape[1]  # CLS + patches
    got = int(_call(fn, (32, 48), 8, True))
    if got != T:
        return _say(False, f"a TinyViT turns a 32 x 48 image into {T} tokens (CLS + 4 x 6 patches), "
                           f"count_image_tokens((32, 48), 8, keep_cls=True) says {got}.")
    return _say(True, f"{len(cases)} sizes right, and a TinyViT agrees ({T} tokens for 32 x 48 px with CLS).")


@_guard
def check_vqa_accuracy(fn: Callable) -> bool:
    """fn(predictions, answers) -> float in [0, 1]: normalised exact match, as mmkit.eval scores VQA."""
    cases = [  # (predictions, answers, expected, what it tests)
        (["red"], ["red"], 1.0, "identical answers match"),
        (["Red."], ["red"], 1.0, "case and punctuation do not matter: lower-case and strip punctuation"),
        (["the circle"], ["circle"], 1.0, "articles do not matter: drop a / an / the"),
        (["  blue "], ["blue"], 1.0, "surrounding spaces do not matter"),
        (["red circle"], ["red"], 0.0, "exact match, not 'contains': 'red circle' is not the answer 'red'"),
        (["2", "yes", "no", "star"], ["2", "no", "no", "square"], 0.5, "2 of 4 right is 0.5"),
        ([], [], 0.0, "no questions: return 0.0 (and do not divide by zero)"),
    ]
    from mmkit.data.shapes import normalize_answer

    for preds, answers, want, what in cases:
        got = _call(fn, list(preds), list(answers), what=f"({preds!r}, {answers!r})")
        try:
            got = float(got)
        except (TypeError, ValueError):
            return _say(False, f"vqa_accuracy({preds!r}, {answers!r}) returned {got!r}; return one number.")
        if math.isclose(got, want, abs_tol=1e-6):
            continue
        if math.isclose(got, 100 * want, abs_tol=1e-6) and want:
            return _say(False, f"vqa_accuracy({preds!r}, {answers!r}) returned {got}: return a fraction in [0, 1], "
                               "not a percentage.")
        return _say(False, f"vqa_accuracy({preds!r}, {answers!r}) returned {got}, expected {want}: {what}.")
    # agree with the library's scorer on a batch of real-looking answers
    preds = ["Red", "2", "a star", "Yes.", "hexagon", "3", "no", "the blue square"]
    answers = ["red", "2", "star", "yes", "diamond", "3", "yes", "blue square"]
    lib = sum(normalize_answer(p) == normalize_answer(a) for p, a in zip(preds, answers)) / len(answers)
    got = float(_call(fn, preds, answers))
    if not math.isclose(got, lib, abs_tol=1e-6):
        return _say(False, f"on {list(zip(preds, answers))} you score {got:.3f}, mmkit.eval scores {lib:.3f}.")
    return _say(True, f"{len(cases)} cases right, and you agree with mmkit.eval's scorer ({lib:.3f}). "
                      "(mmkit.data.shapes.normalize_answer also maps spellings: 'two' == '2', 'colour' == 'color'.)")


register(Exercise("count_image_tokens", "00_tour",
                  "count_image_tokens(image_size, patch_size, keep_cls=False) -> how many tokens a ViT makes of an image",
                  check_count_image_tokens), _COUNT)
register(Exercise("vqa_accuracy", "00_tour",
                  "vqa_accuracy(predictions, answers) -> normalised exact-match accuracy in [0, 1]",
                  check_vqa_accuracy), _VQA)
