"""Exercises of notebook 08 (native models): the straight-through estimator, the nearest
codebook entry, and what an interleaved document costs in tokens.

    from mmkit.exercises import check, solution
    check("straight_through", straight_through)
    check("nearest_code", nearest_code)
    check("document_tokens", document_tokens)
"""
from __future__ import annotations

from typing import Callable

import torch

from mmkit.exercises.core import Exercise, _call, _guard, _say, register

_ST = '''\
def straight_through(z, q):
    """Forward: the quantised q. Backward: the gradient that reaches q goes to z unchanged
    (VQ-VAE Sec. 3.1: copy the decoder's gradient to the encoder's output)."""
    return z + (q - z).detach()
'''

_NEAREST = '''\
def nearest_code(z, codebook):
    """z: (N, D) encoder outputs; codebook: (K, D). Returns (N,) ids of the closest code
    (squared Euclidean distance): ||z||^2 - 2 z.e + ||e||^2, argmin over K."""
    d = (z ** 2).sum(1, keepdim=True) - 2 * z @ codebook.T + (codebook ** 2).sum(1)
    return d.argmin(1)
'''

_DOC = '''\
def document_tokens(doc, tokenize, tokens_per_image, wrap=0):
    """Tokens a document costs the decoder: the text between <image> placeholders,
    each piece tokenised on its own, plus (tokens_per_image + wrap) per image."""
    pieces = doc.split("<image>")
    text = sum(len(tokenize(p)) for p in pieces)
    return text + (len(pieces) - 1) * (tokens_per_image + wrap)
'''


@_guard
def check_straight_through(fn: Callable) -> bool:
    """Checks ``straight_through(z, q)``: the value of q forward, the identity backward."""
    torch.manual_seed(0)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    codebook = torch.randn(5, 4, requires_grad=True)
    q = codebook[torch.randint(0, 5, (2, 3, 3))].permute(0, 3, 1, 2)  # (2, 4, 3, 3), built from codes
    out = _call(fn, z, q)
    if not torch.is_tensor(out) or out.shape != z.shape:
        return _say(False, f"expected a tensor of shape {tuple(z.shape)}, got "
                           f"{tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}.")
    if not torch.allclose(out, q, atol=1e-6):
        if torch.allclose(out, z, atol=1e-6):
            return _say(False, "the forward value is z: the decoder must see the quantised q.")
        return _say(False, "the forward value must equal q exactly (z + (q - z) = q).")
    upstream = torch.randn_like(out)
    if not out.requires_grad:
        return _say(False, "no gradient flows through your output: the encoder could never learn.")
    out.backward(upstream)
    if z.grad is None or not torch.allclose(z.grad, upstream, atol=1e-6):
        if z.grad is None or z.grad.abs().max() == 0:
            return _say(False, "z gets no gradient: the argmin that picked q has none, so the gradient "
                               "must be copied past it: z + (q - z).detach().")
        return _say(False, "z's gradient must be exactly the gradient that reached q (the identity).")
    if codebook.grad is not None and codebook.grad.abs().max() > 0:
        return _say(False, "the codebook got a gradient through your output; in the VQ-VAE it learns from its "
                           "own loss (or EMA), not through the straight-through path: detach (q - z).")
    return _say(True, "forward = q, backward = identity to z, nothing to the codebook.")


@_guard
def check_nearest_code(fn: Callable) -> bool:
    """Checks ``nearest_code(z, codebook)`` against the VectorQuantizer's own lookup."""
    from mmkit.native.vq import VectorQuantizer

    torch.manual_seed(1)
    vq = VectorQuantizer(codebook_size=16, code_dim=8)
    z = torch.randn(50, 8) * 1.5
    want = vq.nearest(z)
    got = _call(fn, z, vq.embed.clone())
    if not torch.is_tensor(got) or got.shape != want.shape:
        return _say(False, f"expected a tensor of {tuple(want.shape)} ids, got "
                           f"{tuple(got.shape) if torch.is_tensor(got) else type(got).__name__}.")
    if torch.equal(got.long(), want):
        return _say(True, f"the same code as the VectorQuantizer for all {len(z)} vectors.")
    d = torch.cdist(z, vq.embed)
    if torch.equal(got.long(), d.argmax(1)):
        return _say(False, "you picked the farthest code: argmin, not argmax.")
    if torch.equal(got.long(), (z @ vq.embed.T).argmax(1)):
        return _say(False, "the largest dot product is not the nearest code when codes differ in length; "
                           "use the squared distance ||z||^2 - 2 z.e + ||e||^2.")
    wrong = int((got.long() != want).sum())
    return _say(False, f"{wrong} of {len(z)} ids differ from the nearest code (squared Euclidean distance).")


@_guard
def check_document_tokens(fn: Callable) -> bool:
    """Checks ``document_tokens(doc, tokenize, tokens_per_image, wrap)`` against the processor."""
    from mmkit.data.processor import Processor
    from mmkit.data.shapes import ShapesWorld
    from mmkit.language import load_language_model

    _, tok = load_language_model("tiny")
    tokenize = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    world = ShapesWorld()
    for shots, (per, wrap, what) in zip((1, 2, 3), [(16, 2, "KOSMOS-1 (16 latents + <img> </img>)"),
                                                    (64, 0, "PaLM-E (one token per patch)"),
                                                    (64, 2, "the unified decoder (<boi> 64 codes <eoi>)")]):
        rec = world.sample("train", shots, "interleaved", shots=shots, fmt="caption")
        doc = rec["conversations"][0]["value"]
        proc = Processor(tok, lambda ims: torch.zeros(len(ims), 3, 8, 8),
                         lambda px, k=per + wrap: [tok.pad_token_id] * k,
                         text_format="document", max_length=4096)
        want = len(proc.encode({"images": rec["images"], "conversations": rec["conversations"][:1]},
                               for_generation=True).input_ids) - 1  # without <bos>
        got = _call(fn, doc, tokenize, per, wrap, what=f"(a {shots + 1}-image document, {what})")
        if int(got) != want:
            n = shots + 1
            hint = ("images are counted too: (tokens_per_image + wrap) each" if int(got) < want - n * per + 1
                    else "tokenise the text pieces between the placeholders; the placeholder itself is not text")
            return _say(False, f"{what}: the {n}-image document costs {want} tokens, you say {got}: {hint}.")
    return _say(True, "the same counts as the processor for KOSMOS-1, PaLM-E and the unified decoder.")


register(Exercise("straight_through", "08_native",
                  "straight_through(z, q) -> q forward, identity gradient to z backward", check_straight_through),
         _ST)
register(Exercise("nearest_code", "08_native",
                  "nearest_code(z, codebook) -> (N,) ids of the nearest codebook vectors", check_nearest_code),
         _NEAREST)
register(Exercise("document_tokens", "08_native",
                  "document_tokens(doc, tokenize, tokens_per_image, wrap) -> tokens a document costs",
                  check_document_tokens), _DOC)


# ---------------------------------------------------------------- build-up: the EMA codebook
_EMA_UPDATE = '''\
import torch
import torch.nn.functional as F

def ema_update(embed, cluster_size, embed_sum, flat, ids, decay=0.99, eps=1e-5):
    """One EMA step of the VQ-VAE codebook (Appendix A.1), no gradients involved.
    embed (K, D) codes e_k; cluster_size (K,) N_k; embed_sum (K, D) m_k; flat (M, D) encoder
    vectors; ids (M,) the code each picked. Returns the new (embed, cluster_size, embed_sum)."""
    K = embed.shape[0]
    onehot = F.one_hot(ids, K).to(flat.dtype)                          # (M, K)
    cluster_size = decay * cluster_size + (1 - decay) * onehot.sum(0)  # N_k: how many vectors picked k
    embed_sum = decay * embed_sum + (1 - decay) * onehot.t() @ flat    # m_k: their sum
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + K * eps) * n                # Laplace: no division by 0
    return embed_sum / smoothed[:, None], cluster_size, embed_sum       # e_k = m_k / N_k
'''


@_guard
def check_ema_update(fn: Callable) -> bool:
    """fn(embed, cluster_size, embed_sum, flat, ids, decay, eps) -> (embed, cluster_size,
    embed_sum); compared with one training step of ``mmkit.native.vq.VectorQuantizer`` (its
    buffers copied in, dead-code restarts off) with one code that no vector picks."""
    import torch.nn.functional as F

    from mmkit.native.vq import VectorQuantizer

    g = torch.Generator().manual_seed(0)
    K, D, decay, eps = 5, 3, 0.9, 0.1                                  # a large eps: smoothing shows
    vq = VectorQuantizer(K, D, decay=decay, eps=eps, dead_threshold=0.0)
    vq.embed.copy_(torch.randn(K, D, generator=g))
    vq.cluster_size.copy_(torch.rand(K, generator=g) * 4 + 1)
    vq.embed_sum.copy_(vq.embed * vq.cluster_size[:, None])
    flat = torch.randn(12, D, generator=g)
    ids = torch.tensor([0, 1, 1, 2, 2, 2, 0, 1, 3, 3, 0, 1])            # code 4: nobody picks it
    before = [t.clone() for t in (vq.embed, vq.cluster_size, vq.embed_sum)]
    vq._ema_update(flat, F.one_hot(ids, K).float())
    want = (vq.embed, vq.cluster_size, vq.embed_sum)
    got = _call(fn, *(t.clone() for t in before), flat.clone(), ids.clone(), decay, eps,
                what=f"(K={K} codes, D={D}, 12 vectors, decay={decay})")
    if not isinstance(got, (tuple, list)) or len(got) != 3:
        return _say(False, "return three tensors: (embed, cluster_size, embed_sum).")
    for name, gt, wt in zip(("cluster_size N_k", "embed_sum m_k", "embed e_k"), (got[1], got[2], got[0]),
                            (want[1], want[2], want[0])):
        if not torch.is_tensor(gt) or tuple(gt.shape) != tuple(wt.shape):
            return _say(False, f"{name}: expected a tensor of shape {tuple(wt.shape)}.")
        if torch.allclose(gt.float(), wt, atol=1e-5):
            continue
        if name.startswith("cluster") and torch.allclose(gt, (1 - decay) * before[1] + decay * F.one_hot(ids, K).sum(0).float()):
            return _say(False, "cluster_size: decay and 1 - decay are swapped: the old count keeps weight "
                               f"decay = {decay}, the batch adds (1 - decay) of its counts.")
        if name.startswith("embed e") and torch.allclose(gt, want[2] / want[1][:, None], atol=1e-5):
            return _say(False, "embed: you divided by N_k without Laplace smoothing; smooth the counts, "
                               "(N_k + eps) / (n + K eps) * n, so a code no vector picks never divides by ~0.")
        k = int(torch.nonzero((gt.float() - wt).abs() > 1e-5)[0][0])
        return _say(False, f"{name} of code {k}: expected {wt[k].tolist()}, got {gt[k].tolist()} "
                           f"({int((ids == k).sum())} vector(s) picked code {k} in this batch).")
    return _say(True, "same codebook as VectorQuantizer after one EMA step (the unpicked code keeps its place).")


register(Exercise("ema_update", "08_native",
                  "ema_update(embed, cluster_size, embed_sum, flat, ids, decay, eps): the VQ-VAE's EMA codebook step",
                  check_ema_update), _EMA_UPDATE)
