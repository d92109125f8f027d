"""Preference tuning against hallucination: DPO (Rafailov et al. 2023) on ShapesWorld.

A model that names objects that are not in the picture has learned that such captions are
*likely*, not that they are *wrong*. Preference tuning shows it pairs: for the same prompt,
a preferred answer y_w and a dispreferred one y_l, and raises the first relative to the
second. Direct Preference Optimisation does it without a reward model or RL (Sec. 4, Eq. 7):

    L_DPO = -log sigmoid( beta * [ (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) ] )

``pi`` is the model being tuned, ``ref`` a frozen copy of it from before tuning; the two
brackets are the *implicit rewards* of y_w and y_l, their difference the *margin*. ``beta``
says how far pi may move from ref (small beta: far). RLHF-V and POVID build such pairs for
real VLMs, the dispreferred answer with a hallucinated object written in; ShapesWorld can
write them exactly from the scene graph:

    x    "<image> Describe the image briefly."
    y_w  "a large red circle and a small blue star."                        (faithful)
    y_l  "a large red circle, a small red star and a small blue star."      (a red star that is not there)

:func:`preference_pairs` makes them, :func:`dpo_loss` is the loss, :func:`sequence_logps` the
log-likelihood of an answer under a model, and :func:`dpo_train` tunes a trained model against
its frozen copy. ``mmkit.eval`` (CHAIR_i on captions, POPE) measures the hallucinations before
and after.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmkit.data.processor import IGNORE_INDEX

__all__ = ["hallucinated_caption", "preference_pairs", "dpo_loss", "sequence_logps", "preference_margin",
           "dpo_train"]


# ----------------------------------------------------------------------------- the pairs
def hallucinated_caption(world, scene, rng) -> tuple[str, tuple[str, str]]:
    """The scene's brief caption with one object written in that is not in the picture.

    The ghost is adversarial (POPE's hardest negatives): it shares its shape or its colour
    with an object that is there. Returns the caption and the ghost's (colour, shape).
    """
    from mmkit.data.shapes import COLORS, SIZES, Obj, Scene
    from mmkit.data.shapes.text import caption

    color, shape = world._absent_pair(scene, rng, near=True)
    ghost = Obj(shape, color, rng.choice(SIZES), rng.random(), rng.random(), 0.1, COLORS[color])
    seen = Scene(objects=[*scene.objects, ghost], background=scene.background, text=scene.text,
                 split=scene.split, key=scene.key)
    return caption(seen), (color, shape)


def preference_pairs(world, split: str = "train", n: int = 64, start: int = 0) -> list[dict]:
    """``n`` preference pairs for ShapesWorld caption prompts, deterministic.

    Each pair is ``{"id", "image", "prompt", "chosen", "rejected", "meta": {"scene", "ghost"}}``:
    the chosen caption is the faithful brief caption (whatever the world's caption style),
    the rejected one names one object more, which is not in the picture.
    """
    from mmkit.data.shapes import Rng
    from mmkit.data.shapes.text import caption

    out = []
    for i in range(start, start + n):
        rec = world.sample(split, i, "caption")
        scene = rec["meta"]["scene"]
        rejected, ghost = hallucinated_caption(world, scene, Rng(world._key(split, i, "ghost")))
        out.append({"id": f"{split}/{i}/preference", "image": rec["image"],
                    "prompt": rec["conversations"][0]["value"], "chosen": caption(scene), "rejected": rejected,
                    "meta": {"scene": scene, "ghost": ghost}})
    return out


def _records(pairs: Sequence[dict], which: str) -> list[dict]:
    return [{"id": p["id"], "image": p["image"],
             "conversations": [{"from": "human", "value": p["prompt"]}, {"from": "gpt", "value": p[which]}]}
            for p in pairs]


# ----------------------------------------------------------------------------- the loss
def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float = 0.1, reduction: str = "mean") -> Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7) from summed answer log-probabilities, each (B,).

    ``-log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)))``, written as
    ``softplus(-z)`` (the same number, without overflow for large margins).
    """
    if beta <= 0:
        raise ValueError(f"dpo_loss: beta must be > 0 (how far the policy may move from the reference), got {beta}")
    z = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    loss = F.softplus(-z)  # = -log sigmoid(z)
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"dpo_loss: reduction is 'mean' or 'none', got {reduction!r}")


def sequence_logps(model, records: Sequence[dict]) -> Tensor:
    """(B,) sum of log p(token) over each record's assistant answer (the labelled tokens),
    teacher-forced with its image: log pi(y | x)."""
    batch = model.processor(list(records))
    device = next(model.parameters()).device
    labels = batch["labels"].to(device)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   pixel_values=_to(batch.get("pixel_values"), device)).logits
    logits, labels = logits[:, :-1].float(), labels[:, 1:]        # token t predicts token t + 1
    mask = labels != IGNORE_INDEX
    logp = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (logp * mask).sum(-1)


def _to(x, device):
    if x is None:
        return None
    return x.to(device) if torch.is_tensor(x) else [t.to(device) for t in x]


@torch.no_grad()
def preference_margin(model, reference, pairs: Sequence[dict], beta: float = 0.1, batch_size: int = 16) -> dict[str, float]:
    """On ``pairs``: the mean implicit-reward margin ``beta * ((pi_w - ref_w) - (pi_l - ref_l))``,
    the DPO loss, and ``reward_accuracy`` (share of pairs with a positive margin); also
    ``prefers_chosen``: share of pairs where the model itself gives the faithful caption the
    higher likelihood (no reference involved)."""
    margins, prefers = [], []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        pw, pl = sequence_logps(model, _records(chunk, "chosen")), sequence_logps(model, _records(chunk, "rejected"))
        rw, rl = sequence_logps(reference, _records(chunk, "chosen")), sequence_logps(reference, _records(chunk, "rejected"))
        margins.append(beta * ((pw - rw) - (pl - rl)))
        prefers.append((pw > pl).float())
    m = torch.cat(margins)
    return {"margin": float(m.mean()), "loss": float(F.softplus(-m).mean()),
            "reward_accuracy": float((m > 0).float().mean()), "prefers_chosen": float(torch.cat(prefers).mean())}


# ----------------------------------------------------------------------------- tuning
def dpo_train(model, *, steps: int = 50, beta: float = 0.1, lr: float = 1e-5, batch_size: int = 8,
              train: Sequence[str] = ("lm",), world=None, start: int = 0, max_grad_norm: float = 1.0,
              log_every: int = 5, progress: bool = False) -> dict[str, Any]:
    """Tune a trained ``model`` with DPO against a frozen copy of itself (the reference).

    ``steps`` optimizer steps of ``batch_size`` pairs (``preference_pairs`` from the train
    split, from index ``start`` on, a fresh pair every time), training the module groups in
    ``train`` (``mmkit.train.set_trainable``). The model is tuned in place and left in eval
    mode. Returns ``{"history": [{"step", "loss", "margin", "reward_accuracy", "seconds"}],
    "reference": the frozen copy, "seconds"}``.
    """
    from mmkit.eval import model_world
    from mmkit.train import set_trainable

    if steps < 1 or batch_size < 1:
        raise ValueError(f"dpo_train: steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    world = world or model_world(model)
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    params = [model.get_parameter(n) for n in set_trainable(model, list(train))]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    history: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    model.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="DPO", dynamic_ncols=True)
    try:
        for step in range(steps):
            pairs = preference_pairs(world, "train", batch_size, start=start + step * batch_size)
            chosen, rejected = _records(pairs, "chosen"), _records(pairs, "rejected")
            with torch.no_grad():
                rw, rl = sequence_logps(reference, chosen), sequence_logps(reference, rejected)
            pw, pl = sequence_logps(model, chosen), sequence_logps(model, rejected)
            loss = dpo_loss(pw, pl, rw, rl, beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            margin = (beta * ((pw - rw) - (pl - rl))).detach()
            if (step + 1) % log_every == 0 or step == 0 or step + 1 == steps:
                history.append({"step": step + 1, "loss": float(loss.detach()), "margin": float(margin.mean()),
                                "reward_accuracy": float((margin > 0).float().mean()),
                                "seconds": time.perf_counter() - t0})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss):.3f}", margin=f"{float(margin.mean()):.3f}")
    finally:
        if bar is not None:
            bar.close()
        set_trainable(model, [])
        model.eval()
    return {"history": history, "reference": reference, "seconds": time.perf_counter() - t0}
