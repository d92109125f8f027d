"""Exercises of notebook 06 (encoder-free: Fuyu and EVE): Fuyu's token layout, EVE's CA1
windows, and the patch positions the Patch Aligning Layer reads.

    from mmkit.exercises import check, solution
    check("fuyu_expand", fuyu_expand)
    check("ca1_windows", ca1_windows)
    check("eve_patch_states", eve_patch_states)
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch

from mmkit.exercises.core import Exercise, _call, _guard, _say, register

_EXPAND = '''\
def fuyu_expand(height, width, patch_size, image_id, newline_id):
    """The ids one padded height x width image becomes in Fuyu's text: for each of the
    h = height / p rows, w = width / p image tokens and then one newline token."""
    h, w = height // patch_size, width // patch_size
    return ([image_id] * w + [newline_id]) * h
'''

_WINDOWS = '''\
def ca1_windows(fine, grid, s):
    """(N, Hf*Wf, C) row-major patches -> (N*h*w, s*s, C): the s x s sub-patches under each
    window (windows row-major, sub-patches row-major inside a window)."""
    N, _, C = fine.shape
    Hf, Wf = grid
    h, w = Hf // s, Wf // s
    x = fine.view(N, h, s, w, s, C)             # split rows into (window row, row inside) ...
    x = x.permute(0, 1, 3, 2, 4, 5)             # ... and bring the two "inside" axes together
    return x.reshape(N * h * w, s * s, C)
'''

_STATES = '''\
def eve_patch_states(x, grid):
    """One image's 1 + h*(w+1) LM positions (T, D) -> (h, w, D): drop <CLS> (first) and the
    <SPL> that ends every row."""
    h, w = grid
    return x[1:].reshape(h, w + 1, x.shape[-1])[:, :w]
'''


@_guard
def check_fuyu_expand(fn: Callable) -> bool:
    """``fuyu_expand(H, W, p, image_id, newline_id)`` against ``FuyuVLM.expand_image``."""
    from mmkit.encoder_free.fuyu import FuyuVLM, Patchify

    for H, W in [(64, 64), (48, 96), (96, 48), (8, 40)]:
        stub = SimpleNamespace(image_grid=lambda pv: Patchify(8).grid(pv.shape), image_token_id=5,
                               newline_token_id=9, image_wrap_ids=None)
        want = FuyuVLM.expand_image(stub, torch.zeros(3, H, W))
        got = _call(fn, H, W, 8, 5, 9, what=f"({H}, {W}, 8, 5, 9)")
        got = list(got)
        if got == want:
            continue
        h, w = H // 8, W // 8
        if len(got) == h * w:
            hint = "one newline token ends every row: h * (w + 1) ids, not h * w"
        elif len(got) == w * (h + 1):
            hint = "rows come from the height: h = H / p rows of w = W / p patches (you swapped them)"
        elif got and got[0] == 9:
            hint = "the newline comes after each row's patches, not before"
        else:
            hint = f"expected {h} rows of {w} image ids followed by the newline id"
        return _say(False, f"a {H} x {W} image (H x W): got {len(got)} ids, expected {len(want)}: {hint}.")
    return _say(True, "square, wide and tall images laid out row by row, each row closed by |NEWLINE|.")


@_guard
def check_ca1_windows(fn: Callable) -> bool:
    """``ca1_windows(fine, grid, s)`` against ``mmkit.encoder_free.eve.window_partition``."""
    from mmkit.encoder_free.eve import window_partition

    torch.manual_seed(0)
    for N, Hf, Wf, C, s in [(1, 4, 4, 3, 2), (2, 4, 8, 5, 2), (1, 6, 9, 2, 3)]:
        fine = torch.randn(N, Hf * Wf, C)
        want = window_partition(fine, (Hf, Wf), s)
        got = _call(fn, fine, (Hf, Wf), s, what=f"(fine {tuple(fine.shape)}, {(Hf, Wf)}, {s})")
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            return _say(False, f"a {Hf} x {Wf} grid, {s} x {s} windows: got {shape}, expected {tuple(want.shape)} "
                               "= (N * windows, s * s, C).")
        if torch.equal(got, want):
            continue
        naive = fine.reshape(N * (Hf * Wf) // (s * s), s * s, C)
        hint = ("you cut the row-major sequence into consecutive runs of s*s patches; a window's patches "
                "come from s different rows: view as (N, h, s, w, s, C) and permute") if torch.equal(got, naive) \
            else "window k must hold exactly the s x s patches under it, in row-major order"
        return _say(False, f"a {Hf} x {Wf} grid, {s} x {s} windows: right shape, wrong patches: {hint}.")
    return _say(True, "every window holds the sub-patches under it (2x2 and 3x3, non-square grids).")


@_guard
def check_eve_patch_states(fn: Callable) -> bool:
    """``eve_patch_states(x, grid)`` against ``mmkit.encoder_free.eve.patch_states``."""
    from mmkit.encoder_free.eve import patch_states

    for h, w in [(2, 3), (4, 4), (3, 1)]:
        x = torch.arange(1 + h * (w + 1), dtype=torch.float32)[:, None].repeat(1, 2)  # position ids as features
        want = patch_states(x, (h, w))
        got = _call(fn, x, (h, w), what=f"(x {tuple(x.shape)}, {(h, w)})")
        if isinstance(got, torch.Tensor) and tuple(got.shape) == tuple(want.shape) and torch.equal(got, want):
            continue
        kept = sorted(set(int(v) for v in torch.as_tensor(got)[..., 0].flatten().tolist())) \
            if isinstance(got, torch.Tensor) else []
        if 0 in kept:
            hint = "position 0 is <CLS>: drop it"
        elif any((p - 1) % (w + 1) == w for p in kept if p > 0):
            hint = f"positions {[1 + r * (w + 1) + w for r in range(h)]} are the <SPL> tokens: drop them"
        else:
            hint = f"return shape (h, w, D) = {tuple(want.shape)}"
        return _say(False, f"grid {h} x {w}: {hint}.")
    return _say(True, "CLS and every SPL dropped; the patches keep their (row, col) places.")


register(Exercise("fuyu_expand", "06_encoder_free",
                  "fuyu_expand(H, W, p, image_id, newline_id) -> ids: rows of patches, each closed by |NEWLINE|",
                  check_fuyu_expand), _EXPAND)
register(Exercise("ca1_windows", "06_encoder_free",
                  "ca1_windows(fine (N, Hf*Wf, C), grid, s) -> (N*h*w, s*s, C): the sub-patches under each window",
                  check_ca1_windows), _WINDOWS)
register(Exercise("eve_patch_states", "06_encoder_free",
                  "eve_patch_states(x (1+h*(w+1), D), grid) -> (h, w, D): CLS and SPL dropped",
                  check_eve_patch_states), _STATES)


# ---------------------------------------------------------------- build-up: EVE's patch rows
_PATCH_ROWS = '''\
import torch

def patch_rows(cls, local, spl):
    """EVE's image tokens in the LM's order: [<CLS>, row 0, <SPL>, row 1, <SPL>, ...].
    cls (N, 1, C), local (N, h, w, C) window tokens, spl (C,) -> (N, 1 + h*(w+1), C)."""
    N, h, w, C = local.shape
    split = spl.expand(N, h, 1, C)                                  # one <SPL> at the end of every row
    rows = torch.cat([local, split], dim=2).reshape(N, h * (w + 1), C)
    return torch.cat([cls, rows], dim=1)
'''


@_guard
def check_patch_rows(fn: Callable) -> bool:
    """fn(cls (N, 1, C), local (N, h, w, C), spl (C,)) -> (N, 1 + h*(w+1), C); compared with
    ``mmkit.encoder_free.eve.patch_rows`` on a non-square grid, then used inside a real
    ``PatchEmbeddingLayer`` (its weights unchanged) on a 2 x 3 window image."""
    from mmkit.encoder_free import eve

    g = torch.Generator().manual_seed(0)
    N, h, w, C = 2, 2, 3, 4
    cls, local, spl = torch.randn(N, 1, C, generator=g), torch.randn(N, h, w, C, generator=g), torch.randn(C, generator=g)
    want = eve.patch_rows(cls, local, spl)
    got = _call(fn, cls.clone(), local.clone(), spl.clone(), what=f"(cls (2, 1, 4), local (2, {h}, {w}, 4), spl (4,))")
    if not torch.is_tensor(got):
        return _say(False, f"patch_rows returned a {type(got).__name__}; return a (N, 1 + h*(w+1), C) tensor.")
    if tuple(got.shape) != tuple(want.shape):
        hint = (" (is the <CLS> missing?)" if got.shape[1] == want.shape[1] - 1 else
                " (one <SPL> per row, h of them, not one per column)" if got.shape[1] == 1 + w * (h + 1) else "")
        return _say(False, f"expected shape {tuple(want.shape)} = (N, 1 + h*(w+1), C) for h={h}, w={w}; "
                           f"got {tuple(got.shape)}{hint}.")
    names = ["<CLS>"] + [f"row {r}, {'<SPL>' if c == w else f'window {c}'}" for r in range(h) for c in range(w + 1)]
    for t in range(want.shape[1]):
        if torch.allclose(got[:, t], want[:, t], atol=1e-6):
            continue
        if torch.allclose(got[0, t], spl, atol=1e-6):
            return _say(False, f"position {t} should be {names[t]} but holds <SPL>: the <SPL> ends every row "
                               "(after its w windows), it does not start it.")
        return _say(False, f"position {t} should be {names[t]}; the layout is [<CLS>, row 0, <SPL>, row 1, "
                           "<SPL>, ...], rows in reading order (row-major).")
    torch.manual_seed(0)
    pel = eve.PatchEmbeddingLayer(8, patch_size=2, pool=2, dim=8, num_heads=2).eval()
    pixels = torch.randn(1, 3, 8, 12)
    original = eve.patch_rows
    with torch.no_grad():
        ref = pel(pixels)
        try:
            eve.patch_rows = fn
            mine = pel(pixels)
        finally:
            eve.patch_rows = original
    if not torch.allclose(mine, ref, atol=1e-5):
        return _say(False, "inside PatchEmbeddingLayer your layout changed the image tokens (check dtypes "
                           "and that spl is expanded, not copied per image by hand).")
    return _say(True, "same layout as EVE's Patch Embedding Layer: 1 + h*(w+1) tokens, <SPL> ending every row.")


register(Exercise("patch_rows", "06_encoder_free",
                  "patch_rows(cls, local, spl) -> (N, 1 + h*(w+1), C): EVE's [CLS, row, SPL, row, SPL ...] layout",
                  check_patch_rows), _PATCH_ROWS)
