"""Training callbacks: what the notebooks watch while a model trains.

The ``Trainer`` (``mmkit.train``) calls ``on_stage_start``, ``on_step_end`` and
``on_stage_end`` of each callback it is given. This module does not import the trainer,
so a model file can name a callback without pulling the training loop in.

    GateLogger        |tanh(alpha)| of every Flamingo gate over training (Fig. 6)
    AccuracyTracker   ``mmkit.eval.evaluate`` at chosen steps: a learning curve
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["Callback", "StopTraining", "GateLogger", "AccuracyTracker", "CURVE", "GATES", "load_curve", "load_gates", "compute_clock"]

CURVE = "curve.jsonl"  # where `mmkit train --curve` and `mmkit zoo models --curve` keep an AccuracyTracker's records
GATES = "gates.jsonl"  # where a GateLogger keeps the gate values of a Flamingo run (shipped with the model)


class Callback:
    """Override what you need; ``logs`` has stage, step, global_step, loss, lr, ..."""

    def on_stage_start(self, trainer, stage) -> None: ...

    def on_step_end(self, trainer, logs: dict[str, Any]) -> None: ...

    def on_stage_end(self, trainer, stage) -> None: ...


class StopTraining(Exception):
    """Raised by a callback to stop (the last checkpoint stays valid)."""


class GateLogger(Callback):
    """Records |tanh(alpha)| of every gated block during training (Flamingo Fig. 6).

    ``history``: one dict per logged step, ``{"global_step": s, "xattn/0": v, "dense/0": v, ...}``
    (the key's number is the LM layer), also appended to ``OUT/gates.jsonl``.
    ``curves("xattn")`` gives ``{"layer 0": {step: value}}`` for ``mmkit.viz.plot_curves``.
    """

    def __init__(self, every: int = 1, filename: str | None = GATES):
        self.every, self.filename = every, filename
        self.history: list[dict[str, float]] = []

    def _log(self, trainer, step: int) -> None:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if not hasattr(model, "gate_values"):
            raise TypeError("GateLogger needs a FlamingoVLM (a model with gate_values())")
        row: dict[str, float] = {"global_step": step}
        for kind, per_layer in model.gate_values().items():
            row.update({f"{kind}/{i}": v for i, v in per_layer.items()})
        if self.history and self.history[-1]["global_step"] == step:
            return
        self.history.append(row)
        if self.filename and trainer.is_main:
            with open(Path(trainer.out_dir) / self.filename, "a") as f:
                f.write(json.dumps(row) + "\n")

    def on_stage_start(self, trainer, stage) -> None:
        if not self.history:
            self._log(trainer, 0)  # the gates before any step (0 with tanh gating)

    def on_step_end(self, trainer, logs: dict[str, Any]) -> None:
        if logs["global_step"] % self.every == 0:
            self._log(trainer, logs["global_step"])

    def curves(self, kind: str = "xattn") -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for row in self.history:
            for k, v in row.items():
                if k.startswith(kind + "/"):
                    out.setdefault(f"layer {k.split('/')[1]}", {})[int(row["global_step"])] = v
        return out


def compute_clock() -> Callable[[], float]:
    """A clock in *compute seconds*: the process's CPU time divided by its torch threads. On an
    idle machine it runs like the wall clock; when other programs share the cores it does not
    count the time they took, so budgets and curves measured with it stay comparable."""
    import torch

    threads = max(1, torch.get_num_threads())
    return lambda: time.process_time() / threads


class AccuracyTracker(Callback):
    """Trainer callback: ``mmkit.eval.evaluate(model, task, n=n)`` at the given global steps.

    ``history`` = {global_step: metric}; steps are counted across stages. ``records`` holds
    one dict per measurement, ``{"step", "train_seconds", metric, "per_type"}``, where
    ``train_seconds`` is the training time so far without the time spent evaluating: the
    x-axis of a learning curve in minutes (``mmkit.viz.plot_learning_curves``). With a
    ``filename`` each record is also appended to ``OUT/filename`` (JSON lines); a resumed run
    keeps the records before its first step and goes on counting from there.
    ``clock``: what a second is, by default the wall clock; ``compute_clock()`` counts the
    process's CPU time per torch thread instead, which other programs on the machine do not
    stretch (the bake-off's curves use it). ``loss_n`` > 0 also records ``answer_loss``: the
    model's loss on the true answers of that many test records (``mmkit.eval.answer_loss``),
    to set beside the accuracy (is the loss a good stand-in for it?). ``oracle``: ask with the
    scene's description instead of its picture (``evaluate(..., oracle=True)``), the way a
    text-oracle recipe (``Stage.describe``) is trained.
    """

    def __init__(self, at: Sequence[int], task: str = "vqa", n: int = 100, metric: str = "accuracy",
                 filename: str | None = None, clock: Callable[[], float] = time.perf_counter, loss_n: int = 0,
                 oracle: bool = False):
        self.at, self.task, self.n, self.metric = set(int(a) for a in at), task, n, metric
        self.oracle = oracle
        self.loss_n = loss_n
        self.filename = filename
        self.clock = clock
        self.history: dict[int, float] = {}
        self.records: list[dict[str, Any]] = []
        self.train_seconds = 0.0
        self._since: float | None = None
        self._started = False

    @classmethod
    def every(cls, steps: int, total: int, **kwargs: Any) -> "AccuracyTracker":
        """A tracker that measures every ``steps`` steps of a ``total``-step run, and at its end."""
        return cls(sorted(set(range(steps, total + 1, steps)) | {total}), **kwargs)

    def _path(self, trainer) -> Path | None:
        return Path(trainer.out_dir) / self.filename if self.filename else None

    def _start(self, trainer, step: int) -> None:
        """First step of this run: keep what an earlier run measured before ``step``."""
        self._started = True
        path = self._path(trainer)
        if path is None or not trainer.is_main:
            return
        kept = []
        if path.exists():
            kept = [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] < step]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.records = kept
        self.history.update({r["step"]: r[self.metric] for r in kept})
        self.train_seconds = kept[-1]["train_seconds"] if kept else 0.0

    def on_stage_start(self, trainer, stage) -> None:
        self._since = self.clock()

    def on_step_end(self, trainer, logs: dict[str, Any]) -> None:
        now = self.clock()
        step = int(logs["global_step"])
        if not self._started:
            self._start(trainer, step)
        if self._since is not None:
            self.train_seconds += now - self._since
        if step in self.at:
            from mmkit.eval import evaluate

            model = trainer.accelerator.unwrap_model(trainer.model)
            res = evaluate(model, self.task, n=self.n, oracle=self.oracle)
            self.history[step] = float(res[self.metric])
            row = {"step": step, "train_seconds": round(self.train_seconds, 2), self.metric: float(res[self.metric]),
                   "per_type": {k: float(v) for k, v in (res.get("per_type") or {}).items()}}
            if self.loss_n:
                from mmkit.eval import answer_loss

                row["answer_loss"] = round(answer_loss(model, self.task, n=self.loss_n), 4)
            self.records.append(row)
            path = self._path(trainer)
            if path is not None and trainer.is_main:
                with open(path, "a") as f:
                    f.write(json.dumps(row) + "\n")
        self._since = self.clock()


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not a JSON record ({e}); delete the line or retrain") from None
    return rows


def load_curve(folder: str | Path) -> list[dict[str, Any]]:
    """The learning-curve records a run or a shipped model keeps in ``folder/curve.jsonl``."""
    path = Path(folder) / CURVE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no learning curve here; train with `mmkit train --curve N` "
                                "(or `mmkit zoo models --curve N`) to record one")
    return _read_jsonl(path)


def load_gates(folder: str | Path) -> GateLogger:
    """The gate values a Flamingo run or a shipped Flamingo model keeps in ``folder/gates.jsonl``,
    as a ``GateLogger`` (``.curves("xattn")`` / ``.curves("dense")`` for ``viz.plot_curves``)."""
    path = Path(folder) / GATES
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no gate values here; train a Flamingo model with a GateLogger "
                                "callback (`mmkit zoo models` adds one) to record them")
    logger = GateLogger(filename=None)
    logger.history = _read_jsonl(path)
    return logger
