"""Evaluation on ShapesWorld: VQA, POPE, grounding and captioning, with and without the image.

Every metric asks the model the way a user would (``model.generate``, greedy) and
scores the text it writes:

    vqa      exact match after normalisation ("Red." == "red"), overall and per
             question type (color, shape, count, relation, exists)
    pope     yes/no object probes (POPE, Li et al. 2023): accuracy, precision, recall,
             F1 and the yes-ratio (a model that says "yes" to everything has 1.0)
    ground   <ref>..</ref><box>(x1,y1),(x2,y2)</box> answers: Acc@IoU>=0.5, mean IoU,
             how many answers held no well-formed box, and how many held a malformed one
    caption  objects recovered from the caption by ShapesWorld's parser against the
             scene: precision, recall, F1, and CHAIR_i (share of mentioned objects that
             are not in the picture: hallucination)
    draw     text -> image, for models that write pictures (``writes_images``): each
             drawing parsed back into objects (``mmkit.native.unified.evaluate_drawing``)

``blind=True`` asks the same questions with the image removed: the language model's
priors alone. A bridge is only worth something by how far it beats this baseline.

``oracle=True`` is the other bound: the image is replaced by the scene's full text
description (``ShapesWorld.detail``: every object with its colour, shape, size and
place, and every pairwise relation), i.e. perfect perception written in words. What a
model scores then is what its language model can do with a scene it fully "sees"; a
bridge cannot lift the model above it. Evaluate a model trained on such text (the text
oracle in docs/benchmarks.md) to measure the LM's in-context reading on its own.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from mmkit.language import IMAGE_TOKEN

__all__ = ["evaluate", "TASKS", "strip_images", "describe_images"]

TASKS = ("vqa", "pope", "ground", "caption", "draw")


def strip_images(record: dict) -> dict:
    """The same record with its images and ``<image>`` placeholders removed."""
    conv = []
    for turn in record["conversations"]:
        value = turn["value"].replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "")
        conv.append({**turn, "value": value.strip()})
    out = {k: v for k, v in record.items() if k not in ("image", "images")}
    out["conversations"] = conv
    return out


def describe_images(record: dict, world) -> dict:
    """The record with its image replaced by the scene's text description (the text oracle).

    ``"<image>\nWhat shape is the red object?"`` becomes ``"There are two objects on a plain
    light background. A small red star is on the left. ... \nWhat shape is the red object?"``.
    Needs a one-image ShapesWorld record (``meta["scene"]``).
    """
    scene = record.get("meta", {}).get("scene")
    if scene is None:
        raise ValueError(f"record {record.get('id')!r}: the text oracle needs a ShapesWorld record with "
                         "meta['scene'] (one image); multi-image tasks have no single description")
    out = strip_images(record)
    first = dict(out["conversations"][0])
    first["value"] = world.detail(scene) + "\n" + first["value"]
    out["conversations"] = [first, *out["conversations"][1:]]
    return out


def _answer(record: dict) -> str:
    return record["conversations"][-1]["value"]


def _records(task: str, split: str, n: int, world, start: int = 0) -> list[dict]:
    return [world.sample(split, start + i, task=task) for i in range(n)]


def _generate(model, records: list[dict], batch_size: int, max_new_tokens: int) -> list[str]:
    preds: list[str] = []
    for i in range(0, len(records), batch_size):
        chunk = records[i: i + batch_size]
        preds += model.generate(records=chunk, max_new_tokens=max_new_tokens)
    return preds


def _vqa_metrics(records, preds) -> dict[str, Any]:
    from mmkit.data.shapes import normalize_answer

    per: dict[str, list[int]] = defaultdict(list)
    for r, p in zip(records, preds):
        ok = int(normalize_answer(p) == normalize_answer(_answer(r)))
        per[r.get("meta", {}).get("qtype", "all")].append(ok)
    allv = [v for vs in per.values() for v in vs]
    return {
        "accuracy": sum(allv) / max(1, len(allv)),
        "per_type": {k: sum(v) / len(v) for k, v in sorted(per.items())},
        "count_per_type": {k: len(v) for k, v in sorted(per.items())},
    }


def _pope_metrics(records, preds) -> dict[str, Any]:
    from mmkit.data.shapes import normalize_answer

    tp = fp = tn = fn = 0
    yes = 0
    for r, p in zip(records, preds):
        gt = normalize_answer(_answer(r)) == "yes"
        pr = normalize_answer(p).startswith("yes")
        yes += pr
        tp += gt and pr
        fp += (not gt) and pr
        tn += (not gt) and (not pr)
        fn += gt and (not pr)
    n = max(1, len(records))
    precision = tp / max(1, tp + fp)
    recall = tp / max(1, tp + fn)
    f1 = 2 * precision * recall / max(1e-9, precision + recall)
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1, "yes_ratio": yes / n}


def _ground_metrics(records, preds) -> dict[str, Any]:
    from mmkit.data.shapes import box_iou, find_boxes, parse_boxes

    # Model output is parsed leniently: the first well-formed box is scored, a malformed
    # one (bad numbers, x1 >= x2, unclosed tag) is counted and reported, never raised.
    ious, no_box, malformed = [], 0, 0
    for r, p in zip(records, preds):
        gt = parse_boxes(_answer(r))
        got, bad = find_boxes(p)
        malformed += bool(bad)
        if not got:
            no_box += 1
            ious.append(0.0)
            continue
        ious.append(box_iou(got[0][1], gt[0][1]))
    n = max(1, len(ious))
    return {"acc_iou50": sum(i >= 0.5 for i in ious) / n, "mean_iou": sum(ious) / n, "no_box": no_box,
            "malformed": malformed}


def _caption_metrics(records, preds) -> dict[str, Any]:
    from mmkit.data.shapes import parse_caption

    tp = n_pred = n_true = 0
    for r, p in zip(records, preds):
        scene = r["meta"]["scene"]
        truth = {(o.color, o.shape) for o in scene.objects}
        said = {(c, s) for _size, c, s in parse_caption(p)}
        tp += len(truth & said)
        n_pred += len(said)
        n_true += len(truth)
    precision = tp / max(1, n_pred)
    recall = tp / max(1, n_true)
    return {
        "precision": precision, "recall": recall,
        "f1": 2 * precision * recall / max(1e-9, precision + recall),
        "chair_i": 1 - precision if n_pred else 0.0,
    }


_METRICS = {"vqa": _vqa_metrics, "pope": _pope_metrics, "ground": _ground_metrics, "caption": _caption_metrics}


def evaluate(
    model,
    task: str = "vqa",
    *,
    split: str = "test",
    n: int = 200,
    batch_size: int = 32,
    blind: bool = False,
    oracle: bool = False,
    world=None,
    max_new_tokens: int | None = None,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Score ``model`` on ``n`` ShapesWorld ``split`` samples of ``task``.

    Returns a flat dict: ``task``, ``split``, ``n``, ``blind``, ``seconds`` and the
    task's metrics (see the module docstring); ``oracle`` when asked with descriptions.
    """
    if blind and oracle:
        raise ValueError("evaluate: blind (no image) and oracle (a description instead of the image) "
                         "exclude each other; pick one")
    if task == "draw":  # the other direction: the model answers with a picture
        if not getattr(model, "writes_images", False):
            raise ValueError("task 'draw' needs a model that writes images (a native model such as "
                             "unified-tiny); this one only reads them")
        from mmkit.native.unified import evaluate_drawing

        return evaluate_drawing(model, n=n, split=split, world=world, batch_size=batch_size)
    if task not in _METRICS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if world is None:
        from mmkit.data.shapes import ShapesConfig, ShapesWorld

        recipe = getattr(model, "recipe", None)
        cfg = {"image_size": getattr(recipe, "image_size", 64), **(getattr(recipe, "shapes", {}) or {})}
        world = ShapesWorld(ShapesConfig(**cfg), seed=getattr(recipe, "seed", 0))
    shapes_task = "caption" if task == "caption" else task
    records = _records(shapes_task, split, n, world)
    if oracle:
        asked = [describe_images(r, world) for r in records]
    else:
        asked = [strip_images(r) for r in records] if blind else records
    if max_new_tokens is None:
        max_new_tokens = {"vqa": 6, "pope": 4, "ground": 32, "caption": 40}[task]
    t0 = time.perf_counter()
    preds = _generate(model, asked, batch_size, max_new_tokens)
    out = {"task": task, "split": split, "n": len(records), "blind": blind}
    if oracle:
        out["oracle"] = True
    out.update(_METRICS[task](records, preds))
    out["seconds"] = round(time.perf_counter() - t0, 2)
    if return_predictions:
        out["predictions"] = [
            {"id": r["id"], "question": r["conversations"][0]["value"], "answer": _answer(r), "prediction": p}
            for r, p in zip(records, preds)
        ]
    return out
