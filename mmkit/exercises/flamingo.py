"""Exercises of notebook 04 (Flamingo): write the media mask; count the visual tokens of a video."""
from __future__ import annotations

from typing import Callable

from mmkit.exercises.core import Exercise, _call, _guard, _say, register

__all__ = ["check_media_mask", "check_visual_tokens"]

_MEDIA_MASK = '''\
import torch

def media_mask(input_ids, image_token_id, only_latest=True):
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
                  check_media_mask), _MEDIA_MASK)
register(Exercise("visual_tokens", "04_flamingo",
                  "visual_tokens(frames, image_size, patch_size, num_latents=None) -> keys one video costs the LM",
                  check_visual_tokens), _VISUAL_TOKENS)
