"""Exercises of notebook 01 (the vision encoder): patchify, the CLIP loss.

    from mmkit.exercises import check_patchify, check_clip_loss, solution
    check_patchify(patchify)
    check_clip_loss(clip_loss)
"""
from __future__ import annotations

import math
from typing import Callable

from mmkit.exercises.core import Exercise, _call, _guard, _say, register

_PATCHIFY = '''\
def patchify(image, p):
    """(C, H, W) -> (N, C*p*p): non-overlapping p x p patches, row-major (left to right,
    then top to bottom), each flattened in (C, p, p) order like the conv weight."""
    C, H, W = image.shape
    h, w = H // p, W // p
    x = image[:, : h * p, : w * p].reshape(C, h, p, w, p)   # split rows and columns into blocks
    x = x.permute(1, 3, 0, 2, 4)                             # (h, w, C, p, p): grid first
    return x.reshape(h * w, C * p * p)
    # the same with torch: torch.nn.functional.unfold(image[None], p, stride=p)[0].T
'''

_CLIP_LOSS = '''\
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
'''


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


register(Exercise("patchify", "01_vision_encoder",
                  "patchify(image (C, H, W), p) -> (N, C*p*p) row-major patches", check_patchify), _PATCHIFY)
register(Exercise("clip_loss", "01_vision_encoder",
                  "clip_loss(img, txt, logit_scale) -> symmetric InfoNCE", check_clip_loss), _CLIP_LOSS)
