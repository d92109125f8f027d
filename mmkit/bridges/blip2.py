"""BLIP-2's Q-Former: a small BERT that reads the image with learned queries.

Papers: BLIP-2 (Li et al., 2023, "Bootstrapping Language-Image Pre-training with Frozen
Image Encoders and Large Language Models", Fig. 2 and Fig. 3), InstructBLIP (Dai et al.,
2023, Fig. 3) and MiniGPT-4 (Zhu et al., 2023, Fig. 1).

    image -> frozen ViT -> ln_vision -> Z (N, h*w, D_v)                 [layer -2, CLS dropped]
    query_tokens (Q, D) ----------------\\
    text ids (optional) -> word + pos ---+-> LayerNorm -> L x QFormerLayer -> (N, Q [+ L], D)
                                                   (queries cross-attend to Z)
    h[:, :Q] -> language_projection -> (N, Q, D_lm) -> written into the frozen LM's input

The Q-Former is one BERT-style (post-LN) transformer over the concatenation
[queries; text]. Each layer:

    h = LN(h + SelfAttn(h, mask))                 queries and text, as the mask allows
    q = LN(q + CrossAttn(q, Z))                   queries only, every `cross_attention_frequency`-th layer
    q = LN(q + FFN_query(q));  t = LN(t + FFN_text(t))   separate feed-forwards per position kind

The image reaches the text only through the queries, so Q (32 in BLIP-2, 32 here too)
vectors are all the LM ever sees of the picture: 32 tokens where LLaVA's projector would
give one per patch (576 at 336 px, 64 in the tiny world).

**Stage 1 (Fig. 2): three objectives, one network, three attention masks.** The masks
are the lesson; each is built by one function below and drawn by the notebook:

    ITC  uni-modal mask            queries see queries, text sees text. Image-text
                                   similarity = max over queries of cos(z_q, t_CLS) / tau,
                                   tau learned (init 0.07); InfoNCE both ways.
    ITM  bidirectional mask        everything sees everything; a 2-way head on each query
                                   output, averaged over queries; hard negatives sampled
                                   from the ITC similarities.
    ITG  multimodal-causal mask    queries see queries; text sees all queries and earlier
                                   text; next-token loss on the text (the image reaches the
                                   text only through the queries, so they must carry it).

**Stage 2 (Fig. 3):** the Q-Former's query outputs, through ``language_projection``, are
the LM's image tokens: exactly the prefix path LLaVA uses (``mmkit.vlm.VLM.embed``), with
a frozen LM. MiniGPT-4 is the same bridge (its ``language_projection`` is the "one linear
layer into Vicuna"), trained with the Q-Former frozen. InstructBLIP feeds the instruction
into the Q-Former too (bidirectional mask), so what the queries pull out of the image
depends on the question (``InstructBlipVLM``).

**The text side of the Q-Former in the tiny world.** BLIP-2 initialises the Q-Former from
BERT-base and uses BERT's WordPiece vocabulary. There is no BERT in the tiny world, so the
Q-Former's word embeddings are indexed by the *tiny LM's tokenizer* (2048 ids) plus three
rows of its own: ``[CLS]`` (ITC), ``[ENC]`` (ITM) and ``[DEC]`` (ITG), the task tokens
BLIP puts first. One vocabulary means no second tokenizer to ship, and the caption needs
no re-encoding: stage 1 reads it straight from the processor's batch (the assistant turn
of a caption record, ``mmkit.data.processor.answer_ids``). The ITG head is a BERT LM head whose output matrix
is tied to these word embeddings. Real checkpoints bring their own BERT vocabulary
(``vocab_size`` from their config) through ``mmkit.convert.load_hf``.

Shapes: N images, B texts, Q queries, L text tokens, T = Q + L, D Q-Former width,
P = h*w patches, D_v vision width, E the ITC embedding width.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkit.bridges import Bridge, register_bridge
from mmkit.data.processor import answer_ids, image_turns, pad_rows
from mmkit.nn import MLP, Attention
from mmkit.vlm import VLM, VLMOutput, load_parts, vlm_options

__all__ = [
    "QFormerConfig", "QFormer", "QFormerLayer", "QFormerBridge",
    "uni_modal_mask", "bidirectional_mask", "multimodal_causal_mask", "MASKS",
    "Blip2VLM", "InstructBlipVLM",
]

OBJECTIVES = ("itc", "itm", "itg")


# ======================================================================================
# The three stage-1 attention masks (BLIP-2 Fig. 2, right). True = "may attend".
# ======================================================================================
def _key_valid(num_queries: int, text_mask: Tensor) -> Tensor:
    """(B, L) text padding mask -> (B, 1, T) keys that exist (queries always do)."""
    B = text_mask.shape[0]
    queries = torch.ones(B, num_queries, dtype=torch.bool, device=text_mask.device)
    return torch.cat([queries, text_mask.bool()], dim=1)[:, None, :]  # (B, 1, T)


def uni_modal_mask(num_queries: int, text_mask: Tensor) -> Tensor:
    """ITC: queries attend to queries, text to text; the two never see each other.

    text_mask: (B, L), 1 for real tokens, 0 for padding. Returns (B, T, T) bool.
    One pass with this mask gives exactly the image-only and the text-only encodings.
    """
    Q, L = num_queries, text_mask.shape[1]
    is_query = torch.arange(Q + L, device=text_mask.device) < Q  # (T,)
    same_modality = is_query[:, None] == is_query[None, :]  # (T, T)
    return same_modality[None] & _key_valid(Q, text_mask)  # (B, T, T)


def bidirectional_mask(num_queries: int, text_mask: Tensor) -> Tensor:
    """ITM (and InstructBLIP's instruction): every position attends to every real position."""
    Q, L = num_queries, text_mask.shape[1]
    full = torch.ones(Q + L, Q + L, dtype=torch.bool, device=text_mask.device)
    return full[None] & _key_valid(Q, text_mask)  # (B, T, T)


def multimodal_causal_mask(num_queries: int, text_mask: Tensor) -> Tensor:
    """ITG: queries attend to queries only; text token i attends to all queries and text <= i."""
    Q, L = num_queries, text_mask.shape[1]
    T = Q + L
    pos = torch.arange(T, device=text_mask.device)
    is_query = pos < Q
    # a query row: query columns only. a text row: every query column + causal over text.
    allowed = is_query[None, :] | (~is_query[:, None] & (pos[None, :] <= pos[:, None]))  # (T, T)
    return allowed[None] & _key_valid(Q, text_mask)  # (B, T, T)


MASKS = {"itc": uni_modal_mask, "itm": bidirectional_mask, "itg": multimodal_causal_mask}


# ======================================================================================
# The Q-Former
# ======================================================================================
@dataclass
class QFormerConfig:
    """Sizes of a Q-Former. Field names follow transformers' ``Blip2QFormerConfig``.

    The defaults are the tiny world's (BLIP-2: 768 wide, 12 layers, 12 heads, 3072 FFN,
    cross-attention every 2nd layer, ``encoder_hidden_size`` 1408 for EVA ViT-g).
    ``vocab_size=None`` builds a query-only Q-Former (no text embeddings), like the one
    inside ``Blip2ForConditionalGeneration``; ``text_ffn`` adds the text feed-forward
    (transformers: ``use_qformer_text_input``; always there in InstructBLIP).
    """

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 512
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 128
    vocab_size: int | None = None
    max_position_embeddings: int = 64
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    hidden_act: str = "gelu"
    text_ffn: bool = True
    initializer_range: float = 0.02



class QFormerLayer(nn.Module):
    """One BERT layer with a cross-attention for the queries and two feed-forwards."""

    def __init__(self, cfg: QFormerConfig, has_cross_attention: bool):
        super().__init__()
        D, eps = cfg.hidden_size, cfg.layer_norm_eps
        drop = cfg.attention_probs_dropout_prob
        self.self_attn = Attention(D, cfg.num_attention_heads, dropout=drop)
        self.self_attn_norm = nn.LayerNorm(D, eps=eps)
        self.cross_attn = (Attention(D, cfg.num_attention_heads, kv_dim=cfg.encoder_hidden_size, dropout=drop)
                           if has_cross_attention else None)
        self.cross_attn_norm = nn.LayerNorm(D, eps=eps) if has_cross_attention else None
        self.ffn_query = MLP(D, cfg.intermediate_size, act=cfg.hidden_act)
        self.ffn_query_norm = nn.LayerNorm(D, eps=eps)
        self.ffn_text = MLP(D, cfg.intermediate_size, act=cfg.hidden_act) if cfg.text_ffn else None
        self.ffn_text_norm = nn.LayerNorm(D, eps=eps) if cfg.text_ffn else None
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: Tensor, mask: Tensor | None, image: Tensor | None, num_queries: int) -> Tensor:
        # post-LN, as BERT: sublayer -> dropout -> LayerNorm(residual + sublayer)
        h = self.self_attn_norm(h + self.dropout(self.self_attn(h, mask=mask)))  # (B, T, D)
        q, t = h[:, :num_queries], h[:, num_queries:]  # (B, Q, D), (B, L, D)
        if self.cross_attn is not None and num_queries:
            if image is None:
                raise ValueError("QFormer: this layer cross-attends to the image; pass image features")
            q = self.cross_attn_norm(q + self.dropout(self.cross_attn(q, image)))  # (B, Q, D)
        q = self.ffn_query_norm(q + self.dropout(self.ffn_query(q)))
        if t.shape[1]:
            if self.ffn_text is None:
                raise ValueError("QFormer: text positions need the text feed-forward; build it with "
                                 "QFormerConfig(text_ffn=True)")
            t = self.ffn_text_norm(t + self.dropout(self.ffn_text(t)))
        return torch.cat([q, t], dim=1)  # (B, T, D)


class QFormer(nn.Module):
    """The Querying Transformer: [queries; text] -> L layers -> (B, T, D).

    ``forward(query_embeds (B, Q, D) | None, input_ids (B, L) | None, mask, image)``:
    ``mask`` is a (B, T, T) boolean matrix (one of the mask functions above, key padding
    included) or None (everything attends to everything); ``image`` (B, P, D_v) is what
    the queries cross-attend to. Text gets word + absolute position embeddings; the
    LayerNorm + dropout then apply to queries and text alike (as in transformers).
    """

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.config = cfg
        D = cfg.hidden_size
        if cfg.vocab_size:
            self.word_embeddings = nn.Embedding(cfg.vocab_size, D)
            self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, D)
        else:
            self.word_embeddings = self.position_embeddings = None
        self.layernorm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, has_cross_attention=i % cfg.cross_attention_frequency == 0)
            for i in range(cfg.num_hidden_layers))
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        """BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.initializer_range)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def embed_text(self, input_ids: Tensor) -> Tensor:
        """(B, L) ids -> word + absolute position embeddings (B, L, D)."""
        if self.word_embeddings is None:
            raise ValueError("QFormer: this Q-Former has no text embeddings (vocab_size=None)")
        L = input_ids.shape[1]
        if L > self.config.max_position_embeddings:
            raise ValueError(f"QFormer: {L} text tokens exceed max_position_embeddings="
                             f"{self.config.max_position_embeddings}; shorten the text or raise it")
        pos = torch.arange(L, device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]

    def forward(self, query_embeds: Tensor | None = None, input_ids: Tensor | None = None,
                mask: Tensor | None = None, image: Tensor | None = None) -> Tensor:
        parts = []
        if query_embeds is not None:
            parts.append(query_embeds)  # (B, Q, D)
        if input_ids is not None:
            parts.append(self.embed_text(input_ids))  # (B, L, D)
        if not parts:
            raise ValueError("QFormer: give query_embeds, input_ids, or both")
        Q = 0 if query_embeds is None else query_embeds.shape[1]
        h = self.dropout(self.layernorm(torch.cat(parts, dim=1)))  # (B, T, D)
        if mask is not None and mask.dim() == 3:
            mask = mask[:, None]  # (B, 1, T, T): the same mask for every head
        for layer in self.layers:
            h = layer(h, mask, image, Q)
        return h  # (B, T, D)



# ======================================================================================
# The bridge: queries + Q-Former + language_projection (and the stage-1 heads)
# ======================================================================================
@register_bridge("qformer")
class QFormerBridge(Bridge):
    """BLIP-2's bridge: (N, P, D_v) image features -> (N, Q, D_lm) LM tokens.

    Args:
        vision_dim / lm_dim: widths of the vision features and of the LM.
        num_query_tokens: Q (BLIP-2: 32).
        embed_dim: E, the width of the ITC space (BLIP-2: 256).
        vocab_size: the text vocabulary the Q-Former reads (the LM tokenizer's size in
            the tiny world); None for a query-only bridge (no stage-1 objectives, no
            instruction). Three task tokens [CLS] [ENC] [DEC] are added after it.
        **qformer: any ``QFormerConfig`` field (hidden_size, num_hidden_layers, ...).

    Holds, beside the Q-Former: ``query_tokens`` (1, Q, D), ``ln_vision`` (the LayerNorm
    BLIP-2 puts on the frozen ViT's features), ``language_projection`` Linear(D, D_lm),
    and the stage-1 heads ``vision_proj`` / ``text_proj`` (ITC), ``temp`` (learned
    temperature), ``itm_head`` Linear(D, 2), and the ITG head: ``itg_transform`` (BERT's
    Linear -> GELU -> LayerNorm) then the word-embedding matrix (tied) + ``itg_bias``.
    """

    def __init__(self, vision_dim: int, lm_dim: int, num_query_tokens: int = 32, embed_dim: int = 64,
                 vocab_size: int | None = None, **qformer: Any):
        super().__init__()
        known = {f.name for f in fields(QFormerConfig)}
        bad = sorted(set(qformer) - known)
        if bad:
            raise ValueError(f"qformer bridge: unknown options {bad}; Q-Former options: {sorted(known)}")
        self.text_vocab = vocab_size  # ids below this are the tokenizer's; then [CLS] [ENC] [DEC]
        cfg = QFormerConfig(encoder_hidden_size=vision_dim, **qformer,
                            vocab_size=None if vocab_size is None else vocab_size + 3)
        D = cfg.hidden_size
        self.num_query_tokens = num_query_tokens
        self.ln_vision = nn.LayerNorm(vision_dim)
        self.query_tokens = nn.Parameter(torch.randn(1, num_query_tokens, D) * cfg.initializer_range)
        self.qformer = QFormer(cfg)
        self.language_projection = nn.Linear(D, lm_dim)
        if vocab_size is not None:
            self.vision_proj = nn.Linear(D, embed_dim)
            self.text_proj = nn.Linear(D, embed_dim)
            self.temp = nn.Parameter(torch.tensor(0.07))
            self.itm_head = nn.Linear(D, 2)
            self.itg_transform = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.LayerNorm(D, eps=cfg.layer_norm_eps))
            self.itg_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
            for m in (self.vision_proj, self.text_proj, self.itm_head, self.itg_transform):
                m.apply(self.qformer._init_weights)

    # ------------------------------------------------------------------ prefix path
    @property
    def cls_token_id(self) -> int:
        return self.text_vocab

    @property
    def enc_token_id(self) -> int:
        return self.text_vocab + 1

    @property
    def dec_token_id(self) -> int:
        return self.text_vocab + 2

    def num_tokens(self, grid: tuple[int, int]) -> int:
        return self.num_query_tokens  # whatever the grid: the Q-Former's fixed budget

    def queries(self, image: Tensor, text_ids: Tensor | None = None, text_mask: Tensor | None = None,
                mask_fn=bidirectional_mask) -> Tensor:
        """Run the Q-Former on one batch: (N, P, D_v) image [+ (N, L) text] -> (N, T, D)."""
        z = self.ln_vision(image)  # (N, P, D_v)
        q = self.query_tokens.expand(z.shape[0], -1, -1)  # (N, Q, D)
        mask = None
        if text_ids is not None:
            if text_mask is None:
                text_mask = torch.ones_like(text_ids)
            mask = mask_fn(self.num_query_tokens, text_mask)  # (N, T, T)
        return self.qformer(q, text_ids, mask, z)

    def forward(self, features: Tensor, grid: tuple[int, int] | None = None,
                text_ids: Tensor | None = None, text_mask: Tensor | None = None) -> Tensor:
        """(N, P, D_v) -> (N, Q, D_lm). InstructBLIP passes the instruction as ``text_ids``."""
        h = self.queries(features, text_ids, text_mask)  # (N, T, D)
        return self.language_projection(h[:, : self.num_query_tokens])  # (N, Q, D_lm)

    def attention_maps(self, seen: dict) -> Tensor | None:
        """(N, Q, P): each query's cross-attention over the patches, mean over heads and
        cross-attention layers, from the most recent forward that ``inspect`` recorded."""
        maps = []
        for key, value in seen.items():
            if key.endswith("cross_attn.weights") and "qformer.layers." in key:
                w = value[-1] if isinstance(value, list) else value  # (N, H, Q, P)
                maps.append(w.float().mean(dim=1))
        if not maps:
            return None
        return torch.stack(maps).mean(dim=0)  # (N, Q, P)

    # ------------------------------------------------------------------ stage 1
    def _need_text(self) -> None:
        if self.text_vocab is None:
            raise ValueError("qformer bridge: stage-1 objectives need the Q-Former's text side; "
                             "build it with vocab_size (the Blip2VLM builders do)")

    def _with_first(self, token_id: int, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Prepend a task token: (B, L) -> (B, 1 + L)."""
        first = torch.full_like(ids[:, :1], token_id)
        return torch.cat([first, ids], dim=1), torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)

    def itc_features(self, image: Tensor, text_ids: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        """One pass under the uni-modal mask -> image (N, Q, E) and text (N, E) unit vectors."""
        ids, mask = self._with_first(self.cls_token_id, text_ids, text_mask)
        h = self.queries(image, ids, mask, uni_modal_mask)  # (N, Q + 1 + L, D)
        Q = self.num_query_tokens
        z = F.normalize(self.vision_proj(h[:, :Q]), dim=-1)  # (N, Q, E)
        t = F.normalize(self.text_proj(h[:, Q]), dim=-1)  # (N, E): the [CLS] output
        return z, t

    def image_itc(self, image: Tensor) -> Tensor:
        """Queries alone (no text): (N, P, D_v) -> (N, Q, E) unit vectors."""
        return F.normalize(self.vision_proj(self.queries(image)), dim=-1)

    def text_itc(self, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Text alone (no queries, no image): (M, L) -> (M, E) unit vectors from [CLS]."""
        ids, mask = self._with_first(self.cls_token_id, text_ids, text_mask)
        h = self.qformer(None, ids, bidirectional_mask(0, mask))  # (M, 1 + L, D)
        return F.normalize(self.text_proj(h[:, 0]), dim=-1)

    def similarity(self, z: Tensor, t: Tensor) -> Tensor:
        """s(I, T) = max_q cos(z_q, t) / tau: (N, Q, E) x (M, E) -> (N, M)."""
        sim = torch.einsum("nqe,me->nmq", z, t)  # (N, M, Q)
        return sim.max(dim=-1).values / self.temp.clamp(0.001, 0.5)  # (N, M)

    def itm_logits(self, image: Tensor, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Bidirectional pass -> (N, 2) match logits (mean over the queries' head outputs)."""
        ids, mask = self._with_first(self.enc_token_id, text_ids, text_mask)
        h = self.queries(image, ids, mask, bidirectional_mask)
        return self.itm_head(h[:, : self.num_query_tokens]).mean(dim=1)  # (N, 2)

    def itg_logits(self, image: Tensor, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Multimodal-causal pass with [DEC] first -> (N, 1 + L, V) next-token logits."""
        ids, mask = self._with_first(self.dec_token_id, text_ids, text_mask)
        h = self.queries(image, ids, mask, multimodal_causal_mask)[:, self.num_query_tokens:]  # (N, 1+L, D)
        return F.linear(self.itg_transform(h), self.qformer.word_embeddings.weight, self.itg_bias)

    def stage1_losses(self, image: Tensor, text_ids: Tensor, text_mask: Tensor,
                      objectives: Iterable[str] = OBJECTIVES) -> dict[str, Tensor]:
        """BLIP-2's representation-learning losses for N matching (image, text) pairs.

        image: (N, P, D_v) ViT features; text_ids / text_mask: (N, L) caption ids
        (tokenizer ids, no task token; 0-padded). Returns {"itc", "itm", "itg"} (those asked).
        """
        self._need_text()
        objectives = list(objectives)
        N = image.shape[0]
        out: dict[str, Tensor] = {}
        # captions that are equal token for token are not negatives of each other
        same = (text_ids[:, None, :] == text_ids[None, :, :]).all(-1)  # (N, N)
        sim_i2t = None
        if "itc" in objectives or "itm" in objectives:
            z, t = self.itc_features(image, text_ids, text_mask)
            sim_i2t = self.similarity(z, t)  # (N, N): row = image, column = text
        if "itc" in objectives:
            targets = same.float() / same.float().sum(1, keepdim=True)  # the diagonal (+ duplicates)
            out["itc"] = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
                          + F.cross_entropy(sim_i2t.t(), targets, label_smoothing=0.1)) / 2
        if "itm" in objectives:
            if N < 2:
                raise ValueError("ITM needs at least 2 pairs per batch to mine a negative")
            with torch.no_grad():  # hard negatives: sample the confusable ones more often
                w_t2i = sim_i2t.t().softmax(dim=1).masked_fill(same, 0.0) + 1e-6 * (~same)
                w_i2t = sim_i2t.softmax(dim=1).masked_fill(same, 0.0) + 1e-6 * (~same)
                neg_image = torch.multinomial(w_t2i, 1).squeeze(1)  # for each text, a wrong image
                neg_text = torch.multinomial(w_i2t, 1).squeeze(1)  # for each image, a wrong text
            images = torch.cat([image, image[neg_image], image])  # (3N, P, D_v)
            ids = torch.cat([text_ids, text_ids, text_ids[neg_text]])  # (3N, L)
            masks = torch.cat([text_mask, text_mask, text_mask[neg_text]])
            labels = torch.cat([torch.ones(N), torch.zeros(2 * N)]).long().to(image.device)
            out["itm"] = F.cross_entropy(self.itm_logits(images, ids, masks), labels)
        if "itg" in objectives:
            logits = self.itg_logits(image, text_ids, text_mask)  # (N, 1 + L, V)
            targets = text_ids.masked_fill(~text_mask.bool(), -100)  # position i predicts text token i
            out["itg"] = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                         ignore_index=-100, label_smoothing=0.1)
        return out



# ======================================================================================
# The models: the prefix VLM, plus stage-1 objectives (BLIP-2, MiniGPT-4) and the
# instruction-aware Q-Former (InstructBLIP)
# ======================================================================================
class Blip2VLM(VLM):
    """The prefix VLM with a Q-Former bridge, plus BLIP-2's stage-1 objectives.

    ``forward(..., objective="lm")`` is VLM's forward (stage 2: generative training into
    the frozen LM through the same prefix path as LLaVA). ``objective="itc+itm+itg"`` (any
    subset, joined by "+") runs stage 1 instead: the ViT and the Q-Former only, no LM,
    on the caption in each sample; returns {"loss": sum, "losses": {part: value}}.

    Module groups: ``vision``, ``bridge`` (everything of the Q-Former side), ``lm``, and
    the finer ``qformer`` (queries, Q-Former, stage-1 heads) and ``projection``
    (``language_projection``: MiniGPT-4's one trained layer). Per-group learning rates
    (``Stage.lr_groups``) apply to the top-level names ``vision`` / ``bridge`` / ``lm``.
    """

    bridge: QFormerBridge

    def module_groups(self) -> dict[str, nn.Module]:
        b = self.bridge
        qformer_side = nn.ModuleList([m for n, m in b.named_children() if n != "language_projection"])
        qformer_side.register_parameter("query_tokens", b.query_tokens)
        if getattr(b, "temp", None) is not None:
            qformer_side.register_parameter("temp", b.temp)
            qformer_side.register_parameter("itg_bias", b.itg_bias)
        return {**super().module_groups(), "qformer": qformer_side, "projection": b.language_projection}

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, P, D_v) ViT features (no gradient while the ViT is frozen)."""
        frozen = not any(p.requires_grad for p in self.vision.parameters())
        with torch.no_grad() if frozen else nullcontext():
            return self.vision.features(pixel_values, layer=self.feature_layer, drop_cls=True)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                pixel_values: Tensor | None = None, objective: str = "lm", **lm_kwargs: Any) -> VLMOutput:
        if objective == "lm":
            return super().forward(input_ids, attention_mask, labels, pixel_values, **lm_kwargs)
        parts = objective.split("+")
        bad = [p for p in parts if p not in OBJECTIVES]
        if bad:
            raise ValueError(f"unknown objective part(s) {bad}: BLIP-2 stage 1 is 'itc+itm+itg' (any subset), "
                             "stage 2 is 'lm'")
        if labels is None or pixel_values is None:
            raise ValueError("stage-1 objectives need caption records (labels) with one image each")
        feats = self.image_features(pixel_values)  # (B, P, D_v)
        if feats.shape[0] != input_ids.shape[0]:
            raise ValueError(f"stage 1 pairs one image with one caption; got {feats.shape[0]} images "
                             f"for {input_ids.shape[0]} samples")
        end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        max_len = self.bridge.qformer.config.max_position_embeddings - 1  # room for the task token
        ids, mask = answer_ids(input_ids, labels, end, max_len)  # the caption: the assistant's turn
        losses = self.bridge.stage1_losses(feats, ids, mask, parts)
        loss = sum(losses.values())
        return VLMOutput(loss=loss, logits=None, losses={k: v.detach() for k, v in losses.items()})


class InstructBlipVLM(Blip2VLM):
    """InstructBLIP: the user's instruction also enters the Q-Former (InstructBLIP Fig. 3).

    For each image, the text of the user turn that holds it (image tokens and the role
    header removed; ``[CLS]`` first) is appended to the queries with the bidirectional
    mask, so the queries read the question in self-attention before and while they look
    at the image. The LM still gets the question as text, as in BLIP-2. Everything else
    (merge, generate, training) is the prefix path of ``VLM``.
    """

    _instruction: tuple[Tensor, Tensor] | None = None

    def instructions(self, input_ids: Tensor) -> tuple[Tensor, Tensor] | None:
        """(B, T) prompt ids -> (N_img, L) instruction ids + mask, one row per image."""
        max_len = self.bridge.qformer.config.max_position_embeddings - 1
        turns = image_turns(input_ids, self.tokenizer, self.image_token_id, self.bridge.num_query_tokens,
                            self.image_wrap_ids or ())
        if not turns:
            return None
        return pad_rows([[self.bridge.cls_token_id, *t][:max_len] for t in turns], device=input_ids.device)

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None = None) -> Tensor:
        # hand the instructions to encode_images for the duration of VLM.embed's merge
        self._instruction = self.instructions(input_ids)
        try:
            return super().embed(input_ids, pixel_values)
        finally:
            self._instruction = None

    def encode_images(self, pixel_values: Tensor, instruction: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """(N, 3, H, W) [+ (N, L) instruction ids, mask] -> (N, Q, D_lm)."""
        instruction = instruction if instruction is not None else self._instruction
        feats = self.image_features(pixel_values)
        ids, mask = instruction if instruction is not None else (None, None)
        if ids is not None and ids.shape[0] != feats.shape[0]:
            raise ValueError(f"InstructBLIP: {ids.shape[0]} instructions for {feats.shape[0]} images")
        return self.bridge(feats, self.image_grid(pixel_values), text_ids=ids, text_mask=mask)

    def ask_ids(self, question: str) -> tuple[Tensor, Tensor]:
        """A question string -> (1, L) instruction ids + mask, as ``instructions`` builds them."""
        ids = self.tokenizer(question, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([[self.bridge.cls_token_id, *ids]])
        return ids, torch.ones_like(ids)


# ------------------------------------------------------------------------ builders
def _assemble(cls: type, recipe, pretrained: bool) -> VLM:
    """ViT + LM from the recipe, a Q-Former bridge that reads the LM tokenizer's ids."""
    if recipe.bridge != "qformer":
        raise ValueError(f"recipe {recipe.name!r}: family {recipe.family!r} needs bridge='qformer', "
                         f"got {recipe.bridge!r}")
    vision, lm, tokenizer = load_parts(recipe, pretrained=pretrained)
    bridge = QFormerBridge(vision.hidden_size, lm.config.get_text_config().hidden_size,
                           vocab_size=len(tokenizer), **recipe.bridge_kwargs)
    return cls(vision, bridge, lm, tokenizer, **vlm_options(recipe))


def build_blip2(recipe, pretrained: bool = True) -> Blip2VLM:
    """BLIP-2 and MiniGPT-4 (same model; the recipes differ in what they train)."""
    return _assemble(Blip2VLM, recipe, pretrained)


def build_instructblip(recipe, pretrained: bool = True) -> InstructBlipVLM:
    return _assemble(InstructBlipVLM, recipe, pretrained)
