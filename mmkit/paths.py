"""Where mmkit keeps its files on disk.

Kept tiny and dependency-free so that any module (vision, language, zoo, cli) can ask
"where are the assets?" without importing torch or transformers.

    assets_dir()                 -> <repo>/assets, or $MMKIT_ASSETS when set
    assets_dir() / "tiny/vision" -> the tiny pre-trained ViT (built by `mmkit zoo build`)
    run_mode("classroom")        -> "smoke" / "classroom" / "full" (SMOKE=1 forces "smoke")
    cache_dir()                  -> per-user state (exercise progress), or $MMKIT_CACHE
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


# ---------------------------------------------------------------- run modes and user state
ENV_CACHE = "MMKIT_CACHE"
ENV_MODE = "MMKIT_MODE"
MODES = {
    "smoke": "every step shrinks to seconds (what the tests and CI run); numbers are placeholders",
    "classroom": "long training is replaced by the shipped reference checkpoints in assets/tiny/models; "
                 "your own short runs stay",
    "full": "everything is trained, as in the papers' recipes (minutes to tens of minutes per notebook on a CPU)",
}


def run_mode(mode: str | None = None) -> str:
    """The run mode of a notebook: ``"smoke"``, ``"classroom"`` or ``"full"``.

    A notebook's first code cell says ``MODE = mmkit.mode("classroom")``; edit the word to
    change it, inside Jupyter. The environment wins over the cell: ``SMOKE=1`` always means
    ``"smoke"`` (that is how CI runs every notebook), and ``MMKIT_MODE=full`` sets the mode
    for every notebook started from that environment (``MMKIT_MODE=full jupyter lab``). Without
    either, ``mode`` is used (default ``"classroom"``).
    """
    if os.environ.get("SMOKE") == "1":
        return "smoke"
    chosen = os.environ.get(ENV_MODE) or mode or "classroom"
    key = str(chosen).strip().lower()
    if key not in MODES:
        source = f"the environment variable {ENV_MODE}" if os.environ.get(ENV_MODE) else "mmkit.mode(...)"
        raise ValueError(f"unknown run mode {chosen!r} (from {source}); choose one of: "
                         + "; ".join(f"{k!r}: {v}" for k, v in MODES.items()))
    return key


def cache_dir() -> Path:
    """Per-user folder for small state (exercise progress): ``$MMKIT_CACHE``, else
    ``$XDG_CACHE_HOME/mmkit``, else ``~/.cache/mmkit``. Not created here."""
    override = os.environ.get(ENV_CACHE)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "mmkit"
