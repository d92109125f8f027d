"""Exercises for the notebooks: a student writes a small function, a check says what is wrong.

Each exercise has a name, the notebook it belongs to, and

    check_<name>(student_fn) -> bool    runs the student's function on real inputs, compares
                                        it with the library (the conv patch embedding,
                                        ``mmkit.zoo.clip_loss``, the Processor's labels,
                                        ``VLM.embed``, ...) and prints a verdict: "✓ correct",
                                        or what is wrong and where.
    solution(name)                      prints a reference answer (only when asked).

A check never raises: an unsolved exercise (``raise NotImplementedError``, ``return None``)
or a crashing attempt prints a message and returns False, so a notebook with open
exercises still runs top to bottom (``pytest --nbmake``).

    from mmkit.exercises import check_patchify, solution
    check_patchify(patchify)        # ✗ ... / ✓ correct
    solution("patchify")            # prints the reference implementation

This module holds the exercises of notebooks 00-02; each later notebook's exercises live
in a module of this package (``mmkit/exercises/blip2.py``, ...) that calls
``register(Exercise(...), solution_source)``; ``check`` / ``solution`` find them all.
"""
from __future__ import annotations

import math
import traceback
from dataclasses import dataclass
from typing import Any, Callable

__all__ = [
    "EXERCISES", "Exercise", "check", "solution", "list_exercises", "register",
    "check_count_image_tokens", "check_vqa_accuracy", "check_patchify", "check_clip_loss",
    "check_label_mask", "check_merge_image_tokens",
]

IGNORE_INDEX = -100
OK = "✓ correct"


class _NotDone(Exception):
    """The student's function is not written yet (or crashed); the message says which."""


def _say(ok: bool, msg: str) -> bool:
    print(f"{OK}{': ' + msg if msg else ''}" if ok else f"✗ {msg}")
    return ok


def _call(fn: Callable, *args: Any, what: str = "") -> Any:
    """Call the student's function; turn 'not written yet' and crashes into _NotDone."""
    name = getattr(fn, "__name__", "your function")
    if not callable(fn):
        raise _NotDone(f"expected a function, got {type(fn).__name__}: pass the function itself, e.g. check_x(x), not x(...)")
    try:
        out = fn(*args)
    except NotImplementedError:
        raise _NotDone(f"{name} is not written yet: replace `raise NotImplementedError` with your code "
                       f"(solution({name!r}) shows a reference answer).") from None
    except Exception as e:  # noqa: BLE001 - a student's bug must not stop the notebook
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f" (line {f.lineno}: {f.line})" for f in reversed(tb) if f.line), "")
        raise _NotDone(f"{name}{what} raised {type(e).__name__}: {e}{where}") from None
    if out is None:
        raise _NotDone(f"{name}{what} returned None: is the `return` missing, or is the cell still '# YOUR CODE HERE'?")
    return out


def _guard(check: Callable[..., bool]) -> Callable[..., bool]:
    def wrapped(fn: Callable, *args: Any, **kwargs: Any) -> bool:
        try:
            return check(fn, *args, **kwargs)
        except _NotDone as e:
            return _say(False, str(e))

    wrapped.__name__, wrapped.__doc__ = check.__name__, check.__doc__
    wrapped.__wrapped__ = check
    return wrapped


# ================================================================================ solutions
# Reference answers, kept as source text: solution(name) prints exactly the code that the
# checks are tested against (tests/test_exercises.py runs every reference through its check).
_SOLUTIONS: dict[str, str] = {
    "count_image_tokens": '''\
def count_image_tokens(image_size, patch_size, keep_cls=False):
    """Tokens a ViT turns one image into: one per patch (+ the CLS token if kept)."""
    H, W = (image_size, image_size) if isinstance(image_size, int) else image_size
    grid_h, grid_w = H // patch_size, W // patch_size    # the patch grid, e.g. 8 x 8
    return grid_h * grid_w + (1 if keep_cls else 0)
''',
    "vqa_accuracy": '''\
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
''',
    "patchify": '''\
def patchify(image, p):
    """(C, H, W) -> (N, C*p*p): non-overlapping p x p patches, row-major (left to right,
    then top to bottom), each flattened in (C, p, p) order like the conv weight."""
    C, H, W = image.shape
    h, w = H // p, W // p
    x = image[:, : h * p, : w * p].reshape(C, h, p, w, p)   # split rows and columns into blocks
    x = x.permute(1, 3, 0, 2, 4)                             # (h, w, C, p, p): grid first
    return x.reshape(h * w, C * p * p)
    # the same with torch: torch.nn.functional.unfold(image[None], p, stride=p)[0].T
''',
    "clip_loss": '''\
import torch
import torch.nn.functional as F

def clip_loss(img, txt, logit_scale):
    """Symmetric InfoNCE. img, txt: (B, E); logit_scale: a scalar tensor, log(1 / temperature)."""
    img = F.normalize(img, dim=-1)                        # cosine similarity = dot product of unit vectors
    txt = F.normalize(txt, dim=-1)
    logits = logit_scale.exp() * img @ txt.t()            # (B, B): row i = image i against every text
    target = torch.arange(len(img))                       # the right text for image i is text i
    return (F.cross_entropy(logits, target)               # image -> text: pick the caption
            + F.cross_entropy(logits.t(), target)) / 2    # text -> image: pick the picture
''',
    "label_mask": '''\
IGNORE_INDEX = -100

def label_mask(input_ids, tokenizer):
    """Labels for one ChatML sequence: the token itself where the assistant wrote it
    (its answer, its <|im_end|> and the newline after it), IGNORE_INDEX everywhere else."""
    start = tokenizer.encode("<|im_start|>assistant\\n", add_special_tokens=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    newline = tokenizer.encode("\\n", add_special_tokens=False)
    ids = list(input_ids)
    labels = [IGNORE_INDEX] * len(ids)
    i = 0
    while i < len(ids):
        if ids[i:i + len(start)] != start:              # not the start of an assistant turn
            i += 1
            continue
        j = i + len(start)                              # the answer starts after the marker
        while j < len(ids) and ids[j] != end:
            labels[j] = ids[j]                          # the answer itself
            j += 1
        if j < len(ids):
            labels[j] = ids[j]                          # <|im_end|>: the model must learn to stop
            j += 1
        if ids[j:j + len(newline)] == newline:
            labels[j:j + len(newline)] = newline        # the template's newline after the turn
            j += len(newline)
        i = j
    return labels
    # Labels are NOT shifted here: the LM shifts them by one inside its loss.
''',
    "merge_image_tokens": '''\
def merge_image_tokens(input_ids, text_embeds, image_embeds, image_token_id):
    """Write image embeddings into the text embeddings where the image tokens are.
    input_ids (B, T), text_embeds (B, T, D), image_embeds (N_img, T_img, D) -> (B, T, D)."""
    is_image = input_ids == image_token_id                       # (B, T) True at image slots
    n_slots = int(is_image.sum())
    if n_slots != image_embeds.shape[0] * image_embeds.shape[1]:
        raise ValueError(f"{n_slots} image slots but {tuple(image_embeds.shape[:2])} image tokens")
    out = text_embeds.clone()                                    # do not overwrite the caller's tensor
    # Boolean indexing walks the True positions row by row, left to right: the first
    # image's tokens fill the first slots, exactly the order the processor laid them out.
    out[is_image] = image_embeds.reshape(-1, image_embeds.shape[-1]).to(out.dtype)
    return out
''',
}


def _reference(name: str) -> Callable:
    _load_all()
    ns: dict[str, Any] = {}
    exec(compile(_SOLUTIONS[name], f"<solution {name}>", "exec"), ns)  # noqa: S102 - our own source
    return ns[name]


# ================================================================================ 00_tour
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


# ================================================================================ 01_vision_encoder
@_guard
def check_patchify(fn: Callable) -> bool:
    """fn(image (C, H, W), p) -> (N, C*p*p). Checked against F.unfold and a Conv2d patch
    embedding: patches @ W.reshape(D, -1).T + b must equal conv(image)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 16, 24, generator=g)  # a non-square image: 2 x 3 patches of 8 x 8
    p = 8
    h, w = 2, 3
    got = _call(fn, x.clone(), p, what="(image of shape (3, 16, 24), p=8)")
    if not torch.is_tensor(got):
        return _say(False, f"patchify returned a {type(got).__name__}; return a torch tensor.")
    want = F.unfold(x[None], p, stride=p)[0].t()  # (N, C*p*p), row-major, (C, p, p) inside
    if tuple(got.shape) != tuple(want.shape):
        hint = ""
        if got.dim() == 3 or got.dim() == 5:
            hint = "; flatten each patch into one row"
        elif tuple(got.shape) == (h * w, p * p):
            hint = "; keep all 3 colour channels of each patch"
        return _say(False, f"for a (3, 16, 24) image and p=8 expected shape {tuple(want.shape)} "
                           f"({h} x {w} = {h * w} patches of 3*8*8 = {3 * p * p} values), got {tuple(got.shape)}{hint}.")
    got = got.float()
    if torch.allclose(got, want, atol=1e-6):
        conv = nn.Conv2d(3, 5, kernel_size=p, stride=p)
        with torch.no_grad():
            ref = conv(x[None]).flatten(2).transpose(1, 2)[0]  # (N, D): the ViT's patch embedding
            mine = got @ conv.weight.reshape(5, -1).t() + conv.bias
        diff = float((ref - mine).abs().max())
        return _say(diff < 1e-4, f"a linear map of your patches is exactly the Conv2d(k=s=p) patch "
                                 f"embedding (max diff {diff:.1e}): a ViT 'patchifies' with one conv.")
    blocks = x.reshape(3, h, p, w, p)
    col_major = blocks.permute(3, 1, 0, 2, 4).reshape(h * w, -1)
    chan_last = blocks.permute(1, 3, 2, 4, 0).reshape(h * w, -1)
    if torch.allclose(got, col_major, atol=1e-6):
        return _say(False, "your patches go column by column; tokens are row-major: left to right along "
                           "the top row first, then the next row (patch 1 is row 0, column 1).")
    if torch.allclose(got, chan_last, atol=1e-6):
        return _say(False, "right patches, but each is flattened as (p, p, C) (channels last). The conv's "
                           "weight is (D, C, p, p), so flatten each patch in (C, p, p) order to match it.")
    for k in range(h * w):
        r, c = divmod(k, w)
        if not torch.allclose(got[k], want[k], atol=1e-6):
            same_pixels = torch.allclose(got[k].sort().values, want[k].sort().values, atol=1e-6)
            what = ("holds the right pixels in a different order: flatten in (C, p, p) order"
                    if same_pixels else
                    f"should hold image[:, {r * p}:{(r + 1) * p}, {c * p}:{(c + 1) * p}] (row {r}, column {c})")
            return _say(False, f"patch {k} {what}.")
    return _say(False, "the patches differ from F.unfold's.")  # pragma: no cover


@_guard
def check_clip_loss(fn: Callable) -> bool:
    """fn(img (B, E), txt (B, E), logit_scale) -> scalar tensor; compared with mmkit.zoo.clip_loss."""
    import torch
    import torch.nn.functional as F

    from mmkit.zoo import clip_loss as reference

    g = torch.Generator().manual_seed(0)
    for B, E in ((6, 16), (3, 8)):
        img = torch.randn(B, E, generator=g) * 3
        txt = torch.randn(B, E, generator=g) * 3
        txt[0] = img[0] + 0.5 * torch.randn(E, generator=g)  # one matching pair, so the loss is not flat
        scale = torch.tensor(math.log(1 / 0.07))
        want = reference(img, txt, scale)
        got = _call(fn, img.clone().requires_grad_(), txt.clone().requires_grad_(), scale.clone(),
                    what=f"(img {B}x{E}, txt {B}x{E}, logit_scale)")
        if not torch.is_tensor(got):
            return _say(False, f"clip_loss returned a {type(got).__name__}; return a tensor (the optimizer "
                               "needs to backpropagate through it).")
        if got.numel() != 1:
            return _say(False, f"clip_loss returned shape {tuple(got.shape)}; the loss is one number "
                               "(the mean over the batch of the two cross-entropies).")
        if not got.requires_grad:
            return _say(False, "the loss does not depend on img / txt through autograd (did you call "
                               ".item(), .detach() or numpy?); training needs its gradient.")
        got_v = float(got.detach())
        if math.isclose(got_v, float(want), rel_tol=1e-4, abs_tol=1e-5):
            continue
        # diagnose the usual slips
        t = torch.arange(B)
        i_n, t_n = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
        s = scale.exp()
        L = s * i_n @ t_n.t()
        variants = {
            "only the image -> text direction: add the text -> image cross-entropy (on logits.T) and average":
                F.cross_entropy(L, t),
            "only the text -> image direction: add the image -> text cross-entropy and average":
                F.cross_entropy(L.t(), t),
            "the two directions are summed: average them (divide by 2)":
                F.cross_entropy(L, t) + F.cross_entropy(L.t(), t),
            "the embeddings are not L2-normalised: CLIP compares cosine similarities":
                (F.cross_entropy(s * img @ txt.t(), t) + F.cross_entropy(s * txt @ img.t(), t)) / 2,
            "logit_scale is a log: multiply by logit_scale.exp() (= 1 / temperature), not by logit_scale":
                (F.cross_entropy(scale * i_n @ t_n.t(), t) + F.cross_entropy(scale * t_n @ i_n.t(), t)) / 2,
            "the similarities are not scaled: multiply them by logit_scale.exp() (1 / temperature)":
                (F.cross_entropy(i_n @ t_n.t(), t) + F.cross_entropy(t_n @ i_n.t(), t)) / 2,
        }
        for why, v in variants.items():
            if math.isclose(got_v, float(v), rel_tol=1e-4, abs_tol=1e-5):
                return _say(False, f"batch of {B}: you return {got_v:.4f}, mmkit.zoo.clip_loss gives "
                                   f"{float(want):.4f}: {why}.")
        return _say(False, f"batch of {B}: you return {got_v:.4f}, mmkit.zoo.clip_loss gives {float(want):.4f}. "
                           "Check: normalise, logits = exp(logit_scale) * img @ txt.T, targets = arange(B), "
                           "mean of the two cross-entropies.")
    return _say(True, "matches mmkit.zoo.clip_loss on two batches, and gradients flow.")


# ================================================================================ 02_llava
def _tiny_tokenizer():
    from transformers import AutoTokenizer

    from mmkit.language import resolve_lm_source

    return AutoTokenizer.from_pretrained(resolve_lm_source("tiny"))


def _label_cases(tokenizer) -> list[tuple[str, list[int], list[int]]]:
    """(description, input_ids, labels) from the real Processor on ShapesWorld records."""
    import torch

    from mmkit.data.processor import Processor
    from mmkit.data.shapes import ShapesWorld
    from mmkit.language import IMAGE_TOKEN

    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    proc = dict(image_transform=lambda ims: torch.zeros(len(ims), 3, 8, 8), expand=lambda pv: [image_id] * 4)
    world = ShapesWorld()
    vqa = world.sample("train", 1, "vqa")
    pope = world.sample("train", 1, "pope")  # same index, same scene: a follow-up question
    two_turns = {**vqa, "id": "two turns", "conversations": vqa["conversations"] + [
        {"from": "human", "value": pope["conversations"][0]["value"].replace("<image>\n", "")},
        {"from": "gpt", "value": pope["conversations"][1]["value"]}]}
    cases = [("a VQA record", Processor(tokenizer, **proc), vqa),
             ("a two-turn conversation", Processor(tokenizer, **proc), two_turns),
             ("a two-image record with a system prompt",
              Processor(tokenizer, **proc, system_prompt="Answer in one word."), world.sample("train", 2, "multi"))]
    out = []
    for what, p, rec in cases:
        enc = p.encode(rec)
        out.append((what, enc.input_ids, enc.labels))
    return out


@_guard
def check_label_mask(fn: Callable, tokenizer: Any = None) -> bool:
    """fn(input_ids, tokenizer) -> labels; compared with the Processor's labels on real
    ShapesWorld records (one VQA turn; two turns; two images with a system prompt)."""
    tokenizer = tokenizer or _tiny_tokenizer()
    from mmkit.language import IMAGE_TOKEN, IM_END

    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    end_id = tokenizer.convert_tokens_to_ids(IM_END)
    for what, ids, want in _label_cases(tokenizer):
        got = _call(fn, list(ids), tokenizer, what=f" on {what}")
        if hasattr(got, "tolist"):
            got = got.tolist()
        got = list(got)
        if len(got) != len(want):
            return _say(False, f"{what}: {len(ids)} input ids but {len(got)} labels; there is one label per token.")
        for k, (g, w) in enumerate(zip(got, want)):
            try:
                g = int(g)
            except (TypeError, ValueError):
                return _say(False, f"{what}: label {k} is {g!r}; labels are ints (a token id or {IGNORE_INDEX}).")
            if g == w:
                continue
            tok = tokenizer.decode([ids[k]], skip_special_tokens=False).replace("\n", "\\n")
            at = f"{what}, position {k} ({tok!r})"
            if w == IGNORE_INDEX:
                why = ("it is an image token: the model reads images, it never predicts them"
                       if ids[k] == image_id else "it is not part of the assistant's answer")
                return _say(False, f"{at} should be {IGNORE_INDEX} because {why}; you wrote {g}.")
            if g == IGNORE_INDEX:
                why = ("the model must learn to stop after its answer" if ids[k] == end_id
                       else "the assistant wrote it, so the model learns to predict it")
                return _say(False, f"{at} should be trained (label = its id {w}): {why}.")
            shifted = k + 1 < len(ids) and g == ids[k + 1]
            return _say(False, f"{at}: the label should be the token's own id {w}, you wrote {g}"
                               + (" (the next token: do not shift; the LM shifts labels inside its loss)"
                                  if shifted else "") + ".")
    return _say(True, "same labels as mmkit's Processor on all three records (one turn, two turns, "
                      "two images + system prompt).")


@_guard
def check_merge_image_tokens(fn: Callable) -> bool:
    """fn(input_ids, text_embeds, image_embeds, image_token_id) -> (B, T, D); compared with
    ``VLM.embed`` on random tensors (two rows, three images, padding)."""
    from types import SimpleNamespace

    import torch
    from torch import nn

    from mmkit.vlm import VLM

    g = torch.Generator().manual_seed(0)
    V, D, T_img, IMG, PAD = 20, 6, 3, 7, 0
    ids = torch.tensor([
        [1, 7, 7, 7, 5, 1, 7, 7, 7, 9, 4, 2],  # row 0: two images
        [1, 3, 8, 7, 7, 7, 6, 2, 0, 0, 0, 0],  # row 1: one image, then padding
    ])
    emb = nn.Embedding(V, D)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(V, D, generator=g))
    image_embeds = torch.randn(3, T_img, D, generator=g) + 10  # (N_img, T_img, D), far from any word
    stub = SimpleNamespace(lm=SimpleNamespace(get_input_embeddings=lambda: emb), image_token_id=IMG,
                           image_embeds=lambda pv: image_embeds)
    with torch.no_grad():
        want = VLM.embed(stub, ids, torch.zeros(3, 3, 8, 8))  # (B, T, D), the library's merge
        text = emb(ids)
    text_before = text.clone()
    with torch.no_grad():
        got = _call(fn, ids.clone(), text, image_embeds.clone(), IMG,
                    what="(input_ids (2, 12), text_embeds (2, 12, 6), image_embeds (3, 3, 6), image_token_id=7)")
    if not torch.is_tensor(got):
        return _say(False, f"merge_image_tokens returned a {type(got).__name__}; return a (B, T, D) tensor.")
    if tuple(got.shape) != tuple(want.shape):
        return _say(False, f"expected shape {tuple(want.shape)} (B, T, D): the sequence keeps its length, "
                           f"image tokens are replaced in place; got {tuple(got.shape)}.")
    note = ("" if torch.equal(text, text_before) else
            " (note: you overwrote text_embeds in place; fine here, but under autograd clone() first)")
    flat = image_embeds.reshape(-1, D)
    for b in range(ids.shape[0]):
        slot = 0 if b == 0 else int((ids[:b] == IMG).sum())
        for t in range(ids.shape[1]):
            if torch.allclose(got[b, t], want[b, t], atol=1e-5):
                slot += int(ids[b, t] == IMG)
                continue
            if ids[b, t] != IMG:
                return _say(False, f"row {b}, position {t} is a text token (id {int(ids[b, t])}): its embedding "
                                   "must stay the word embedding; only image-token positions change.")
            want_i, want_k = divmod(slot, T_img)
            match = [j for j in range(flat.shape[0]) if torch.allclose(got[b, t], flat[j], atol=1e-5)]
            if match:
                i, k = divmod(match[0], T_img)
                hint = (" Number the image slots across the whole batch, row by row: row 1's first slot "
                        "takes the next unused image (image 2), not image 0." if b > 0 and i < want_i else "")
                return _say(False, f"row {b}, position {t} holds image {i}'s token {k}; it should hold image "
                                   f"{want_i}'s token {want_k} (images fill the slots in reading order).{hint}")
            return _say(False, f"row {b}, position {t} is an image slot: it should hold image {want_i}'s token "
                               f"{want_k} (image_embeds[{want_i}, {want_k}]), but holds something else.")
    return _say(True, "same result as VLM.embed (two rows, three images, padding)" + note + ".")


# ================================================================================ registry
@dataclass(frozen=True)
class Exercise:
    name: str
    notebook: str
    task: str
    check: Callable[..., bool]


EXERCISES: dict[str, Exercise] = {e.name: e for e in [
    Exercise("count_image_tokens", "00_tour",
             "count_image_tokens(image_size, patch_size, keep_cls=False) -> how many tokens a ViT makes of an image",
             check_count_image_tokens),
    Exercise("vqa_accuracy", "00_tour",
             "vqa_accuracy(predictions, answers) -> normalised exact-match accuracy in [0, 1]",
             check_vqa_accuracy),
    Exercise("patchify", "01_vision_encoder",
             "patchify(image (C, H, W), p) -> (N, C*p*p) row-major patches", check_patchify),
    Exercise("clip_loss", "01_vision_encoder",
             "clip_loss(img, txt, logit_scale) -> symmetric InfoNCE", check_clip_loss),
    Exercise("label_mask", "02_llava",
             "label_mask(input_ids, tokenizer) -> labels: trained on the assistant's tokens only", check_label_mask),
    Exercise("merge_image_tokens", "02_llava",
             "merge_image_tokens(input_ids, text_embeds, image_embeds, image_token_id) -> inputs_embeds",
             check_merge_image_tokens),
]}


def register(exercise: Exercise, solution_source: str) -> Exercise:
    """Add a notebook's exercise (used by the modules of this package)."""
    if exercise.name in EXERCISES and EXERCISES[exercise.name].check is not exercise.check:
        raise ValueError(f"two exercises are named {exercise.name!r}")
    EXERCISES[exercise.name] = exercise
    _SOLUTIONS[exercise.name] = solution_source
    return exercise


_LOADED = False


def _load_all() -> None:
    """Import every exercise module of this package (each registers its exercises)."""
    global _LOADED
    if _LOADED:
        return
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
    _LOADED = True


def _get(name: str) -> Exercise:
    _load_all()
    if name not in EXERCISES:
        raise KeyError(f"no exercise {name!r}; there are: {', '.join(EXERCISES)}")
    return EXERCISES[name]


def check(name: str, answer: Callable, **kwargs: Any) -> bool:
    """``check("patchify", patchify)`` is ``check_patchify(patchify)``."""
    return _get(name).check(answer, **kwargs)


def solution(name: str) -> None:
    """Print a reference answer for exercise ``name``. Try the exercise first!"""
    _get(name)
    print(f"# reference answer for {name!r} (mmkit.exercises)\n")
    print(_SOLUTIONS[name])


def list_exercises(notebook: str | None = None) -> list[Exercise]:
    """The exercises (of one notebook, e.g. "02_llava")."""
    _load_all()
    return [e for e in EXERCISES.values() if notebook is None or e.notebook == notebook]
