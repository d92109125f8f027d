"""The tiny pre-trained parts every bridge connects: a CLIP-trained ViT and a small Llama.

Real VLMs bridge two *pre-trained, frozen* experts: a vision encoder trained with
CLIP (image-text contrastive learning) and a language model trained on text alone.
The tiny world needs the same two experts, so ``mmkit zoo build`` trains them here,
from scratch, on ShapesWorld, in a few minutes on a laptop CPU:

1. **Tokenizer**: byte-level BPE learned from ShapesWorld text.
2. **Vision encoder**: a ``TinyViT`` trained CLIP-style (Radford et al. 2021, Fig. 1)
   against a small text transformer: a batch of N (image, caption) pairs gives an
   N x N similarity matrix; a symmetric cross-entropy pushes the diagonal (the true
   pairs) up and everything else down, with a learned temperature (init 0.07). The
   image vector is the max over patch tokens (see ``image_embedding`` for why).
   Only the image tower is shipped; the text tower is a training device.
   The full build adds **shape-swap hard negatives** (NegCLIP-style, Yuksekgonul et al.
   2023): every image must also rank its caption above a copy with one object's shape
   swapped (``swap_one_shape``), which colour and size alone cannot do.
   Two more levers are built in, off by default, measured worse at equal steps (see
   docs/benchmarks.md): ``stem="conv"`` (a convolutional stem, Xiao et al. 2021,
   ``mmkit.vision.conv_stem``) and ``cap_weight > 0`` (a captioning decoder next to the
   contrastive loss, CapPa: Tschannen et al. 2023, ``CaptionDecoder``; ``cap_parallel``
   = share of steps with CapPa's parallel prediction).
3. **Language model**: a ``LlamaForCausalLM`` trained on ShapesWorld *text*: captions,
   descriptions and chat-formatted questions and answers with the image removed. It
   learns the language and the chat format but has never seen a picture, so its
   answers to "What colour is the star?" are guesses from priors: the *blind*
   baseline every bridge must beat.

Quality figures printed (and written to ``assets/tiny/report.json``):
    vision: zero-shot image->caption retrieval R@1 among 100 test candidates; linear
            probes for colour and shape on single-object test scenes (layer -2,
            mean-pooled; ``probe_shape_max``: the same tokens max-pooled)
    lm:     held-out perplexity; blind VQA accuracy per question type

The shipped weights live in ``assets/tiny/{vision,lm}`` (safetensors + config) and load
offline in well under 2 s.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkit import nn as mnn
from mmkit.paths import assets_dir
from mmkit.train import warmup_cosine

__all__ = ["build", "info", "TextTower", "clip_loss", "image_embedding", "linear_probe", "retrieval_r1",
           "load_tiny", "VISION_DIR", "LM_DIR", "build_models", "ship_checkpoint", "model_report", "SHIPPED_MODELS", "MODELS_DIR"]

VISION_DIR = "tiny/vision"
LM_DIR = "tiny/lm"
REPORT = "tiny/report.json"

# The size of each build. "smoke" is for tests: seconds, not quality. "full" is what is
# shipped: CLIP with shape-swap hard negatives and patch-phrase alignment (region_weight)
# for 1000 steps. Measured (docs/benchmarks.md, same seed): max-pooled shape probe 0.89 for
# 700 steps without hard negatives, 0.946 with them, 0.98 for 1000 (mean-pooled 0.50 / 0.61 /
# 0.73). Those encoders still did not *bind*: the token under an object told its shape 0.57
# of the time, and llava-tiny answered shape questions at 0.35. Patch-phrase alignment makes
# every object patch name its own object (token probe 0.94, mean-pooled 0.93, llava-tiny's
# shape answers 0.69). The price of both is build time (docs/benchmarks.md).
# Optional keys, absent from both (what the shipped assets were built without): "reading"
# (that many reading_corpus documents join the LM's corpus), "lm_config" (tiny_lm_config
# overrides, e.g. a wider LM), "clip_lr", "stem" ("conv"), "cap_weight" / "cap_parallel"
# (a CapPa-style captioning loss next to CLIP's), "region_layer" (which hidden state the
# alignment trains; default -2, the one bridges read). docs/benchmarks.md measures each.
SETTINGS: dict[str, dict[str, Any]] = {
    "full": dict(corpus=20_000, vocab=2048, clip_images=16_000, clip_steps=1000, clip_batch=96, hard_negatives=True,
                 region_weight=1.0, lm_steps=600, lm_batch=32, probe_train=1500, probe_test=500, blind_n=300, ppl_n=500),
    "smoke": dict(corpus=600, vocab=400, clip_images=256, clip_steps=3, clip_batch=32, hard_negatives=True, region_weight=1.0,
                  lm_steps=3, lm_batch=8, probe_train=64, probe_test=32, blind_n=8, ppl_n=16),
}


# ------------------------------------------------------------------------ text tower
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
def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                 steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-4) -> float:
    """Accuracy of a logistic-regression probe trained on frozen features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    tx, vx = (train_x - mean) / std, (test_x - mean) / std
    n_cls = int(max(train_y.max(), test_y.max())) + 1
    probe = nn.Linear(tx.shape[1], n_cls)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():  # callers may hold no_grad for the frozen features
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(probe(tx), train_y).backward()
            opt.step()
    with torch.no_grad():
        return float((probe(vx).argmax(-1) == test_y).float().mean())


def retrieval_r1(img: Tensor, txt: Tensor) -> float:
    """Image->text R@1: share of images whose own caption is the most similar."""
    sim = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    return float((sim.argmax(-1) == torch.arange(len(img))).float().mean())


# ---------------------------------------------------------------------------- helpers
def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)


def _step(loss: Tensor, opt, sched, params: list, bar) -> None:
    """One optimizer step with gradient clipping; advances the schedule and the bar."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    bar.update(1)
    bar.set_postfix(loss=f"{loss.item():.3f}")


def _caption(rec: dict) -> str:
    return rec["conversations"][-1]["value"]


def _tokenize(tokenizer, texts: list[str], max_len: int) -> tuple[Tensor, Tensor]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt",
                    add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


# The chat tasks the LM's corpus cycles through, in this order. Named, not derived from
# ShapesWorld's TASKS, so a new task leaves the corpus (and so the shipped LM) unchanged.
LM_CHAT_TASKS = ("caption", "detail", "vqa", "pope", "ground", "region", "ocr", "multi")


def lm_corpus(world, split: str, n: int, start: int = 0) -> list[str]:
    """Text the tiny LM learns from: plain descriptions and image-free chats.

    Chats come from the ShapesWorld tasks of ``LM_CHAT_TASKS`` with the ``<image>`` placeholders removed,
    rendered with the ChatML template, so the LM knows the format and the answer
    styles before any bridge exists (but not what any particular picture shows).
    """
    from mmkit.eval import strip_images

    texts = list(world.text_corpus(split, n // 2, start=start))
    tasks = LM_CHAT_TASKS
    for i in range(n - len(texts)):
        texts.append(_chatml(strip_images(world.sample(split, start + i, task=tasks[i % len(tasks)]))))
    return texts


def _chatml(record: dict) -> str:
    """A record's turns as one ChatML document (no system turn, no generation prompt)."""
    from mmkit.language import to_chat_messages

    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                   for m in to_chat_messages(record["conversations"]))


#: The questions of the reading-comprehension documents: the answer is in the description.
READING_TASKS = ("vqa", "pope")


def reading_corpus(world, split: str, n: int, start: int = 0) -> list[str]:
    """Reading-comprehension chats: a scene's full text description, then a question about it.

    ``user: "There are two objects ... A small red star is on the left. ...\nWhat shape
    is the red object?"``, ``assistant: "star"``. The answer is not guessable from the
    question (the scene is random): the only way to get it right is to look back at the
    description and copy from it (find "red", read the word after it). That is the skill
    a VLM's LM needs for a picture, with image tokens in place of the description, and
    the one a real LLM brings from pre-training; the shipped tiny LM, trained only on
    descriptions and image-free chats, does not have it (``reading_vqa`` 0.167; with these
    documents it grows, docs/benchmarks.md, "the text oracle"). The user turn is exactly what
    ``evaluate(..., oracle=True)`` asks (``eval.describe_images``); no picture is rendered.
    """
    from mmkit.data.shapes import Rng
    from mmkit.eval import describe_images

    out = []
    for i in range(start, start + n):
        scene, rng = world.scene(split, i), Rng(world._key(split, i, "reading"))
        task = READING_TASKS[i % len(READING_TASKS)]
        if task == "vqa" and not world._feasible_qtypes(scene):
            task = "pope"
        q, a, _ = world.vqa(scene, rng) if task == "vqa" else world.pope(scene, rng)
        rec = {"conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}],
               "meta": {"scene": scene}}
        out.append(_chatml(describe_images(rec, world)))
    return out


# ------------------------------------------------------------------------------ build
def build_tokenizer(world, s: dict):
    from mmkit.language import build_tiny_tokenizer

    return build_tiny_tokenizer(lm_corpus(world, "train", s["corpus"]), vocab_size=s["vocab"])


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
    ids, mask = _tokenize(tokenizer, [_caption(r) for r in recs], 64)
    hard = s.get("hard_negatives", False)
    if hard:
        hids, hmask = _tokenize(tokenizer, [swap_one_shape(world, "train", i) for i in range(N)], 64)
    if region_proj is not None:
        phrases = region_phrases()
        pids, pmask = _tokenize(tokenizer, phrases, 16)
        phrase_id = {p: k for k, p in enumerate(phrases)}
        targets = patch_targets([r["meta"]["scene"] for r in recs], vit.config.grid,
                                lambda o: phrase_id[o.phrase.removeprefix("a ")])
        region_layer = s.get("region_layer", -2)  # the layer the bridges read

    t0 = time.perf_counter()
    bar = _bar(s["clip_steps"], "CLIP  (vision)", progress)
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
        _step(loss, opt, sched, params, bar)
    bar.close()
    train_s = time.perf_counter() - t0
    vit.eval()

    with torch.no_grad():
        # Zero-shot retrieval: 100 test images against their 100 captions.
        test = [world.sample("test", i, task="caption") for i in range(100)]
        tids, tmask = _tokenize(tokenizer, [_caption(r) for r in test], 64)
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


def train_lm(world, tokenizer, s: dict, progress: bool = True) -> tuple[nn.Module, dict]:
    """Causal-LM pre-training of the tiny Llama on ShapesWorld text."""
    from transformers import LlamaForCausalLM

    from mmkit.language import special_token_ids, tiny_lm_config

    torch.manual_seed(0)
    cfg = tiny_lm_config(len(tokenizer), **special_token_ids(tokenizer), **s.get("lm_config", {}))
    lm = LlamaForCausalLM(cfg)
    # the tokenizer was trained on lm_corpus alone: reading documents use the same words
    texts = lm_corpus(world, "train", s["corpus"]) + reading_corpus(world, "train", s.get("reading", 0),
                                                                     start=s["corpus"])
    ids, mask = _tokenize(tokenizer, texts, 160)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    bar = _bar(s["lm_steps"], "LM    (text)  ", progress)
    lm.train()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(max(1, s["lm_steps"] // 20), s["lm_steps"], 0.0))
    for step in range(s["lm_steps"]):
        idx = torch.randint(0, len(texts), (s["lm_batch"],), generator=g)
        m = mask[idx]
        T = int(m.sum(1).max())
        x, m = ids[idx, :T], m[:, :T]
        labels = x.masked_fill(m == 0, -100)
        _step(lm(input_ids=x, attention_mask=m, labels=labels).loss, opt, sched, list(lm.parameters()), bar)
    bar.close()
    train_s = time.perf_counter() - t0
    lm.eval()

    # Held-out perplexity on validation text.
    val = lm_corpus(world, "val", s["ppl_n"])
    nll, ntok = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(val), 64):
            x, m = _tokenize(tokenizer, val[i:i + 64], 160)
            labels = x.masked_fill(m == 0, -100)
            n = int((labels[:, 1:] != -100).sum())
            nll += float(lm(input_ids=x, attention_mask=m, labels=labels).loss) * n
            ntok += n
    report = {"val_perplexity": round(math.exp(nll / max(1, ntok)), 3), "train_seconds": round(train_s, 1),
              "params": sum(p.numel() for p in lm.parameters()), "steps": s["lm_steps"]}
    return lm, report


def _lm_only(vision, lm, tokenizer):
    """A VLM around the LM whose bridge is never used (no image is ever passed)."""
    from mmkit.bridges import build_bridge
    from mmkit.vlm import VLM

    return VLM(vision, build_bridge("linear", vision.hidden_size, lm.config.hidden_size), lm, tokenizer)


def blind_accuracy(vision, lm, tokenizer, n: int) -> dict[str, Any]:
    """How often the LM alone answers VQA right without seeing the image."""
    from mmkit.eval import evaluate

    res = evaluate(_lm_only(vision, lm, tokenizer), "vqa", split="test", n=n, blind=True)
    return {"blind_vqa": round(res["accuracy"], 4), "blind_per_type": {k: round(v, 4) for k, v in res["per_type"].items()}}


def reading_accuracy(vision, lm, tokenizer, n: int) -> dict[str, Any]:
    """How often the LM alone answers VQA right from the scene's text description
    (``evaluate(..., oracle=True)``): its in-context reading before any image training."""
    from mmkit.eval import evaluate

    res = evaluate(_lm_only(vision, lm, tokenizer), "vqa", split="test", n=n, oracle=True)
    return {"reading_vqa": round(res["accuracy"], 4),
            "reading_per_type": {k: round(v, 4) for k, v in res["per_type"].items()}}


def build(out: str | Path | None = None, *, smoke: bool = False, only: str | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Retrain the tiny tokenizer + ViT + LM from scratch and write them to ``out``.

    Deterministic (fixed seeds, single process). ``out`` defaults to the shipped
    ``assets/`` folder. Returns the quality report (also saved as report.json).
    """
    from mmkit.data.shapes import ShapesConfig, ShapesWorld
    from mmkit.vision import load_vision_encoder

    if only not in (None, "vision", "lm", "vq"):
        raise ValueError(f"zoo build --only takes 'vision', 'lm' or 'vq', got {only!r} "
                         "(family models: `mmkit zoo models --only RECIPE`)")
    s = SETTINGS["smoke" if smoke else "full"]
    root = Path(out) if out else assets_dir()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    world = ShapesWorld(ShapesConfig(image_size=64), seed=0)
    tokenizer = build_tokenizer(world, s) if only != "vq" else None
    report: dict[str, Any] = {"smoke": smoke, "torch_threads": torch.get_num_threads()}
    if only == "vq":
        pass  # the image tokenizer needs neither the ViT nor the LM
    elif only in (None, "vision"):
        vision, report["vision"] = train_vision(world, tokenizer, s, progress)
        vision.model.save_pretrained(root / VISION_DIR)
    else:
        vision = load_vision_encoder(str(root / VISION_DIR))
    if only in (None, "lm"):
        lm, report["lm"] = train_lm(world, tokenizer, s, progress)
        (root / LM_DIR).mkdir(parents=True, exist_ok=True)
        lm.save_pretrained(root / LM_DIR)
        tokenizer.save_pretrained(root / LM_DIR)
        report["lm"].update(blind_accuracy(vision, lm, tokenizer, s["blind_n"]))
        report["lm"].update(reading_accuracy(vision, lm, tokenizer, s["blind_n"]))
    if only in (None, "vq"):  # the VQ-VAE image tokenizer of the native models (mmkit.native.vq)
        from mmkit.native.vq import VQ_DIR, build_vq

        report["vq"] = build_vq(root / VQ_DIR, smoke=smoke, progress=progress)
    # wall time of this run, tokenizer included; a partial build (--only) keeps the full one's
    report["total_seconds" if only is None else f"{only}_only_seconds"] = round(time.perf_counter() - t0, 1)
    path = root / REPORT
    old = json.loads(path.read_text()) if (only and path.exists()) else {}
    old.update(report)
    path.write_text(json.dumps(old, indent=2) + "\n")
    return old


def info() -> dict[str, Any]:
    """The shipped tiny models' report and sizes on disk."""
    root = assets_dir()
    path = root / REPORT
    out: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"missing": str(path)}
    for d in (VISION_DIR, LM_DIR):
        p = root / d
        out[f"{d}_bytes"] = sum(f.stat().st_size for f in p.glob("*") if f.is_file()) if p.exists() else 0
    return out


def load_tiny():
    """(vision encoder, lm, tokenizer) of the shipped tiny world."""
    from mmkit.language import load_language_model
    from mmkit.vision import load_vision_encoder

    lm, tok = load_language_model("tiny")
    return load_vision_encoder("tiny"), lm, tok


# ---------------------------------------------------------------- shipped family models
# One trained model per family, small enough to ship in assets/ (weights in fp16), so the
# demo starts without training. ``mmkit zoo models`` retrains them with their recipes.
SHIPPED_MODELS = ("llava-tiny", "flamingo-tiny", "unified-tiny")
MODELS_DIR = "tiny/models"


def ship_checkpoint(src: str | Path, name: str, out: str | Path | None = None) -> Path:
    """Copy a trained checkpoint into ``<out>/tiny/models/<name>/`` for shipping.

    Keeps recipe.json, the trained tensors in fp16 (half the bytes; the demo loads them
    into the fp32 model) and a peft adapter if any; drops the optimizer state. Atomic:
    written next to the destination, then renamed.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    from mmkit.train import ADAPTER, RECIPE, WEIGHTS, find_checkpoint

    src = find_checkpoint(src)
    dst = (Path(out) if out else assets_dir()) / MODELS_DIR / name
    staging = dst.with_name(dst.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    shutil.copy2(src / RECIPE, staging / RECIPE)
    weights = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(str(src / WEIGHTS)).items()}
    save_file(weights, str(staging / WEIGHTS), metadata={"format": "pt", "dtype": "float16"})
    if (src / ADAPTER).is_dir():
        shutil.copytree(src / ADAPTER, staging / ADAPTER)
    if dst.exists():
        shutil.rmtree(dst)
    staging.rename(dst)
    return dst


def model_report(path: str | Path, eval_n: int = 300) -> dict[str, Any]:
    """VQA accuracy of a shipped model as the demo loads it (fp16-rounded weights)."""
    from mmkit.eval import evaluate
    from mmkit.train import load_model

    path = Path(path)
    model = load_model(path)
    vqa = evaluate(model, "vqa", n=eval_n)
    out = {"vqa": vqa["accuracy"], "vqa_per_type": vqa.get("per_type"), "vqa_n": eval_n,
           "bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file())}
    if getattr(model, "writes_images", False):  # a native model draws too: judged by the scene parser
        draw = evaluate(model, "draw", n=max(8, eval_n // 3))
        out["draw"] = {k: draw[k] for k in ("ok", "object_recall", "color_recall", "drawn", "extra", "n")}
    return out


def build_models(names: Sequence[str] = SHIPPED_MODELS, out: str | Path | None = None, *,
                 smoke: bool = False, progress: bool = True, eval_n: int = 300) -> dict[str, Any]:
    """Train each named recipe on the tiny world and ship its checkpoint in ``out``.

    Each lands in ``<out>/tiny/models/<recipe>/`` (``ship_checkpoint``), which
    ``mmkit.train.load_model`` and the demo read. The report (VQA accuracy on ``eval_n``
    test questions, training seconds, size) is merged into report.json under "models".
    """
    import tempfile

    from mmkit.recipes import apply_overrides, get_recipe
    from mmkit.train import Trainer
    from mmkit.vlm import build_model

    root = Path(out) if out else assets_dir()
    report: dict[str, Any] = {}
    for name in names:
        recipe = get_recipe(name)
        if smoke:
            recipe = apply_overrides(recipe, ["stages.*.steps=2", "stages.*.batch_size=4", "stages.*.warmup_steps=1"])
        torch.manual_seed(recipe.seed)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            model = build_model(recipe)
            Trainer(model, recipe, tmp, progress=progress).train()
            seconds = time.perf_counter() - t0
            dst = ship_checkpoint(tmp, name, root)
        report[name] = {**model_report(dst, 8 if smoke else eval_n), "train_seconds": round(seconds, 1),
                        "torch_threads": torch.get_num_threads()}
    path = root / REPORT
    old = json.loads(path.read_text()) if path.exists() else {}
    old.setdefault("models", {}).update(report)
    path.write_text(json.dumps(old, indent=2) + "\n")
    return report
