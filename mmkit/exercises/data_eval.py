"""Exercises of notebook 09 (data, evaluation, hallucination): write the DPO loss; split POPE
by negative type; write a caption that fools CHAIR."""
from __future__ import annotations

import re
from typing import Callable

from mmkit.exercises.core import Exercise, _call, _guard, _say, register

__all__ = ["check_dpo_loss", "check_pope_by_type", "check_fool_chair"]

_PLACE = r"in the (?:top|bottom) (?:left|right)|at the (?:top|bottom)|on the (?:left|right)|in the center"

_DPO_LOSS = '''\
import torch.nn.functional as F

def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1):
    """Mean DPO loss over a batch; each argument is (B,) summed answer log-probabilities."""
    z = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(z).mean()
'''

_POPE_BY_TYPE = '''\
def pope_by_type(records, predictions):
    """{negative type: {"accuracy": .., "f1": ..}} with the answers read leniently."""
    from mmkit.data.shapes import normalize_answer

    groups = {}
    for r, p in zip(records, predictions):
        groups.setdefault(r["meta"]["pope_type"], []).append(
            (r["meta"]["answer"] == "yes", normalize_answer(p).startswith("yes")))
    out = {}
    for kind, pairs in groups.items():
        tp = sum(g and s for g, s in pairs)
        fp = sum((not g) and s for g, s in pairs)
        fn = sum(g and not s for g, s in pairs)
        correct = sum(g == s for g, s in pairs)
        precision, recall = tp / max(1, tp + fp), tp / max(1, tp + fn)
        f1 = 2 * precision * recall / max(1e-9, precision + recall)
        out[kind] = {"accuracy": correct / len(pairs), "f1": f1}
    return out
'''

_FOOL_CHAIR = '''\
def fool_chair(scene):
    """A caption that names every object and nothing else (CHAIR_i 0, recall 1) and is still
    wrong: every object gets the other size."""
    other = {"small": "large", "large": "small"}
    return " and ".join(f"a {other[o.size]} {o.color} {o.shape}" for o in scene.objects) + "."
'''


@_guard
def check_dpo_loss(fn: Callable) -> bool:
    """fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta) -> scalar; checked on a
    hand-computed case and against ``mmkit.preference.dpo_loss`` on random batches."""
    import math

    import torch

    from mmkit.preference import dpo_loss

    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    got = _call(fn, one(-10), one(-14), one(-12), one(-12), 0.5, what="(-10, -14, -12, -12, beta=0.5)")
    want = math.log(1 + math.exp(-0.5 * ((-10 + 12) - (-14 + 12))))  # z = 0.5 * (2 + 2) = 2
    if not torch.is_tensor(got) or got.numel() != 1:
        return _say(False, f"return one number (a scalar tensor: the batch mean), got {got!r}.")
    if abs(float(got) - want) > 1e-5:
        if abs(float(got) + want) < 1e-5:
            return _say(False, "the sign is flipped: the loss is MINUS log sigmoid(z), a positive number.")
        if abs(float(got) - math.log(1 + math.exp(-4))) < 1e-5:
            return _say(False, "beta is missing: z = beta * (margin), here 0.5 * 4 = 2.")
        return _say(False, f"pi_w=-10, pi_l=-14, ref_w=ref_l=-12, beta=0.5: z = 0.5 * ((-10+12) - (-14+12)) = 2, "
                           f"loss = -log sigmoid(2) = {want:.4f}; you return {float(got):.4f}.")
    equal = _call(fn, one(-3), one(-7), one(-3), one(-7), 0.1, what="(policy == reference)")
    if abs(float(equal) - math.log(2)) > 1e-5:
        return _say(False, f"when the policy equals the reference the margin is 0 and the loss log 2 = 0.6931; "
                           f"you return {float(equal):.4f}. Subtract the reference's log-probs from the policy's.")
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(6, generator=g) * 5 - 20 for _ in range(4)]
    got = _call(fn, *args, 0.1, what="(a batch of 6)")
    if abs(float(got) - float(dpo_loss(*args, beta=0.1))) > 1e-5:
        return _say(False, f"a batch of 6 pairs: expected the mean loss {float(dpo_loss(*args, beta=0.1)):.4f}, got "
                           f"{float(got):.4f} (is it a mean over the batch, not a sum?).")
    return _say(True, "-log sigmoid(2) = 0.1269 by hand, log 2 when the policy is the reference, and batches agree.")


@_guard
def check_pope_by_type(fn: Callable) -> bool:
    """fn(records, predictions) -> {pope_type: {"accuracy", "f1"}}; compared with
    ``mmkit.eval.pope_by_type`` on ShapesWorld POPE records and a yes-sayer's replies."""
    from mmkit.data.shapes import ShapesWorld
    from mmkit.eval import pope_by_type

    world = ShapesWorld()
    records = [world.sample("test", i, "pope") for i in range(60)]
    truth = [r["meta"]["answer"] for r in records]
    replies = {
        "a yes-sayer (answers 'Yes.' to everything)": ["Yes." for _ in records],
        "a model fooled by adversarial negatives": [
            "yes" if (t == "yes" or r["meta"]["pope_type"] == "adversarial") else "no" for r, t in zip(records, truth)],
    }
    for who, preds in replies.items():
        want = pope_by_type(records, preds)
        got = _call(fn, records, preds, what=f"(60 records, {who})")
        if not isinstance(got, dict) or set(got) != set(want):
            return _say(False, f"{who}: expected the keys {sorted(want)} (meta['pope_type']), got "
                               f"{sorted(got) if isinstance(got, dict) else type(got).__name__}.")
        for kind in want:
            for metric in ("accuracy", "f1"):
                g = got[kind].get(metric) if isinstance(got[kind], dict) else None
                if g is None or abs(float(g) - want[kind][metric]) > 1e-6:
                    return _say(False, f"{who}, {kind} negatives: {metric} should be {want[kind][metric]:.3f}, "
                                       f"got {g}. Group by meta['pope_type'], read 'Yes.' as yes (normalise), "
                                       "and compute each group's scores on its own records only.")
    return _say(True, "the same scores per negative type as mmkit.eval.pope_by_type.")


@_guard
def check_fool_chair(fn: Callable) -> bool:
    """fn(scene) -> caption: CHAIR_i 0 and recall 1 by ShapesWorld's caption parser, yet false
    about a size or a place (checked on 20 test scenes)."""
    from mmkit.data.shapes import ShapesWorld, parse_caption, position_phrase
    from mmkit.data.shapes.text import _SIZE_WORDS

    world = ShapesWorld()
    for i in range(20):
        scene = world.scene("test", i)
        cap = _call(fn, scene, what=f"(test scene {i})")
        if not isinstance(cap, str):
            return _say(False, f"return a caption string, got {type(cap).__name__}.")
        said = parse_caption(cap)
        pairs = {(c, s) for _z, c, s in said}
        extra, missing = pairs - scene.pairs(), scene.pairs() - pairs
        if extra:
            return _say(False, f"scene {i} ({', '.join(o.name for o in scene.objects)}): you name {sorted(extra)}, "
                               "which is not there: CHAIR catches that (CHAIR_i > 0). Fool it without a new object.")
        if missing:
            return _say(False, f"scene {i}: {sorted(missing)} is not named (recall < 1); name every object.")
        low = cap.lower()
        wrong_size = any(z is not None and _SIZE_WORDS[z] != scene.find(c, s).size for z, c, s in said)
        wrong_place = False  # "red circle in the top left" when it is on the right
        for o in scene.objects:
            for m in re.finditer(rf"{o.color} {o.shape}s? (?:is )?({_PLACE})", low):
                wrong_place |= m.group(1) != position_phrase(o.cx, o.cy)
        if not (wrong_size or wrong_place):
            return _say(False, f"scene {i}: {cap!r} is true (or says nothing checkable): give an object the wrong "
                               "size or the wrong place, which CHAIR does not read.")
    return _say(True, "CHAIR_i 0 and recall 1 on 20 scenes, and every caption false: CHAIR only counts objects.")


register(Exercise("dpo_loss", "09_data_and_evaluation",
                  "dpo_loss(pi_w, pi_l, ref_w, ref_l, beta) -> the mean DPO loss (Rafailov et al. 2023)",
                  check_dpo_loss), _DPO_LOSS)
register(Exercise("pope_by_type", "09_data_and_evaluation",
                  "pope_by_type(records, predictions) -> {random|popular|adversarial: {accuracy, f1}}",
                  check_pope_by_type), _POPE_BY_TYPE)
register(Exercise("fool_chair", "09_data_and_evaluation",
                  "fool_chair(scene) -> a caption with CHAIR_i 0 and recall 1 that is still false",
                  check_fool_chair), _FOOL_CHAIR)
