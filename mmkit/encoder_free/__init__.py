"""Encoder-free models: the LM reads pixels with no pre-trained vision encoder in front.

    fuyu.py   Fuyu: raw patches -> one Linear -> the LM, a |NEWLINE| token after every
              patch row, any aspect ratio (images padded bottom/right, never resized
              to a square)
    eve.py    EVE: a small Patch Embedding Layer (conv, local and global cross-attention,
              a <CLS> token, a <SPL> token per row) and, during training only, a Patch
              Aligning Layer that pulls the LM's image states towards a frozen CLIP
              encoder's patch features

Both are ``mmkit.vlm.VLM`` subclasses built by ``build_model`` from the recipes
``fuyu-tiny`` / ``eve-tiny`` (families "fuyu" and "eve").
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

__all__ = ["scale_budget", "AccuracyTracker", "train_and_track"]


def scale_budget(recipe, total_steps: int, batch_size: int | None = None):
    """A copy of ``recipe`` whose stages share ``total_steps`` in their original proportions.

    Comparing families "on the same data and budget" means the same number of optimizer
    steps (and batch size) for each; every stage keeps at least one step.
    """
    import copy

    r = copy.deepcopy(recipe)
    old = r.total_steps()
    steps = [max(1, round(s.steps * total_steps / old)) for s in r.stages]
    steps[-1] = max(1, total_steps - sum(steps[:-1]))  # exact total
    for s, n in zip(r.stages, steps):
        s.steps = n
        s.warmup_steps = min(s.warmup_steps, max(1, n // 10))
        if batch_size is not None:
            s.batch_size = batch_size
    return r


def _tracker_base():
    from mmkit.train import Callback

    return Callback


class AccuracyTracker(_tracker_base()):
    """Trainer callback: ``mmkit.eval.evaluate(model, task, n=n)`` at the given global steps.

    ``history`` = {global_step: metric}; steps are counted across stages.
    """

    def __init__(self, at: Sequence[int], task: str = "vqa", n: int = 100, metric: str = "accuracy"):
        self.at, self.task, self.n, self.metric = set(int(a) for a in at), task, n, metric
        self.history: dict[int, float] = {}

    def on_step_end(self, trainer, logs: dict[str, Any]) -> None:
        step = int(logs["global_step"])
        if step in self.at:
            from mmkit.eval import evaluate

            model = trainer.accelerator.unwrap_model(trainer.model)
            self.history[step] = float(evaluate(model, self.task, n=self.n)[self.metric])


def train_and_track(recipe, out_dir: str | Path, at: Sequence[int], *, task: str = "vqa", n: int = 100,
                    progress: bool = False) -> dict[int, float]:
    """Build ``recipe``'s model, train it (fresh, no resume) and return {step: accuracy}.

    Step 0 (before any training) is measured too when 0 is in ``at``.
    """
    from mmkit.eval import evaluate
    from mmkit.train import Trainer
    from mmkit.vlm import build_model

    model = build_model(recipe)
    tracker = AccuracyTracker([a for a in at if a > 0], task=task, n=n)
    if 0 in at:
        tracker.history[0] = float(evaluate(model, task, n=n)[tracker.metric])
    Trainer(model, recipe, out_dir, callbacks=[tracker], progress=progress).train(resume=False)
    return dict(sorted(tracker.history.items()))
