"""The course pack's machinery: student and instructor copies of the notebooks.

Exercise cells carry nbgrader-compatible metadata, so nbgrader can also grade them:

    skeleton cell (the student writes here)   {"nbgrader": {"solution": true,  "grade_id": "<exercise>", ...}}
    check cell (runs the check)                {"nbgrader": {"solution": false, "grade_id": "<exercise>-check",
                                                             "locked": true, ...}}

    export(out, "student")      the notebooks without outputs and without the lines that print
                                reference answers (``solution("...")``, and its import)
    export(out, "instructor")   the notebooks with every skeleton cell filled with its reference
                                answer (``mmkit.exercises.solution``): an answer key that runs

``mmkit course export --student OUT/`` (or ``--instructor OUT/``) calls it.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable

__all__ = ["ROLES", "notebooks_dir", "exercise_cells", "export", "nbgrader_meta"]

ROLES = ("student", "instructor")
_SOLUTION_CALL = re.compile(r"^\s*#?\s*solution\(.*\)\s*(#.*)?$")
_IMPORT = re.compile(r"^(\s*from mmkit\.exercises import )(.+)$")
_DEFINES = re.compile(r"^(?:def|class) (\w+)\(", re.M)


def notebooks_dir() -> Path:
    """The course notebooks: ``notebooks/`` next to the ``mmkit`` package."""
    return Path(__file__).resolve().parent.parent / "notebooks"


def nbgrader_meta(grade_id: str, solution: bool) -> dict[str, Any]:
    """nbgrader's cell metadata (schema 3): a cell the student writes in, or a locked check cell."""
    return {"grade": False, "grade_id": grade_id, "locked": not solution, "schema_version": 3,
            "solution": solution, "task": False}


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _set_source(cell: dict, text: str) -> None:
    lines = text.splitlines(keepends=True)
    cell["source"] = lines if isinstance(cell.get("source"), list) else text


def exercise_cells(nb: dict) -> list[tuple[int, str]]:
    """(cell index, exercise name) of every skeleton cell of a notebook (its nbgrader metadata)."""
    out = []
    for i, cell in enumerate(nb.get("cells", [])):
        meta = cell.get("metadata", {}).get("nbgrader", {})
        if meta.get("solution"):
            out.append((i, meta["grade_id"]))
    return out


def _strip_solution_hints(text: str) -> str:
    """Drop ``solution("x")`` lines and the ``solution`` name from ``mmkit.exercises`` imports."""
    kept = []
    for line in text.splitlines():
        if _SOLUTION_CALL.match(line):
            continue
        m = _IMPORT.match(line)
        if m:
            names = [n.strip() for n in m.group(2).split(",") if n.strip() != "solution"]
            line = m.group(1) + ", ".join(names)
        kept.append(line)
    return "\n".join(kept).rstrip("\n")


def _write_json(path: Path, nb: dict, ensure_ascii: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".ipynb")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(nb, indent=1, ensure_ascii=ensure_ascii) + "\n")
    os.replace(tmp, path)


def export(out: str | Path, role: str = "student", notebooks: Iterable[str | Path] | None = None) -> list[Path]:
    """Write the course notebooks for ``role`` ("student" or "instructor") into ``out``.

    Outputs are cleared in both. Returns the written paths. ``out`` must not be the
    notebooks' own folder (the originals are never overwritten).
    """
    from mmkit.exercises import EXERCISES, list_exercises
    from mmkit.exercises.core import _SOLUTIONS

    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    src_dir = notebooks_dir()
    paths = sorted(Path(p) for p in notebooks) if notebooks is not None else sorted(src_dir.glob("*.ipynb"))
    if not paths:
        raise FileNotFoundError(f"no notebooks found in {src_dir}; run from a checkout of mmkit")
    out = Path(out)
    if out.resolve() in {p.resolve().parent for p in paths}:
        raise ValueError(f"{out} holds the original notebooks; export into another folder (e.g. student/)")
    list_exercises()  # every exercise registered
    written = []
    for path in paths:
        raw = path.read_text(encoding="utf-8")
        nb = json.loads(raw)
        for i, name in exercise_cells(nb):
            if name not in EXERCISES:
                raise ValueError(f"{path.name}, cell {i}: nbgrader grade_id {name!r} is not an exercise of "
                                 "mmkit.exercises; fix the cell's metadata")
        # a skeleton cell without metadata yet is still found by the name it defines
        defines = {e.defines: e.name for e in list_exercises(path.stem)}
        for cell in nb.get("cells", []):
            if cell.get("cell_type") != "code":
                continue
            cell["outputs"], cell["execution_count"] = [], None
            name = cell.get("metadata", {}).get("nbgrader", {}).get("solution") and \
                cell["metadata"]["nbgrader"]["grade_id"]
            if not name and "# YOUR CODE HERE" in _source(cell):
                m = _DEFINES.search(_source(cell))
                name = defines.get(m.group(1)) if m else None
            if role == "instructor" and name:
                _set_source(cell, _SOLUTIONS[name].rstrip("\n"))
            elif role == "student":
                _set_source(cell, _strip_solution_hints(_source(cell)))
        dst = out / path.name
        _write_json(dst, nb, ensure_ascii="\\u00" in raw)
        written.append(dst)
    return written
