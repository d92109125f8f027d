"""CLIP pre-training of the tiny ViT on ShapesWorld (Radford et al. 2021, Fig. 1).

A ``TinyViT`` is trained against a small text transformer (``TextTower``): a batch of N
(image, caption) pairs gives an N x N similarity matrix; a symmetric cross-entropy
(``clip_loss``) pushes the diagonal (the true pairs) up and everything else down, with a
learned temperature (init 0.07). The image vector is the max over patch tokens (see
``image_embedding`` for why). Only the image tower is shipped; the text tower is a
training device. ``train_vision`` is the loop; ``mmkit zoo build`` runs it.

What the shipped encoder adds to plain CLIP:

* **shape-swap hard negatives** (NegCLIP-style, Yuksekgonul et al. 2023): every image
  must also rank its caption above a copy with one object's shape swapped
  (``swap_one_shape``), which colour and size alone cannot do.
* **patch-phrase alignment** (RegionCLIP-style, per patch): every patch token that shows
  an object must name its own object's phrase (``patch_targets``, ``centre_patch``,
  ``region_phrases``, ``region_loss``), so shape is bound to the object's tokens;
  ``object_token_probe`` measures it.

Two more levers are built in, off by default, measured worse at equal steps (see
docs/benchmarks.md): ``stem="conv"`` (a convolutional stem, Xiao et al. 2021,
``mmkit.vision.conv_stem``) and ``cap_weight > 0`` (a captioning decoder next to the
contrastive loss, CapPa: Tschannen et al. 2023, ``CaptionDecoder``; ``cap_parallel`` =
share of steps with CapPa's parallel prediction).

The report ``train_vision`` returns: zero-shot image->caption retrieval R@1 among 100
test candidates; linear probes for colour and shape on single-object test scenes
(layer -2, mean-pooled; ``probe_shape_max``: the same tokens max-pooled;
``probe_shape_token``: the one token under each object).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkit import nn as mnn
from mmkit.pretrain.common import optimizer_step, progress_bar, tokenize
from mmkit.pretrain.probes import linear_probe, retrieval_r1
from mmkit.train import warmup_cosine

__all__ = ["TextTower", "CaptionDecoder", "caption_loss", "image_embedding", "clip_loss", "swap_one_shape",
           "centre_patch", "patch_targets", "region_phrases", "region_loss", "object_token_probe", "train_vision"]


# ------------------------------------------------------------------------ the towers
class TextTower(nn.Module):
    """CLIP's text encoder, small: token + position embeddings, pre-norm blocks with a
    padding mask, the mean of the valid tokens, a projection into the joint space."""

    def __init__(self, vocab_size: int, dim: int = 128, layers: int = 2, heads: int = 4, max_len: int = 64,
                 out_dim: int = 128):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"n1": nn.LayerNorm(dim), "attn": mnn.Attention(dim, heads),
                           "n2": nn.LayerNorm(dim), "mlp": mnn.MLP(dim, 4 * dim)})
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim, bias=False)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """ids, mask (B, T) -> text embeddings (B, out_dim)."""
        x = self.tok(ids) + self.pos[:, : ids.shape[1]]  # (B, T, D)
        attn_mask = mask[:, None, None, :].bool()  # (B, 1, 1, T): keys that are real tokens
        for b in self.blocks:
            x = x + b["attn"](b["n1"](x), mask=attn_mask)
            x = x + b["mlp"](b["n2"](x))
        x = self.norm(x)
        m = mask.unsqueeze(-1).to(x.dtype)
        return self.proj((x * m).sum(1) / m.sum(1).clamp(min=1))  # (B, out_dim)


class CaptionDecoder(nn.Module):
    """CapPa's captioner, small (Tschannen et al. 2023, "Image Captioners Are Scalable
    Vision Learners Too", Fig. 1): a transformer decoder that writes the caption while
    cross-attending to *every* image token; its loss trains the encoder.

        ids (B, T) -> tok + pos -> [causal self-attn, cross-attn(image tokens), MLP] x L
                   -> LN -> logits (B, T, V) (output matrix tied to the token embedding)

    Why it makes shape visible where the contrastive loss alone did not: contrast only
    needs *some* difference between the captions in a batch, and colours and sizes
    usually suffice; the captioner has to name every object's shape, token by token,
    so the patch tokens must carry it. With ``parallel`` (CapPa's parallel prediction),
    the decoder inputs are all one [MASK]-like token and the self-attention is not
    causal, so no word can be guessed from the words before it: only from the image.
    """

    def __init__(self, vocab_size: int, image_dim: int, dim: int = 128, layers: int = 2, heads: int = 4,
                 max_len: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.ctx = nn.Linear(image_dim, dim) if image_dim != dim else nn.Identity()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"n1": nn.LayerNorm(dim), "self_attn": mnn.Attention(dim, heads),
                           "n2": nn.LayerNorm(dim), "cross_attn": mnn.Attention(dim, heads),
                           "n3": nn.LayerNorm(dim), "mlp": mnn.MLP(dim, 4 * dim)})
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: Tensor, image_tokens: Tensor, parallel: bool = False) -> Tensor:
        """ids (B, T) decoder inputs, image_tokens (B, N, Dv) -> logits (B, T, V)."""
        c = self.ctx(image_tokens)  # (B, N, D)
        x = self.tok(ids) + self.pos[:, : ids.shape[1]]  # (B, T, D)
        for b in self.blocks:
            x = x + b["self_attn"](b["n1"](x), is_causal=not parallel)
            x = x + b["cross_attn"](b["n2"](x), context=c)
            x = x + b["mlp"](b["n3"](x))
        return self.norm(x) @ self.tok.weight.t()  # (B, T, V)


# ------------------------------------------------------------------------ objectives
def caption_loss(decoder: CaptionDecoder, image_tokens: Tensor, ids: Tensor, mask: Tensor, start_id: int,
                 parallel: bool = False) -> Tensor:
    """Next-token cross-entropy of the caption given the image, over real tokens.

    ids, mask (B, T): the caption; the decoder reads [start, t_1 .. t_{T-1}] (teacher
    forcing) or, with ``parallel``, [start] * T, and predicts t_1 .. t_T.
    """
    start = torch.full_like(ids[:, :1], start_id)
    inp = start.expand_as(ids) if parallel else torch.cat([start, ids[:, :-1]], dim=1)  # (B, T)
    logits = decoder(inp, image_tokens, parallel=parallel)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), ids.masked_fill(mask == 0, -100).flatten())


def image_embedding(vit: nn.Module, pixel_values: Tensor) -> Tensor:
    """CLIP's image vector: the max over the final patch tokens, (B, N, D) -> (B, D).

    Why not the CLS token, as CLIP does? In ShapesWorld an object covers 2-9 of the 64
    patches. Through CLS (or a mean) its shape is diluted among ~60 background patches
    until attention learns where to look, which takes far longer than the colour, a
    global statistic. The max lets each patch token carry the evidence itself, so the
    contrastive loss shapes the *patch* features, which is what every bridge reads
    (measured: shape probe on layer -2 0.32 -> 0.47 mean-pooled, 0.50 -> 0.72 pooled
    over the object's patches, same 700 steps).
    """
    return _max_pool(vit(pixel_values).last_hidden_state)


def _max_pool(last_hidden_state: Tensor) -> Tensor:
    return last_hidden_state[:, 1:].max(dim=1).values  # (B, 1 + N, D) -> (B, D), CLS dropped


def clip_loss(img: Tensor, txt: Tensor, logit_scale: Tensor, hard_txt: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE: (B, E) image and text embeddings -> scalar.

    logits[i, j] = s * cos(img_i, txt_j); the right caption of image i is j = i.
    ``hard_txt`` (B', E): extra captions that describe no image in the batch (hard
    negatives, e.g. a caption with one shape swapped); each image must also rank its
    own caption above all of them (image->text direction only).
    """
    img = F.normalize(img, dim=-1)
    txt = F.normalize(txt, dim=-1)
    scale = logit_scale.exp().clamp(max=100)
    logits = scale * img @ txt.t()  # (B, B)
    target = torch.arange(len(img), device=img.device)
    i2t = logits if hard_txt is None else torch.cat([logits, scale * img @ F.normalize(hard_txt, dim=-1).t()], 1)
    return 0.5 * (F.cross_entropy(i2t, target) + F.cross_entropy(logits.t(), target))


def centre_patch(obj, grid: tuple[int, int]) -> tuple[int, int]:
    """(row, col) of the patch that holds ``obj``'s centre on an ``(h, w)`` patch grid."""
    h, w = grid
    return min(h - 1, int(obj.cy * h)), min(w - 1, int(obj.cx * w))


def patch_targets(scenes, grid: tuple[int, int], class_of) -> Tensor:
    """Which object each patch shows: (N, h*w) class ids, -1 for background.

    A patch belongs to an object when the patch's centre lies inside the object's radius,
    or when the object's centre lies in the patch (small objects); where two objects claim
    a patch, the nearer centre wins. ``class_of(obj)`` gives the object's class id.
    """
    h, w = grid
    ys = (torch.arange(h).float() + 0.5) / h  # patch centres, normalised
    xs = (torch.arange(w).float() + 0.5) / w
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")  # (h, w)
    out = torch.full((len(scenes), h * w), -1, dtype=torch.long)
    for i, sc in enumerate(scenes):
        best = torch.full((h, w), float("inf"))
        for o in sc.objects:
            d = ((cx - o.cx) ** 2 + (cy - o.cy) ** 2).sqrt()  # (h, w), image is square here
            mine = d < o.r
            mine[centre_patch(o, grid)] = True
            take = mine & (d < best)
            best = torch.where(take, d, best)
            out[i][take.flatten()] = class_of(o)
    return out


def region_phrases() -> list[str]:
    """Every object phrase ShapesWorld can say: size x colour x shape, e.g. "small red circle"
    (``Obj.phrase`` without its article)."""
    from mmkit.data.shapes import COLORS, SHAPES

    return [f"{z} {c} {s}" for z in ("small", "large") for c in COLORS for s in SHAPES]


def region_loss(tokens: Tensor, targets: Tensor, proj: nn.Module, phrase_emb: Tensor, logit_scale: Tensor) -> Tensor:
    """Patch-phrase alignment (RegionCLIP-style, per patch): every patch token that shows an
    object is classified, by cosine similarity, among the text tower's embeddings of every
    object phrase. tokens (B, N, D), targets (B, N) with -1 for background, phrase_emb (K, E).
    The patch must name *its own* object's colour and shape: binding, in the token."""
    keep = targets >= 0
    if not keep.any():
        return tokens.sum() * 0.0
    z = F.normalize(proj(tokens[keep]), dim=-1)  # (M, E)
    logits = logit_scale.exp().clamp(max=100) * z @ F.normalize(phrase_emb, dim=-1).t()  # (M, K)
    return F.cross_entropy(logits, targets[keep])


def swap_one_shape(world, split: str, index: int, seed: int = 0) -> str:
    """A hard-negative caption: scene (split, index)'s caption with one object's shape
    replaced by another shape. It differs from the true caption in one word, so only
    an image embedding that carries every object's shape can tell them apart."""
    import dataclasses
    import random

    from mmkit.data.shapes import SHAPES

    scene = world.scene(split, index)
    if not scene.objects:
        return world.caption(scene)
    rng = random.Random(f"{seed}-{split}-{index}")
    k = rng.randrange(len(scene.objects))
    o = scene.objects[k]
    new = dataclasses.replace(o, shape=rng.choice([s for s in SHAPES if s != o.shape]))
    return world.caption(dataclasses.replace(scene, objects=[*scene.objects[:k], new, *scene.objects[k + 1:]]))


# -------------------------------------------------------------------------- metrics
def object_token_probe(enc, n_train: int, n_test: int, layer: int = -2) -> float:
    """Binding in the tokens: a linear probe for an object's shape from the one patch token
    under its centre (layer -2, scenes of 1-3 objects, no text). A bridge hands the LM
    these tokens; "the orange object's shape" is only readable if the orange object's own
    tokens say it. Chance 1/6."""
    from mmkit.data.shapes import SHAPES, ShapesConfig, ShapesWorld

    w = ShapesWorld(ShapesConfig(image_size=64, text_prob=0.0), seed=0)
    shapes = list(SHAPES)

    def data(split: str, n: int):
        scenes = [w.scene(split, i) for i in range(n)]
        px = enc.preprocess([w.render(x) for x in scenes])
        f = torch.cat([enc.features(px[i:i + 256], layer=layer) for i in range(0, n, 256)])  # (n, h*w, D)
        gh, gw = enc.grid((64, 64))
        x, y = [], []
        for fi, sc in zip(f, scenes):
            for o in sc.objects:
                r, c = centre_patch(o, (gh, gw))
                x.append(fi[r * gw + c])
                y.append(shapes.index(o.shape))
        return torch.stack(x), torch.tensor(y)

    with torch.no_grad():
        return linear_probe(*data("train", n_train), *data("test", n_test))


# ------------------------------------------------------------------------- training
def _caption(rec: dict) -> str:
    return rec["conversations"][-1]["value"]


def train_vision(world, tokenizer, s: dict, progress: bool = True) -> tuple[nn.Module, dict]:
    """CLIP pre-training of TinyViT; returns the VisionEncoder and its report."""
    from mmkit.data.shapes import ShapesConfig, ShapesWorld
    from mmkit.vision import TinyViT, ViTConfig, VisionEncoder

    torch.manual_seed(0)
    vit = TinyViT(ViTConfig(stem=s.get("stem", "patch")))
    enc = VisionEncoder(vit)
    text = TextTower(len(tokenizer), out_dim=128)
    img_proj = nn.Linear(vit.config.hidden_size, 128, bias=False)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    cap_w, cap_par = s.get("cap_weight", 0.0), s.get("cap_parallel", 0.0)
    decoder = CaptionDecoder(len(tokenizer), vit.config.hidden_size) if cap_w > 0 else None
    region_w = s.get("region_weight", 0.0)
    region_proj = nn.Linear(vit.config.hidden_size, 128, bias=False) if region_w > 0 else None
    params = [*vit.parameters(), *text.parameters(), *img_proj.parameters(), logit_scale]
    params += [*decoder.parameters()] if decoder is not None else []
    params += [*region_proj.parameters()] if region_proj is not None else []
    opt = torch.optim.AdamW(params, lr=s.get("clip_lr", 2e-3), weight_decay=0.05, betas=(0.9, 0.98))

    # A fixed pool of scenes rendered once: rendering is cheap, but not free.
    N = s["clip_images"]
    recs = [world.sample("train", i, task="caption") for i in range(N)]
    pixels = enc.preprocess([r["image"] for r in recs])  # (N, 3, 64, 64)
    ids, mask = tokenize(tokenizer, [_caption(r) for r in recs], 64)
    hard = s.get("hard_negatives", False)
    if hard:
        hids, hmask = tokenize(tokenizer, [swap_one_shape(world, "train", i) for i in range(N)], 64)
    if region_proj is not None:
        phrases = region_phrases()
        pids, pmask = tokenize(tokenizer, phrases, 16)
        phrase_id = {p: k for k, p in enumerate(phrases)}
        targets = patch_targets([r["meta"]["scene"] for r in recs], vit.config.grid,
                                lambda o: phrase_id[o.phrase.removeprefix("a ")])
        region_layer = s.get("region_layer", -2)  # the layer the bridges read

    t0 = time.perf_counter()
    bar = progress_bar(s["clip_steps"], "CLIP  (vision)", progress)
    g = torch.Generator().manual_seed(0)
    vit.train()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(max(1, s["clip_steps"] // 20), s["clip_steps"], 0.0))
    for step in range(s["clip_steps"]):
        idx = torch.randint(0, N, (s["clip_batch"],), generator=g)
        out = vit(pixels[idx])
        tokens = out.last_hidden_state  # (B, 1 + N, D): one pass serves every loss
        img = img_proj(_max_pool(tokens))  # (B, 128)
        T = int(mask[idx].sum(1).max())  # the batch's longest caption
        bids, bmask = ids[idx, :T], mask[idx, :T]  # (B, T)
        txt = text(bids, bmask)  # (B, 128)
        hard_txt = None
        if hard:
            Th = int(hmask[idx].sum(1).max())
            hard_txt = text(hids[idx, :Th], hmask[idx, :Th])  # (B, 128): one swapped shape each
        loss = clip_loss(img, txt, logit_scale, hard_txt)
        if region_proj is not None:
            loss = loss + region_w * region_loss(out.hidden_states[region_layer][:, 1:], targets[idx], region_proj,
                                                 text(pids, pmask), logit_scale)
        if decoder is not None:
            parallel = bool(torch.rand((), generator=g) < cap_par)
            loss = loss + cap_w * caption_loss(decoder, tokens, bids, bmask, tokenizer.bos_token_id, parallel)
        optimizer_step(loss, opt, sched, params, bar)
    bar.close()
    train_s = time.perf_counter() - t0
    vit.eval()

    with torch.no_grad():
        # Zero-shot retrieval: 100 test images against their 100 captions.
        test = [world.sample("test", i, task="caption") for i in range(100)]
        tids, tmask = tokenize(tokenizer, [_caption(r) for r in test], 64)
        tpix = enc.preprocess([r["image"] for r in test])
        r1 = retrieval_r1(img_proj(image_embedding(vit, tpix)), text(tids, tmask))

        # Linear probes on the features a bridge reads (layer -2, mean over patches),
        # one object per scene so colour and shape are well defined.
        single = ShapesWorld(ShapesConfig(image_size=64, min_objects=1, max_objects=1, text_prob=0.0), seed=0)

        def feats(split: str, n: int):
            sc = [single.scene(split, i) for i in range(n)]
            px = enc.preprocess([single.render(x) for x in sc])
            f = torch.cat([enc.features(px[i:i + 256], layer=-2) for i in range(0, n, 256)])  # (n, 64, D)
            return f, [x.objects[0] for x in sc]

        from mmkit.data.shapes import COLORS, SHAPES

        colors, shapes = list(COLORS), list(SHAPES)
        fx, fo = feats("train", s["probe_train"])
        vx, vo = feats("test", s["probe_test"])
        ys = torch.tensor([shapes.index(o.shape) for o in fo]), torch.tensor([shapes.index(o.shape) for o in vo])
        probe_color = linear_probe(fx.mean(1), torch.tensor([colors.index(o.color) for o in fo]),
                                   vx.mean(1), torch.tensor([colors.index(o.color) for o in vo]))
        probe_shape = linear_probe(fx.mean(1), ys[0], vx.mean(1), ys[1])
        # the object covers 2-9 of 64 patches: the mean dilutes it, the max does not
        probe_shape_max = linear_probe(fx.amax(1), ys[0], vx.amax(1), ys[1])
        probe_shape_token = object_token_probe(enc, s["probe_train"], s["probe_test"])
    report = {"retrieval_r1_100": round(r1, 4), "probe_color": round(probe_color, 4),
              "probe_shape": round(probe_shape, 4), "probe_shape_max": round(probe_shape_max, 4),
              "probe_shape_token": round(probe_shape_token, 4), "train_seconds": round(train_s, 1),
              "params": sum(p.numel() for p in vit.parameters()), "steps": s["clip_steps"],
              "stem": vit.config.stem, "objective": "clip" + (" + shape-swap hard negatives" if hard else "")
              + (f" + {cap_w:g} x captioning" if decoder else "")
              + (f" + {region_w:g} x patch-phrase alignment (layer {region_layer})" if region_proj is not None else "")}
    return enc, report
