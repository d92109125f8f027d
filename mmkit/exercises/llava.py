"""Exercises of notebook 02 (LLaVA): the label mask, merging image tokens into the text.

    from mmkit.exercises import check_label_mask, check_merge_image_tokens, solution
    check_label_mask(label_mask)
    check_merge_image_tokens(merge_image_tokens)
"""
from __future__ import annotations

from typing import Any, Callable

from mmkit.exercises.core import Exercise, _call, _guard, _say, register

_LABEL_MASK = '''\
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
'''

_MERGE = '''\
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
'''


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
    from mmkit.data.processor import IGNORE_INDEX
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
    V, D, T_img, IMG = 20, 6, 3, 7  # token 0 pads
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


register(Exercise("label_mask", "02_llava",
                  "label_mask(input_ids, tokenizer) -> labels: trained on the assistant's tokens only",
                  check_label_mask), _LABEL_MASK)
register(Exercise("merge_image_tokens", "02_llava",
                  "merge_image_tokens(input_ids, text_embeds, image_embeds, image_token_id) -> inputs_embeds",
                  check_merge_image_tokens), _MERGE)


# ---------------------------------------------------------------- build-up: the projector
_MLP_PROJECTOR = '''\
from torch import nn

class MLPProjector(nn.Module):
    """LLaVA-1.5's projector ("mlp2x_gelu"), applied to every patch on its own:
    (N, P, D_v) -> Linear(D_v, D_lm) -> GELU -> Linear(D_lm, D_lm) -> (N, P, D_lm)."""

    def __init__(self, vision_dim, lm_dim):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, lm_dim)
        self.act = nn.GELU()                      # the exact (erf) GELU, transformers' "gelu"
        self.linear_2 = nn.Linear(lm_dim, lm_dim)

    def forward(self, features):
        return self.linear_2(self.act(self.linear_1(features)))
'''


@_guard
def check_MLPProjector(cls: Callable) -> bool:
    """cls(vision_dim, lm_dim) -> module; loaded with ``mmkit.bridges.llava.MLPProjector``'s
    weights and compared on random patch features (N=2, P=5, D_v=12 -> D_lm=16)."""
    import torch
    import torch.nn.functional as F

    from mmkit.bridges.llava import MLPProjector
    from mmkit.exercises.core import _same_module

    torch.manual_seed(0)
    ref = MLPProjector(12, 16)
    x = torch.randn(2, 5, 12) * 2
    mistakes = {
        "there is no activation between the two linear layers: two linear maps in a row are one linear "
        "map, no more than LLaVA-1.0's single layer. Put a GELU between them.":
            lambda r, x: r.linear_2(r.linear_1(x)),
        "you used the tanh approximation of GELU; LLaVA-1.5's projector (transformers' \"gelu\") uses the "
        "exact erf GELU: nn.GELU() with no arguments.":
            lambda r, x: r.linear_2(F.gelu(r.linear_1(x), approximate="tanh")),
        "you used ReLU; LLaVA-1.5 uses GELU (nn.GELU()).": lambda r, x: r.linear_2(F.relu(r.linear_1(x))),
        "there is an activation after the second linear layer too; the projector ends with the linear "
        "layer, so image tokens can take any sign and scale.":
            lambda r, x: F.gelu(r.linear_2(F.gelu(r.linear_1(x)))),
    }
    if not _same_module(cls, ref, (12, 16), (x,), what="MLPProjector(12, 16) on (2, 5, 12) features",
                        mistakes=mistakes):
        return False
    return _say(True, "same image tokens as mmkit.bridges.llava.MLPProjector with the same weights.")


register(Exercise("MLPProjector", "02_llava",
                  "class MLPProjector(nn.Module): LLaVA-1.5's Linear-GELU-Linear projector",
                  check_MLPProjector), _MLP_PROJECTOR)
