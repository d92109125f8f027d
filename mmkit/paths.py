"""Where mmkit keeps its files on disk.

Kept tiny and dependency-free so that any module (vision, language, zoo, cli) can ask
"where are the assets?" without importing torch or transformers.

    assets_dir()                 -> <repo>/assets, or $MMKIT_ASSETS when set
    assets_dir() / "tiny/vision" -> the tiny pre-trained ViT (built by `mmkit zoo build`)
"""
from __future__ import annotations

import os
from pathlib import Path

ENV_ASSETS = "MMKIT_ASSETS"


def assets_dir() -> Path:
    """Root folder of the shipped assets (tiny weights, sample images).

    Defaults to ``assets/`` next to the ``mmkit`` package (the repository root when
    mmkit is installed in editable mode). Set the environment variable
    ``MMKIT_ASSETS=/some/folder`` to use another location, e.g. a shared cache.
    The folder is not created here; callers say what is missing and how to build it.
    """
    override = os.environ.get(ENV_ASSETS)
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parent.parent / "assets"
