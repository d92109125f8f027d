"""Evaluation on ShapesWorld: VQA, POPE, grounding and captioning, with and without the image.

Every metric asks the model the way a user would (``model.generate``, greedy) and
scores the text it writes:

    vqa      exact match after normalisation ("Red." == "red"), overall and per
             question type (color, shape, count, relation, exists)
    pope     yes/no object probes (POPE, Li et al. 2023): accuracy, precision, recall,
             F1 and the yes-ratio (a model that says "yes" to everything has 1.0), pooled and
             ``per_type``: split by how the negative was drawn (random / popular / adversarial)
    ground   <ref>..</ref><box>(x1,y1),(x2,y2)</box> answers: Acc@IoU>=0.5, mean IoU,
             how many answers held no well-formed box, and how many held a malformed one
    caption  objects recovered from the caption by ShapesWorld's parser against the
             scene: precision, recall, F1, and CHAIR_i (share of mentioned objects that
             are not in the picture: hallucination)
    ocr      "What is written in the image?": exact match (``accuracy``, letters and digits
             compared upper-case, spaces and punctuation ignored) and the character error
             rate ``cer`` (edit distance / characters of the truth, over all answers;
             ``character_error_rate``). Small text needs pixels: ``ShapesConfig.text_height``
    draw     text -> image, for models that write pictures (``writes_images``): each
             drawing parsed back into objects (``evaluate_drawing``)

Beyond ``evaluate``'s tasks, two evaluations that need more than a question:

    retrieval   image <-> text R@1 in a BLIP-2 Q-Former's ITC space (``retrieval``)
    few-shot    interleaved documents with 0, 2, 4 solved examples before the query
                image (Flamingo, KOSMOS-1, PaLM-E: ``evaluate_few_shot``)

How an answer is read is a choice that changes the score (``parser``, ``PARSERS``):

    strict   the exact string ("Red." is wrong when the answer is "red")
    lenient  ``normalize_answer`` on both sides (case, punctuation, articles, "two" == "2"); the default
    judge    a model-free judge: reads the scene-graph facts out of free text ("The star is
             red, I think." -> colour red; "There is no blue square." -> no), as an LLM judge
             would, but by rules anyone can read (``judge_answer``)

``parser_ranking`` scores several models with every parser: the ranking may flip.
``answer_loss`` is the other way to score a model: its training loss (nats per answer token)
on the true answers, no generation; across checkpoints it says how far the loss is a stand-in
for accuracy (notebook 09).
``text_metrics`` measures the language model alone (perplexity on held-out ShapesWorld text
and its reading accuracy): before and after image training, it shows what the LM forgot.

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
from typing import Any, Sequence

import torch
from torch import Tensor

from mmkit.language import IMAGE_TOKEN

__all__ = ["evaluate", "vqa_match", "TASKS", "character_error_rate", "edit_distance", "strip_images", "describe_images",
           "model_world", "evaluate_drawing",
           "itc_embed", "retrieval", "few_shot_record", "evaluate_few_shot", "FEW_SHOT_TASKS", "compare_few_shot",
           "PARSERS", "caption_scores", "judge_answer", "answer_correct", "says_yes", "pope_by_type", "parser_ranking", "text_metrics",
           "answer_loss"]

TASKS = ("vqa", "pope", "ground", "caption", "ocr", "draw")


def model_world(model, image_size: int | None = None, **config):
    """The ShapesWorld a model was trained in: image size, ``Recipe.shapes`` settings and seed
    from ``model.recipe`` (64 px, defaults and seed 0 without one); ``config`` overrides."""
    from mmkit.data.shapes import ShapesConfig, ShapesWorld

    recipe = getattr(model, "recipe", None)
    size = image_size or getattr(recipe, "image_size", 64)
    cfg = {"image_size": size, **(getattr(recipe, "shapes", {}) or {}), **config}
    return ShapesWorld(ShapesConfig(**cfg), seed=getattr(recipe, "seed", 0))


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


def vqa_match(prediction: str, truth: str) -> bool:
    """VQA scoring's one rule: exact match after ``normalize_answer`` (case, punctuation,
    articles, spelling variants: "The Red." matches "red", "two" matches "2")."""
    from mmkit.data.shapes import normalize_answer

    return normalize_answer(prediction) == normalize_answer(truth)


# ------------------------------------------------------------------ reading answers
PARSERS = ("strict", "lenient", "judge")
_NEGATIONS = {"no", "not", "none", "nothing", "neither", "nor", "never", "isn", "aren", "false"}
_AFFIRMATIONS = {"yes", "true", "correct", "indeed"}


def judge_answer(prediction: str, record: dict) -> str | None:
    """A model-free judge: the answer a free-text reply gives, read as scene-graph facts.

    The question type (``record["meta"]``) says which fact to look for: a colour, a shape,
    a number, or yes / no. "The star is red." -> "red"; "I count two of them" -> "2";
    "There is no blue square." -> "no"; "Yes, to the left." -> "yes". Returns the answer in
    ``normalize_answer`` form, or None when the reply states no such fact or several
    (an answer that hedges, "red or blue", is not given credit).
    """
    from mmkit.data.shapes import COLORS, normalize_answer, parse_caption
    from mmkit.data.shapes.text import _SHAPE_WORDS

    meta = record.get("meta", {})
    qtype = meta.get("qtype") or meta.get("task")
    words = normalize_answer(prediction.replace("'", " ")).split()
    if qtype == "color":
        found = {w for w in words if w in COLORS}
    elif qtype == "shape":
        found = {_SHAPE_WORDS[w] for w in words if w in _SHAPE_WORDS}
    elif qtype == "count":
        found = {next((w for w in words if w.isdigit()), None)} - {None}
    elif qtype in ("exists", "relation", "pope"):
        first = next((w for w in words if w in _NEGATIONS | _AFFIRMATIONS), None)
        if first is not None:
            return "no" if first in _NEGATIONS else "yes"
        target = meta.get("target")  # "There is a red star." states the fact without a yes
        said = {(c, sh) for _size, c, sh in parse_caption(prediction)}
        return "yes" if target is not None and tuple(target) in said else None
    else:
        return normalize_answer(prediction)
    return found.pop() if len(found) == 1 else None


def answer_correct(prediction: str, record: dict, parser: str = "lenient") -> bool:
    """Is ``prediction`` the record's answer, read by ``parser`` (one of ``PARSERS``)?"""
    from mmkit.data.shapes import normalize_answer

    gold = _answer(record)
    if parser == "strict":
        return prediction == gold
    if parser == "lenient":
        return vqa_match(prediction, gold)
    if parser == "judge":
        return judge_answer(prediction, record) == normalize_answer(gold)
    raise ValueError(f"unknown parser {parser!r}; choose from {', '.join(PARSERS)}")


def says_yes(prediction: str, record: dict, parser: str = "lenient") -> bool:
    """Did a yes/no reply say yes? strict: exactly "yes"; lenient: starts with yes after
    normalisation; judge: ``judge_answer``."""
    from mmkit.data.shapes import normalize_answer

    if parser == "strict":
        return prediction == "yes"
    if parser == "lenient":
        return normalize_answer(prediction).startswith("yes")
    if parser == "judge":
        return judge_answer(prediction, {**record, "meta": {**record.get("meta", {}), "qtype": "pope"}}) == "yes"
    raise ValueError(f"unknown parser {parser!r}; choose from {', '.join(PARSERS)}")


def _vqa_metrics(records, preds, parser: str = "lenient") -> dict[str, Any]:
    per: dict[str, list[int]] = defaultdict(list)
    for r, p in zip(records, preds):
        per[r.get("meta", {}).get("qtype", "all")].append(int(answer_correct(p, r, parser)))
    allv = [v for vs in per.values() for v in vs]
    return {
        "accuracy": sum(allv) / max(1, len(allv)),
        "per_type": {k: sum(v) / len(v) for k, v in sorted(per.items())},
        "count_per_type": {k: len(v) for k, v in sorted(per.items())},
    }


def _yes_no_scores(records, preds, parser: str) -> dict[str, Any]:
    from mmkit.data.shapes import normalize_answer

    tp = fp = tn = fn = 0
    yes = 0
    for r, p in zip(records, preds):
        gt = normalize_answer(_answer(r)) == "yes"
        pr = says_yes(p, r, parser)
        yes += pr
        tp += gt and pr
        fp += (not gt) and pr
        tn += (not gt) and (not pr)
        fn += gt and (not pr)
    n = max(1, len(records))
    precision = tp / max(1, tp + fp)
    recall = tp / max(1, tp + fn)
    f1 = 2 * precision * recall / max(1e-9, precision + recall)
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1, "yes_ratio": yes / n,
            "n": len(records)}


def pope_by_type(records, preds, parser: str = "lenient") -> dict[str, dict[str, Any]]:
    """POPE's scores for each way of drawing the negatives (``random``, ``popular``,
    ``adversarial``, from ``meta["pope_type"]``): pooled, an easy split hides a hard one."""
    from mmkit.data.shapes import POPE_TYPES

    out = {}
    for kind in POPE_TYPES:
        rows = [(r, p) for r, p in zip(records, preds) if r["meta"].get("pope_type") == kind]
        if rows:
            out[kind] = _yes_no_scores([r for r, _ in rows], [p for _, p in rows], parser)
    return out


def _pope_metrics(records, preds, parser: str = "lenient") -> dict[str, Any]:
    out = _yes_no_scores(records, preds, parser)
    out.pop("n")
    out["per_type"] = pope_by_type(records, preds, parser)
    return out


def _ground_metrics(records, preds, parser: str = "lenient") -> dict[str, Any]:
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


def _caption_metrics(records, preds, parser: str = "lenient") -> dict[str, Any]:
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


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions from a to b."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _ocr_text(text: str) -> str:
    """What OCR is scored on: letters and digits, upper-case ("kx 7." -> "KX7")."""
    return "".join(c for c in str(text).upper() if c.isalnum())


def character_error_rate(predictions: Sequence[str], truths: Sequence[str]) -> float:
    """Edits needed to turn the predictions into the truths, over the truths' characters
    (letters and digits, upper-case): 0 is perfect, 1 as many errors as characters (can
    exceed 1 when a model writes too much)."""
    edits = sum(edit_distance(_ocr_text(p), _ocr_text(t)) for p, t in zip(predictions, truths))
    return edits / max(1, sum(len(_ocr_text(t)) for t in truths))


def _ocr_metrics(records, preds, parser: str = "lenient") -> dict[str, Any]:
    # OCR has one reading rule of its own (letters and digits, upper-case): ``parser`` is unused
    truths = [_answer(r) for r in records]
    exact = [int(_ocr_text(p) == _ocr_text(t)) for p, t in zip(preds, truths)]
    return {"accuracy": sum(exact) / max(1, len(exact)), "cer": character_error_rate(preds, truths)}


def caption_scores(records, captions: Sequence[str]) -> dict[str, Any]:
    """Object precision / recall / F1 and CHAIR_i of ``captions`` against the records' scenes:
    the caption metrics of ``evaluate``, for any text (a model's, or a data set's own captions)."""
    return _caption_metrics(records, captions)


_METRICS = {"vqa": _vqa_metrics, "pope": _pope_metrics, "ground": _ground_metrics, "caption": _caption_metrics,
            "ocr": _ocr_metrics}


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
    parser: str = "lenient",
) -> dict[str, Any]:
    """Score ``model`` on ``n`` ShapesWorld ``split`` samples of ``task``.

    Returns a flat dict: ``task``, ``split``, ``n``, ``blind``, ``seconds`` and the
    task's metrics (see the module docstring); ``oracle`` when asked with descriptions.
    ``parser`` (vqa, pope): how an answer is read, one of ``PARSERS``.
    """
    if parser not in PARSERS:
        raise ValueError(f"unknown parser {parser!r}; choose from {', '.join(PARSERS)}")
    if blind and oracle:
        raise ValueError("evaluate: blind (no image) and oracle (a description instead of the image) "
                         "exclude each other; pick one")
    if task == "draw":  # the other direction: the model answers with a picture
        if not getattr(model, "writes_images", False):
            raise ValueError("task 'draw' needs a model that writes images (a native model such as "
                             "unified-tiny); this one only reads them")
        return evaluate_drawing(model, n=n, split=split, world=world, batch_size=batch_size)
    if task not in _METRICS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    world = world or model_world(model)
    shapes_task = "caption" if task == "caption" else task
    records = _records(shapes_task, split, n, world)
    if oracle:
        asked = [describe_images(r, world) for r in records]
    else:
        asked = [strip_images(r) for r in records] if blind else records
    if max_new_tokens is None:
        max_new_tokens = {"vqa": 6, "pope": 4, "ground": 32, "caption": 40, "ocr": 8}[task]
    t0 = time.perf_counter()
    preds = _generate(model, asked, batch_size, max_new_tokens)
    out = {"task": task, "split": split, "n": len(records), "blind": blind}
    if oracle:
        out["oracle"] = True
    if parser != "lenient":
        out["parser"] = parser
    out.update(_METRICS[task](records, preds, parser))
    out["seconds"] = round(time.perf_counter() - t0, 2)
    if return_predictions:
        out["predictions"] = [
            {"id": r["id"], "question": r["conversations"][0]["value"], "answer": _answer(r), "prediction": p}
            for r, p in zip(records, preds)
        ]
    return out


# ------------------------------------------------------------------ drawing (text -> image)
def evaluate_drawing(model, *, n: int = 100, split: str = "test", world=None, batch_size: int = 16,
                     image_temperature: float = 1.0, seed: int = 0, return_samples: int = 0) -> dict[str, Any]:
    """Text -> image: ask for ``n`` ShapesWorld "draw" prompts and check each picture.

    The checker (``mmkit.native.checker.check_drawing``) parses the drawing back into
    objects with the scene renderer's own colours and shapes. Returns ``ok`` (share of
    drawings in which every described object is found: colour and shape), ``object_recall``
    (share of described objects found), ``color_recall`` (share of described objects whose
    colour appears in the drawing, whatever the shape), ``drawn`` (share of replies holding a picture),
    ``extra`` (objects drawn but not asked for, per drawing) and optionally
    ``samples``: ``return_samples`` dicts ``{"prompt", "image", "truth", "found", "ok"}``.
    """
    from mmkit.native.checker import check_drawing

    world = world or model_world(model, image_size=model.image_size[0])
    torch.manual_seed(seed)  # the pictures are sampled: the same seed gives the same drawings
    records = [world.sample(split, i, "draw") for i in range(n)]
    prompts = [{**r, "image": None, "conversations": r["conversations"][:1]} for r in records]
    replies: list[dict] = []
    for s in range(0, n, batch_size):
        replies += model.generate(records=prompts[s:s + batch_size], max_new_tokens=4,
                                  image_temperature=image_temperature, return_images=True)
    ok = found = wanted = drawn = extra = colours = 0
    samples = []
    for r, rep in zip(records, replies):
        scene = r["meta"]["scene"]
        wanted += len(scene.objects)
        if not rep["images"]:
            if len(samples) < return_samples:
                samples.append({"prompt": r["meta"]["prompt"], "image": None, "truth": r["image"],
                                "found": [], "ok": False})
            continue
        drawn += 1
        res = check_drawing(rep["images"][0], scene)
        ok += bool(res["ok"])
        found += len(res["found"])
        drawn_colours = {o["color"] for o in res["objects"]}
        colours += sum(o.color in drawn_colours for o in scene.objects)
        extra += len(res["extra"])
        if len(samples) < return_samples:
            samples.append({"prompt": r["meta"]["prompt"], "image": rep["images"][0], "truth": r["image"],
                            "found": res["found"], "ok": bool(res["ok"])})
    out = {"task": "draw", "split": split, "n": n, "ok": ok / max(1, n), "object_recall": found / max(1, wanted),
           "color_recall": colours / max(1, wanted), "drawn": drawn / max(1, n), "extra": extra / max(1, drawn)}
    if return_samples:
        out["samples"] = samples
    return out


# ------------------------------------------------------------------ retrieval (BLIP-2 ITC)
@torch.no_grad()
def itc_embed(model, images: list, captions: list[str]) -> tuple[Tensor, Tensor]:
    """A BLIP-2 model's ITC vectors for PIL images and caption strings: (N, Q, E) and (M, E)."""
    from mmkit.data.processor import pad_rows

    ids = [model.tokenizer(c, add_special_tokens=False)["input_ids"] for c in captions]
    end = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    max_len = model.bridge.qformer.config.max_position_embeddings - 1
    text, mask = pad_rows([(i + [end])[:max_len] for i in ids])
    device = next(model.bridge.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the same inputs always give the same vectors
    try:
        feats = model.image_features(model.preprocess(images).to(device))  # (N, P, D_v)
        # the uni-modal mask keeps the two apart, so they can be encoded in separate
        # passes of any sizes (the test checks this equals the joint ITC pass)
        return model.bridge.image_itc(feats), model.bridge.text_itc(text.to(device), mask.to(device))
    finally:
        model.train(was_training)


def retrieval(model, n: int = 100, split: str = "test", world=None, start: int = 0) -> dict[str, Any]:
    """Image <-> text retrieval on ``n`` held-out ShapesWorld caption pairs (ITC similarity).

    Returns R@1 both ways among the ``n`` candidates, and the (n, n) similarity matrix.
    """
    world = world or model_world(model)
    records = [world.sample(split, start + i, task="caption") for i in range(n)]
    images = [r["image"] for r in records]
    captions = [r["conversations"][-1]["value"] for r in records]
    z, t = itc_embed(model, images, captions)
    with torch.no_grad():
        sim = model.bridge.similarity(z, t).cpu()  # (n, n)
    same = torch.tensor([[a == b for b in captions] for a in captions])  # equal captions both count
    i2t = same[torch.arange(n), sim.argmax(1)].float().mean().item()
    t2i = same[sim.argmax(0), torch.arange(n)].float().mean().item()
    return {"i2t_r1": i2t, "t2i_r1": t2i, "n": n, "similarity": sim, "captions": captions, "images": images}


# ------------------------------------------------------------------ few-shot (interleaved documents)
#: Few-shot tasks. "vqa": the interleaved question format of training ("Question: ..
#: Answer: .."). "color" / "shape" / "size": an answer format never trained: single-object
#: pictures labelled with one word, the object's colour (or shape, or size: "small" /
#: "large", a word no training answer is on its own); no question says which, so only the
#: solved examples can tell the model what is asked.
FEW_SHOT_TASKS = ("vqa", "color", "shape", "size")
_SHOT_OFFSET = 1_000_000  # shots come from indices far from the queries'


def few_shot_record(world, split: str, index: int, shots: int, task: str = "color") -> dict:
    """An interleaved prompt: ``shots`` solved examples, then the query image (Flamingo Sec. 3).

    The query of ``(split, index)`` is the same for every shot count, so accuracies at 0, 2
    and 4 shots differ only by the examples. Single-object worlds make "color"/"shape"
    unambiguous; pass ``ShapesWorld(ShapesConfig(min_objects=1, max_objects=1))``.
    """
    if task not in FEW_SHOT_TASKS:
        raise ValueError(f"few-shot task must be one of {FEW_SHOT_TASKS}, got {task!r}")
    shot_ids = [_SHOT_OFFSET + index * 8 + j for j in range(shots)]
    if task == "vqa":
        query = world.sample(split, index, "vqa")
        qtype = query["meta"]["qtype"]
        examples = [world.sample(split, i, "vqa", qtype=qtype) for i in shot_ids]
        question = lambda r: r["conversations"][0]["value"].replace("<image>\n", "")  # noqa: E731
        doc = "".join(f"<image>\nQuestion: {question(r)} Answer: {r['meta']['answer']}\n" for r in examples)
        doc += f"<image>\nQuestion: {question(query)} Answer:"
        answer = query["meta"]["answer"]
        images = [r["image"] for r in examples] + [query["image"]]
    else:
        scenes = [world.scene(split, i) for i in shot_ids] + [world.scene(split, index)]
        if any(len(s.objects) != 1 for s in scenes):
            raise ValueError(f"few-shot task {task!r} needs single-object scenes: use a world with "
                             "ShapesConfig(min_objects=1, max_objects=1)")
        labels = [getattr(s.objects[0], task) for s in scenes]
        doc = "".join(f"<image>\n{a}\n" for a in labels[:-1]) + "<image>\n"
        answer, images = labels[-1], [world.render(s) for s in scenes]
    return {"id": f"{split}/{index}/fewshot-{task}-{shots}", "images": images,
            "conversations": [{"from": "human", "value": doc}, {"from": "gpt", "value": answer}],
            "meta": {"task": task, "shots": shots, "answer": answer}}


def evaluate_few_shot(model, task: str = "color", shots: Sequence[int] = (0, 2, 4), *, n: int = 100,
                      split: str = "test", world=None, batch_size: int = 16, max_new_tokens: int = 6,
                      return_predictions: bool = False) -> dict[str, Any]:
    """Accuracy per shot count on ``n`` queries (greedy answers, normalised exact match).

    Only the first line of each answer counts (the examples end their answers there).
    Returns ``{"task", "n", "accuracy": {shots: acc}, "format": {shots: share}}`` where
    ``format`` is the share of answers that are one word of the asked kind (a colour for
    "color", a shape for "shape", a size for "size"; for "vqa" any single word): did the model pick up the
    answer format from the examples, right or wrong?
    """
    from mmkit.data.shapes import COLORS, SHAPES, SIZES, normalize_answer

    if world is None:
        world = model_world(model) if task == "vqa" else model_world(model, min_objects=1, max_objects=1)
    kind = {"color": set(COLORS), "shape": set(SHAPES), "size": set(SIZES)}.get(task)
    out: dict[str, Any] = {"task": task, "n": n, "accuracy": {}, "format": {}}
    preds_all = {}
    for k in shots:
        records = [few_shot_record(world, split, i, k, task) for i in range(n)]
        preds = []
        for s in range(0, n, batch_size):
            preds += model.generate(records=records[s:s + batch_size], max_new_tokens=max_new_tokens)
        gold = [normalize_answer(r["meta"]["answer"]) for r in records]
        # an answer ends its line: a document model goes on writing the document after it
        # ("red\n<image>..."), so only the first line is the answer (Flamingo's stop sequence)
        got = [normalize_answer(p.strip().split("\n")[0]) for p in preds]
        out["accuracy"][k] = sum(g == p for g, p in zip(gold, got)) / max(1, n)
        one_word = [p for p in got if len(p.split()) == 1]
        out["format"][k] = sum(1 for p in one_word if kind is None or p in kind) / max(1, n)
        preds_all[k] = [{"id": r["id"], "answer": r["meta"]["answer"], "prediction": p} for r, p in zip(records, preds)]
    if return_predictions:
        out["predictions"] = preds_all
    return out


def compare_few_shot(models: dict[str, Any], task: str = "size", shots: Sequence[int] = (0, 2, 4), *,
                     n: int = 100, split: str = "test", world=None, batch_size: int = 16) -> dict[str, dict]:
    """In-context learning of several models on the *same* few-shot documents.

    ``models``: ``{"llava-tiny": m1, "flamingo-tiny": m2, "kosmos-tiny": m3}``. A shallow-fusion
    model (LLaVA: image tokens in the input, trained on single-image chats), a deep-fusion one
    (Flamingo: cross-attention inside a frozen LM) and a native one (KOSMOS-1: trained on
    interleaved documents) read identical prompts (one world for all, 64 px unless ``world``
    says otherwise). Each model may use its LM's whole context window (a 4-shot prompt costs
    LLaVA 5 x 64 image tokens, more than its training max_length). Returns
    ``{name: evaluate_few_shot(...) + {"prompt_tokens": tokens of the longest prompt}}``.
    """
    from mmkit.data.shapes import ShapesConfig, ShapesWorld
    from mmkit.native.interleaved import token_budget

    if not models:
        raise ValueError("compare_few_shot: pass at least one model, e.g. {'llava-tiny': model}")
    if world is None:
        single = {} if task == "vqa" else {"min_objects": 1, "max_objects": 1}
        world = ShapesWorld(ShapesConfig(image_size=64, **single), seed=0)
    out = {}
    for name, m in models.items():
        proc = m.processor
        limit = proc.max_length
        proc.max_length = max(limit, getattr(getattr(m.lm, "config", None), "max_position_embeddings", limit))
        try:
            out[name] = evaluate_few_shot(m, task, shots, n=n, split=split, world=world, batch_size=batch_size)
        finally:
            proc.max_length = limit
        longest = few_shot_record(world, split, 0, max(shots), task)
        out[name]["prompt_tokens"] = token_budget(m, longest)["total"]
    return out


# ------------------------------------------------------------------ how the answer is read
def parser_ranking(models: dict[str, Any], task: str = "vqa", *, n: int = 200, split: str = "test",
                   parsers: Sequence[str] = PARSERS, batch_size: int = 32, world=None) -> dict[str, Any]:
    """Score every model with every parser on the same questions, and rank them per parser.

    Each model answers once (greedy); its answers are then read by each parser. Returns
    ``{"scores": {model: {parser: accuracy}}, "ranking": {parser: [best model, ...]},
    "flipped": bool}``: ``flipped`` is True when two parsers do not agree on the order, i.e.
    the leaderboard measures the answer *format* as much as the model.
    """
    if task not in ("vqa", "pope"):
        raise ValueError(f"parser_ranking compares yes/no and short answers: task 'vqa' or 'pope', got {task!r}")
    bad = [p for p in parsers if p not in PARSERS]
    if bad:
        raise ValueError(f"unknown parser(s) {bad}; choose from {', '.join(PARSERS)}")
    scores: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        w = world or model_world(model)
        records = _records(task, split, n, w)
        preds = _generate(model, records, batch_size, {"vqa": 12, "pope": 12}[task])
        scores[name] = {p: _METRICS[task](records, preds, p)["accuracy"] for p in parsers}
    ranking = {p: sorted(scores, key=lambda m: -scores[m][p]) for p in parsers}
    orders = {tuple(r) for r in ranking.values()}
    return {"task": task, "n": n, "scores": scores, "ranking": ranking, "flipped": len(orders) > 1}


# ------------------------------------------------------------------ loss as a metric
@torch.no_grad()
def answer_loss(model, task: str = "vqa", *, split: str = "test", n: int = 200, batch_size: int = 32,
                world=None) -> float:
    """The model's loss on the true answers of ``n`` ``split`` records of ``task``: the mean
    next-token cross-entropy over every answer token (nats per token), teacher-forced, the
    number the training loss reports, on held-out data. No text is generated, so it is cheap
    and smooth; but a model can lower it by being less wrong on answers it still gets wrong,
    which exact-match accuracy does not reward."""
    from mmkit.data.processor import IGNORE_INDEX

    world = world or model_world(model)
    records = _records(task, split, n, world)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    try:
        for i in range(0, len(records), batch_size):
            batch = {k: (v.to(device) if torch.is_tensor(v) else v)
                     for k, v in model.processor(records[i:i + batch_size]).items() if k != "ids"}
            k = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            nll += float(model(**batch)["loss"]) * k
            tokens += k
    finally:
        model.train(was_training)
    if not tokens:
        raise ValueError(f"answer_loss: no answer tokens in {len(records)} {task!r} records")
    return nll / tokens


# ------------------------------------------------------------------ the language model alone
def text_metrics(model, *, n: int = 200, ppl_n: int = 200, world=None, batch_size: int = 32) -> dict[str, Any]:
    """What the VLM's language model can still do with text alone (catastrophic forgetting).

    ``perplexity``: on ``ppl_n`` held-out ShapesWorld text documents (``val`` split of the LM's
    own pre-training corpus, ``mmkit.pretrain.lm.lm_corpus``), lower is better; ``reading_vqa``
    (+ per type): ``n`` test questions answered from the scene's text description
    (``evaluate(..., oracle=True)``, as ``zoo.reading_accuracy`` measures the base LM).
    Call it before and after stage 2: Flamingo keeps its LM frozen because fine-tuning it
    cost 8-13% on text (Alayrac et al. 2022), EVE mixes text-only data back in.
    """
    from mmkit.data.shapes import ShapesWorld
    from mmkit.pretrain.lm import lm_corpus, perplexity

    world = world or ShapesWorld()
    ppl = perplexity(model.lm, model.tokenizer, lm_corpus(world, "val", ppl_n))
    reading = evaluate(model, "vqa", n=n, oracle=True, batch_size=batch_size, world=world)
    return {"perplexity": ppl, "reading_vqa": reading["accuracy"], "reading_per_type": reading["per_type"],
            "n": n, "ppl_n": ppl_n}
