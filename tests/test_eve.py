"""EVE: Patch Embedding Layer (CA1 local, CLS + CA2 global, SPL per row), Patch Aligning
Layer (1 - cos to a frozen CLIP), the three stages through the Trainer."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mmkit.encoder_free.eve import PatchEmbeddingLayer
from mmkit.nn import inspect
from mmkit.recipes import apply_overrides, get_recipe


@pytest.fixture(scope="module")
def model(tiny_assets):
    from mmkit.vlm import build_model

    torch.manual_seed(0)
    return build_model(get_recipe("eve-tiny")).eval()


def _record(image, question="What colour is the circle?", answer="red"):
    return {"id": "r", "images": [image],
            "conversations": [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]}


# ----------------------------------------------------------------------------- PEL
@pytest.mark.parametrize("H,W", [(64, 64), (32, 72), (80, 24)])
def test_pel_token_count_is_one_plus_rows_times_cols_plus_one(H, W):
    pel = PatchEmbeddingLayer(48, patch_size=4, pool=2, dim=32, num_heads=4).eval()
    h, w = H // 8, W // 8
    out = pel(torch.randn(2, 3, H, W))
    assert out.shape == (2, 1 + h * (w + 1), 48) == (2, pel.num_tokens((h, w)), 48)
    rows = out[:, 1:].view(2, h, w + 1, 48)
    spl = rows[:, :, w]  # the <SPL> column: one learned token, the same after every row
    assert torch.allclose(spl, spl[:, :1].expand_as(spl), atol=1e-6)


def test_ca1_is_local_and_cls_is_global():
    """Changing the pixels under one 8x8 window changes that window's token and <CLS>, nothing else."""
    torch.manual_seed(0)
    pel = PatchEmbeddingLayer(48, patch_size=4, pool=2, dim=32, num_heads=4).eval()
    x = torch.randn(1, 3, 32, 48)  # 4 x 6 windows
    y = x.clone()
    y[:, :, 8:16, 24:32] += 1.0  # window (row 1, col 3)
    with torch.no_grad():
        a, b = pel(x), pel(y)
    changed = (a - b).abs().amax(-1)[0] > 1e-6  # (1 + 4*7,)
    want = torch.zeros(1 + 4 * 7, dtype=torch.bool)
    want[0] = True  # <CLS> sees every patch (CA2)
    want[1 + 1 * 7 + 3] = True  # the one window (CA1 sees only its 2x2 sub-patches)
    assert torch.equal(changed, want)
    with inspect(pel) as seen:  # the PEL alone: CA2's map folded onto the 4 x 6 token grid
        pel(x)
    m = pel.attention_maps(seen)
    assert m.shape == (1, 1, 4 * 6) and abs(float(m.sum()) - 1) < 1e-5


def test_cls_attention_map_lies_on_the_token_grid(model, world):
    img = world.render(world.scene("test", 0), size=(64, 32))
    out = model.explain([img], "What colour is the circle?", "red")
    assert out["grid"] == (4, 8) and out["image_tokens"] == [1 + 4 * 9]
    m = out["maps"][0]["mean over outputs"]
    assert m.shape == (4, 8) and abs(m.sum() - 1) < 1e-4
    assert out["views"][0].size == (64, 32)
    with inspect(model) as seen:
        model.encode_images(model.processor([_record(img)])["pixel_values"])
    raw = seen["bridge.ca2.weights"].mean(1)  # (1, 1, 8*16) over the fine 4 px patches
    assert torch.allclose(model.bridge.attention_maps(seen).sum(-1), raw.sum(-1), atol=1e-5)


# ----------------------------------------------------------------------------- PAL
def test_align_loss_is_one_minus_cosine_to_the_frozen_encoder(model, world):
    """Recompute the PAL loss by hand: 64 px image -> 8x8 token grid == the CLIP's 8x8 grid."""
    batch = model.processor([_record(world.render(world.scene("test", 1)))])
    ids, pv = batch["input_ids"], batch["pixel_values"]
    with torch.no_grad():
        out = model.lm(inputs_embeds=model.embed(ids, pv), output_hidden_states=True)
        got = model.align_loss(out.hidden_states, ids, pv)
        pos = (ids[0] == model.image_token_id).nonzero().flatten()  # 1 + 8*9 positions
        keep = pos[1:].view(8, 9)[:, :8].flatten()  # drop CLS and the SPL column
        states = torch.stack([out.hidden_states[i][0, keep] for i in model.align_layers], 1)  # (64, L, D)
        pred = model.pal(states)
        target = model.target.features(pv, layer=-2, drop_cls=True)[0]  # same normalisation, same size
        want = (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
    assert abs(float(got) - float(want)) < 1e-5
    assert model.target_layer == -2 and len(model.align_layers) == model.lm.config.num_hidden_layers


def test_objectives_and_what_learns_in_stage_one(model, world):
    from mmkit.train import set_trainable

    batch = {k: v for k, v in model.processor([_record(world.render(world.scene("test", 2)))]).items() if k != "ids"}
    set_trainable(model, ["bridge", "pal"])  # stage 1: the LM frozen
    try:
        out = model(**batch, objective="lm+align")
        assert set(out["losses"]) == {"lm", "align"}
        w = model.align_weight
        assert abs(float(out["loss"].detach()) - float(out["losses"]["lm"] + w * out["losses"]["align"])) < 1e-5
        out["loss"].backward()
        assert model.bridge.patch_embedding.weight.grad.abs().sum() > 0
        assert model.pal.proj.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in model.lm.parameters())
        assert all(p.grad is None and not p.requires_grad for p in model.target.parameters())
        plain = model(**batch)  # objective "lm": the next-token loss alone
        assert abs(float(plain.loss.detach()) - float(out["losses"]["lm"])) < 1e-5
        with pytest.raises(ValueError, match="unknown objective"):
            model(**batch, objective="itc")
    finally:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(False)
    assert "target" not in model.module_groups()


# ---------------------------------------------------------------------- training
def test_three_stages_train_align_and_answer(tiny_assets, tmp_path, world, write_llava_data):
    """eve-tiny's three stages, shortened, on 8 fixed colour questions: the alignment loss
    falls in stage 1 with the LM frozen, and the answers' loss falls overall."""
    from mmkit.train import Trainer, load_model
    from mmkit.vlm import build_model

    records = [world.sample("train", i, "vqa", qtype="color") for i in range(8)]
    data = write_llava_data(records, tmp_path, "colors.json")
    recipe = apply_overrides(get_recipe("eve-tiny"),
                             ["stages.0.steps=12", "stages.1.steps=6", "stages.2.steps=12", "stages.*.batch_size=8",
                              "stages.*.warmup_steps=2", "stages.*.lr=0.003", "log_every=1",
                              f"stages.*.data={data}", f"stages.*.image_folder={tmp_path}"])
    m = build_model(recipe)
    batch = {k: v for k, v in m.processor(records).items() if k != "ids"}
    lm_before = {k: v.clone() for k, v in m.lm.state_dict().items()}
    target_before = {k: v.clone() for k, v in m.target.state_dict().items()}

    def loss():
        m.eval()
        with torch.no_grad():
            return float(m(**batch).loss)

    before = loss()

    class Stage1Check:  # the LM must still be untouched when stage 1 ends
        def on_stage_start(self, trainer, stage): ...
        def on_step_end(self, trainer, logs): ...
        def on_stage_end(self, trainer, stage):
            if stage.name == "prealign":
                assert all(torch.equal(v, m.lm.state_dict()[k]) for k, v in lm_before.items())

    Trainer(m, recipe, tmp_path / "run", callbacks=[Stage1Check()], progress=False).train()
    logs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    align = [l["loss_align"] for l in logs if l["stage"] == "prealign"]
    assert len(align) == 12 and min(align[-3:]) < align[0] - 0.05
    assert all("loss_align" not in l for l in logs if l["stage"] == "sft")
    assert loss() < 0.6 * before
    assert not all(torch.equal(v, m.lm.state_dict()[k]) for k, v in lm_before.items())  # stages 2-3 tune it
    assert all(torch.equal(v, m.target.state_dict()[k]) for k, v in target_before.items())
    again = load_model(tmp_path / "run")
    with torch.no_grad():
        assert abs(float(again(**batch).loss) - loss()) < 1e-4


def test_align_weight_zero_is_eve_without_pal(tiny_assets, world):
    from mmkit.vlm import build_model

    m = build_model(apply_overrides(get_recipe("eve-tiny"), ["bridge_kwargs.align_weight=0"])).eval()
    batch = {k: v for k, v in m.processor([_record(world.render(world.scene("test", 3)))]).items() if k != "ids"}
    with torch.no_grad():
        out = m(**batch, objective="lm+align")
    assert set(out["losses"]) == {"lm"} and abs(float(out["loss"]) - float(out["losses"]["lm"])) < 1e-6
