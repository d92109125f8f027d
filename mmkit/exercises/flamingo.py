"""Exercises of notebook 04 (Flamingo): write the media mask; count the visual tokens of a video."""
from __future__ import annotations

from typing import Callable

from mmkit.exercises.core import Exercise, _call, _guard, _say, register

__all__ = ["check_media_mask", "check_visual_tokens"]

_MEDIA_MASK = '''\
import torch

def media_mask_mine(input_ids, image_token_id, only_latest=True):
    """(B, T) ids -> (B, T, N) bool: may token t see image m? (N = most images in a row)"""
    text_time = torch.cumsum(input_ids == image_token_id, dim=1)   # (B, T): images so far, the marker included
    N = int(text_time[:, -1].max())
    image_number = torch.arange(1, N + 1)                             # images are numbered 1..N
    if only_latest:
        return text_time[..., None] == image_number                    # only the latest image
    return text_time[..., None] >= image_number                        # every image so far
'''

_VISUAL_TOKENS = '''\
def visual_tokens(frames, image_size, patch_size, num_latents=None):
    """Keys one video costs the LM's cross-attention: every patch of every frame, or, with a
    Perceiver Resampler, its num_latents latents whatever the frames and the resolution."""
    if num_latents is not None:
        return num_latents
    H, W = (image_size, image_size) if isinstance(image_size, int) else image_size
    return frames * (H // patch_size) * (W // patch_size)
'''


@_guard
def check_media_mask(fn: Callable) -> bool:
    """fn(input_ids (B, T), image_token_id, only_latest=True) -> (B, T, N) bool; compared with
    ``mmkit.bridges.flamingo.media_mask`` on rows with text before the first image, several
    images, padding, and both settings of ``only_latest``."""
    import torch

    from mmkit.bridges.flamingo import media_mask

    IMG = 7
    ids = torch.tensor([
        [1, 4, IMG, 5, 6, IMG, 8, 9, IMG, 2],   # text, then three images
        [0, 0, 0, 0, IMG, 3, 3, IMG, 3, 2],     # left padding, two images
    ])
    for latest in (True, False):
        want = media_mask(ids, IMG, only_latest=latest)
        got = _call(fn, ids.clone(), IMG, latest, what=f"(ids (2, 10), {IMG}, only_latest={latest})")
        if not torch.is_tensor(got):
            return _say(False, f"media_mask returned a {type(got).__name__}; return a (B, T, N) bool tensor.")
        if tuple(got.shape) != tuple(want.shape):
            return _say(False, f"expected shape {tuple(want.shape)} (B, T, N images, N = most images in a row), "
                               f"got {tuple(got.shape)}.")
        got = got.bool()
        for b, t, m in zip(*torch.nonzero(got != want, as_tuple=True)):
            b, t, m = int(b), int(t), int(m)
            seen_before = int((ids[b, : t + 1] == IMG).sum())
            if seen_before == 0:
                why = "no image comes at or before it, so it must see nothing"
            elif m + 1 > seen_before:
                why = f"image {m} comes after it (a token never sees a later image)"
            elif latest:
                why = (f"{seen_before} image(s) at or before it; with only_latest=True it sees image "
                       f"{seen_before - 1} only" + (" (the <image> marker sees its own image)" if ids[b, t] == IMG else ""))
            else:
                why = f"with only_latest=False it sees every image up to image {seen_before - 1}"
            return _say(False, f"only_latest={latest}: row {b}, token {t} (id {int(ids[b, t])}), image {m}: "
                               f"you say {bool(got[b, t, m])}, but {why}.")
    return _say(True, "same mask as the library, with only_latest=True and False.")


@_guard
def check_visual_tokens(fn: Callable) -> bool:
    """fn(frames, image_size, patch_size, num_latents=None) -> int; checked against real
    ``PerceiverResampler`` outputs and the patch counts of ViTs."""
    import torch

    from mmkit.bridges.flamingo import PerceiverResampler

    cases = [  # frames, size, patch, latents, expected, what
        (1, 64, 8, None, 64, "one tiny-world image, no resampler"),
        (8, 224, 14, None, 8 * 256, "8 frames at 224 px, ViT-L/14, no resampler"),
        (30, 336, 14, None, 30 * 576, "a 30-frame clip at 336 px, no resampler"),
        (1, (64, 128), 8, None, 128, "a 64 x 128 image"),
    ]
    for frames, size, p, lat, want, what in cases:
        got = _call(fn, frames, size, p, lat, what=f"({frames}, {size!r}, {p}, num_latents={lat})")
        if int(got) != want:
            H, W = (size, size) if isinstance(size, int) else size
            return _say(False, f"{what}: expected {want} = {frames} frame(s) x {H // p} x {W // p} patches, "
                               f"got {got}.")
    res = PerceiverResampler(16, num_latents=5, depth=1, num_heads=2, max_frames=8)
    for frames, grid in ((1, 4), (3, 4), (8, 6)):
        with torch.no_grad():
            real = res(torch.zeros(1, frames, grid * grid, 16)).shape[1]
        got = _call(fn, frames, grid * 8, 8, 5, what=f"({frames}, {grid * 8}, 8, num_latents=5)")
        if int(got) != real:
            return _say(False, f"a PerceiverResampler with 5 latents turned {frames} frame(s) of {grid * grid} "
                               f"patches into {real} tokens; you said {got}. The latents are the output, "
                               "however long the input.")
    return _say(True, "patch counts right, and the resampler's output is num_latents for 1, 3 or 8 frames.")


register(Exercise("media_mask", "04_flamingo",
                  "media_mask(input_ids, image_token_id, only_latest=True) -> (B, T, N) bool: which image each token sees",
                  check_media_mask, answer="media_mask_mine"), _MEDIA_MASK)  # the library's media_mask stays
register(Exercise("visual_tokens", "04_flamingo",
                  "visual_tokens(frames, image_size, patch_size, num_latents=None) -> keys one video costs the LM",
                  check_visual_tokens), _VISUAL_TOKENS)


# ---------------------------------------------------------------- build-up: the two Flamingo blocks
_PERCEIVER_BLOCK = '''\
import torch
from torch import nn

from mmkit.nn import MLP, Attention

class PerceiverBlock(nn.Module):
    """One Perceiver Resampler layer (Flamingo, Fig. 5): the latents read the features.
        x_f, x = LN(features), LN(latents)
        latents = latents + Attention(q = x, kv = cat[x_f, x])     # the latents see themselves too
        latents = latents + FFW(LN(latents))"""

    def __init__(self, dim, num_heads, ff_mult=4):
        super().__init__()
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=False, out_bias=False)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = MLP(dim, ff_mult * dim, act="relu", bias=False)

    def forward(self, features, latents):
        x_f = self.norm_media(features)                                        # (N, S, D)
        x = self.norm_latents(latents)                                         # (N, L, D)
        latents = latents + self.attn(x, context=torch.cat([x_f, x], dim=1))   # (N, L, D)
        return latents + self.ff(self.norm_ff(latents))                        # (N, L, D)
'''

_GATED_XATTN = '''\
import torch
from torch import nn

from mmkit.bridges.flamingo import GatedMLP
from mmkit.nn import Attention, RMSNorm

class GatedXAttnDense(nn.Module):
    """GATED XATTN-DENSE (Flamingo, Fig. 4), in front of a frozen LM layer:
        y = y + tanh(alpha_xattn) * XAttn(RMSNorm(y), media, mask)
        y = y + tanh(alpha_dense) * FFW(RMSNorm(y))
    The alphas start at 0, so at step 0 the block is the identity: the LM is unchanged."""

    def __init__(self, dim, media_dim, num_heads, ffn_hidden):
        super().__init__()
        self.norm_xattn = RMSNorm(dim)
        self.xattn = Attention(dim, num_heads, kv_dim=media_dim, qkv_bias=False, out_bias=False)
        self.norm_dense = RMSNorm(dim)
        self.ffn = GatedMLP(dim, ffn_hidden)
        self.alpha_xattn = nn.Parameter(torch.zeros(1))
        self.alpha_dense = nn.Parameter(torch.zeros(1))

    def forward(self, y, media, mask):
        # y (B, T, D) text; media (B, M, D_v); mask (B, T, M) bool: may token t see media m?
        x = self.xattn(self.norm_xattn(y), context=media, mask=mask[:, None])   # (B, T, D); heads share the mask
        y = y + torch.tanh(self.alpha_xattn) * x
        return y + torch.tanh(self.alpha_dense) * self.ffn(self.norm_dense(y))
'''


@_guard
def check_PerceiverBlock(cls: Callable) -> bool:
    """cls(dim, num_heads) -> module; loaded with ``mmkit.bridges.flamingo.PerceiverBlock``'s
    weights, compared on 10 features and 3 latents."""
    import torch

    from mmkit.bridges.flamingo import PerceiverBlock
    from mmkit.exercises.core import _same_module

    torch.manual_seed(0)
    ref = PerceiverBlock(16, 2)
    feats, lat = torch.randn(2, 10, 16), torch.randn(2, 3, 16)

    def only_features(r, f, l):
        l = l + r.attn(r.norm_latents(l), context=r.norm_media(f))
        return l + r.ff(r.norm_ff(l))

    def no_norm_media(r, f, l):
        x = r.norm_latents(l)
        l = l + r.attn(x, context=torch.cat([f, x], 1))
        return l + r.ff(r.norm_ff(l))

    def no_residual(r, f, l):
        x = r.norm_latents(l)
        l = r.attn(x, context=torch.cat([r.norm_media(f), x], 1))
        return l + r.ff(r.norm_ff(l))

    mistakes = {
        "the latents attend to the features only; Flamingo's keys and values are cat[LN(features), "
        "LN(latents)], so a latent can also keep what it already holds.": only_features,
        "the features are not normalised before attention: use norm_media on them.": no_norm_media,
        "the attention output replaces the latents; add it to them (a residual connection).": no_residual,
    }
    if not _same_module(cls, ref, (16, 2), (feats, lat), mistakes=mistakes,
                        what="PerceiverBlock(16, 2) on 10 features, 3 latents"):
        return False
    return _say(True, "same latents as mmkit.bridges.flamingo.PerceiverBlock: stack `depth` of them "
                      "after learned latents and a LayerNorm, and you have the Perceiver Resampler.")


@_guard
def check_GatedXAttnDense(cls: Callable) -> bool:
    """cls(dim, media_dim, num_heads, ffn_hidden) -> module; loaded with
    ``mmkit.bridges.flamingo.GatedXAttnDense``'s weights (alphas set away from 0), compared on
    text that comes before, between and after two images."""
    import torch

    from mmkit.bridges.flamingo import GatedXAttnDense, media_mask
    from mmkit.exercises.core import _same_module

    torch.manual_seed(0)
    ref = GatedXAttnDense(16, 12, 2, 24)
    with torch.no_grad():
        ref.alpha_xattn.fill_(0.7), ref.alpha_dense.fill_(-0.4)
    IMG = 7
    ids = torch.tensor([[1, 4, IMG, 5, 6, IMG, 8, 2], [IMG, 3, 3, 3, 3, 3, 3, 2]])
    mask = media_mask(ids, IMG)                                   # (2, 8, 2)
    y, media = torch.randn(2, 8, 16), torch.randn(2, 2 * 3, 12).view(2, 2, 3, 12)
    media_flat = media.flatten(1, 2)                              # (2, 6, 12): 3 latents per image
    mask = mask.repeat_interleave(3, dim=2)                       # (2, 8, 6)

    def no_tanh(xattn: bool, dense: bool):
        def wrong(r, y, m, k):
            g1 = r.alpha_xattn if xattn else torch.tanh(r.alpha_xattn)
            g2 = r.alpha_dense if dense else torch.tanh(r.alpha_dense)
            y = y + g1 * r.xattn(r.norm_xattn(y), context=m, mask=k[:, None])
            return y + g2 * r.ffn(r.norm_dense(y))
        return wrong

    def no_mask(r, y, m, k):
        return r(y, m, torch.ones_like(k))

    def parallel(r, y, m, k):
        x = r.xattn(r.norm_xattn(y), context=m, mask=k[:, None])
        return y + torch.tanh(r.alpha_xattn) * x + torch.tanh(r.alpha_dense) * r.ffn(r.norm_dense(y))

    tanh_msg = "a gate is alpha, not tanh(alpha): Flamingo squashes both gates with tanh so they stay in (-1, 1)."
    mistakes = [(tanh_msg, no_tanh(a, b)) for a, b in ((True, True), (True, False), (False, True))] + list({
        "the media mask is ignored: each token may only read the image(s) the mask allows "
        "(pass mask=mask[:, None] so every head shares it).": no_mask,
        "the feed-forward reads y from before the cross-attention; it reads the updated y "
        "(the two sublayers are in sequence, each with its residual).": parallel,
    }.items())
    if not _same_module(cls, ref, (16, 12, 2, 24), (y, media_flat, mask), mistakes=mistakes,
                        what="GatedXAttnDense(16, 12, 2, 24), alphas 0.7 / -0.4"):
        return False
    fresh = _call(cls, 16, 12, 2, 24)
    with torch.no_grad():
        out0 = fresh(y, media_flat, mask)
    if not torch.allclose(out0, y, atol=1e-6):
        return _say(False, "with the weights loaded the block is right, but a freshly built one changes y: "
                           "initialise alpha_xattn and alpha_dense to zeros, so at step 0 the LM is untouched.")
    return _say(True, "same output as mmkit.bridges.flamingo.GatedXAttnDense, and the identity at step 0.")


register(Exercise("PerceiverBlock", "04_flamingo",
                  "class PerceiverBlock(nn.Module): latents attend to cat[features, latents], then an FFW",
                  check_PerceiverBlock), _PERCEIVER_BLOCK)
register(Exercise("GatedXAttnDense", "04_flamingo",
                  "class GatedXAttnDense(nn.Module): tanh-gated cross-attention and FFW in front of an LM layer",
                  check_GatedXAttnDense), _GATED_XATTN)
