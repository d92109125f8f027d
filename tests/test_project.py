"""The project's own files agree with each other: pyproject, environment.yml, README, CI."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_declares_the_kit():
    p = _pyproject()["project"]
    assert p["name"] == "mmkit" and p["requires-python"] == ">=3.10"
    assert p["scripts"]["mmkit"] == "mmkit.cli:main"
    names = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in p["dependencies"]}
    for need in ["torch", "torchvision", "timm", "transformers", "peft", "bitsandbytes", "accelerate",
                 "safetensors", "matplotlib", "ipywidgets", "jupyterlab", "gradio", "tqdm", "pillow", "numpy"]:
        assert need in names, need
    dev = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in p["optional-dependencies"]["dev"]}
    assert "pytest" in dev and ({"nbmake", "nbclient"} & dev)


def test_environment_yml_installs_the_project_from_pyproject():
    text = (ROOT / "environment.yml").read_text()
    lines = [l.split("#")[0].strip() for l in text.splitlines()]
    assert "- conda-forge" in lines
    assert "- python=3.12" in lines and "- pip" in lines
    pip_items = [l[2:].strip() for l in lines if l.startswith("- ") and ("." in l[2:4] or l[2:].startswith("-e"))]
    installs = [i for i in pip_items if i.startswith("-e .") or i.startswith(".")]
    assert installs, "environment.yml must pip-install the project itself"
    extras = set(re.findall(r"\[(.*)\]", installs[0])[0].split(","))
    assert extras <= set(_pyproject()["project"]["optional-dependencies"]), extras
    assert "dev" in extras
    # pyproject stays the one source of dependencies: no package is repeated in the yml
    deps = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in _pyproject()["project"]["dependencies"]}
    listed = {re.split(r"[<>=!~\[ ]", l[2:])[0].lower() for l in lines if l.startswith("- ")}
    assert not (deps & listed), f"listed in both files: {deps & listed}"


def test_readme_commands_are_the_ci_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    make = (ROOT / "Makefile").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in ci
    assert re.search(r"^test:.*\n\t.*pytest", make, re.M), "make test must run pytest"
    assert "--nbmake notebooks" in make
