"""The command line end to end on a few-step run: train, chat, eval --json, errors."""
from __future__ import annotations

import json

import pytest

from mmkit.cli import main


@pytest.fixture(scope="module")
def trained(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_run")
    rc = main(["train", "--recipe", "llava-tiny", "--out", str(out), "--quiet",
               "--set", "stages.*.steps=2", "--set", "stages.*.batch_size=2", "--curve", "3", "--curve-n", "6"])
    assert rc == 0
    return out


def test_train_curve_writes_a_learning_curve_the_plot_reads(trained):
    from mmkit.viz import plot_learning_curves

    rows = [json.loads(l) for l in (trained / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 4]  # every 3 steps, and the last step
    assert rows[0]["train_seconds"] < rows[1]["train_seconds"] and set(rows[0]) >= {"accuracy", "per_type"}
    fig = plot_learning_curves({"student": rows, "reference": rows[:1]}, baseline=0.35)
    types = sorted(rows[0]["per_type"])
    assert [ax.get_title() for ax in fig.axes[:1 + len(types)]] == ["accuracy"] + types
    overall = fig.axes[0]
    assert len(overall.lines) == 3 and list(overall.lines[0].get_ydata()) == [r["accuracy"] for r in rows]
    with pytest.raises(ValueError, match="--curve"):
        plot_learning_curves({"empty": []})


def test_a_text_oracle_curve_asks_with_descriptions(tiny_assets, tmp_path, monkeypatch):
    import mmkit.eval

    asked = []
    real = mmkit.eval.evaluate

    def spy(model, task, **kw):
        asked.append(kw.get("oracle", False))
        return real(model, task, **kw)

    monkeypatch.setattr(mmkit.eval, "evaluate", spy)
    assert main(["train", "--recipe", "oracle-tiny", "--out", str(tmp_path), "--quiet", "--set", "stages.0.steps=2",
                 "--set", "stages.0.batch_size=2", "--curve", "2", "--curve-n", "4"]) == 0
    assert asked == [True]  # trained on descriptions, so asked with them, never with the picture
    row = json.loads((tmp_path / "curve.jsonl").read_text())
    assert row["step"] == 2 and 0.0 <= row["accuracy"] <= 1.0


def test_curves_command_draws_runs_side_by_side(trained, tmp_path, capsys):
    fig = tmp_path / "figs" / "curves.png"
    assert main(["curves", str(trained), str(trained), "--label", "student", "--label", "again",
                 "--out", str(fig), "--baseline", "0.4"]) == 0
    assert fig.is_file() and fig.read_bytes()[:4] == b"\x89PNG"
    assert main(["curves", str(tmp_path), "--out", str(fig)]) != 0  # no curve.jsonl there
    assert "mmkit train --curve N" in capsys.readouterr().err


def test_chat_prints_an_answer(trained, tmp_path, capsys):
    from mmkit.data.shapes import ShapesWorld

    img = tmp_path / "scene.png"
    ShapesWorld().sample("test", 0)["image"].save(img)
    assert main(["chat", "--checkpoint", str(trained), "--image", str(img), "What colour is the circle?",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_eval_json_last_line(trained, capsys):
    assert main(["eval", "--checkpoint", str(trained), "--task", "vqa", "--n", "4", "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    res = json.loads(last)
    assert res["task"] == "vqa" and res["split"] == "test" and res["n"] == 4
    assert 0.0 <= res["accuracy"] <= 1.0 and isinstance(res["per_type"], dict)


def test_eval_pope_and_blind(trained, capsys):
    assert main(["eval", "--checkpoint", str(trained), "--task", "pope", "--n", "4", "--json", "--blind"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["blind"] is True
    assert {"accuracy", "precision", "recall", "f1", "yes_ratio"} <= res.keys()


def test_eval_oracle_replaces_the_image_by_its_description(trained, capsys):
    from mmkit.data.shapes import ShapesWorld
    from mmkit.eval import describe_images, evaluate
    from mmkit.train import load_model

    world = ShapesWorld()
    rec = world.sample("test", 3, task="vqa")
    told = describe_images(rec, world)
    assert "image" not in told and "<image>" not in told["conversations"][0]["value"]
    assert told["conversations"][0]["value"] == (world.detail(rec["meta"]["scene"]) + "\n"
                                                  + rec["conversations"][0]["value"].replace("<image>\n", ""))
    assert told["conversations"][1] == rec["conversations"][1]
    with pytest.raises(ValueError, match="meta"):
        describe_images({"id": "x", "conversations": rec["conversations"]}, world)
    with pytest.raises(ValueError, match="exclude"):
        evaluate(load_model(trained), "vqa", n=2, blind=True, oracle=True)
    assert main(["eval", "--checkpoint", str(trained), "--n", "4", "--json", "--oracle"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["oracle"] is True and res["n"] == 4


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["chat", "--checkpoint", str(tmp_path / "missing"), "hi"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "mmkit train" in err
    assert main(["train", "--recipe", "no-such-recipe"]) == 2
    assert "known recipes" in capsys.readouterr().err
    assert main(["train", "--recipe", "llava-tiny", "--set", "stages.0.nope=1"]) == 2


def test_bench_speed_times_each_bridge_against_its_reference():
    """The speed bench builds each pair from one config with shared weights (so both compute the
    same thing) and times both; the tiny size runs in seconds."""
    from mmkit.bench import bridge_speed, format_speed

    rows = bridge_speed("tiny", repeats=1)
    assert [r["reference"] for r in rows] == ["Blip2QFormerModel", "IdeficsPerceiverResampler",
                                              "IdeficsGatedCrossAttentionLayer", "LlavaMultiModalProjector",
                                              "Idefics3Connector"]
    for r in rows:
        assert r["ref_s"] > 0 and r["ours_s"] > 0 and r["speedup"] > 0
    assert format_speed(rows).count("\n") == len(rows) + 1


def test_bench_speed_pairs_are_valid_configs_at_real_size():
    """The real-size pairs (the papers' widths) build: each reference config passes transformers'
    own checks, e.g. a width that divides by its number of heads. Built, not timed."""
    from mmkit.bench import _speed_pairs

    names = [pair[1] for pair in _speed_pairs("real")]
    assert len(names) == 5 and names[0] == "Blip2QFormerModel"
