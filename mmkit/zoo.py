"""``mmkit zoo build``: the tiny pre-trained parts every bridge connects, built and shipped.

Real VLMs bridge two *pre-trained, frozen* experts: a vision encoder trained with
CLIP (image-text contrastive learning) and a language model trained on text alone.
The tiny world needs the same two experts, so ``mmkit zoo build`` trains them from
scratch, on ShapesWorld, in a few minutes on a laptop CPU, with ``mmkit.pretrain``:

1. **Tokenizer**: byte-level BPE learned from ShapesWorld text (``mmkit.pretrain.lm``).
2. **Vision encoder**: a ``TinyViT`` trained CLIP-style against a small text tower, with
   shape-swap hard negatives and patch-phrase alignment (``mmkit.pretrain.clip``).
   Only the image tower is shipped.
3. **Language model**: a ``LlamaForCausalLM`` trained on ShapesWorld *text* alone
   (``mmkit.pretrain.lm``): the *blind* baseline every bridge must beat.

``--only vision|lm|vq`` rebuilds one part (``vq``: the native models' image tokenizer,
``mmkit.native.vq``). Quality figures printed (and written to ``assets/tiny/report.json``):
    vision: zero-shot image->caption retrieval R@1 among 100 test candidates; linear
            probes for colour and shape on single-object test scenes (layer -2,
            mean-pooled; ``probe_shape_max``: the same tokens max-pooled)
    lm:     held-out perplexity; blind VQA accuracy per question type

The shipped weights live in ``assets/tiny/{vision,lm}`` (safetensors + config) and load
offline in well under 2 s. ``mmkit zoo models`` (``build_models``, ``ship_checkpoint``)
trains the demo's family models and ships them in ``assets/tiny/models``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from mmkit.callbacks import CURVE, GATES, AccuracyTracker, GateLogger, compute_clock
from mmkit.paths import assets_dir
from mmkit.pretrain.clip import TextTower, clip_loss, image_embedding, object_token_probe, region_loss, train_vision
from mmkit.pretrain.lm import build_tokenizer, train_lm
from mmkit.pretrain.probes import linear_probe, retrieval_r1

__all__ = ["build", "info", "load_tiny", "VISION_DIR", "LM_DIR", "build_models", "ship_checkpoint", "model_report",
           "SHIPPED_MODELS", "MODELS_DIR", "REFERENCE_BUDGETS", "SETTINGS", "shipped_dir", "load_shipped",
           "shipped_results",
           # from mmkit.pretrain, kept here for notebook 01 and the exercises (``zoo.clip_loss``, ...)
           "TextTower", "clip_loss", "image_embedding", "linear_probe", "retrieval_r1", "object_token_probe",
           "region_loss", "train_vision"]

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
# alignment trains; default -2, the one bridges read), "answer_weight" (answer tokens weigh
# that much more in the LM's loss), "lm_buckets" (the LM's batches run in length buckets: the
# same gradients, 0.26 s instead of 0.40 s a step). docs/experiments.md measures each.
OPTIONAL_SETTINGS = {"reading", "lm_config", "clip_lr", "stem", "cap_weight", "cap_parallel", "region_layer",
                     "answer_weight", "lm_buckets"}
SETTINGS: dict[str, dict[str, Any]] = {
    "full": dict(corpus=20_000, vocab=2048, clip_images=16_000, clip_steps=1000, clip_batch=96, hard_negatives=True,
                 region_weight=1.0, lm_steps=600, lm_batch=32, probe_train=1500, probe_test=500, blind_n=300, ppl_n=500),
    "smoke": dict(corpus=600, vocab=400, clip_images=256, clip_steps=3, clip_batch=32, hard_negatives=True, region_weight=1.0,
                  lm_steps=3, lm_batch=8, probe_train=64, probe_test=32, blind_n=8, ppl_n=16),
}


# ------------------------------------------------------------------- quality report
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


# ------------------------------------------------------------------------------ build
def build(out: str | Path | None = None, *, smoke: bool = False, only: str | None = None,
          progress: bool = True, settings: dict[str, Any] | None = None, curve_every: int = 0) -> dict[str, Any]:
    """Retrain the tiny tokenizer + ViT + LM from scratch and write them to ``out``.

    Deterministic (fixed seeds, single process). ``out`` defaults to the shipped
    ``assets/`` folder. Returns the quality report (also saved as report.json).
    ``settings`` overrides keys of ``SETTINGS`` (an experiment: ``{"lm_steps": 4000,
    "reading": 20000}``; an unknown key is an error). ``curve_every`` > 0 measures the LM's
    own reading (``reading_vqa``, n = ``blind_n``) every that many LM steps: the report's
    ``lm_curve``. ``only="lm"`` into an ``out`` without a vision encoder uses the shipped one.
    """
    from mmkit.data.shapes import ShapesConfig, ShapesWorld
    from mmkit.vision import load_vision_encoder

    if only not in (None, "vision", "lm", "vq"):
        raise ValueError(f"zoo build --only takes 'vision', 'lm' or 'vq', got {only!r} "
                         "(family models: `mmkit zoo models --only RECIPE`)")
    s = dict(SETTINGS["smoke" if smoke else "full"])
    unknown = sorted(set(settings or {}) - set(s) - OPTIONAL_SETTINGS)
    if unknown:
        raise ValueError(f"zoo build: unknown setting(s) {unknown}; known: {sorted(set(s) | OPTIONAL_SETTINGS)}")
    s.update(settings or {})
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
        has_vision = (root / VISION_DIR).exists()
        vision = load_vision_encoder(str((root if has_vision else assets_dir()) / VISION_DIR))
    if only in (None, "lm"):
        curve: list[dict[str, Any]] = []

        def measure(step: int, lm) -> None:
            if curve_every and (step % curve_every == 0 or step == s["lm_steps"]):
                lm.eval()
                curve.append({"step": step, **reading_accuracy(vision, lm, tokenizer, s["blind_n"])})
                if progress:
                    print(f"LM step {step}: reading_vqa {curve[-1]['reading_vqa']:.3f}", flush=True)

        lm, report["lm"] = train_lm(world, tokenizer, s, progress, on_step=measure if curve_every else None)
        if curve:
            report["lm"]["lm_curve"] = curve
        report["lm"]["settings"] = {k: s[k] for k in sorted(s) if k.startswith(("lm_", "reading", "answer", "corpus"))}
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
# demo starts without training. ``mmkit zoo models`` retrains them with their recipes. The
# first is the one the demo opens with.
SHIPPED_MODELS = ("llava-tiny", "blip2-tiny", "blip2-tiny-lora", "instructblip-tiny", "minigpt4-tiny", "flamingo-tiny",
                  "qwenvl-tiny", "fuyu-tiny", "eve-tiny", "kosmos-tiny", "palme-tiny", "unified-tiny")
MODELS_DIR = "tiny/models"
# A *reference* is a shipped model trained with a larger budget than the recipe's own (the
# student's 5-minute run): the recipe with these overrides. Notebooks put a student's run
# beside it; the demo serves it. Measured in docs/benchmarks.md.
# The three Q-Former references share one budget, so that they differ only in their recipes
# (the question in the Q-Former; LoRA on the LM).
_QFORMER_BUDGET = ["stages.0.steps=2000", "stages.1.steps=300", "stages.2.steps=3000", "stages.2.warmup_steps=100"]
REFERENCE_BUDGETS: dict[str, list[str]] = {
    "llava-tiny": ["stages.1.steps=7200", "stages.1.warmup_steps=100"],
    "flamingo-tiny": ["stages.0.steps=4000", "stages.0.warmup_steps=100"],
    "qwenvl-tiny": ["stages.1.steps=5000", "stages.1.warmup_steps=100"],
    "fuyu-tiny": ["stages.1.steps=5000", "stages.1.warmup_steps=100"],
    "kosmos-tiny": ["stages.0.steps=4000", "stages.0.warmup_steps=100"],
    "eve-tiny": ["stages.0.steps=200", "stages.1.steps=800", "stages.2.steps=3500", "stages.2.warmup_steps=100"],
    "blip2-tiny": list(_QFORMER_BUDGET),
    "blip2-tiny-lora": list(_QFORMER_BUDGET),
    "instructblip-tiny": list(_QFORMER_BUDGET),
    "minigpt4-tiny": ["stages.0.steps=2000", "stages.1.steps=2000", "stages.1.warmup_steps=100",
                      "stages.2.steps=400", "stages.2.warmup_steps=20"],
    "palme-tiny": ["stages.1.steps=1500", "stages.1.warmup_steps=50"],
}


def shipped_dir(name: str) -> Path:
    """The folder of a shipped model, ``assets/tiny/models/<name>``; a clear error when absent."""
    path = assets_dir() / MODELS_DIR / name
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no shipped model {name!r} in {path.parent} (shipped: {', '.join(SHIPPED_MODELS)}); "
                                f"`mmkit zoo models --only {name}` builds it")
    return path


def load_shipped(name: str):
    """A shipped reference model (``SHIPPED_MODELS``), ready to generate, evaluate or explain."""
    from mmkit.train import load_model

    return load_model(shipped_dir(name))


def shipped_results(name: str) -> dict[str, Any]:
    """What ``mmkit zoo models`` measured on a shipped model (``assets/tiny/report.json``):
    ``vqa``, ``vqa_per_type``, ``vqa_n``, ``train_seconds``, ... A notebook quotes these
    rather than copying numbers into its text, so the text stays true when a model is rebuilt."""
    models = info().get("models", {})
    if name not in models:
        raise KeyError(f"no results for {name!r} in {assets_dir() / REPORT}; measured: {', '.join(models) or 'none'}")
    return models[name]


def ship_checkpoint(src: str | Path, name: str, out: str | Path | None = None) -> Path:
    """Copy a trained checkpoint into ``<out>/tiny/models/<name>/`` for shipping.

    Keeps recipe.json, the trained tensors in fp16 (half the bytes; the demo loads them
    into the fp32 model), a peft adapter if any, the run's learning curve (``curve.jsonl``)
    and a Flamingo run's gate curves (``gates.jsonl``) if it has them; drops the optimizer state. Atomic:
    written next to the destination, then renamed.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    from mmkit.train import ADAPTER, RECIPE, WEIGHTS, find_checkpoint

    curves = [Path(src) / f for f in (CURVE, GATES)]
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
    for curve in curves:
        if curve.is_file():
            shutil.copy2(curve, staging / curve.name)
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
                 smoke: bool = False, progress: bool = True, eval_n: int = 300,
                 curve_every: int = 0) -> dict[str, Any]:
    """Train each named recipe on the tiny world and ship its checkpoint in ``out``.

    Each lands in ``<out>/tiny/models/<recipe>/`` (``ship_checkpoint``), which
    ``mmkit.train.load_model`` and the demo read. A name in ``REFERENCE_BUDGETS`` trains with
    its reference budget (smoke size ignores it). The report (VQA accuracy on ``eval_n``
    test questions, training seconds, size) is merged into report.json under "models".
    ``curve_every`` > 0 also ships the model's learning curve (VQA on ``eval_n`` questions
    every that many steps, ``curve.jsonl``; ``viz.plot_learning_curves``), which notebooks
    draw beside a student's run; the training seconds are then compute seconds (CPU time per
    torch thread, ``callbacks.compute_clock``: wall time on an idle machine) without the
    evaluations. A model with gates (Flamingo) also ships their values over training
    (``gates.jsonl``, ``GateLogger`` at about 200 points), which notebook 04 draws.
    """
    import tempfile

    from mmkit.recipes import apply_overrides, get_recipe
    from mmkit.train import Trainer
    from mmkit.vlm import build_model

    root = Path(out) if out else assets_dir()
    report: dict[str, Any] = {}
    for name in names:
        recipe = apply_overrides(get_recipe(name), REFERENCE_BUDGETS.get(name, []))
        if smoke:
            recipe = apply_overrides(recipe, ["stages.*.steps=2", "stages.*.batch_size=4", "stages.*.warmup_steps=1"])
        torch.manual_seed(recipe.seed)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            model = build_model(recipe)
            callbacks = []
            if curve_every:
                callbacks.append(AccuracyTracker.every(curve_every, recipe.total_steps(), n=8 if smoke else eval_n,
                                                       filename=CURVE, clock=compute_clock()))
            if hasattr(model, "gate_values"):
                callbacks.append(GateLogger(every=max(1, recipe.total_steps() // 200)))
            Trainer(model, recipe, tmp, callbacks=callbacks, progress=progress).train()
            seconds = callbacks[0].train_seconds if curve_every else time.perf_counter() - t0
            dst = ship_checkpoint(tmp, name, root)
        report[name] = {**model_report(dst, 8 if smoke else eval_n), "train_seconds": round(seconds, 1),
                        "torch_threads": torch.get_num_threads(), "steps": recipe.total_steps()}
    path = root / REPORT
    old = json.loads(path.read_text()) if path.exists() else {}
    old.setdefault("models", {}).update(report)
    path.write_text(json.dumps(old, indent=2) + "\n")
    return report
