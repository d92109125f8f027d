"""Pre-training of the tiny language model on ShapesWorld *text*, and its tokenizer.

1. **Tokenizer** (``build_tokenizer``): byte-level BPE learned from ShapesWorld text.
2. **Language model** (``train_lm``): a ``LlamaForCausalLM`` trained on ``lm_corpus``:
   captions, descriptions and chat-formatted questions and answers with the image
   removed. It learns the language and the chat format but has never seen a picture,
   so its answers to "What colour is the star?" are guesses from priors: the *blind*
   baseline every bridge must beat. ``reading_corpus`` (off in the shipped build) adds
   reading-comprehension chats: a scene's description, then a question about it.

``train_lm`` reports the held-out perplexity; ``mmkit zoo build`` runs both and adds the
blind and reading VQA accuracies.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkit.pretrain.common import apply_step, length_buckets, optimizer_step, progress_bar, tokenize
from mmkit.train import warmup_cosine

__all__ = ["LM_CHAT_TASKS", "READING_TASKS", "lm_corpus", "reading_corpus", "build_tokenizer", "answer_mask",
           "lm_backward", "train_lm", "perplexity"]


# ------------------------------------------------------------------------- the text
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


# ------------------------------------------------------------------------- training
def build_tokenizer(world, s: dict):
    """The tiny byte-level BPE tokenizer, learned from ``lm_corpus`` (``s``: "corpus" documents, "vocab" size)."""
    from mmkit.language import build_tiny_tokenizer

    return build_tiny_tokenizer(lm_corpus(world, "train", s["corpus"]), vocab_size=s["vocab"])


def answer_mask(ids: Tensor, tokenizer) -> Tensor:
    """(B, T) ChatML ids -> (B, T) bool: the tokens of every assistant answer, its closing
    ``<|im_end|>`` included (what a chat model is asked to write; the role header is not)."""
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    header = tokenizer("assistant\n", add_special_tokens=False)["input_ids"]
    H = len(header)
    out = torch.zeros_like(ids, dtype=torch.bool)
    for b, row in enumerate(ids.tolist()):
        t = 0
        while t < len(row):
            if row[t] == start and row[t + 1:t + 1 + H] == header:
                t += 1 + H  # the first token of the answer
                while t < len(row):
                    out[b, t] = True
                    if row[t] == end:
                        break
                    t += 1
            t += 1
    return out


def lm_backward(lm, ids: Tensor, mask: Tensor, answers: Tensor | None = None, weight: float = 1.0,
                buckets: bool = True) -> float:
    """Backward of a causal LM's next-token loss over a right-padded batch (B, T); returns the loss.

    The loss is a weighted mean over the predicted tokens: a token of an assistant answer
    (``answers``, from :func:`answer_mask`) weighs ``weight``, any other real token 1. With
    ``buckets`` the batch runs in length groups (:func:`~mmkit.pretrain.common.length_buckets`),
    each padded only to its own longest row; every group's share is divided by the whole
    batch's total weight, so the gradients add up to those of the one padded batch.
    """
    lengths = mask.sum(1)
    labels = ids.masked_fill(mask == 0, -100)
    w = (labels[:, 1:] != -100).float()  # (B, T-1): which next tokens are predicted
    if answers is not None:
        w = w * (1.0 + (weight - 1.0) * answers[:, 1:].float())
    total_w = w.sum().clamp(min=1.0)
    groups = length_buckets(lengths.tolist()) if buckets else [list(range(len(ids)))]
    total = 0.0
    for group in groups:
        rows = torch.tensor(group)
        T = int(lengths[rows].max())
        if T < 2:
            continue
        logits = lm(input_ids=ids[rows, :T], attention_mask=mask[rows, :T]).logits[:, :-1].float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[rows, 1:T].reshape(-1),
                             ignore_index=-100, reduction="none").view(len(group), T - 1)
        loss = (ce * w[rows, :T - 1]).sum() / total_w
        loss.backward()
        total += float(loss.detach())
    return total


@torch.no_grad()
def perplexity(lm, tokenizer, texts: list[str], batch_size: int = 64, max_len: int = 160) -> float:
    """exp(mean next-token loss) of a causal LM over ``texts`` (every real token counts)."""
    was_training = lm.training
    lm.eval()
    device = next(lm.parameters()).device
    nll, ntok = 0.0, 0
    for i in range(0, len(texts), batch_size):
        x, m = tokenize(tokenizer, texts[i:i + batch_size], max_len)
        x, m = x.to(device), m.to(device)
        labels = x.masked_fill(m == 0, -100)
        n = int((labels[:, 1:] != -100).sum())
        nll += float(lm(input_ids=x, attention_mask=m, labels=labels).loss) * n
        ntok += n
    lm.train(was_training)
    return math.exp(nll / max(1, ntok))


def train_lm(world, tokenizer, s: dict, progress: bool = True, on_step=None) -> tuple[nn.Module, dict]:
    """Causal-LM pre-training of the tiny Llama on ShapesWorld text.

    ``s`` (a ``zoo.SETTINGS`` entry): ``corpus`` documents of ``lm_corpus`` plus ``reading``
    documents of ``reading_corpus``, ``lm_steps`` x ``lm_batch``; ``answer_weight`` > 1 weighs
    the tokens of assistant answers that much more than the rest of the text (default 1: one
    mean over every token); ``lm_buckets`` runs each batch in length buckets (:func:`lm_backward`:
    the same gradients, less compute). ``on_step(step, lm)`` is called after each step (a
    learning curve).
    """
    from transformers import LlamaForCausalLM

    from mmkit.language import special_token_ids, tiny_lm_config

    torch.manual_seed(0)
    cfg = tiny_lm_config(len(tokenizer), **special_token_ids(tokenizer), **s.get("lm_config", {}))
    lm = LlamaForCausalLM(cfg)
    # the tokenizer was trained on lm_corpus alone: reading documents use the same words
    texts = lm_corpus(world, "train", s["corpus"]) + reading_corpus(world, "train", s.get("reading", 0),
                                                                     start=s["corpus"])
    ids, mask = tokenize(tokenizer, texts, 160)
    weight = float(s.get("answer_weight", 1.0))
    answers = answer_mask(ids, tokenizer) if weight != 1.0 else None
    buckets, params = bool(s.get("lm_buckets", False)), list(lm.parameters())
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(1)
    t0, measured = time.perf_counter(), 0.0
    bar = progress_bar(s["lm_steps"], "LM    (text)  ", progress)
    lm.train()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(max(1, s["lm_steps"] // 20), s["lm_steps"], 0.0))
    for step in range(s["lm_steps"]):
        idx = torch.randint(0, len(texts), (s["lm_batch"],), generator=g)
        m = mask[idx]
        T = int(m.sum(1).max())
        x, m = ids[idx, :T], m[:, :T]
        if weight == 1.0 and not buckets:  # the shipped LM's step: one padded batch, one mean
            loss = lm(input_ids=x, attention_mask=m, labels=x.masked_fill(m == 0, -100)).loss
            optimizer_step(loss, opt, sched, params, bar)
        else:
            opt.zero_grad(set_to_none=True)
            loss = lm_backward(lm, x, m, answers[idx, :T] if answers is not None else None, weight, buckets)
            apply_step(loss, opt, sched, params, bar)
        if on_step is not None:
            t_cb = time.perf_counter()
            on_step(step + 1, lm)
            lm.train()
            measured += time.perf_counter() - t_cb
    bar.close()
    train_s = time.perf_counter() - t0 - measured  # training alone, without the callback's measurements
    lm.eval()

    ppl = perplexity(lm, tokenizer, lm_corpus(world, "val", s["ppl_n"]))  # held-out validation text
    report = {"val_perplexity": round(ppl, 3), "train_seconds": round(train_s, 1),
              "params": sum(p.numel() for p in lm.parameters()), "steps": s["lm_steps"]}
    return lm, report
