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
