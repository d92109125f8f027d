"""The Trainer: stages freeze what they should, checkpoints resume exactly, two processes agree."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mmkit.recipes import Recipe, Stage, apply_overrides, get_recipe
from mmkit.train import (Callback, CheckpointError, StopTraining, Trainer, TrainData, find_checkpoint,
                         load_model, set_trainable)
from mmkit.vlm import build_model


def small_recipe(**kw) -> Recipe:
    r = get_recipe("llava-tiny")
    r = apply_overrides(r, ["stages.*.batch_size=4", "stages.0.steps=3", "stages.1.steps=4",
                            "stages.*.warmup_steps=1", "log_every=1"])
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_overrides_parse_and_validate():
    r = apply_overrides(get_recipe("llava-tiny"), ["stages.1.steps=7", "bridge=linear", "lora={\"r\": 4}"])
    assert r.stages[1].steps == 7 and r.bridge == "linear" and r.lora == {"r": 4}
    with pytest.raises(ValueError, match="no field 'nope'"):
        apply_overrides(r, ["nope=1"])
    with pytest.raises(ValueError, match="module groups must be names"):
        Stage("x", train=[""])


def test_stage_shapes_override_the_recipe_world_for_that_stage_only():
    """A curriculum: stage.shapes (ShapesConfig overrides) apply on top of recipe.shapes."""
    r = get_recipe("llava-tiny")
    r.shapes = {"max_objects": 2}
    r.stages[0].shapes = {"max_objects": 1}
    first, second = TrainData(r, r.stages[0], 0), TrainData(r, r.stages[1], 1)
    assert first.world.config.max_objects == 1 and second.world.config.max_objects == 2
    assert {len(b["meta"]["scene"].objects) for b in first.batch(0, 0)} == {1}
    assert Recipe.from_json(r.to_json()).stages[0].shapes == {"max_objects": 1}  # saved with the recipe


def test_stage_freezes_everything_else(tiny_assets):
    model = build_model(small_recipe())
    names = set_trainable(model, ["bridge"])
    assert names and all(n.startswith("bridge.") for n in names)
    assert not any(p.requires_grad for p in model.lm.parameters())
    with pytest.raises(ValueError, match="unknown module group 'brige'"):  # a typo fails before any compute
        set_trainable(model, ["brige"])


class Interrupt(Callback):
    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, trainer, logs):
        if logs["global_step"] == self.at:
            raise StopTraining("simulated crash")


def test_resume_gives_the_same_weights(tiny_assets, tmp_path):
    recipe = small_recipe(save_every=2)
    # uninterrupted
    a = Trainer(build_model(recipe), recipe, tmp_path / "a", progress=False)
    a.train()
    # interrupted in stage 2 after its step-2 checkpoint (global step 3 + 3 = 6), then resumed
    b = Trainer(build_model(recipe), recipe, tmp_path / "b", progress=False, callbacks=[Interrupt(6)])
    with pytest.raises(StopTraining):
        b.train()
    state = torch.load(tmp_path / "b" / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert (state["stage"], state["step"]) == (1, 2)
    c = Trainer(build_model(recipe), recipe, tmp_path / "b", progress=False)
    c.train()
    wa = load_file(str(tmp_path / "a" / "checkpoint" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "checkpoint" / "model.safetensors"))
    assert wa.keys() == wb.keys() and any(k.startswith("lm.") for k in wa)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # the metrics log has each step once, in order
    steps = [json.loads(l)["global_step"] for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 8))


def test_describe_stage_trains_on_descriptions_not_pictures(tmp_path):
    """oracle-tiny's stage: the same ShapesWorld questions, each picture replaced by its scene's description."""
    recipe = get_recipe("oracle-tiny")
    stage = recipe.stages[0]
    assert stage.describe and stage.train == ["lm"]
    plain = TrainData(recipe, Stage("plain", train=["lm"], tasks=stage.tasks, batch_size=4), 0).batch(0, 0)
    told = TrainData(recipe, stage, 0).batch(0, 0)
    for p, t in zip(plain[:4], told):
        assert p.get("image") is not None and "image" not in t and "images" not in t
        question = p["conversations"][0]["value"].replace("<image>\n", "")
        first = t["conversations"][0]["value"]
        assert "<image>" not in first and first.endswith(question) and len(first) > len(question) + 40
        assert t["conversations"][1:] == p["conversations"][1:]  # the answers are unchanged
    data = tmp_path / "d.jsonl"
    data.write_text('{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}\n')
    bad = Stage("read", train=["lm"], data=str(data), describe=True)
    with pytest.raises(ValueError, match="describe / text_share need ShapesWorld"):
        TrainData(recipe, bad, 0)


def test_a_text_only_share_replaces_that_share_of_pictures_with_words():
    """Stage.text_share: about that fraction of one-image records comes as text, the same on every call
    (a resumed run sees the same mix); multi-image records and drawings keep their pictures."""
    recipe = get_recipe("llava-tiny")
    tasks = {"vqa": 1.0, "caption": 1.0, "multi": 0.5, "draw": 0.5}
    plain = TrainData(recipe, Stage("s", train=["lm"], tasks=tasks, batch_size=64), 1)
    mixed = TrainData(recipe, Stage("s", train=["lm"], tasks=tasks, batch_size=64, text_share=0.5), 1)
    a, b = plain.batch(3, 0), mixed.batch(3, 0)
    assert b == mixed.batch(3, 0)
    worded = [i for i, (p, m) in enumerate(zip(a, b)) if p != m]
    eligible = sum(r["meta"]["task"] in ("vqa", "caption") for r in a)
    assert 0.3 * eligible < len(worded) < 0.7 * eligible
    for i in worded:
        assert a[i]["meta"]["task"] in ("vqa", "caption") and "image" not in b[i]
        assert b[i]["conversations"][0]["value"].endswith(a[i]["conversations"][0]["value"].replace("<image>\n", ""))
        assert b[i]["conversations"][1:] == a[i]["conversations"][1:]
    assert all(b[i] == a[i] for i in range(64) if a[i]["meta"]["task"] in ("multi", "draw"))
    with pytest.raises(ValueError, match="text_share=1.0 must be in"):
        Stage("s", train=["lm"], text_share=1.0)


def test_learning_curve_records_survive_a_resume(tiny_assets, tmp_path):
    from mmkit.callbacks import AccuracyTracker

    recipe = small_recipe(save_every=2)
    first = AccuracyTracker([2, 4, 7], n=4, filename="curve.jsonl")
    with pytest.raises(StopTraining):  # stops at global step 6; the checkpoint is at step 5
        Trainer(build_model(recipe), recipe, tmp_path, progress=False, callbacks=[first, Interrupt(6)]).train()
    assert [r["step"] for r in first.records] == [2, 4]
    again = AccuracyTracker([2, 4, 7], n=4, filename="curve.jsonl")
    Trainer(build_model(recipe), recipe, tmp_path, progress=False, callbacks=[again]).train()
    rows = [json.loads(l) for l in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 7] == sorted(again.history)
    seconds = [r["train_seconds"] for r in rows]
    assert 0 < seconds[0] < seconds[1] < seconds[2]  # training time goes on from where it stopped
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["per_type"] for r in rows)


def test_checkpoint_loads_for_chat(tiny_assets, tmp_path):
    recipe = small_recipe()
    Trainer(build_model(recipe), recipe, tmp_path, progress=False).train()
    model = load_model(tmp_path)
    assert model.recipe.name == "llava-tiny"
    assert isinstance(model.generate(None, "Hello", max_new_tokens=3)[0], str)
    # only the trained groups were written
    keys = load_file(str(tmp_path / "checkpoint" / "model.safetensors")).keys()
    assert not any(k.startswith("vision.") for k in keys)


def test_missing_or_incomplete_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoint(tmp_path / "nope")
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "recipe.json").write_text("{}")
    with pytest.raises(CheckpointError, match="incomplete"):
        find_checkpoint(tmp_path)


DIST_SCRIPT = r'''
import sys, torch
from safetensors.torch import save_file
from mmkit.recipes import get_recipe, apply_overrides
from mmkit.train import Trainer
from mmkit.vlm import build_model
out = sys.argv[1]
r = apply_overrides(get_recipe("llava-tiny"), ["stages.*.batch_size=2", "stages.0.steps=2",
                    "stages.1.steps=2", "stages.*.warmup_steps=1"])
t = Trainer(build_model(r), r, out, progress=False)
t.train()
rank = t.accelerator.process_index
save_file({k: v.clone().contiguous() for k, v in t.model.named_parameters() if k.startswith(("bridge.", "lm."))},
          f"{out}/rank{rank}.safetensors")
print("world", t.accelerator.num_processes)
'''


@pytest.mark.slow
def test_two_processes_keep_identical_weights(tiny_assets, tmp_path):
    script = tmp_path / "dist.py"
    script.write_text(DIST_SCRIPT)
    env = {**os.environ, "MMKIT_ASSETS": str(tiny_assets), "OMP_NUM_THREADS": "1"}
    # torchrun sets RANK / WORLD_SIZE; accelerate's Accelerator(cpu=True) then uses the
    # gloo backend: the same code path `accelerate launch --multi_gpu` takes on GPUs.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", "29533", str(script), str(tmp_path / "out")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "world 2" in res.stdout
    w0 = load_file(str(tmp_path / "out" / "rank0.safetensors"))
    w1 = load_file(str(tmp_path / "out" / "rank1.safetensors"))
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
