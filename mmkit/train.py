"""One Trainer for every family: stages, optimizer groups, checkpoints that resume exactly.

A recipe is a list of stages (``mmkit.recipes.Stage``). For each stage the Trainer

1. freezes every parameter, then unfreezes the module groups the stage names
   (``model.module_groups()``: ``vision``, ``bridge``, ``lm``; ``lora`` = the LoRA
   adapters inside the LM);
2. builds AdamW with one parameter group per trained module group (each may have its
   own learning rate; no weight decay on biases and norms) and a linear-warmup +
   cosine-decay schedule;
3. runs ``steps`` optimizer steps of ``grad_accum`` micro-batches each, clipping the
   gradient norm, under ``accelerate`` (device placement, mixed precision on GPU,
   several processes with ``accelerate launch``);
4. logs loss / lr / speed to ``metrics.jsonl`` and a tqdm bar, and calls callbacks
   (a later notebook records Flamingo's gate values this way).

Data position is a pure function of (stage, step, micro-step, rank): sample ``i`` of a
batch is ShapesWorld sample number ``offset(stage) + ((step * accum + micro) * world +
rank) * batch + i``. So resuming needs only the step, and a resumed run sees exactly
the samples the uninterrupted run would have seen.

Checkpoints (``OUT/checkpoint/``) hold the recipe (JSON), only the trained weights
(safetensors; LoRA adapters separately, the peft way, in ``adapter/``) and the trainer
state (optimizer, scheduler, RNG, stage, step). They are
written to a temporary folder and swapped in with renames, so a crash mid-write never
leaves a half checkpoint: there is always a complete one (new or old).
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmkit.callbacks import AccuracyTracker, Callback, StopTraining
from mmkit.language import is_adapter_param
from mmkit.recipes import Recipe, Stage

__all__ = [
    "Trainer", "Callback", "TrainData", "save_checkpoint", "load_model", "find_checkpoint",
    "CheckpointError", "trainable_state_dict", "set_trainable", "load_trained_weights", "export_merged",
    "StopTraining", "train_and_track",
]

CKPT = "checkpoint"
WEIGHTS = "model.safetensors"
RECIPE = "recipe.json"
STATE = "trainer_state.pt"
ADAPTER = "adapter"  # peft LoRA adapter folder inside a checkpoint
METRICS = "metrics.jsonl"
STAGE_OFFSET = 10_000_000  # stage k reads ShapesWorld samples from k * STAGE_OFFSET on


class CheckpointError(FileNotFoundError):
    """A checkpoint folder that is missing or incomplete."""


# ----------------------------------------------------------------------------- data
class TrainData:
    """The records of one stage, addressed by (step, micro, rank): no hidden state.

    ShapesWorld (default): an endless, deterministic stream of the stage's task mix.
    A LLaVA-format file (``stage.data``): records in a seeded permutation per epoch.
    """

    def __init__(self, recipe: Recipe, stage: Stage, stage_index: int):
        self.stage = stage
        self.offset = stage_index * STAGE_OFFSET
        self.seed = recipe.seed
        self.records: list[dict] | None = None
        if stage.data:
            from mmkit.data.conversations import load_records

            if stage.describe or stage.text_share:
                raise ValueError(f"stage {stage.name!r}: describe / text_share need ShapesWorld scenes (their "
                                 f"descriptions), not a data file ({stage.data}); remove one of the two")
            self.records = load_records(stage.data, stage.image_folder, **stage.data_options)
            if not self.records:
                raise ValueError(f"{stage.data}: no usable records")
        else:
            from mmkit.data.shapes import ShapesConfig, ShapesWorld

            cfg = ShapesConfig(**{"image_size": recipe.image_size, **recipe.shapes, **stage.shapes})
            self.world = ShapesWorld(cfg, seed=recipe.seed)

    def batch(self, step: int, micro: int, rank: int = 0, world_size: int = 1) -> list[dict]:
        B = self.stage.batch_size
        start = ((step * self.stage.grad_accum + micro) * world_size + rank) * B
        if self.records is None:
            records = self.world.samples("train", self.stage.tasks, self.offset + start, B)
            from mmkit.eval import describe_images

            if self.stage.describe:  # the text oracle: each picture replaced by its description
                records = [describe_images(r, self.world) for r in records]
            elif self.stage.text_share:  # a seeded draw per record, the same on every resume
                drawn = np.random.default_rng([self.seed, self.offset + start]).random(B) < self.stage.text_share
                records = [describe_images(r, self.world) if d and _one_scene(r) else r for r, d in zip(records, drawn)]
            return records
        N = len(self.records)
        out = []
        for i in range(start, start + B):
            epoch, j = divmod(i, N)
            perm = np.random.default_rng([self.seed, epoch]).permutation(N)
            out.append(self.records[int(perm[j])])
        return out


def _one_scene(record: dict) -> bool:
    """A one-image ShapesWorld record whose picture words can replace (not multi-image, not a drawing)."""
    meta = record.get("meta", {})
    return meta.get("scene") is not None and meta.get("task") != "draw" and record.get("image") is not None


# ------------------------------------------------------------------------ trainable
def set_trainable(model: nn.Module, groups: Sequence[str]) -> list[str]:
    """Freeze everything, then unfreeze the named module groups; returns trained names."""
    for p in model.parameters():
        p.requires_grad_(False)
    module_groups = model.module_groups()
    for g in groups:
        if g == "lora":
            hits = 0
            for n, p in model.named_parameters():
                if is_adapter_param(n):
                    p.requires_grad_(True)
                    hits += 1
            if not hits:
                raise ValueError("stage trains 'lora' but the model has no LoRA adapters; set recipe.lora")
            continue
        if g not in module_groups:
            raise ValueError(f"unknown module group {g!r}; this model has {sorted(module_groups)} and 'lora'")
        for p in module_groups[g].parameters():
            if p.is_floating_point():
                p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _group_of(name: str, groups: dict[str, nn.Module]) -> str:
    if is_adapter_param(name):
        return "lora"
    for g in groups:
        if name.startswith(g + "."):
            return g
    return "other"


def trainable_state_dict(model: nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    return {n: sd[n].detach().cpu().contiguous() for n in sorted(names) if n in sd}


# ---------------------------------------------------------------------- checkpoints
def _atomic_dir_swap(tmp: Path, final: Path) -> None:
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def save_checkpoint(
    out_dir: str | Path,
    model: nn.Module,
    recipe: Recipe,
    trained_names: set[str],
    state: dict[str, Any] | None = None,
) -> Path:
    """Write ``out_dir/checkpoint`` atomically: recipe + trained weights (+ trainer state)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / CKPT
    tmp = out_dir / f"{CKPT}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    (tmp / RECIPE).write_text(recipe.to_json())
    trained = trainable_state_dict(model, trained_names)
    peft_model = _peft_model(model)
    if peft_model is not None and any(is_adapter_param(n) for n in trained):
        # LoRA adapters the peft way (adapter_config.json + adapter_model.safetensors):
        # loadable by peft / transformers without mmkit. The mean-initialised rows of the
        # tokens mmkit added are rebuilt identically at load time, so the (large)
        # embedding matrices are not saved unless they were trained (modules_to_save).
        peft_model.save_pretrained(str(tmp / ADAPTER), save_embedding_layers=False)
        trained = {n: t for n, t in trained.items() if not is_adapter_param(n)}
    save_file(trained, str(tmp / WEIGHTS), metadata={"format": "pt"})
    if state is not None:
        torch.save(state, tmp / STATE)
    _atomic_dir_swap(tmp, final)
    return final


def find_checkpoint(path: str | Path) -> Path:
    """``path`` may be a training output folder or the checkpoint folder itself."""
    path = Path(path)
    for cand in (path / CKPT, path / (CKPT + ".old"), path):
        if (cand / RECIPE).is_file():
            missing = [f for f in (WEIGHTS,) if not (cand / f).is_file()]
            if missing:
                raise CheckpointError(
                    f"checkpoint {cand} is incomplete: {', '.join(missing)} is missing; "
                    "retrain or resume with `mmkit train --out` on the same folder"
                )
            return cand
    if not path.exists():
        raise CheckpointError(f"checkpoint folder {path} does not exist; train one with "
                              "`mmkit train --recipe llava-tiny --out DIR` and pass that DIR")
    raise CheckpointError(f"{path} holds no checkpoint ({RECIPE} not found there or in {path / CKPT}); "
                          "pass the --out folder of a `mmkit train` run")


def _peft_model(model: nn.Module):
    """The peft ``PeftModel`` inside ``model`` (the LM under LoRA), or None."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    found = [m for m in model.modules() if isinstance(m, PeftModel)]
    if len(found) > 1:
        raise ValueError(f"the model holds {len(found)} peft models; mmkit checkpoints expect one (the LM)")
    return found[0] if found else None


def load_trained_weights(model: nn.Module, ckpt: str | Path) -> None:
    """Put a checkpoint's trained tensors (and its peft adapter, if any) into ``model``."""
    ckpt = Path(ckpt)
    trained = load_file(str(ckpt / WEIGHTS))
    own = model.state_dict()
    unexpected = sorted(k for k in trained if k not in own)
    wrong = sorted(k for k in trained if k in own and own[k].shape != trained[k].shape)
    if unexpected or wrong:
        raise CheckpointError(
            f"{ckpt / WEIGHTS} does not fit the model its recipe builds: unexpected "
            f"{unexpected[:5]}, wrong shape {wrong[:5]}; was the recipe edited after training?"
        )
    model.load_state_dict(trained, strict=False)  # only the trained tensors; the rest is the base
    adapter = ckpt / ADAPTER
    if adapter.is_dir():
        peft_model = _peft_model(model)
        if peft_model is None:
            raise CheckpointError(f"{adapter} holds LoRA adapters but the recipe builds a model without "
                                  "LoRA; was recipe.lora removed after training?")
        weights = adapter / "adapter_model.safetensors"
        if not weights.is_file():
            raise CheckpointError(f"{adapter} is incomplete: adapter_model.safetensors is missing; "
                                  "retrain or resume with `mmkit train --out` on the same folder")
        from peft import set_peft_model_state_dict

        res = set_peft_model_state_dict(peft_model, load_file(str(weights)))
        bad = list(getattr(res, "unexpected_keys", []) or [])
        if bad:
            raise CheckpointError(f"{weights} does not fit the model's LoRA adapters (unexpected {bad[:5]}); "
                                  "were the LoRA settings (r, target modules) changed after training?")


def load_model(path: str | Path, *, device: str | torch.device | None = None,
               recipe_overrides: dict[str, Any] | None = None):
    """Rebuild a trained model from its checkpoint folder (recipe + trained weights + adapter).

    ``recipe_overrides`` changes recipe fields before the model is built, e.g.
    ``{"quantization": None}`` to put the adapters on a full-precision base (export).
    """
    from mmkit.vlm import build_model

    ckpt = find_checkpoint(path)
    recipe = Recipe.from_json((ckpt / RECIPE).read_text())
    # Relative model folders in a recipe (an export's "lm") live inside the checkpoint.
    for field_name in ("lm", "vision"):
        value = getattr(recipe, field_name)
        if isinstance(value, str) and not Path(value).is_absolute() and (ckpt / value).is_dir():
            setattr(recipe, field_name, str(ckpt / value))
    for k, v in (recipe_overrides or {}).items():
        if not hasattr(recipe, k):
            raise ValueError(f"recipe has no field {k!r}")
        setattr(recipe, k, v)
    model = build_model(recipe)
    load_trained_weights(model, ckpt)
    model.recipe = recipe
    model.eval()
    if device is not None:
        model.to(device)
    return model


def export_merged(path: str | Path, out: str | Path) -> Path:
    """Write a checkpoint whose LM has the LoRA adapters merged in, not quantised.

    QLoRA trains adapters on a 4-bit base; for inference elsewhere you want one plain
    model. The adapters are put on the full-precision base (the same weights before
    quantisation), ``W' = W + (alpha / r) * B @ A`` is folded in (peft
    ``merge_and_unload``), and the result is saved as an ordinary transformers model in
    ``out/lm`` (loadable with ``AutoModelForCausalLM.from_pretrained(out / "lm")``), next
    to ``recipe.json`` (lm="lm", no LoRA, no quantisation) and the other trained weights
    (bridge, ...) in ``model.safetensors``. ``out`` is itself a checkpoint folder for
    ``mmkit chat`` / ``eval`` / ``demo``. Written to a temporary folder, then renamed.
    """
    ckpt = find_checkpoint(path)
    model = load_model(ckpt, recipe_overrides={"quantization": None})
    recipe = model.recipe
    peft_model = _peft_model(model)
    if peft_model is None:
        raise ValueError(f"{ckpt} has no LoRA adapters to merge (recipe.lora is None); "
                         "its checkpoint already works as it is")
    # find where the peft model sits, and put the merged plain model there
    parent_name = next(n for n, m in model.named_modules() if m is peft_model)
    merged = peft_model.merge_and_unload()
    owner = model.get_submodule(parent_name.rsplit(".", 1)[0]) if "." in parent_name else model
    setattr(owner, parent_name.rsplit(".", 1)[-1], merged)

    out = Path(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    merged.save_pretrained(str(tmp / "lm"))
    model.tokenizer.save_pretrained(str(tmp / "lm"))
    kept = {n for n in load_file(str(ckpt / WEIGHTS)) if not n.startswith(parent_name + ".")}
    save_file(trainable_state_dict(model, kept), str(tmp / WEIGHTS), metadata={"format": "pt"})
    recipe = Recipe.from_dict({**recipe.to_dict(), "lm": "lm", "lora": None, "quantization": None})
    for stage in recipe.stages:  # there are no adapters any more to train
        stage.train = [g for g in stage.train if g != "lora"]
    (tmp / RECIPE).write_text(recipe.to_json())
    if out.exists():
        _atomic_dir_swap(tmp, out)
    else:
        os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------- schedule
def warmup_cosine(warmup: int, total: int, min_ratio: float = 0.1) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine decay to ``min_ratio``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        t = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def _rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ------------------------------------------------------------------------ callbacks
# -------------------------------------------------------------------------- trainer
@dataclass
class Trainer:
    """Runs a recipe's stages on a model, with checkpoints that resume exactly.

    Example::

        model = build_model(get_recipe("llava-tiny"))
        Trainer(model, recipe, "runs/llava").train()
    """

    model: nn.Module
    recipe: Recipe
    out_dir: str | Path
    callbacks: list[Callback] = field(default_factory=list)
    progress: bool = True
    accelerator: Any = None

    def __post_init__(self):
        self.out_dir = Path(self.out_dir)
        if self.accelerator is None:
            from accelerate import Accelerator

            mp = self.recipe.mixed_precision
            if mp == "auto":
                mp = "no"
                if torch.cuda.is_available():
                    mp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            self.accelerator = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
        self.trained_names: set[str] = set()
        self.state = {"stage": 0, "step": 0}
        self.history: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- helpers
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def _optimizer(self, stage: Stage) -> torch.optim.Optimizer:
        groups = self.model.module_groups()
        # a finer group for some parameters (Flamingo's gates); models that are not a VLM
        # (UnifiedLM) have no such hook
        finer = getattr(self.model, "param_group", None)
        buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for n, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            g = (finer(n) if finer else None) or _group_of(n, groups)
            no_decay = p.ndim < 2  # biases, norms, gates
            buckets.setdefault((g, no_decay), []).append(p)
        param_groups = [
            {"params": ps, "lr": stage.lr_groups.get(g, stage.lr),
             "weight_decay": 0.0 if nd else stage.weight_decay, "name": f"{g}{'/no_decay' if nd else ''}"}
            for (g, nd), ps in sorted(buckets.items())
        ]
        return torch.optim.AdamW(param_groups, betas=(0.9, 0.98), eps=1e-8)

    def _log(self, logs: dict[str, Any]) -> None:
        self.history.append(logs)
        if self.is_main:
            with open(self.out_dir / METRICS, "a") as f:
                f.write(json.dumps(logs) + "\n")

    def _resume(self) -> dict[str, Any] | None:
        ckpt = self.out_dir / CKPT
        if not (ckpt / STATE).is_file():
            old = self.out_dir / (CKPT + ".old")
            if (old / STATE).is_file():  # crashed between the two renames
                ckpt = old
            else:
                return None
        saved = Recipe.from_json((ckpt / RECIPE).read_text())
        if [s.name for s in saved.stages] != [s.name for s in self.recipe.stages] or saved.bridge != self.recipe.bridge:
            raise CheckpointError(
                f"{self.out_dir} holds a checkpoint of a different recipe ({saved.name}); "
                "use another --out folder or delete it"
            )
        load_trained_weights(self.model, ckpt)
        state = torch.load(ckpt / STATE, weights_only=False)
        self.trained_names = set(state["trained_names"])
        # keep metrics up to the checkpoint only (a crash may have logged past it)
        mpath = self.out_dir / METRICS
        if mpath.exists() and self.is_main:
            keep = [l for l in mpath.read_text().splitlines()
                    if l.strip() and json.loads(l)["global_step"] <= state["global_step"]]
            mpath.write_text("".join(l + "\n" for l in keep))
        return state

    def _save(self, stage_idx: int, step: int, global_step: int, optimizer, scheduler) -> None:
        self.accelerator.wait_for_everyone()
        if self.is_main:
            state = {
                "stage": stage_idx, "step": step, "global_step": global_step,
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": _rng_state(), "trained_names": sorted(self.trained_names),
            }
            save_checkpoint(self.out_dir, self.accelerator.unwrap_model(self.model), self.recipe,
                            self.trained_names, state)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------- train
    def train(self, resume: bool = True) -> nn.Module:
        acc = self.accelerator
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            (self.out_dir / RECIPE).write_text(self.recipe.to_json())
        torch.manual_seed(self.recipe.seed)
        random.seed(self.recipe.seed)
        np.random.seed(self.recipe.seed)
        state = self._resume() if resume else None
        if state is None and self.is_main and (self.out_dir / METRICS).exists():
            (self.out_dir / METRICS).unlink()
        start_stage = state["stage"] if state else 0
        global_step = state["global_step"] if state else 0
        total = self.recipe.total_steps()
        bar = None
        if self.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=global_step, desc=self.recipe.name, dynamic_ncols=True)
        self.model.to(acc.device)
        try:
            for si in range(start_stage, len(self.recipe.stages)):
                stage = self.recipe.stages[si]
                start_step = state["step"] if (state and si == state["stage"]) else 0
                if start_step >= stage.steps:
                    continue
                names = set_trainable(self.model, stage.train)
                self.trained_names |= set(names)
                optimizer = self._optimizer(stage)
                scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer, warmup_cosine(stage.warmup_steps, stage.steps))
                if state and si == state["stage"] and state.get("optimizer") is not None and start_step > 0:
                    optimizer.load_state_dict(state["optimizer"])
                    scheduler.load_state_dict(state["scheduler"])
                    _set_rng_state(state["rng"])
                model, optimizer, scheduler = acc.prepare(self.model, optimizer, scheduler)
                data = TrainData(self.recipe, stage, si)
                for cb in self.callbacks:
                    cb.on_stage_start(self, stage)
                model.train()
                t0 = time.perf_counter()
                for step in range(start_step, stage.steps):
                    loss_sum, n_tok = 0.0, 0
                    parts: dict[str, float] = {}
                    for micro in range(stage.grad_accum):
                        records = data.batch(step, micro, acc.process_index, acc.num_processes)
                        batch = self.model.processor(records)
                        batch = {k: (v.to(acc.device) if torch.is_tensor(v) else v)
                                 for k, v in batch.items() if k != "ids"}
                        if stage.objective != "lm":
                            batch["objective"] = stage.objective
                        with acc.autocast():
                            out = model(**batch)
                        loss = out["loss"] / stage.grad_accum
                        acc.backward(loss)
                        loss_sum += float(out["loss"].detach())
                        # a family's objective may report its parts, e.g. {"itc": .., "itm": ..}
                        for k, v in (out.get("losses") or {}).items():
                            parts[k] = parts.get(k, 0.0) + float(v) / stage.grad_accum
                        n_tok += int((batch["labels"] != -100).sum())
                    if stage.max_grad_norm:
                        acc.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                            stage.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    global_step += 1
                    logs = {
                        "stage": stage.name, "step": step + 1, "global_step": global_step,
                        "loss": loss_sum / stage.grad_accum, "lr": scheduler.get_last_lr()[0],
                        "tokens": n_tok, "seconds": time.perf_counter() - t0,
                        **{f"loss_{k}": v for k, v in parts.items()},
                    }
                    if (step + 1) % self.recipe.log_every == 0 or step + 1 == stage.steps:
                        self._log(logs)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(stage=stage.name, loss=f"{logs['loss']:.3f}")
                    for cb in self.callbacks:
                        cb.on_step_end(self, logs)
                    every = self.recipe.save_every
                    if every and (step + 1) % every == 0 and step + 1 < stage.steps:
                        self._save(si, step + 1, global_step, optimizer, scheduler)
                for cb in self.callbacks:
                    cb.on_stage_end(self, stage)
                self.model = acc.unwrap_model(model)
                # stage done: the next stage starts fresh (new optimizer), so save no optimizer
                self._save(si + 1, 0, global_step, None, None)
                acc.free_memory()
                state = None
        finally:
            if bar is not None:
                bar.close()
        self.model.eval()
        return self.model


def train_and_track(recipe, out_dir: str | Path, at: Sequence[int], *, task: str = "vqa", n: int = 100,
                    progress: bool = False) -> dict[int, float]:
    """Build ``recipe``'s model, train it (fresh, no resume) and return {step: accuracy}.

    Step 0 (before any training) is measured too when 0 is in ``at``.
    """
    from mmkit.eval import evaluate
    from mmkit.vlm import build_model

    model = build_model(recipe)
    tracker = AccuracyTracker([a for a in at if a > 0], task=task, n=n)
    if 0 in at:
        tracker.history[0] = float(evaluate(model, task, n=n)[tracker.metric])
    Trainer(model, recipe, out_dir, callbacks=[tracker], progress=progress).train(resume=False)
    return dict(sorted(tracker.history.items()))
