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
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

__all__ = ["EXERCISES", "Exercise", "OK", "check", "list_exercises", "register", "solution"]

OK = "✓ correct"
_PACKAGE = __name__.rpartition(".")[0]  # mmkit.exercises


class _NotDone(Exception):
    """The student's function is not written yet (or crashed); the message says which."""


def _say(ok: bool, msg: str) -> bool:
    print(f"{OK}{': ' + msg if msg else ''}" if ok else f"✗ {msg}")
    return ok


def _call(fn: Callable, *args: Any, what: str = "") -> Any:
    """Call the student's function; turn 'not written yet' and crashes into _NotDone."""
    name = getattr(fn, "__name__", "your function")
    if not callable(fn):
        raise _NotDone(f"expected a function, got {type(fn).__name__}: pass the function itself, e.g. check_x(x), not x(...)")
    try:
        out = fn(*args)
    except NotImplementedError:
        raise _NotDone(f"{name} is not written yet: replace `raise NotImplementedError` with your code "
                       f"(solution({name!r}) shows a reference answer).") from None
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
            return check(fn, *args, **kwargs)
        except _NotDone as e:
            return _say(False, str(e))

    return wrapped


@dataclass(frozen=True)
class Exercise:
    name: str
    notebook: str
    task: str
    check: Callable[..., bool]


EXERCISES: dict[str, Exercise] = {}
# Reference answers, kept as source text: solution(name) prints exactly the code that the
# checks are tested against (tests/test_exercises.py runs every reference through its check).
_SOLUTIONS: dict[str, str] = {}


def register(exercise: Exercise, solution_source: str) -> Exercise:
    """Add a notebook's exercise (used by the modules of this package)."""
    if exercise.name in EXERCISES and EXERCISES[exercise.name].check is not exercise.check:
        raise ValueError(f"two exercises are named {exercise.name!r}")
    EXERCISES[exercise.name] = exercise
    _SOLUTIONS[exercise.name] = solution_source
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
    return ns[name]
