"""Data, evaluation and hallucination: caption styles, answer parsers, POPE by negative type,
the LM's text metrics, DPO, few-shot comparison, the studies and the CLI (notebook 09)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from mmkit.data.shapes import (
    CAPTION_STYLES, COLORS, POPE_TYPES, ShapesConfig, ShapesWorld, parse_caption, styled_caption, web_caption,
)
from mmkit.data.shapes.text import caption, detail
from mmkit.eval import (
    PARSERS, answer_correct, compare_few_shot, evaluate, judge_answer, parser_ranking, pope_by_type, text_metrics,
)
from mmkit.preference import dpo_loss, dpo_train, hallucinated_caption, preference_margin, preference_pairs


# ------------------------------------------------------------------ caption styles
def test_default_caption_style_is_brief_and_unchanged(world):
    assert ShapesConfig().caption_style == "brief"
    for i in range(10):
        rec = world.sample("train", i, "caption")
        assert rec["conversations"][1]["value"] == caption(rec["meta"]["scene"])


def test_detailed_style_names_every_object_place_and_relation():
    w = ShapesWorld(ShapesConfig(caption_style="detailed"))
    for i in range(10):
        rec = w.sample("train", i, "caption")
        scene = rec["meta"]["scene"]
        assert rec["conversations"][1]["value"] == detail(scene)
        assert {(c, s) for _z, c, s in parse_caption(rec["conversations"][1]["value"])} == scene.pairs()


def test_web_style_is_noisy_at_its_rate_and_deterministic():
    w = ShapesWorld(ShapesConfig(caption_style="web", caption_noise=0.3))
    missing = wrong = named = total = 0
    for i in range(300):
        scene = w.scene("train", i)
        text = web_caption(scene, 0.3)
        assert text == w.sample("train", i, "caption")["conversations"][1]["value"]  # same scene, same noise
        said = parse_caption(text)
        assert said, text  # one object always stays
        total += len(scene.objects)
        named += len(said)
        wrong += sum((c, s) not in scene.pairs() for _z, c, s in said)
        missing += len(scene.objects) - len(said)
    assert 0.15 < missing / total < 0.35    # objects left out at about the rate (one always stays)
    assert 0.2 < wrong / named < 0.4        # wrong colours at about the rate
    clean = [web_caption(w.scene("train", i), 0.0) for i in range(30)]
    assert all({(c, s) for _z, c, s in parse_caption(t)} == w.scene("train", i).pairs() for i, t in enumerate(clean))


def test_caption_style_errors_name_the_choices():
    with pytest.raises(ValueError, match="caption_style must be one of"):
        ShapesConfig(caption_style="fancy")
    with pytest.raises(ValueError, match="caption_noise"):
        ShapesConfig(caption_noise=1.5)
    with pytest.raises(ValueError, match="caption style"):
        styled_caption(ShapesWorld().scene("train", 0), "fancy")
    assert set(CAPTION_STYLES) == {"web", "brief", "detailed"}


# ------------------------------------------------------------------ answer parsers
def _rec(answer, qtype, **meta):
    return {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": answer}],
            "meta": {"qtype": qtype, **meta}}


@pytest.mark.parametrize("pred, rec, want", [
    ("red", _rec("red", "color"), (True, True, True)),
    ("Red.", _rec("red", "color"), (False, True, True)),
    ("The star is red.", _rec("red", "color"), (False, False, True)),
    ("red or blue", _rec("red", "color"), (False, False, False)),
    ("It is a red star", _rec("star", "shape"), (False, False, True)),
    ("I count two of them.", _rec("2", "count"), (False, False, True)),
    ("There is no blue square.", _rec("no", None, task="pope", target=("blue", "square")), (False, False, True)),
    ("There is a blue square.", _rec("yes", "exists", target=("blue", "square")), (False, False, True)),
    ("Yes, it is to the left.", _rec("yes", "relation"), (False, False, True)),
])
def test_three_parsers(pred, rec, want):
    assert tuple(answer_correct(pred, rec, p) for p in PARSERS) == want
    with pytest.raises(ValueError, match="unknown parser"):
        answer_correct(pred, rec, "llm")


def test_judge_returns_none_for_no_fact():
    assert judge_answer("I am not sure what this is", _rec("red", "color")) is None


class _Stub:
    """A 'model' that answers from the record: right on ``right`` of the questions, in ``form``."""

    def __init__(self, form="{}", right=1.0):
        self.form, self.right, self.seen = form, right, 0

    def generate(self, records, max_new_tokens=8):
        out = []
        for r in records:
            self.seen += 1
            ok = (self.seen % 10) < self.right * 10
            out.append(self.form.format(r["meta"]["answer"] if ok else "purple"))
        return out


def test_parser_ranking_flips_with_a_chatty_model():
    terse, chatty = _Stub("{}", right=0.7), _Stub("The answer is {}.", right=1.0)
    res = parser_ranking({"terse": terse, "chatty": chatty}, "vqa", n=40, parsers=("strict", "judge"))
    assert res["ranking"]["strict"] == ["terse", "chatty"]
    assert res["scores"]["chatty"]["strict"] == 0.0
    assert res["ranking"]["judge"][0] == "chatty" and res["flipped"]
    with pytest.raises(ValueError, match="task 'vqa' or 'pope'"):
        parser_ranking({"a": terse}, "caption")


# ------------------------------------------------------------------ POPE by negative type
def test_pope_split_by_negative_type(world):
    records = [world.sample("test", i, "pope") for i in range(90)]
    yes = ["Yes." for _ in records]
    per = pope_by_type(records, yes)
    assert set(per) == set(POPE_TYPES)
    assert sum(m["n"] for m in per.values()) == 90
    assert all(m["yes_ratio"] == 1.0 and m["recall"] == 1.0 for m in per.values())
    # a model fooled only by adversarial negatives is perfect on the other two
    fooled = ["yes" if (r["meta"]["answer"] == "yes" or r["meta"]["pope_type"] == "adversarial") else "no"
              for r in records]
    per = pope_by_type(records, fooled)
    assert per["random"]["accuracy"] == per["popular"]["accuracy"] == 1.0
    assert per["adversarial"]["accuracy"] < 0.8


# ------------------------------------------------------------------ DPO
def test_dpo_loss_hand_computed():
    t = lambda v: torch.tensor([float(v)])  # noqa: E731
    # z = 0.5 * ((-10 + 12) - (-14 + 12)) = 2 -> -log sigmoid(2) = log(1 + e^-2)
    assert float(dpo_loss(t(-10), t(-14), t(-12), t(-12), beta=0.5)) == pytest.approx(math.log(1 + math.exp(-2)))
    assert float(dpo_loss(t(-3), t(-7), t(-3), t(-7))) == pytest.approx(math.log(2))  # policy == reference
    big = dpo_loss(t(0), t(-1e4), t(-1e4), t(0), beta=1.0)  # a huge margin: no overflow
    assert torch.isfinite(big) and float(big) == pytest.approx(0.0, abs=1e-6)
    assert dpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3), reduction="none").shape == (3,)
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(t(0), t(0), t(0), t(0), beta=0.0)


def test_preference_pairs_add_one_ghost(world):
    from mmkit.data.shapes import Rng

    pairs = preference_pairs(world, "train", 20)
    for p in pairs:
        scene = p["meta"]["scene"]
        chosen = {(c, s) for _z, c, s in parse_caption(p["chosen"])}
        rejected = {(c, s) for _z, c, s in parse_caption(p["rejected"])}
        assert chosen == scene.pairs()
        assert rejected - chosen == {p["meta"]["ghost"]} and p["meta"]["ghost"] not in scene.pairs()
        c, s = p["meta"]["ghost"]
        assert any(o.color == c or o.shape == s for o in scene.objects)  # adversarial: shares a word
    assert preference_pairs(world, "train", 3)[2]["rejected"] == pairs[2]["rejected"]
    assert hallucinated_caption(world, world.scene("train", 0), Rng("x"))[1][0] in COLORS


def test_dpo_steps_raise_the_margin(llava_model, world):
    model = copy.deepcopy(llava_model)
    torch.manual_seed(0)
    res = dpo_train(model, steps=2, batch_size=4, lr=1e-3, beta=0.5, train=("bridge", "lm"), world=world,
                    log_every=1)
    assert res["history"][0]["margin"] == pytest.approx(0.0, abs=1e-4)  # policy == reference at the start
    assert res["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    seen = preference_pairs(world, "train", 4)  # the pairs of the first step
    after = preference_margin(model, res["reference"], seen, beta=0.5)
    assert after["margin"] > 0.05 and after["reward_accuracy"] > 0.5, after
    assert not any(p.requires_grad for p in res["reference"].parameters())


# ------------------------------------------------------------------ the LM alone, few-shot
def test_text_metrics_and_perplexity(llava_model, world):
    from mmkit.pretrain.lm import perplexity

    res = text_metrics(llava_model, n=4, ppl_n=8, world=world)
    assert 1.0 < res["perplexity"] < 1e4 and 0.0 <= res["reading_vqa"] <= 1.0
    # perplexity = exp(mean token loss) of the LM
    text = ["A small red circle."]
    ids = llava_model.tokenizer(text[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = llava_model.lm(input_ids=ids, labels=ids).loss
    assert perplexity(llava_model.lm, llava_model.tokenizer, text) == pytest.approx(math.exp(float(loss)), rel=1e-4)


def test_compare_few_shot_same_documents(llava_model):
    res = compare_few_shot({"a": llava_model, "b": llava_model}, "size", shots=(0, 4), n=2, batch_size=2)
    assert res["a"]["accuracy"] == res["b"]["accuracy"] and set(res["a"]["accuracy"]) == {0, 4}
    assert res["a"]["prompt_tokens"] > 4 * 64  # five pictures of 64 tokens each: past the training max_length
    assert llava_model.processor.max_length == 256  # restored


def test_evaluate_pope_reports_per_type_and_parser(llava_model):
    res = evaluate(llava_model, "pope", n=6, parser="strict")
    assert res["parser"] == "strict" and set(res["per_type"]) <= set(POPE_TYPES)
    with pytest.raises(ValueError, match="unknown parser"):
        evaluate(llava_model, "vqa", n=2, parser="gpt")


# ------------------------------------------------------------------ studies, CLI, exercises
@pytest.mark.slow
def test_caption_style_study_runs(tiny_assets, tmp_path):
    from mmkit.studies import caption_style_study, forgetting_study

    rows = caption_style_study(["web"], steps=2, batch_size=2, n=2, out=tmp_path)
    assert rows[0]["caption_style"] == "web" and rows[0]["steps"] == 2 and 0 <= rows[0]["chair_i"] <= 1
    with pytest.raises(ValueError, match="unknown style"):
        caption_style_study(["noisy"], steps=2)
    with pytest.raises(ValueError, match="unknown mode"):
        forgetting_study(["half"], steps=2)


@pytest.mark.slow
def test_forgetting_study_frozen_lm_keeps_its_text(tiny_assets, tmp_path):
    from mmkit.studies import forgetting_study

    rows = forgetting_study(["frozen", "text"], steps=2, batch_size=2, n=2, out=tmp_path)
    assert rows[1]["perplexity"] == pytest.approx(rows[0]["perplexity"], rel=1e-5)  # LM never trained
    assert rows[2]["stage 2 trains"] == "bridge + whole LM, 25% text-only"
    assert rows[2]["perplexity"] != pytest.approx(rows[0]["perplexity"], rel=1e-5)


def test_cli_eval_text_only_and_pope_rows(tiny_assets, capsys):
    from mmkit.cli import main
    from mmkit.paths import assets_dir

    ref = assets_dir() / "tiny" / "models" / "llava-tiny"
    if not ref.exists():
        pytest.skip("shipped llava-tiny not present")
    assert main(["eval", "--checkpoint", str(ref), "--text-only", "--n", "4"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "reading_vqa" in out
    assert main(["eval", "--checkpoint", str(ref), "--task", "pope", "--n", "9", "--parser", "judge"]) == 0
    out = capsys.readouterr().out
    assert "negatives" in out and "random" in out and "parser: judge" in out


def test_exercise_mistakes(capsys):
    import torch.nn.functional as F

    from mmkit import exercises as ex

    def flipped(a, b, c, d, beta=0.1):
        return F.logsigmoid(beta * ((a - c) - (b - d))).mean()

    def no_beta(a, b, c, d, beta=0.1):
        return -F.logsigmoid((a - c) - (b - d)).mean()

    assert not ex.check("dpo_loss", flipped) and "sign" in capsys.readouterr().out
    assert not ex.check("dpo_loss", no_beta) and "beta" in capsys.readouterr().out

    def pooled(records, preds):
        from mmkit.eval import _pope_metrics

        m = _pope_metrics(records, preds)
        return {k: {"accuracy": m["accuracy"], "f1": m["f1"]} for k in POPE_TYPES}

    assert not ex.check("pope_by_type", pooled) and "negatives" in capsys.readouterr().out
    assert not ex.check("fool_chair", lambda scene: "a small red star.") and "CHAIR" in capsys.readouterr().out
    assert not ex.check("fool_chair", caption) and "true" in capsys.readouterr().out


def test_answer_loss_is_lower_for_the_trained_reference(tiny_assets):
    """The loss on held-out answers, teacher-forced: the shipped llava-tiny's is far below an
    untrained bridge's, and the model is left in the mode it was in."""
    from mmkit.eval import answer_loss
    from mmkit.paths import assets_dir
    from mmkit.recipes import get_recipe
    from mmkit.train import load_model
    from mmkit.vlm import build_model

    trained = load_model(assets_dir() / "tiny" / "models" / "llava-tiny")
    fresh = build_model(get_recipe("llava-tiny")).train()
    a, b = answer_loss(trained, n=16, batch_size=8), answer_loss(fresh, n=16, batch_size=8)
    assert 0 < a < 0.5 * b and fresh.training


@pytest.mark.slow
def test_loss_study_records_loss_and_accuracy_per_checkpoint(tiny_assets, tmp_path):
    from mmkit.studies import loss_study

    rows = loss_study(steps=4, batch_size=2, n=4, points=2, out=tmp_path)
    assert [r["step"] for r in rows] == [2, 4] and [r["stage"] for r in rows][-1] == "instruct"
    assert all(r["answer_loss"] > 0 and 0 <= r["vqa"] <= 1 for r in rows)
    with pytest.raises(ValueError, match="at least 2"):
        loss_study(points=1)


def test_cli_study_arguments():
    from mmkit.cli import build_parser, cmd_study

    args = build_parser().parse_args(["study", "forgetting", "--steps", "40", "--n", "50", "--only", "full,text"])
    assert args.fn is cmd_study and args.name == "forgetting" and args.steps == 40 and args.n == 50
    assert args.settings == "full,text"
    bad = build_parser().parse_args(["study", "forgetting", "--only", "half"])
    with pytest.raises(SystemExit, match="unknown mode"):
        cmd_study(bad)
    with pytest.raises(SystemExit, match="no settings"):
        cmd_study(build_parser().parse_args(["study", "loss", "--only", "a"]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["study", "everything"])
