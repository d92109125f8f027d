"""The exercise framework: checks that never raise, reference solutions, the registry.

A notebook's exercise module (``tour.py``, ``blip2.py``, ...) writes each check as

    @_guard
    def check_x(fn) -> bool:
        got = _call(fn, ...)              # the student's function; crashes become a message
        ...
        return _say(ok, "what is wrong")  # prints "✓ correct" or "✗ ..." and returns ok

and registers it with its reference answer, kept as source text:

    register(Exercise("x", "00_tour", "x(...) -> ...", check_x), solution_source)

``check(name, fn)``, ``solution(name)`` and ``list_exercises()`` then find it; they import
every module of the package first, so every notebook's exercises are known.

Build-up exercises (the student writes a module: ``MLPProjector``, ``QFormerLayer``, ...)
use ``_same_module(student, reference, inputs, ...)``: the library module's ``state_dict``
goes into the student's module, both run on the same random inputs, and the first key or
output that differs is named.

Every check's verdict is kept per user (``progress()`` shows it, ``reset(name)`` forgets it)
in a small JSON file in ``mmkit.paths.cache_dir()``.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import pkgutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

__all__ = ["EXERCISES", "Exercise", "OK", "check", "list_exercises", "progress", "register", "reset",
           "solution"]

OK = "✓ correct"
_PACKAGE = __name__.rpartition(".")[0]  # mmkit.exercises


class _NotDone(Exception):
    """The student's function is not written yet (or crashed); the message says which."""


def _say(ok: bool, msg: str) -> bool:
    print(f"{OK}{': ' + msg if msg else ''}" if ok else f"✗ {msg}")
    return ok


def _call(fn: Callable, *args: Any, what: str = "") -> Any:
    """Call the student's function; turn 'not written yet' and crashes into _NotDone."""
    exercise = getattr(fn, "__name__", None) or type(fn).__name__  # a function, a class, or a module built from one
    name = getattr(fn, "__name__", None) or f"{exercise}.forward"
    if not callable(fn):
        raise _NotDone(f"expected a function, got {type(fn).__name__}: pass the function itself, e.g. check_x(x), not x(...)")
    try:
        out = fn(*args)
    except NotImplementedError:
        raise _NotDone(f"{name} is not written yet: replace `raise NotImplementedError` with your code "
                       f"(solution({exercise!r}) shows a reference answer).") from None
    except Exception as e:  # noqa: BLE001 - a student's bug must not stop the notebook
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f" (line {f.lineno}: {f.line})" for f in reversed(tb) if f.line), "")
        raise _NotDone(f"{name}{what} raised {type(e).__name__}: {e}{where}") from None
    if out is None:
        raise _NotDone(f"{name}{what} returned None: is the `return` missing, or is the cell still '# YOUR CODE HERE'?")
    return out


def _guard(check: Callable[..., bool]) -> Callable[..., bool]:
    """Make a check print (not raise) when the student's function is unwritten or crashes."""
    @functools.wraps(check)  # keeps the check's name, docstring and module for help()
    def wrapped(fn: Callable, *args: Any, **kwargs: Any) -> bool:
        try:
            ok = check(fn, *args, **kwargs)
        except _NotDone as e:
            ok = _say(False, str(e))
        _record(_NAMES.get(wrapped), ok)
        return ok

    return wrapped


def _same_module(student: Callable, reference: Any, args: tuple, inputs: tuple, *, what: str,
                 mistakes: dict[str, Callable] | list[tuple[str, Callable]] | None = None, atol: float = 1e-5) -> bool:
    """The check of a build-up exercise: ``student(*args)`` builds the student's module, the
    library module ``reference``'s weights are loaded into it, both run on ``inputs`` and the
    outputs are compared. ``mistakes`` maps a typical mistake's message to a function
    ``(reference, *inputs) -> output`` of that mistake (or is a list of such pairs, when one
    message fits several variants); a matching wrong output names it."""
    import torch

    mod = _call(student, *args, what=f"({', '.join(map(repr, args))})")
    if not isinstance(mod, torch.nn.Module):
        return _say(False, f"{getattr(student, '__name__', 'your class')}(...) built a {type(mod).__name__}; "
                           "write a torch.nn.Module subclass (class X(nn.Module), super().__init__() first).")
    want_keys, got_keys = set(reference.state_dict()), set(mod.state_dict())
    missing, extra = sorted(want_keys - got_keys), sorted(got_keys - want_keys)
    if missing or extra:
        msg = f"your module's weights are not named like the library's {type(reference).__name__}:"
        if missing:
            msg += f" missing {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''};"
        if extra:
            msg += f" unexpected {', '.join(extra[:6])}{' ...' if len(extra) > 6 else ''};"
        return _say(False, msg + " name the submodules as in the skeleton (the check loads the library's weights).")
    for k, v in reference.state_dict().items():
        if tuple(mod.state_dict()[k].shape) != tuple(v.shape):
            return _say(False, f"weight {k!r} has shape {tuple(mod.state_dict()[k].shape)}, the library's has "
                               f"{tuple(v.shape)}: check the in/out sizes of that layer.")
    mod.load_state_dict(reference.state_dict())
    mod.eval(), reference.eval()
    with torch.no_grad():
        want = reference(*inputs)
        got = _call(mod, *inputs, what=f" on inputs of shapes {[tuple(x.shape) for x in inputs if torch.is_tensor(x)]}")
    if not torch.is_tensor(got):
        return _say(False, f"forward returned a {type(got).__name__}; return a tensor of shape {tuple(want.shape)}.")
    if tuple(got.shape) != tuple(want.shape):
        return _say(False, f"{what}: expected output shape {tuple(want.shape)}, got {tuple(got.shape)}.")
    if torch.allclose(got.float(), want.float(), atol=atol, rtol=1e-4):
        return True
    with torch.no_grad():
        for msg, wrong in (mistakes.items() if isinstance(mistakes, dict) else mistakes or ()):
            w = wrong(reference, *inputs)
            if tuple(w.shape) == tuple(got.shape) and torch.allclose(got.float(), w.float(), atol=atol, rtol=1e-4):
                return _say(False, f"{what}: {msg}")
    diff = (got.float() - want.float()).abs()
    first = tuple(int(i) for i in torch.nonzero(diff > atol + 1e-4 * want.float().abs())[0])
    return _say(False, f"{what}: same weights, different output: first mismatch at index {first} "
                       f"(yours {float(got[first]):.5f}, the library's {float(want[first]):.5f}; largest gap "
                       f"{float(diff.max()):.3g}). Compare your forward with the equations, line by line.")


@dataclass(frozen=True)
class Exercise:
    name: str
    notebook: str
    task: str
    check: Callable[..., bool]
    answer: str = ""  # the name the student's code defines, when not ``name`` (a library name it must not shadow)

    @property
    def defines(self) -> str:
        return self.answer or self.name


EXERCISES: dict[str, Exercise] = {}
# Reference answers, kept as source text: solution(name) prints exactly the code that the
# checks are tested against (tests/test_exercises.py runs every reference through its check).
_SOLUTIONS: dict[str, str] = {}


_NAMES: dict[Callable, str] = {}  # a registered check -> its exercise's name (for progress)


def register(exercise: Exercise, solution_source: str) -> Exercise:
    """Add a notebook's exercise (used by the modules of this package)."""
    if exercise.name in EXERCISES and EXERCISES[exercise.name].check is not exercise.check:
        raise ValueError(f"two exercises are named {exercise.name!r}")
    EXERCISES[exercise.name] = exercise
    _SOLUTIONS[exercise.name] = solution_source
    _NAMES[exercise.check] = exercise.name
    return exercise


_LOADED = False


def _load_all() -> None:
    """Import every exercise module of this package (each registers its exercises)."""
    global _LOADED
    if _LOADED:
        return
    for mod in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"{_PACKAGE}.{mod.name}")
    _LOADED = True


def _get(name: str) -> Exercise:
    _load_all()
    if name not in EXERCISES:
        raise KeyError(f"no exercise {name!r}; there are: {', '.join(EXERCISES)}")
    return EXERCISES[name]


def check(name: str, answer: Callable, **kwargs: Any) -> bool:
    """``check("patchify", patchify)`` is ``check_patchify(patchify)``."""
    return _get(name).check(answer, **kwargs)


def solution(name: str) -> None:
    """Print a reference answer for exercise ``name``. Try the exercise first!"""
    _get(name)
    print(f"# reference answer for {name!r} (mmkit.exercises)\n")
    print(_SOLUTIONS[name])


def list_exercises(notebook: str | None = None) -> list[Exercise]:
    """The exercises (of one notebook, e.g. "02_llava"), in notebook order."""
    _load_all()
    return sorted((e for e in EXERCISES.values() if notebook is None or e.notebook == notebook),
                  key=lambda e: e.notebook)


def _reference(name: str) -> Callable:
    """The reference answer of ``name`` as a function (the tests run it through its check)."""
    _load_all()
    ns: dict[str, Any] = {}
    exec(compile(_SOLUTIONS[name], f"<solution {name}>", "exec"), ns)  # noqa: S102 - our own source
    return ns[EXERCISES[name].defines]


# ---------------------------------------------------------------- a student's progress
PROGRESS_FILE = "exercises.json"


def _progress_path() -> Path:
    from mmkit.paths import cache_dir

    return cache_dir() / PROGRESS_FILE


def _load_progress() -> dict[str, dict[str, Any]]:
    path = _progress_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_progress(data: dict[str, dict[str, Any]]) -> None:
    """Atomic: written next to the file, then renamed over it."""
    path = _progress_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".exercises-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _record(name: str | None, ok: bool) -> None:
    """Remember one check's verdict; progress is a convenience, never a reason to fail."""
    if name is None:
        return
    try:
        data = _load_progress()
        entry = data.get(name, {"tries": 0, "solved": False})
        entry["tries"] = int(entry.get("tries", 0)) + 1
        entry["solved"] = bool(entry.get("solved")) or bool(ok)
        entry["last"] = time.strftime("%Y-%m-%d %H:%M")
        data[name] = entry
        _save_progress(data)
    except OSError:
        pass


def progress(notebook: str | None = None, show: bool = True) -> dict[str, dict[str, Any]]:
    """Every exercise (of one notebook, e.g. "02_llava") and where this user stands:
    ``{name: {"notebook", "solved", "tries", "last"}}``; prints a table when ``show``."""
    data = _load_progress()
    out = {}
    for e in list_exercises(notebook):
        got = data.get(e.name, {})
        out[e.name] = {"notebook": e.notebook, "solved": bool(got.get("solved")),
                       "tries": int(got.get("tries", 0)), "last": got.get("last", "")}
    if show:
        for name, row in out.items():
            mark = "✓ solved" if row["solved"] else (f"✗ {row['tries']} tries" if row["tries"] else "· not tried")
            print(f"{row['notebook']:<26} {name:<22} {mark}")
        done = sum(r["solved"] for r in out.values())
        print(f"{done} of {len(out)} solved (kept in {_progress_path()})")
    return out


def reset(name: str | None = None) -> None:
    """Forget the progress of exercise ``name`` (``reset()`` with no name: of every exercise).
    Your notebook cells are yours: to start an exercise over, re-run its skeleton cell."""
    data = _load_progress()
    if name is None:
        data = {}
    else:
        _get(name)  # an unknown name says which exist
        data.pop(name, None)
    _save_progress(data)
