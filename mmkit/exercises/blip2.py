"""Exercises of notebook 03 (BLIP-2's Q-Former): the ITG mask, ITC similarity, parameter count.

    from mmkit.exercises import check, solution
    check("itg_mask", itg_mask)
    check("itc_similarity", itc_similarity)
    check("count_qformer_params", count_qformer_params)
"""
from __future__ import annotations

from typing import Callable

import torch

from mmkit.exercises.core import Exercise, _call, _guard, _say, register

_ITG = '''\
import torch

def itg_mask(num_queries, text_len):
    """(T, T) bool, T = num_queries + text_len; True = row may attend to column.
    Queries see queries only; text token i sees every query and the text tokens 0..i."""
    T = num_queries + text_len
    is_query = torch.arange(T) < num_queries
    causal = torch.ones(T, T, dtype=torch.bool).tril()      # j <= i
    text_row = ~is_query[:, None]
    return is_query[None, :] | (text_row & causal)         # query columns for all; causal text for text rows
'''

_ITC = '''\
import torch

def itc_similarity(z, t, temp):
    """z: (N, Q, E) unit query vectors of N images; t: (M, E) unit [CLS] vectors of M texts.
    -> (N, M): for each pair, the best-matching query's cosine, divided by the temperature."""
    sim = torch.einsum("nqe,me->nmq", z, t)     # (N, M, Q): every query against every text
    return sim.max(dim=-1).values / temp         # the query that fits the text best speaks for the image
'''

_COUNT = '''\
def count_qformer_params(hidden, layers, intermediate, vision_dim, cross_every, num_queries):
    """Parameters of a Q-Former with text feed-forwards but no word embeddings, plus its queries."""
    D, I = hidden, intermediate
    linear = lambda i, o: i * o + o                      # weight + bias
    norm = 2 * D                                         # LayerNorm: gain + bias
    attn = 4 * linear(D, D)                              # q, k, v, out
    cross = 2 * linear(D, D) + 2 * linear(vision_dim, D)  # q, out from D; k, v from the image width
    ffn = linear(D, I) + linear(I, D)
    total = num_queries * D + norm                       # query tokens + the input LayerNorm
    for i in range(layers):
        total += attn + norm
        if i % cross_every == 0:                         # layers 0, f, 2f, ... read the image
            total += cross + norm
        total += 2 * (ffn + norm)                        # one FFN for queries, one for text
    return total
'''


@_guard
def check_itg_mask(fn: Callable) -> bool:
    """Checks ``itg_mask(num_queries, text_len) -> (T, T) bool`` against the library's ITG mask."""
    from mmkit.bridges.blip2 import multimodal_causal_mask

    for Q, L in [(2, 3), (4, 1), (3, 5), (1, 0)]:
        got = _call(fn, Q, L, what=f"({Q}, {L})")
        got = torch.as_tensor(got)
        want = multimodal_causal_mask(Q, torch.ones(1, L))[0]
        if tuple(got.shape) != tuple(want.shape):
            return _say(False, f"itg_mask({Q}, {L}) has shape {tuple(got.shape)}; expected (T, T) = {tuple(want.shape)}")
        got = got.bool()
        if torch.equal(got, want):
            continue
        if got[:Q, Q:].any():
            return _say(False, f"itg_mask({Q}, {L}): a query attends to text. In ITG the queries must not "
                               "see the caption, or they could copy it instead of reading the image.")
        if not got[Q:, :Q].all():
            return _say(False, f"itg_mask({Q}, {L}): a text token cannot see every query: the image reaches "
                               "the text only through the queries, so each text token must see all of them.")
        if (got[Q:, Q:] & ~want[Q:, Q:]).any():
            return _say(False, f"itg_mask({Q}, {L}): a text token attends to a later text token: text must be "
                               "causal (token i sees text 0..i), or predicting the next word is trivial.")
        if (~got[Q:, Q:] & want[Q:, Q:]).any():
            return _say(False, f"itg_mask({Q}, {L}): a text token cannot see itself or an earlier text token.")
        return _say(False, f"itg_mask({Q}, {L}): the queries should see all queries (rows 0..{Q - 1}, "
                           f"columns 0..{Q - 1} all True).")
    return _say(True, "the multimodal-causal mask, as mmkit.bridges.blip2.multimodal_causal_mask builds it.")


@_guard
def check_itc_similarity(fn: Callable) -> bool:
    """Checks ``itc_similarity(z (N, Q, E), t (M, E), temp) -> (N, M)``."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(3, 5, 8, generator=g), dim=-1)
    t = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    got = torch.as_tensor(_call(fn, z, t, 0.07)).float()
    want = torch.einsum("nqe,me->nmq", z, t).max(-1).values / 0.07
    if tuple(got.shape) != (3, 4):
        return _say(False, f"the result has shape {tuple(got.shape)}; expected (N images, M texts) = (3, 4)")
    if torch.allclose(got, want, atol=1e-4):
        return _say(True, "max over queries of the cosine, divided by the temperature.")
    mean = torch.einsum("nqe,me->nmq", z, t).mean(-1) / 0.07
    if torch.allclose(got, mean, atol=1e-4):
        return _say(False, "you averaged over the queries; BLIP-2 takes the *best* query (max): one query "
                           "that matches the text is enough.")
    if torch.allclose(got, want * 0.07, atol=1e-4):
        return _say(False, "right similarity, but divide by the temperature (0.07) to sharpen the softmax.")
    if torch.allclose(got, want * 0.07 * 0.07, atol=1e-4):
        return _say(False, "divide by the temperature, do not multiply by it.")
    return _say(False, "not the expected values: for each image n and text m, take the cosine of every query "
                       "z[n, q] with t[m], keep the maximum over q, divide by temp.")


@_guard
def check_count_qformer_params(fn: Callable) -> bool:
    """Checks ``count_qformer_params(hidden, layers, intermediate, vision_dim, cross_every, num_queries)``."""
    from mmkit.bridges.blip2 import QFormer, QFormerConfig

    cases = [(32, 3, 48, 24, 2, 6), (128, 4, 512, 128, 2, 32), (64, 2, 96, 80, 1, 8)]
    for D, n, I, Dv, f, Q in cases:
        got = _call(fn, D, n, I, Dv, f, Q, what=f"{(D, n, I, Dv, f, Q)}")
        qf = QFormer(QFormerConfig(hidden_size=D, num_hidden_layers=n, num_attention_heads=4 if D % 4 == 0 else 1,
                                   intermediate_size=I, encoder_hidden_size=Dv, cross_attention_frequency=f))
        want = sum(p.numel() for p in qf.parameters()) + Q * D
        if int(got) == want:
            continue
        diff = int(got) - want
        n_cross = len(range(0, n, f))
        hints = {
            -(Q * D): "the learned query tokens (num_queries x hidden) are parameters too",
            -2 * D: "the LayerNorm on the input (queries + text) has a gain and a bias",
            -n * (D * I + I + I * D + D + 2 * D): "each layer has two feed-forwards: one for query positions, "
                                                  "one for text positions",
            (n - n_cross) * (2 * (D * D + D) + 2 * (Dv * D + D) + 2 * D): "only every cross_every-th layer "
                                                                          "(0, f, 2f, ...) cross-attends",
            n_cross * 2 * (D - Dv) * D: "the cross-attention keys and values project from the *image* width "
                                        "(vision_dim), not the Q-Former width",
        }
        hint = hints.get(diff, "count weights and biases of every Linear and the gain + bias of every LayerNorm")
        return _say(False, f"for hidden={D}, layers={n}, intermediate={I}, vision_dim={Dv}, cross_every={f}, "
                           f"num_queries={Q} you count {int(got):,}, the model has {want:,} (off by {diff:+,}): {hint}.")
    return _say(True, "matches the parameters of mmkit's QFormer plus its query tokens, for three configs.")


register(Exercise("itg_mask", "03_blip2_qformer",
                  "itg_mask(num_queries, text_len) -> (T, T) bool multimodal-causal mask", check_itg_mask), _ITG)
register(Exercise("itc_similarity", "03_blip2_qformer",
                  "itc_similarity(z, t, temp) -> (N, M) max-over-queries similarity", check_itc_similarity), _ITC)
register(Exercise("count_qformer_params", "03_blip2_qformer",
                  "count_qformer_params(hidden, layers, intermediate, vision_dim, cross_every, num_queries) -> int",
                  check_count_qformer_params), _COUNT)
