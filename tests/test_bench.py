"""The bake-off (``mmkit bench families``): every family trained for the same compute, scored alike."""
import json
import time

import pytest

from mmkit.bench import BAKEOFF, bake_off, format_bake_off, load_bake_off
from mmkit.callbacks import compute_clock
from mmkit.recipes import RECIPES


def test_bake_off_lists_one_student_recipe_per_family():
    families = {RECIPES[name]().family for name in BAKEOFF}
    assert {"prefix", "blip2", "instructblip", "flamingo", "fuyu", "eve", "interleaved", "unified"} <= families
    assert all(name.endswith("-tiny") for name in BAKEOFF)


def test_compute_clock_counts_cpu_time_not_sleep():
    clock = compute_clock()
    t0 = clock()
    time.sleep(0.3)  # the wall clock moves; a sleeping process computes nothing
    assert clock() - t0 < 0.1
    t0 = clock()
    x = 0
    for i in range(2_000_000):
        x += i
    assert clock() - t0 > 0


@pytest.mark.slow
def test_bake_off_trains_scores_resumes_and_tabulates(tmp_path):
    rows = bake_off(0.02, ["llava-tiny"], out=tmp_path, n=4, curve_points=1, curve_n=4)
    (row,) = rows
    assert row["recipe"] == "llava-tiny" and row["steps"] >= 2 and len(row["stage_steps"]) == 2
    assert row["image_tokens"] == row["bridge_tokens"] == 64
    assert 0 < row["trainable_params"] < 10_000_000
    assert 0 <= row["vqa"] <= 1 and 0 <= row["pope_f1"] <= 1 and 0 <= row["chair_i"] <= 1
    assert row["curve"] and row["curve"][-1]["step"] == row["steps"]
    # compute seconds: of the order of the budget (0.02 min = 1.2 s), never the wall time of evaluations
    assert 0 < row["train_seconds"] < 60
    saved = load_bake_off(tmp_path)
    assert saved["rows"][0]["vqa"] == row["vqa"] and saved["minutes"] == 0.02
    # a finished family is read back, not trained again
    stamp = (tmp_path / "llava-tiny" / "result.json").stat().st_mtime_ns
    again = bake_off(0.02, ["llava-tiny"], out=tmp_path, n=4)
    assert again[0] == json.loads((tmp_path / "llava-tiny" / "result.json").read_text())
    assert (tmp_path / "llava-tiny" / "result.json").stat().st_mtime_ns == stamp
    table = format_bake_off(again)
    assert "| llava-tiny |" in table and "POPE F1" in table and "compute seconds" in table


def test_bake_off_refuses_a_budget_of_nothing(tmp_path):
    with pytest.raises(ValueError, match="minutes must be > 0"):
        bake_off(0, ["llava-tiny"], out=tmp_path)


def test_load_bake_off_names_the_command_when_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="mmkit bench families"):
        load_bake_off(tmp_path)
