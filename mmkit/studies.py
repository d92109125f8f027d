"""Controlled experiments on the rest of the pipeline: the data and the training recipe.

Each study trains llava-tiny several times, changing one thing, and measures the same
things after each run (``mmkit study NAME``, notebook 09, docs/benchmarks.md):

    captions     stage 1's caption style (``ShapesConfig.caption_style``): web alt-text
                 (noisy), brief, detailed (re-captioned) -> VQA, CHAIR_i and recall on
                 captions, POPE. SEEChat cleaned its captions; ShareGPT4V and CapsFusion
                 re-captioned theirs: data quality over quantity.
    forgetting   what stage 2 trains in the LM: nothing (frozen, as Flamingo), LoRA
                 adapters, every weight, or every weight with a text-only share in the mix
                 (EVE's remedy) -> VQA with the image, and the LM's own text metrics
                 (``mmkit.eval.text_metrics``) against the base LM before stage 2.
    loss         one llava-tiny run, measured at checkpoints: the loss on held-out answers
                 (``mmkit.eval.answer_loss``) beside VQA accuracy. Is the loss a metric?

``steps`` (and ``batch_size``) scale every run to that many optimizer steps (``recipes.scale_budget``) so a study
fits a budget: seconds in tests, minutes on a laptop, the recipe's own budget with None.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

__all__ = ["caption_style_study", "forgetting_study", "loss_study", "FORGETTING_MODES", "FORGETTING_LABELS"]

#: stage 2's LM setting -> recipe overrides of llava-tiny. "text": the full fine-tune with a
#: quarter of stage 2's records given as text only (``Stage.text_share``: the picture replaced
#: by the scene's description), as EVE mixes text-only data back in.
FORGETTING_MODES: dict[str, list[str]] = {
    "frozen": ['stages.1.train=["bridge"]'],
    "lora": ['lora={"r": 8, "alpha": 16, "dropout": 0.0}', 'stages.1.train=["bridge", "lora"]',
             'stages.1.lr_groups={"lora": 0.002}'],
    "full": [],
    "text": ["stages.1.text_share=0.25"],
}
FORGETTING_LABELS = {"frozen": "bridge (LM frozen)", "lora": "bridge + LoRA", "full": "bridge + whole LM",
                     "text": "bridge + whole LM, 25% text-only"}


def _train(recipe, out: Path, seed_name: str, callbacks: Sequence[Any] = ()):
    import torch

    from mmkit.train import Trainer
    from mmkit.vlm import build_model

    torch.manual_seed(recipe.seed)
    model = build_model(recipe)
    t0 = time.perf_counter()
    Trainer(model, recipe, out / seed_name, progress=False, callbacks=list(callbacks)).train(resume=False)
    return model, time.perf_counter() - t0


def _budget(recipe, steps: int | None, batch_size: int | None = None):
    from mmkit.recipes import scale_budget

    return recipe if steps is None and batch_size is None else scale_budget(recipe, steps or recipe.total_steps(), batch_size)


def caption_style_study(styles: Sequence[str] | None = None, *, steps: int | None = None, n: int = 300,
                        out: str | Path = "runs/study-captions", batch_size: int | None = None) -> list[dict[str, Any]]:
    """llava-tiny trained once per caption style; one row per style: VQA accuracy, caption
    CHAIR_i / recall / F1 (objects parsed from its captions against the scene), POPE F1 and
    yes-ratio, training seconds. Every run sees the same images and questions: only the
    captions' words differ."""
    from mmkit.data.shapes import CAPTION_STYLES
    from mmkit.eval import evaluate
    from mmkit.recipes import apply_overrides, get_recipe

    styles = list(styles or CAPTION_STYLES)
    bad = [s for s in styles if s not in CAPTION_STYLES]
    if bad:
        raise ValueError(f"caption_style_study: unknown style(s) {bad}; choose from {CAPTION_STYLES}")
    rows = []
    for style in styles:
        recipe = apply_overrides(_budget(get_recipe("llava-tiny"), steps, batch_size), [f'shapes={{"caption_style": "{style}"}}'])
        model, seconds = _train(recipe, Path(out), style)
        vqa, cap, pope = (evaluate(model, t, n=n) for t in ("vqa", "caption", "pope"))
        rows.append({"caption_style": style, "vqa": vqa["accuracy"], "chair_i": cap["chair_i"],
                     "caption_recall": cap["recall"], "caption_f1": cap["f1"], "pope_f1": pope["f1"],
                     "pope_yes_ratio": pope["yes_ratio"], "steps": recipe.total_steps(),
                     "train_seconds": round(seconds, 1)})
    return rows


def forgetting_study(modes: Sequence[str] | None = None, *, steps: int | None = None, n: int = 300,
                     out: str | Path = "runs/study-forgetting", batch_size: int | None = None) -> list[dict[str, Any]]:
    """llava-tiny with stage 2 training the LM frozen / with LoRA / fully / fully with a
    text-only share (``FORGETTING_MODES``); the first row is
    the base LM before any image training. Columns: VQA with the image (not for the base),
    the LM's held-out text perplexity and its reading accuracy (``text_metrics``)."""
    from mmkit.eval import evaluate, text_metrics
    from mmkit.recipes import apply_overrides, get_recipe
    from mmkit.vlm import build_model

    modes = list(modes or FORGETTING_MODES)
    bad = [m for m in modes if m not in FORGETTING_MODES]
    if bad:
        raise ValueError(f"forgetting_study: unknown mode(s) {bad}; choose from {list(FORGETTING_MODES)}")
    base = text_metrics(build_model(get_recipe("llava-tiny")), n=n, ppl_n=n)
    rows = [{"stage 2 trains": "(base LM, before stage 2)", "vqa": None, "perplexity": base["perplexity"],
             "reading_vqa": base["reading_vqa"]}]
    for mode in modes:
        recipe = apply_overrides(_budget(get_recipe("llava-tiny"), steps, batch_size), FORGETTING_MODES[mode])
        model, seconds = _train(recipe, Path(out), mode)
        text = text_metrics(model, n=n, ppl_n=n)
        rows.append({"stage 2 trains": FORGETTING_LABELS[mode],
                     "vqa": evaluate(model, "vqa", n=n)["accuracy"], "perplexity": text["perplexity"],
                     "reading_vqa": text["reading_vqa"], "steps": recipe.total_steps(),
                     "train_seconds": round(seconds, 1)})
    return rows


def loss_study(*, steps: int | None = None, n: int = 300, points: int = 9, out: str | Path = "runs/study-loss",
               batch_size: int | None = None) -> list[dict[str, Any]]:
    """llava-tiny trained once, measured at ``points`` checkpoints spread over the run: one row
    per checkpoint with the step, the stage, VQA accuracy (per type too) and the loss on the
    true answers of the same ``n`` test questions (``answer_loss``: teacher-forced, nothing
    generated). Plotted against each other they show where the loss tracks accuracy and where
    it does not (``viz.plot_curves({"run": {loss: accuracy}})``, notebook 09)."""
    from mmkit.callbacks import AccuracyTracker
    from mmkit.recipes import get_recipe

    if points < 2:
        raise ValueError(f"loss_study: points={points}; give at least 2 checkpoints")
    recipe = _budget(get_recipe("llava-tiny"), steps, batch_size)
    total = recipe.total_steps()
    at = sorted({max(1, round(total * k / points)) for k in range(1, points + 1)})
    tracker = AccuracyTracker(at, n=n, loss_n=n)
    _train(recipe, Path(out), "llava-tiny", callbacks=[tracker])
    bounds, start = [], 0
    for stage in recipe.stages:
        bounds.append((start + stage.steps, stage.name))
        start += stage.steps
    return [{"step": r["step"], "stage": next(name for end, name in bounds if r["step"] <= end),
             "vqa": r["accuracy"], "answer_loss": r["answer_loss"], **{f"vqa_{k}": v for k, v in r["per_type"].items()}}
            for r in tracker.records]
