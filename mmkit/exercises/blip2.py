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


# ---------------------------------------------------------------- build-up: one Q-Former layer
_QFORMER_LAYER = '''\
import torch
from torch import nn

from mmkit.nn import MLP, Attention

class QFormerLayer(nn.Module):
    """One Q-Former layer (BERT, post-LN). h = [queries; text] (B, Q + L, D):
    self-attention over everything (the mask decides who sees whom), then cross-attention
    from the QUERIES ONLY to the image features, then a feed-forward for the queries and
    another for the text."""

    def __init__(self, cfg, has_cross_attention):
        super().__init__()
        D, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.self_attn = Attention(D, cfg.num_attention_heads)
        self.self_attn_norm = nn.LayerNorm(D, eps=eps)
        self.cross_attn = Attention(D, cfg.num_attention_heads, kv_dim=cfg.encoder_hidden_size) if has_cross_attention else None
        self.cross_attn_norm = nn.LayerNorm(D, eps=eps) if has_cross_attention else None
        self.ffn_query = MLP(D, cfg.intermediate_size, act=cfg.hidden_act)
        self.ffn_query_norm = nn.LayerNorm(D, eps=eps)
        self.ffn_text = MLP(D, cfg.intermediate_size, act=cfg.hidden_act)
        self.ffn_text_norm = nn.LayerNorm(D, eps=eps)

    def forward(self, h, mask, image, num_queries):
        # post-LN, as BERT: x = LayerNorm(x + sublayer(x))
        h = self.self_attn_norm(h + self.self_attn(h, mask=mask))               # (B, Q + L, D)
        q, t = h[:, :num_queries], h[:, num_queries:]                           # (B, Q, D), (B, L, D)
        if self.cross_attn is not None:
            q = self.cross_attn_norm(q + self.cross_attn(q, image))             # only the queries read the image
        q = self.ffn_query_norm(q + self.ffn_query(q))
        t = self.ffn_text_norm(t + self.ffn_text(t))
        return torch.cat([q, t], dim=1)                                         # (B, Q + L, D)
'''


@_guard
def check_QFormerLayer(cls: Callable) -> bool:
    """cls(cfg, has_cross_attention=True) -> module; loaded with
    ``mmkit.bridges.blip2.QFormerLayer``'s weights, compared on 4 queries + 3 text tokens
    under the ITG mask, reading 9 image features."""
    from mmkit.bridges.blip2 import QFormerConfig, QFormerLayer, multimodal_causal_mask
    from mmkit.exercises.core import _same_module

    torch.manual_seed(0)
    cfg = QFormerConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, encoder_hidden_size=24,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ref = QFormerLayer(cfg, True)
    Q = 4
    h, image = torch.randn(2, Q + 3, 32), torch.randn(2, 9, 24)
    mask = multimodal_causal_mask(Q, torch.tensor([[1, 1, 1], [1, 1, 0]]))[:, None]  # (B, 1, T, T)

    def pre_ln(r, h, mask, image, Q):
        h = h + r.self_attn(r.self_attn_norm(h), mask=mask)
        q, t = h[:, :Q], h[:, Q:]
        q = q + r.cross_attn(r.cross_attn_norm(q), image)
        q = q + r.ffn_query(r.ffn_query_norm(q))
        t = t + r.ffn_text(r.ffn_text_norm(t))
        return torch.cat([q, t], 1)

    def no_cross(r, h, mask, image, Q):
        h = r.self_attn_norm(h + r.self_attn(h, mask=mask))
        q, t = h[:, :Q], h[:, Q:]
        return torch.cat([r.ffn_query_norm(q + r.ffn_query(q)), r.ffn_text_norm(t + r.ffn_text(t))], 1)

    def one_ffn(r, h, mask, image, Q):
        h = r.self_attn_norm(h + r.self_attn(h, mask=mask))
        q, t = h[:, :Q], h[:, Q:]
        q = r.cross_attn_norm(q + r.cross_attn(q, image))
        h = torch.cat([q, t], 1)
        return r.ffn_query_norm(h + r.ffn_query(h))

    def no_mask(r, h, mask, image, Q):
        return r(h, None, image, Q)

    mistakes = {
        "you normalise before each sublayer (pre-LN, x + f(LN(x))); the Q-Former is BERT, post-LN: "
        "x = LayerNorm(x + f(x)).": pre_ln,
        "the queries never read the image: after self-attention, q = cross_attn_norm(q + cross_attn(q, image)).":
            no_cross,
        "the text positions went through ffn_query; the Q-Former has two feed-forwards: ffn_query for "
        "the queries, ffn_text for the text.": one_ffn,
        "the mask is ignored: pass mask= to the self-attention (it decides ITC / ITM / ITG).": no_mask,
    }
    if not _same_module(cls, ref, (cfg, True), (h, mask, image, Q), mistakes=mistakes,
                        what="QFormerLayer on 4 queries + 3 text tokens (ITG mask), 9 image features"):
        return False
    return _say(True, "same output as mmkit.bridges.blip2.QFormerLayer (post-LN, queries-only "
                      "cross-attention, two feed-forwards, the mask respected).")


register(Exercise("QFormerLayer", "03_blip2_qformer",
                  "class QFormerLayer(nn.Module): self-attention, queries-only cross-attention, two FFNs",
                  check_QFormerLayer), _QFORMER_LAYER)
