"""BLIP-2 family: Q-Former masks, parity with transformers, stage-1 objectives, InstructBLIP."""
from __future__ import annotations

import json

import pytest
import torch

from mmkit.convert import from_hf, load_hf, qformer_config_from_hf

from mmkit.bridges.blip2 import (MASKS, QFormer, QFormerBridge, QFormerConfig, bidirectional_mask,
                                 multimodal_causal_mask, uni_modal_mask)
from mmkit.nn import WeightsMismatchError, inspect

HF_KW = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
             cross_attention_frequency=2, encoder_hidden_size=24, vocab_size=50, max_position_embeddings=20,
             hidden_act="gelu")


# ------------------------------------------------------------------------------ masks
def test_masks_match_the_paper_figure():
    Q, text_mask = 2, torch.tensor([[1, 1, 0]])  # 2 queries, 2 words + 1 pad
    T = [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0]]
    assert uni_modal_mask(Q, text_mask)[0].int().tolist() == T
    B = [[1, 1, 1, 1, 0]] * 5
    assert bidirectional_mask(Q, text_mask)[0].int().tolist() == B
    C = [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert multimodal_causal_mask(Q, text_mask)[0].int().tolist() == C
    assert set(MASKS) == {"itc", "itm", "itg"}


def _tiny_qformer(**kw):
    torch.manual_seed(0)
    cfg = QFormerConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                        encoder_hidden_size=24, vocab_size=50, max_position_embeddings=20, **kw)
    return QFormer(cfg).eval()


def test_masks_control_what_flows_where():
    qf = _tiny_qformer()
    Q, L = 4, 5
    q, img = torch.randn(1, Q, 32), torch.randn(1, 7, 24)
    ids = torch.randint(1, 50, (1, L))
    ids2 = ids.clone()
    ids2[0, 3] = (ids[0, 3] + 1) % 50  # change text token 3
    ones = torch.ones(1, L)
    with torch.no_grad():
        for fn in (uni_modal_mask, multimodal_causal_mask):  # queries never see the text
            a, b = qf(q, ids, fn(Q, ones), img), qf(q, ids2, fn(Q, ones), img)
            assert torch.allclose(a[:, :Q], b[:, :Q], atol=1e-6)
        a, b = qf(q, ids, multimodal_causal_mask(Q, ones), img), qf(q, ids2, multimodal_causal_mask(Q, ones), img)
        assert torch.allclose(a[:, Q:Q + 3], b[:, Q:Q + 3], atol=1e-6)  # text before token 3: unchanged
        assert not torch.allclose(a[:, Q + 3:], b[:, Q + 3:], atol=1e-4)
        a, b = qf(q, ids, bidirectional_mask(Q, ones), img), qf(q, ids2, bidirectional_mask(Q, ones), img)
        assert not torch.allclose(a[:, :Q], b[:, :Q], atol=1e-4)  # ITM / InstructBLIP: queries read the text
        # uni-modal: the text does not see the image either
        img2 = torch.randn(1, 7, 24)
        a, b = qf(q, ids, uni_modal_mask(Q, ones), img), qf(q, ids, uni_modal_mask(Q, ones), img2)
        assert torch.allclose(a[:, Q:], b[:, Q:], atol=1e-6)
        assert not torch.allclose(a[:, :Q], b[:, :Q], atol=1e-4)


# ---------------------------------------------------------------------------- parity
def _randomise(*modules):
    torch.manual_seed(1)
    for m in modules:
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.3)  # far from the init, so a mis-copied tensor shows


def _inputs():
    torch.manual_seed(2)
    B, Q, L, P = 2, 5, 6, 7
    text_mask = torch.ones(B, L, dtype=torch.long)
    text_mask[1, 4:] = 0
    full = torch.cat([torch.ones(B, Q, dtype=torch.long), text_mask], 1)
    return torch.randn(B, Q, 32), torch.randint(1, 50, (B, L)), text_mask, full, torch.randn(B, P, 24)


def test_parity_blip2_qformer_with_text():
    from transformers import Blip2QFormerConfig, Blip2QFormerModel
    from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

    cfg = Blip2QFormerConfig(**HF_KW, use_qformer_text_input=True)
    hf, emb = Blip2QFormerModel(cfg).eval(), Blip2TextEmbeddings(cfg).eval()
    _randomise(hf, emb)
    ours = from_hf(hf, embeddings=emb).eval()
    q, ids, tm, full, img = _inputs()
    with torch.no_grad():
        ref = hf(query_embeds=emb(ids, query_embeds=q), query_length=q.shape[1], attention_mask=full,
                 encoder_hidden_states=img).last_hidden_state
        out = ours(q, ids, bidirectional_mask(q.shape[1], tm), img)
        assert (ref - out).abs().max().item() <= 1e-5
        # query-only, as inside Blip2ForConditionalGeneration
        ref = hf(query_embeds=q, encoder_hidden_states=img).last_hidden_state
        assert (ref - ours(q, None, None, img)).abs().max().item() <= 1e-5
        # text-only, as Blip2TextModelWithProjection
        ref = hf(query_embeds=emb(ids), query_length=0, attention_mask=tm).last_hidden_state
        assert (ref - ours(None, ids, bidirectional_mask(0, tm))).abs().max().item() <= 1e-5


def test_parity_instructblip_qformer():
    from transformers import InstructBlipQFormerConfig, InstructBlipQFormerModel

    hf = InstructBlipQFormerModel(InstructBlipQFormerConfig(**HF_KW)).eval()
    _randomise(hf)
    ours = from_hf(hf).eval()
    q, ids, tm, full, img = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=full, query_embeds=q, encoder_hidden_states=img).last_hidden_state
        out = ours(q, ids, bidirectional_mask(q.shape[1], tm), img)
    assert (ref - out).abs().max().item() <= 1e-5


def test_loading_is_strict_and_says_what_is_wrong():
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    hf = Blip2QFormerModel(Blip2QFormerConfig(**HF_KW))
    sd = hf.state_dict()
    ours = QFormer(qformer_config_from_hf(hf.config))
    assert ours.word_embeddings is None and ours.layers[0].ffn_text is None  # query-only, like the checkpoint
    load_hf(ours, {f"qformer.{k}": v for k, v in sd.items()})  # whole-checkpoint prefix works
    del sd["encoder.layer.0.crossattention.attention.key.weight"]
    with pytest.raises(WeightsMismatchError, match="cross_attn.k_proj.weight"):
        load_hf(ours, sd)


# ---------------------------------------------------------------------- the bridge
def test_bridge_shapes_and_attention_maps():
    torch.manual_seed(0)
    b = QFormerBridge(24, 40, num_query_tokens=6, vocab_size=30, hidden_size=32, num_hidden_layers=4,
                      num_attention_heads=4, intermediate_size=48).eval()
    feats = torch.randn(3, 16, 24)
    assert b.num_tokens((4, 4)) == b.num_tokens((8, 8)) == 6  # a fixed budget, whatever the grid
    with inspect(b) as seen:
        out = b(feats, (4, 4))
    assert out.shape == (3, 6, 40)
    maps = b.attention_maps(seen)
    assert maps.shape == (3, 6, 16)
    assert torch.allclose(maps.sum(-1), torch.ones(3, 6), atol=1e-5)
    assert sum(k.endswith("cross_attn.weights") for k in seen) == 2  # layers 0 and 2
    # the ITC pass under the uni-modal mask == separate image-only and text-only passes
    ids, tm = torch.randint(0, 30, (3, 5)), torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 4 + [0]])
    with torch.no_grad():
        z, t = b.itc_features(feats, ids, tm)
        assert torch.allclose(z, b.image_itc(feats), atol=1e-5)
        assert torch.allclose(t, b.text_itc(ids, tm), atol=1e-5)
        sim = b.similarity(z, t)
    assert sim.shape == (3, 3)
    expect = (z[1] @ t[2]).max() / 0.07
    assert torch.allclose(sim[1, 2], expect, atol=1e-4)  # max over queries / temperature


def test_stage1_losses_learn_on_a_fixed_batch():
    torch.manual_seed(0)
    b = QFormerBridge(24, 40, num_query_tokens=4, vocab_size=30, hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=48, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
    feats = torch.randn(8, 16, 24)
    ids = torch.randint(0, 30, (8, 6))
    tm = torch.ones(8, 6, dtype=torch.long)
    opt = torch.optim.AdamW(b.parameters(), lr=3e-3)
    first = None
    for _ in range(50):  # ITC sits on a plateau for ~25 steps, until the queries differ per image
        losses = b.stage1_losses(feats, ids, tm)
        first = first or {k: float(v.detach()) for k, v in losses.items()}
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    last = {k: float(v.detach()) for k, v in b.stage1_losses(feats, ids, tm).items()}
    assert set(last) == {"itc", "itm", "itg"}
    assert last["itc"] < 0.7 * first["itc"], (first, last)
    assert last["itg"] < 0.7 * first["itg"], (first, last)


# ----------------------------------------------------------------- the tiny models
@pytest.fixture(scope="module")
def blip2(tiny_assets):
    from mmkit.recipes import get_recipe
    from mmkit.vlm import build_model

    return build_model(get_recipe("blip2-tiny"))


@pytest.fixture(scope="module")
def instructblip(tiny_assets):
    from mmkit.recipes import get_recipe
    from mmkit.vlm import build_model

    return build_model(get_recipe("instructblip-tiny"))


def test_caption_is_the_assistant_turn(blip2):
    from mmkit.data.processor import answer_ids
    from mmkit.data.shapes import ShapesWorld

    recs = [ShapesWorld().sample("train", i, task="caption") for i in range(3)]
    batch = blip2.processor(recs)
    end = blip2.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids, mask = answer_ids(batch["input_ids"], batch["labels"], end, 63)
    for r, row, m in zip(recs, ids, mask):
        text = blip2.tokenizer.decode(row[m.bool()], skip_special_tokens=False)
        assert text == r["conversations"][-1]["value"] + "<|im_end|>"


def test_prefix_path_and_token_budget(blip2):
    from mmkit.data.shapes import ShapesWorld
    from mmkit.vlm import VLM

    assert isinstance(blip2, VLM) and blip2.num_image_tokens() == 32  # 32 queries vs 64 patches
    rec = ShapesWorld().sample("test", 0, task="vqa")
    batch = blip2.processor([rec])
    assert int((batch["input_ids"] == blip2.image_token_id).sum()) == 32
    out = blip2(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["pixel_values"])
    assert out.loss is not None and out.logits.shape[:2] == batch["input_ids"].shape
    assert isinstance(blip2.generate([rec["image"]], "What color is the circle?", max_new_tokens=3)[0], str)
    with pytest.raises(ValueError, match="itc\\+itm\\+itg"):
        blip2(**{k: v for k, v in batch.items() if k != "ids"}, objective="itc+mlm")


def test_instructblip_queries_depend_on_the_question(instructblip, blip2):
    from mmkit.data.shapes import ShapesWorld

    image = ShapesWorld().sample("test", 1, task="vqa")["image"]
    recs = [instructblip.prompt_record([image], q) for q in ("What color is the circle?", "How many objects?")]
    batch = instructblip.processor(recs, for_generation=True)
    ids, mask = instructblip.instructions(batch["input_ids"])
    want = instructblip.tokenizer("What color is the circle?", add_special_tokens=False)["input_ids"]
    row0 = ids[0][mask[0].bool()].tolist()
    assert row0[0] == instructblip.bridge.cls_token_id and row0[1:] == instructblip.tokenizer("\n")["input_ids"] + want
    instructblip.eval()
    with torch.no_grad():
        e = instructblip.embed(batch["input_ids"], batch["pixel_values"])  # (2, T, D)
        is_img = batch["input_ids"] == instructblip.image_token_id
        a, b = e[0][is_img[0]], e[1][is_img[1]]
        assert not torch.allclose(a, b, atol=1e-4)  # same image, different question -> different tokens
        blip2.eval()
        e2 = blip2.embed(batch["input_ids"], batch["pixel_values"])
        assert torch.allclose(e2[0][is_img[0]], e2[1][is_img[1]], atol=1e-6)  # BLIP-2: question-blind


def test_recipes_groups_and_round_trip(tiny_assets):
    from mmkit.recipes import Recipe, get_recipe
    from mmkit.train import set_trainable
    from mmkit.vlm import build_model

    for name in ("blip2-tiny", "instructblip-tiny", "minigpt4-tiny", "blip2-hf", "instructblip-hf", "minigpt4-hf"):
        r = get_recipe(name)
        assert Recipe.from_json(r.to_json()) == r
        assert r.stages[0].objective == "itc+itm+itg"
    m = build_model(get_recipe("minigpt4-tiny"))
    trained = set_trainable(m, ["projection"])  # MiniGPT-4: one linear layer into the LM
    assert sorted(trained) == ["bridge.language_projection.bias", "bridge.language_projection.weight"]
    trained = set(set_trainable(m, ["qformer"]))
    assert "bridge.query_tokens" in trained and "bridge.temp" in trained
    assert not any("language_projection" in n or n.startswith(("lm.", "vision.")) for n in trained)


def test_the_lora_variant_changes_only_what_the_last_stage_trains(tiny_assets):
    """blip2-tiny-lora: blip2-tiny plus LoRA adapters on the LM in the instruct stage; the LM's own
    weights stay frozen, and at initialisation (LoRA's B = 0) it computes exactly blip2-tiny."""
    from mmkit.data.shapes import ShapesWorld
    from mmkit.recipes import get_recipe
    from mmkit.train import set_trainable
    from mmkit.vlm import build_model

    paper, lora = get_recipe("blip2-tiny"), get_recipe("blip2-tiny-lora")
    assert [s.train for s in paper.stages[:2]] == [s.train for s in lora.stages[:2]]
    assert paper.stages[2].train == ["bridge"] and lora.stages[2].train == ["bridge", "lora"]
    a, b = build_model(paper), build_model(lora)
    b.bridge.load_state_dict(a.bridge.state_dict())   # the same Q-Former in both
    trained = set_trainable(b, lora.stages[2].train)
    lm_trained = [n for n in trained if n.startswith("lm.")]
    assert lm_trained and all("lora_" in n for n in lm_trained)
    batch = {k: v for k, v in a.processor([ShapesWorld().sample("test", 0, "vqa")]).items() if k != "ids"}
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.allclose(a(**batch)["logits"], b(**batch)["logits"], atol=1e-5)


def test_trainer_logs_three_losses_and_checkpoint_reloads(tiny_assets, tmp_path):
    from mmkit.recipes import apply_overrides, get_recipe
    from mmkit.train import Trainer, load_model
    from mmkit.vlm import build_model

    r = apply_overrides(get_recipe("instructblip-tiny"), [
        "stages.0.steps=2", "stages.1.steps=1", "stages.2.steps=1", "stages.*.batch_size=4",
        "stages.*.warmup_steps=1", "log_every=1"])
    m = build_model(r)
    lm_before = {k: v.clone() for k, v in m.lm.state_dict().items()}
    Trainer(m, r, tmp_path, progress=False).train()
    logs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    s1 = [x for x in logs if x["stage"] == "represent"]
    assert len(s1) == 2 and all({"loss_itc", "loss_itm", "loss_itg"} <= set(x) for x in s1)
    assert abs(s1[0]["loss"] - (s1[0]["loss_itc"] + s1[0]["loss_itm"] + s1[0]["loss_itg"])) < 1e-4
    assert all(torch.equal(lm_before[k], v) for k, v in m.lm.state_dict().items())  # the LM stays frozen
    back = load_model(tmp_path)
    assert type(back).__name__ == "InstructBlipVLM"
    assert torch.equal(back.bridge.query_tokens, m.bridge.query_tokens)


# ------------------------------------------------------------------------ exercises
@pytest.mark.parametrize("name", ["itg_mask", "itc_similarity", "count_qformer_params"])
def test_exercises_accept_the_reference_and_print_when_unsolved(name, capsys):
    from mmkit import exercises as ex
    from mmkit.exercises import blip2 as _registers  # noqa: F401

    assert ex.check(name, ex._reference(name)), capsys.readouterr().out
    assert capsys.readouterr().out.startswith("✓ correct")

    def not_done(*a):
        raise NotImplementedError

    assert not ex.check(name, not_done) and "not written yet" in capsys.readouterr().out
    assert not ex.check(name, lambda *a: 1 / 0) and "ZeroDivisionError" in capsys.readouterr().out


def test_exercise_checks_name_the_mistake(capsys):
    from mmkit import exercises as ex
    from mmkit.exercises import blip2 as _registers  # noqa: F401
    from mmkit.bridges.blip2 import bidirectional_mask

    assert not ex.check("itg_mask", lambda Q, L: bidirectional_mask(Q, torch.ones(1, L))[0])
    assert "a query attends to text" in capsys.readouterr().out
    assert not ex.check("itg_mask", lambda Q, L: torch.ones(Q + L, Q + L, dtype=torch.bool).tril())
    assert "the queries should see all queries" in capsys.readouterr().out  # plain causal: queries too
    assert not ex.check("itg_mask", lambda Q, L: uni_modal_mask(Q, torch.ones(1, L))[0].tril())
    assert "cannot see every query" in capsys.readouterr().out
    assert not ex.check("itc_similarity", lambda z, t, temp: torch.einsum("nqe,me->nmq", z, t).mean(-1) / temp)
    assert "averaged over the queries" in capsys.readouterr().out
    ref = ex._reference("count_qformer_params")
    assert not ex.check("count_qformer_params", lambda D, n, I, Dv, f, Q: ref(D, n, I, Dv, f, Q) - Q * D)
    assert "query tokens" in capsys.readouterr().out
    assert not ex.check("count_qformer_params", lambda D, n, I, Dv, f, Q: ref(D, n, I, Dv, 1, Q))
    assert "cross_every" in capsys.readouterr().out


def test_retrieval_and_mask_figure(blip2):
    from mmkit.eval import itc_embed, retrieval
    from mmkit.viz import plot_qformer_masks

    r = retrieval(blip2, n=6)
    assert r["similarity"].shape == (6, 6) and 0.0 <= r["i2t_r1"] <= 1.0 and len(r["captions"]) == 6
    z, t = itc_embed(blip2, r["images"][:2], r["captions"][:3])
    assert torch.allclose(blip2.bridge.similarity(z, t), r["similarity"][:2, :3], atol=1e-4)
    fig = plot_qformer_masks(3, ["[CLS]", "a", "cat"])
    assert len(fig.axes) == 3 and fig.axes[2].get_title().startswith("ITG")
