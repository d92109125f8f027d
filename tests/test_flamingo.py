"""Flamingo: media mask, Perceiver Resampler and gated cross-attention (parity with
transformers' Idefics), the frozen-LM wrapper (zero gates, KV cache, batching, 4-bit),
few-shot prompts, gate logging and a short real training run."""
from __future__ import annotations

import pytest
import torch

from mmkit.bridges.flamingo import PerceiverResampler, media_mask
from mmkit.callbacks import GateLogger, load_gates
from mmkit.convert import from_hf
from mmkit.data.shapes import ShapesConfig, ShapesWorld
from mmkit.eval import evaluate_few_shot, few_shot_record
from mmkit.nn import inspect
from mmkit.recipes import apply_overrides, get_recipe

IMG = 9  # an image-token id for the mask tests


# ------------------------------------------------------------------------- media mask
def test_media_mask_latest_image_only_and_nothing_before_the_first():
    ids = torch.tensor([[5, IMG, 6, 7, IMG, 8, 1]])
    m = media_mask(ids, IMG)  # (1, 7, 2)
    want = torch.tensor([[0, 0], [1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 1]], dtype=torch.bool)
    assert m.shape == (1, 7, 2) and torch.equal(m[0], want)
    every = media_mask(ids, IMG, only_latest=False)[0]
    assert torch.equal(every[5], torch.tensor([True, True])) and not every[0].any()


def test_media_mask_rows_and_padding():
    ids = torch.tensor([[0, 0, IMG, 4, 4], [IMG, 4, IMG, 4, IMG]])  # row 0 left-padded, 1 image
    m = media_mask(ids, IMG)
    assert m.shape == (2, 5, 3)
    assert not m[0, :2].any() and m[0, 2:, 0].all() and not m[0, :, 1:].any()
    assert m[1].sum(-1).eq(1).all() and m[1, 4, 2]


# ---------------------------------------------------------------------------- parity
def _idefics_config(alpha_type="float"):
    from transformers import IdeficsConfig

    return IdeficsConfig(
        hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2, vocab_size=64,
        alpha_type=alpha_type, alpha_initializer="zeros", qk_layer_norms=False,
        vision_config={"embed_dim": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                       "image_size": 16, "patch_size": 8},
        perceiver_config={"use_resampler": True, "resampler_n_latents": 5, "resampler_depth": 2,
                          "resampler_n_heads": 4, "resampler_head_dim": 8},
    )


def test_perceiver_resampler_matches_idefics():
    from transformers.models.idefics.perceiver import IdeficsPerceiverResampler

    torch.manual_seed(0)
    cfg = _idefics_config()
    p = cfg.perceiver_config
    hf = IdeficsPerceiverResampler(cfg, 32, p.resampler_depth, p.resampler_n_heads, p.resampler_head_dim,
                                   p.resampler_n_latents).eval()
    for prm in hf.parameters():  # LayerNorms start at (1, 0): make them count
        prm.data.add_(0.1 * torch.randn_like(prm))
    ours = from_hf(hf).eval()
    feats = torch.randn(3, 20, 32)
    with torch.no_grad():
        want, got = hf(feats), ours(feats)
    assert got.shape == (3, 5, 32)
    assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("alpha_type", ["float", "vector"])
def test_gated_cross_attention_matches_idefics(alpha_type):
    from transformers.models.idefics.modeling_idefics import IdeficsGatedCrossAttentionLayer

    torch.manual_seed(0)
    cfg = _idefics_config(alpha_type)
    cfg._attn_implementation = "eager"
    hf = IdeficsGatedCrossAttentionLayer(cfg, layer_idx=0).eval()
    with torch.no_grad():  # non-zero gates (and norms away from 1): the test sees both sublayers
        for name, prm in hf.named_parameters():
            if "alpha" in name or "layernorm" in name:
                prm.add_(0.5 * torch.randn_like(prm))
    assert hf.alpha_cross_attn.abs().min() > 0
    ours = from_hf(hf).eval()
    B, T, N, L = 2, 7, 2, 5
    y, media = torch.randn(B, T, 48), torch.randn(B, N * L, 32)
    ids = torch.tensor([[1, IMG, 2, 3, IMG, 4, 5], [1, 2, 3, IMG, 4, 5, 6]])  # row 1: 2 tokens before any image
    mm = media_mask(ids, IMG, num_media=N).repeat_interleave(L, dim=-1)  # (B, T, N*L)
    additive = torch.zeros(B, 1, T, N * L).masked_fill(~mm[:, None], torch.finfo(torch.float32).min)
    gate = mm.any(-1).float()  # Idefics' cross_attention_gate: 0 for tokens seeing no image
    with torch.no_grad():
        want = hf(y, None, image_hidden_states=media, image_attention_mask=additive, cross_attention_gate=gate)
        got = ours(y, media, mm)
    assert (got - want).abs().max() <= 1e-5


def test_resampler_token_count_is_fixed_for_any_grid_and_video():
    res = PerceiverResampler(16, num_latents=6, depth=1, num_heads=2, max_frames=4)
    assert res(torch.randn(2, 64, 16)).shape == (2, 6, 16)
    assert res(torch.randn(2, 400, 16)).shape == (2, 6, 16)
    assert res(torch.randn(2, 3, 64, 16)).shape == (2, 6, 16)  # 3 frames of 64 patches
    assert res.num_tokens((8, 8)) == res.num_tokens((20, 20)) == 6
    with pytest.raises(ValueError, match="max_frames >= 5"):
        res(torch.randn(1, 5, 4, 16))


# --------------------------------------------------------------------- the wrapped LM
@pytest.fixture(scope="module")
def model(tiny_assets):
    from mmkit.vlm import build_model

    torch.manual_seed(0)
    m = build_model(get_recipe("flamingo-tiny")).eval()
    return m


def _open_gates(model, value=0.7, dense=None):
    torch.manual_seed(1)
    with torch.no_grad():
        for b in model.xattn:
            b.alpha_xattn.fill_(value)
            b.alpha_dense.fill_(value / 3 if dense is None else dense)
            for lin in (b.xattn.q_proj, b.xattn.k_proj, b.xattn.v_proj, b.xattn.out_proj):
                lin.weight.normal_(0, 0.2)


def test_processor_puts_one_marker_per_image(model, world):
    rec = world.sample("train", 0, "interleaved", shots=2)
    enc = model.processor.encode(rec)
    assert enc.input_ids.count(model.image_token_id) == 3 and len(enc.pixel_values) == 3
    assert model.num_image_tokens() == get_recipe("flamingo-tiny").bridge_kwargs["num_latents"]


def test_zero_gates_leave_the_frozen_lm_exactly_unchanged(model, world):
    batch = model.processor([world.sample("train", i, "interleaved") for i in range(3)])
    with torch.no_grad():
        wrapped = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        pixel_values=batch["pixel_values"]).logits
        plain = model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(wrapped, plain)
    assert all(v == 0.0 for v in model.gate_values()["xattn"].values())


def test_open_gates_change_only_tokens_after_an_image(tiny_assets, world):
    from mmkit.vlm import build_model

    m = build_model(get_recipe("flamingo-tiny")).eval()
    _open_gates(m, dense=0.0)  # the dense FFW acts on every token; the cross-attention only after an image
    rec = world.sample("train", 1, "vqa")
    rec["conversations"][0]["value"] = "Look.\n" + rec["conversations"][0]["value"]
    batch = m.processor([rec])
    ids = batch["input_ids"]
    first = int((ids[0] == m.image_token_id).nonzero()[0])
    with torch.no_grad(), inspect(m) as seen:
        logits = m(input_ids=ids, pixel_values=batch["pixel_values"]).logits
        plain = m.lm(input_ids=ids).logits
    assert torch.allclose(logits[0, :first], plain[0, :first], atol=1e-6)  # causal LM + empty mask rows
    assert (logits[0, first:] - plain[0, first:]).abs().max() > 1e-3
    # what the visualisation draws: the mask, and attention only where it allows
    assert torch.equal(seen["media_mask"], media_mask(ids, m.image_token_id))
    w = seen["xattn.0.xattn.weights"]  # (1, H, T, L)
    assert w[0, :, :first].abs().max() == 0 and torch.allclose(w[0, :, first:].sum(-1), torch.ones(1))
    maps = m.token_to_image(seen)
    assert maps.shape == (ids.shape[1], 1, 64) and torch.allclose(maps[first:].sum(-1), torch.ones(1), atol=1e-5)


def test_generate_cache_equals_no_cache_and_batched_equals_single(tiny_assets, world):
    from mmkit.vlm import build_model

    m = build_model(get_recipe("flamingo-tiny")).eval()
    _open_gates(m, 1.5)
    recs = [few_shot_record(world, "test", 0, 2, "vqa"), world.sample("test", 1, "vqa"),
            world.sample("test", 2, "interleaved", shots=1)]
    cached = m.generate(records=recs, max_new_tokens=8)
    assert cached == m.generate(records=recs, max_new_tokens=8, use_cache=False)
    assert cached == [m.generate(records=[r], max_new_tokens=8)[0] for r in recs]
    assert len(set(cached)) > 1  # the images matter: not one constant answer
    # the same greedy answer as recomputing the whole sequence each step with forward()
    batch = m.processor(recs[:1], for_generation=True)
    ids = batch["input_ids"]
    with torch.no_grad():
        for _ in range(8):
            nxt = m(input_ids=ids, pixel_values=batch["pixel_values"]).logits[:, -1].argmax(-1, keepdim=True)
            if int(nxt) in m.stop_token_ids():
                break
            ids = torch.cat([ids, nxt], 1)
    assert m.tokenizer.decode(ids[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip() == cached[0]


def test_cache_hook_refuses_an_argument_layout_it_does_not_know(tiny_assets, world):
    """A transformers release that passes the KV cache some new way must fail loudly,
    not decode without the images (5.24 renamed ``past_key_values`` to ``cache``)."""
    from transformers import DynamicCache

    from mmkit.vlm import build_model

    m = build_model(get_recipe("flamingo-tiny")).eval()
    batch = m.processor([world.sample("test", 0, "vqa")], for_generation=True)
    ids, pv = batch["input_ids"], batch["pixel_values"]
    decoder, new_token = m.lm.get_decoder(), ids[:, -1:]
    with torch.no_grad(), m.media(ids, pv):
        m._start_call(decoder, (), {"input_ids": ids, "use_cache": True})  # the prompt: fine
        # the next token with its cache under a name and type the hook does not know
        with pytest.raises(RuntimeError, match="no KV cache was found.*kv_state"):
            m._start_call(decoder, (), {"input_ids": new_token, "kv_state": [(ids, ids)], "use_cache": True})
    with torch.no_grad(), m.media(ids, pv):
        m._start_call(decoder, (), {"input_ids": ids})
        stale = DynamicCache()  # a cache that holds fewer tokens than this generation has seen
        stale.update(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4), 0)
        with pytest.raises(RuntimeError, match="cache holds 3 token"):
            m._start_call(decoder, (), {"input_ids": new_token, "some_new_name": stale})
    # a cache found by its type under any keyword continues the generation
    with torch.no_grad(), m.media(ids, pv):
        m._start_call(decoder, (), {"input_ids": ids})
        ok = DynamicCache()
        ok.update(torch.zeros(1, 1, ids.shape[1], 4), torch.zeros(1, 1, ids.shape[1], 4), 0)
        m._start_call(decoder, (), {"input_ids": new_token, "some_new_name": ok})
        assert m._media.history.shape[1] == ids.shape[1] + 1 and m._media.mask.shape[1] == 1
        assert m._media.mask.any()  # the new token still sees the image


def test_only_new_blocks_train_and_the_lm_stays_frozen(model):
    from mmkit.train import set_trainable

    names = set_trainable(model, get_recipe("flamingo-tiny").stages[0].train)
    assert names and all(n.startswith(("xattn.", "bridge.")) for n in names)
    assert any(n.endswith("alpha_xattn") for n in names)
    assert model.xattn_layers == list(range(0, model.lm.config.num_hidden_layers, model.cross_every))
    set_trainable(model, [])


def test_errors_name_the_fix(model, world):
    rec = world.sample("train", 0, "vqa")
    batch = model.processor([rec])
    with pytest.raises(Exception, match="marker"):
        model(input_ids=batch["input_ids"], pixel_values=torch.cat([batch["pixel_values"]] * 2))
    with pytest.raises(ValueError, match="single-object scenes"):
        few_shot_record(ShapesWorld(ShapesConfig(min_objects=3, max_objects=3)), "test", 0, 2, "color")


def test_few_shot_records_share_the_query():
    w1 = ShapesWorld(ShapesConfig(min_objects=1, max_objects=1))
    r0, r4 = few_shot_record(w1, "test", 3, 0, "shape"), few_shot_record(w1, "test", 3, 4, "shape")
    assert r0["conversations"][1] == r4["conversations"][1] and len(r4["images"]) == 5
    assert r4["conversations"][0]["value"].count("<image>") == 5 and r0["conversations"][0]["value"] == "<image>\n"
    v2 = few_shot_record(ShapesWorld(), "test", 3, 2, "vqa")
    assert v2["conversations"][0]["value"].count("Answer:") == 3


def test_4bit_lm_keeps_the_new_blocks_in_full_precision(tiny_assets, world):
    pytest.importorskip("bitsandbytes")
    from mmkit.vlm import build_model

    try:
        m = build_model(apply_overrides(get_recipe("flamingo-tiny"), ["quantization=4bit"]))
    except Exception as e:  # pragma: no cover - depends on the bitsandbytes build
        pytest.skip(f"4-bit loading unavailable here: {e}")
    assert any("4bit" in type(mod).__name__.lower() for mod in m.lm.modules())
    assert all(p.dtype == torch.float32 for p in m.xattn.parameters())
    assert all(p.dtype == torch.float32 for p in m.bridge.parameters())
    batch = m.processor([world.sample("train", i, "vqa") for i in range(2)])
    out = m(**{k: v for k, v in batch.items() if k != "ids"})
    out.loss.backward()
    assert m.xattn[0].alpha_xattn.grad is not None and torch.isfinite(out.loss)


# --------------------------------------------------------------------------- training
def test_training_opens_the_gates_and_lowers_the_loss(tiny_assets, tmp_path, world, write_llava_data):
    """A real (short) run through the Trainer on 8 fixed colour questions, LM frozen."""
    from mmkit.train import Trainer, load_model
    from mmkit.vlm import build_model

    records = [world.sample("train", i, "vqa", qtype="color") for i in range(8)]
    data = write_llava_data(records, tmp_path, "colors.json")
    recipe = apply_overrides(get_recipe("flamingo-tiny"),
                             ["stages.0.steps=30", "stages.0.batch_size=8", "stages.0.warmup_steps=2",
                              "stages.0.lr=0.005", "log_every=1", f"stages.0.data={data}",
                              f"stages.0.image_folder={tmp_path}"])
    m = build_model(recipe)
    batch = {k: v for k, v in m.processor(records).items() if k != "ids"}

    def loss():
        m.eval()
        with torch.no_grad():
            return float(m(**batch).loss)

    before = loss()  # the frozen LM's own loss (gates at 0)
    lm_before = {k: v.clone() for k, v in m.lm.state_dict().items()}
    gates = GateLogger()
    Trainer(m, recipe, tmp_path / "run", callbacks=[gates], progress=False).train()
    assert loss() < 0.7 * before
    assert all(torch.equal(v, m.lm.state_dict()[k]) for k, v in lm_before.items())  # the LM stayed frozen
    curves = gates.curves("xattn")
    assert set(curves) == {f"layer {i}" for i in m.xattn_layers}
    # every gate leaves 0; the first layer's opens least (measured at step 30, gates at the recipe's
    # 1e-2: 0.012 in layer 0, 0.07 / 0.10 / 0.12 in layers 1-3; docs/benchmarks.md sees the same order)
    assert all(c[0] == 0.0 and c[30] > 0.0 for c in curves.values())
    assert max(c[30] for c in curves.values()) > 0.05
    assert (tmp_path / "run" / "gates.jsonl").read_text().count("\n") == 31
    assert load_gates(tmp_path / "run").curves("xattn") == curves  # what a shipped reference keeps
    assert load_model(tmp_path / "run").gate_values() == m.gate_values()


def test_gates_get_their_own_learning_rate(model, tmp_path):
    """flamingo-tiny trains the 8 alphas at 10x the stage's rate (param_group "gates")."""
    from mmkit.train import Trainer, set_trainable

    recipe = get_recipe("flamingo-tiny")
    stage = recipe.stages[0]
    set_trainable(model, stage.train)
    groups = {g["name"]: g for g in Trainer(model, recipe, tmp_path, progress=False)._optimizer(stage).param_groups}
    alphas = {id(p) for n, p in model.named_parameters() if ".alpha_" in n}
    assert len(alphas) == 2 * len(model.xattn_layers)
    assert groups["gates/no_decay"]["lr"] == stage.lr_groups["gates"] == 10 * stage.lr
    members = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert members.pop("gates/no_decay") == alphas
    assert not any(ids & alphas for ids in members.values())  # no alpha in any other group
    assert groups["xattn"]["lr"] == stage.lr and model.param_group("lm.model.layers.0.mlp.up_proj.weight") is None


def test_evaluate_few_shot_reports_each_shot_count(model):
    res = evaluate_few_shot(model, "color", shots=(0, 2), n=4, batch_size=4)
    assert set(res["accuracy"]) == {0, 2} and all(0 <= v <= 1 for v in res["format"].values())


def test_explain_gives_maps_and_gates(tiny_assets, world):
    from mmkit.vlm import build_model

    m = build_model(get_recipe("flamingo-tiny")).eval()
    _open_gates(m)
    rec = world.sample("test", 0, "vqa")
    out = m.explain([rec["image"]], rec["conversations"][0]["value"], rec["meta"]["answer"])
    assert out["grid"] == (8, 8) and out["image_tokens"] == [1] and out["media_tokens"] == 16
    assert "answer -> image" in out["maps"][0] and abs(out["maps"][0]["answer -> image"].sum() - 1) < 1e-4
    assert out["gates"]["xattn layer 0"] > 0.5


def test_the_reference_learned_from_examples_which_label_to_name(tiny_assets, capsys):
    """The shipped reference trained on colour / shape label documents: at 0 shots it names no
    colour, after 4 colour-labelled examples it names the query's colour (in-context learning)."""
    import json

    from mmkit.cli import main
    from mmkit.zoo import shipped_dir

    main(["eval", "--checkpoint", str(shipped_dir("flamingo-tiny")), "--few-shot", "color", "--shots", "0,4",
          "--n", "8", "--json"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["format"]["0"] <= 0.25 and res["accuracy"]["4"] >= 0.75
    with pytest.raises(SystemExit, match="shot counts"):
        main(["eval", "--checkpoint", str(shipped_dir("flamingo-tiny")), "--few-shot", "size", "--shots", "9"])
