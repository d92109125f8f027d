"""The course pack: run modes in every notebook, nbgrader-marked exercise cells, student and
instructor exports, bridge diagrams."""
from __future__ import annotations

import json
import re

import pytest

from mmkit import course
from mmkit import exercises as ex

NOTEBOOKS = sorted(course.notebooks_dir().glob("*.ipynb"))


def _nb(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _src(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


@pytest.fixture(autouse=True)
def _own_progress_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MMKIT_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_every_notebook_sets_its_mode_in_its_first_code_cell(path):
    cells = _nb(path)["cells"]
    first = next(_src(c) for c in cells if c["cell_type"] == "code")
    assert 'MODE = mmkit.mode("' in first and 'SMOKE = MODE == "smoke"' in first
    assert not any('os.environ.get("SMOKE")' in _src(c) for c in cells)  # one place decides the mode
    intro = _src(cells[0])  # the first cell says what each mode runs here
    assert "**Run mode.**" in intro and all(f'`"{m}"`' in intro for m in ("smoke", "classroom", "full")), path.stem


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_exercise_cells_are_marked_for_nbgrader(path):
    nb = _nb(path)
    marked = dict((name, i) for i, name in course.exercise_cells(nb))
    mine = {e.name for e in ex.list_exercises(path.stem)}
    assert set(marked) <= mine, f"grade_ids that are not exercises of {path.stem}: {set(marked) - mine}"
    assert set(marked) == mine, f"exercises of {path.stem} without nbgrader metadata: {mine - set(marked)}"
    for name, i in marked.items():
        defines = ex.EXERCISES[name].defines
        assert re.search(rf"^(def|class) {defines}\(", _src(nb["cells"][i]), re.M), (path.stem, name)
        assert "# YOUR CODE HERE" in _src(nb["cells"][i])
        meta = nb["cells"][i]["metadata"]["nbgrader"]
        assert meta["solution"] and not meta["locked"] and meta["schema_version"] == 3
        check = nb["cells"][i + 1]["metadata"].get("nbgrader", {})  # the check cell, right below
        assert check.get("grade_id") == f"{name}-check" and check["locked"] and not check["solution"], (path.stem, name)


def test_every_build_up_exercise_is_in_its_notebook():
    built = ("MLPProjector", "QFormerLayer", "PerceiverBlock", "GatedXAttnDense", "positions_2d", "patch_rows",
             "LoRALinear", "ema_update")
    for name in built:
        path = course.notebooks_dir() / f"{ex.EXERCISES[name].notebook}.ipynb"
        assert name in dict((n, i) for i, n in course.exercise_cells(_nb(path))), (name, path.name)


def test_student_export_drops_reference_answers(tmp_path):
    paths = course.export(tmp_path / "student", "student")
    assert [p.name for p in paths] == [p.name for p in NOTEBOOKS]
    for path in paths:
        cells = _nb(path)["cells"]
        code = [_src(c) for c in cells if c["cell_type"] == "code"]
        assert not any(re.search(r"^\s*#?\s*solution\(", s, re.M) for s in code), path.name
        assert not any(re.search(r"from mmkit\.exercises import .*\bsolution\b", s) for s in code), path.name
        assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code")
        for _, name in course.exercise_cells(_nb(path)):
            assert any(f"{ex.EXERCISES[name].defines}(" in s and "# YOUR CODE HERE" in s for s in code)
    original = _nb(course.notebooks_dir() / "02_llava.ipynb")
    assert any('solution("MLPProjector")' in _src(c) for c in original["cells"])  # the source is untouched


def test_instructor_export_solves_the_build_up_exercises(tmp_path, capsys):
    paths = course.export(tmp_path / "key", "instructor")
    solved = {}
    for path in paths:
        nb = _nb(path)
        names = {e.defines: e.name for e in ex.list_exercises(path.stem)}
        for cell in nb["cells"]:
            for d in re.findall(r"^(?:def|class) (\w+)\(", _src(cell), re.M):
                if cell["cell_type"] == "code" and d in names and "check(" not in _src(cell):
                    solved[names[d]] = _src(cell)
    assert set(solved) == set(ex.EXERCISES), "every exercise of every notebook is filled in"
    for name in ("MLPProjector", "GatedXAttnDense", "positions_2d", "ema_update"):
        assert "# YOUR CODE HERE" not in solved[name]
        ns: dict = {}
        exec(compile(solved[name], f"<{name}>", "exec"), ns)
        assert ex.check(name, ns[ex.EXERCISES[name].defines]), capsys.readouterr().out


def test_export_errors(tmp_path):
    with pytest.raises(ValueError, match="holds the original notebooks"):
        course.export(course.notebooks_dir(), "student")
    with pytest.raises(ValueError, match="unknown role 'teacher'"):
        course.export(tmp_path, "teacher")
    bad = tmp_path / "bad.ipynb"
    nb = {"cells": [{"cell_type": "code", "execution_count": None, "metadata": {"nbgrader": course.nbgrader_meta("nope", True)},
                     "outputs": [], "source": "def nope():\n    # YOUR CODE HERE\n    raise NotImplementedError"}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    bad.write_text(json.dumps(nb))
    with pytest.raises(ValueError, match="'nope' is not an exercise"):
        course.export(tmp_path / "out", "student", [bad])


def test_cli_course_export(tmp_path, capsys):
    from mmkit.cli import main

    assert main(["course", "export", "--student", str(tmp_path / "s")]) == 0
    assert "student notebooks written" in capsys.readouterr().out
    assert main(["course", "export"]) == 2
    assert "exactly one of --student OUT or --instructor OUT" in capsys.readouterr().err
    assert main(["course", "reset", "nope"]) == 2
    assert main(["course", "progress"]) == 0 and "solved" in capsys.readouterr().out


def test_bridge_diagrams(tmp_path):
    from mmkit.viz import BRIDGE_FAMILIES, plot_bridge_diagram, save_bridge_diagrams

    assert {"llava", "blip2", "flamingo", "qwen_vl", "encoder_free", "native", "qlora"} == set(BRIDGE_FAMILIES)
    fig = plot_bridge_diagram("flamingo")
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    assert "GATED XATTN-DENSE" in texts and "Perceiver Resampler" in texts
    with pytest.raises(ValueError, match="no diagram for 'gpt'.*llava"):
        plot_bridge_diagram("gpt")
    paths = save_bridge_diagrams(tmp_path, ["llava", "qlora"])
    assert [p.name for p in paths] == ["bridge_llava.png", "bridge_qlora.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_shipped_results_read_the_report():
    from mmkit import zoo

    ref = zoo.shipped_results("llava-tiny")
    assert 0 <= ref["vqa"] <= 1 and set(ref["vqa_per_type"]) >= {"color", "shape"}
    with pytest.raises(KeyError, match="no results for 'gpt-tiny'"):
        zoo.shipped_results("gpt-tiny")
    with pytest.raises(FileNotFoundError, match="zoo models --only gpt-tiny"):
        zoo.shipped_dir("gpt-tiny")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_skeleton_cells_run_and_their_checks_say_not_written_yet(path, capsys):
    """What a student sees before writing anything: the skeleton cell runs, the check prints."""
    nb = _nb(path)
    for i, name in course.exercise_cells(nb):
        if ex.EXERCISES[name].defines[0].islower() and name != "positions_2d":
            continue  # the function exercises are covered by tests/test_exercises.py
        ns: dict = {}
        exec(compile(_src(nb["cells"][i]), f"<{path.stem} cell {i}>", "exec"), ns)
        assert not ex.check(name, ns[ex.EXERCISES[name].defines])
        out = capsys.readouterr().out
        assert "not written yet" in out and f"solution('{name}')" in out, out


def _sections(text, level):
    """{"00": body, ...}: the sections of a Markdown text whose heading (at ``level``) starts
    with a notebook number."""
    parts = re.split(rf"^{'#' * level} (\d\d)\b.*$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def test_the_course_pack_covers_every_notebook():
    """Outline, timing row, answer key and questionnaire for each notebook, one answer per question."""
    docs = course.notebooks_dir().parent / "docs" / "course"
    readme = (docs / "README.md").read_text(encoding="utf-8")
    answers = (docs / "answers.md").read_text(encoding="utf-8")
    exercises_part, rest = answers.split("## Read the plot")
    key = _sections(rest.split("## Questionnaire")[1], 3)
    questions = _sections((docs / "questionnaire.md").read_text(encoding="utf-8"), 2)
    outline = _sections(readme, 3)
    for path in NOTEBOOKS:
        num = path.stem[:2]
        assert num in outline, f"docs/course/README.md: no outline section '### {num} · ...'"
        assert re.search(rf"^\| {num} ", readme, re.M), f"docs/course/README.md: no timing row for {num}"
        for e in ex.list_exercises(path.stem):
            assert f"`{e.defines}" in exercises_part or f"`{e.name}" in exercises_part, \
                f"docs/course/answers.md: no answer for the exercise {e.name} of {path.stem}"
        asked = re.findall(r"^\s*(\d+)\. ", questions.get(num, ""), re.M)
        answered = re.findall(r"^\s*(\d+)\. ", key.get(num, ""), re.M)
        assert asked, f"docs/course/questionnaire.md: no questions for {num}"
        assert answered == asked, f"docs/course/answers.md: questionnaire {num} answers {answered}, asks {asked}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_the_answer_key_runs_top_to_bottom_and_every_check_passes(path, tmp_path, monkeypatch):
    """The instructor copy (every exercise filled in) executes in smoke mode, and every check
    cell says it is correct: the reference answers also work where the notebook goes on to use them."""
    import nbformat
    from nbclient import NotebookClient

    from mmkit.exercises.core import OK

    monkeypatch.setenv("SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    (key,) = course.export(tmp_path / "key", "instructor", [path])
    nb = nbformat.read(key, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    checked = course.exercise_cells(nb)
    assert len(checked) == len(ex.list_exercises(path.stem))
    for i, name in checked:
        out = "".join(o.get("text", "") for o in nb.cells[i + 1].outputs if o.output_type == "stream")
        assert OK in out and "✗" not in out, f"{path.stem}, exercise {name} (cell {i + 1}): {out[:400]}"
