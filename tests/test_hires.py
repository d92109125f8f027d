"""High resolution: AnyRes tiling (grid choice, crops, packing and reading it back, token
counts against the calculators), the small-text OCR world, the OCR metric, and a tiled
model that trains, is explained on its crops, saves, loads and is evaluated with
``mmkit eval --task ocr``."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mmkit.data import tiling
from mmkit.viz import tokens as T

GRIDS = [[1, 1], [1, 2], [2, 1], [2, 2]]
SIZES = [(128, 128), (200, 100), (100, 300), (64, 64), (40, 40), (256, 192), (129, 64), (90, 211)]  # (W, H)


# ------------------------------------------------------------------ geometry
def test_best_grid_maximises_resolution_then_minimises_waste():
    assert tiling.best_grid(128, 128, 64, GRIDS) == (2, 2)  # 4 crops keep every pixel
    assert tiling.best_grid(100, 200, 64, GRIDS) == (1, 2)  # wide: one row of two
    assert tiling.best_grid(300, 100, 64, GRIDS) == (2, 1)  # tall: one column of two
    # smaller than a crop: every grid keeps the whole image, so the least waste wins
    assert tiling.best_grid(40, 40, 64, GRIDS) == (1, 1)
    # a 3:1 panorama keeps most with three crops in a row, though 2 x 2 has more area
    assert tiling.best_grid(1000, 3000, 336, tiling.DEFAULT_GRIDS) == (1, 3)
    # rows follow the height: transposing the image transposes the grid
    for w, h in SIZES:
        r, c = tiling.best_grid(h, w, 64, GRIDS)
        assert tiling.best_grid(w, h, 64, GRIDS) == (c, r)


def test_grids_are_checked_with_clear_errors():
    for bad, msg in [([], "non-empty"), ([[1, 0]], ">= 1"), ([[1, 2], [1, 2]], "twice"), ([[2]], "rows, cols"),
                     ("2x2", "non-empty")]:
        with pytest.raises(tiling.TilingError, match=msg):
            tiling.parse_grids(bad)


@pytest.mark.parametrize("w,h", SIZES + [(1024, 768), (3000, 1000), (333, 777)])
def test_unpadding_matches_transformers(w, h):
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    R, C = tiling.best_grid(h, w, 64, GRIDS)
    grid = torch.zeros(1, R * 8, C * 8)
    want = tuple(unpad_image(grid, (h, w)).shape[1:])
    top, bottom, left, right = tiling.unpadded_extent(h, w, R * 8, C * 8)
    assert (bottom - top, right - left) == want


def test_tile_image_cuts_the_canvas_in_reading_order(llava_model):
    img = Image.new("RGB", (200, 100), "white")
    img.paste(Image.new("RGB", (100, 100), "red"), (100, 0))  # right half red
    t = tiling.tile_image(llava_model.vision.preprocess, img, 64, GRIDS)
    assert t.grid == (1, 2) and t.size == (100, 200) and t.pixels.shape == (3, 3, 64, 64)
    canvas = llava_model.vision.preprocess([img], size=(64, 128), mode="pad")[0]
    assert torch.equal(t.pixels[1], canvas[:, :, :64]) and torch.equal(t.pixels[2], canvas[:, :, 64:])
    assert torch.equal(t.pixels[0], llava_model.vision.preprocess([img], size=64, mode="pad")[0])  # global view
    red = t.pixels[2][:, 32, 32]  # the right crop is red: R high, G low
    assert red[0] > 0.5 and red[1] < -0.5


def test_pack_puts_the_global_view_first_cuts_padding_and_ends_rows_with_newline():
    from mmkit.vlm import AnyRes

    ar = AnyRes(GRIDS, dim=3)
    th = tw = 4
    t = tiling.Tiles(torch.zeros(3, 3, 64, 64), (1, 2), (20, 100))  # 5:1 on a 1 x 2 grid: padding above, below
    tokens = torch.arange(3 * 16 * 3, dtype=torch.float).reshape(3, 16, 3)  # (1 + 2 crops, th*tw, D)
    out = ar.pack(tokens, t, (th, tw))
    assert tiling.unpadded_extent(20, 100, th, 2 * tw) == (1, 3, 0, 8)  # rows 1 and 2 of 4 hold the image
    assert out.shape == (16 + 2 * (8 + 1), 3)
    assert torch.equal(out[:16], tokens[0])  # the global view first
    assert torch.equal(out[16 + 8], ar.image_newline.detach()) and torch.equal(out[-1], ar.image_newline.detach())
    # a kept row lays crop 1's tokens, then crop 2's, left to right
    grid = tokens[1:].reshape(1, 2, th, tw, 3).permute(0, 2, 1, 3, 4).reshape(th, 2 * tw, 3)
    assert torch.equal(out[16:24], grid[1]) and torch.equal(out[25:33], grid[2])
    assert torch.equal(out[16:20], tokens[1, 4:8]) and torch.equal(out[20:24], tokens[2, 4:8])


def test_unpack_tokens_reads_the_packing_back_onto_the_crop_grid():
    from mmkit.vlm import AnyRes

    ar = AnyRes(GRIDS, dim=2)
    th = tw = 4
    t = tiling.Tiles(torch.zeros(3, 3, 64, 64), (1, 2), (20, 100))  # kept token rows 1 and 2 of 4
    tokens = torch.arange(3 * 16 * 2, dtype=torch.float).reshape(3, 16, 2) + 1  # no token is 0
    packed = ar.pack(tokens, t, (th, tw)).detach()  # (16 + 2 * (8 + 1), 2)
    view, crops = tiling.unpack_tokens(packed, t, (th, tw))
    assert torch.equal(view, tokens[0].reshape(th, tw, 2))  # the global view
    assert crops.shape == (th, 2 * tw, 2)
    grid = tokens[1:].reshape(1, 2, th, tw, 2).permute(0, 2, 1, 3, 4).reshape(th, 2 * tw, 2)
    assert torch.equal(crops[1:3], grid[1:3])  # each crop's tokens back in its place
    assert not crops[[0, 3]].any()  # the rows that only saw padding: zero
    newline = ar.image_newline.detach()
    assert not (crops == newline).all(-1).any()  # the newlines are left out
    view, crops = tiling.unpack_tokens(torch.arange(34.0), t, (th, tw))  # one value per token works alike
    assert crops.shape == (4, 8) and torch.equal(crops[1], torch.arange(16.0, 24.0))
    with pytest.raises(tiling.TilingError, match="34 LM tokens"):
        tiling.unpack_tokens(torch.zeros(33), t, (th, tw))


def test_canvas_view_frames_the_image_as_the_crops_cover_it():
    t = tiling.Tiles(torch.zeros(3, 3, 64, 64), (1, 2), (48, 128))
    assert t.crop == (64, 64)
    view = tiling.canvas_view(Image.new("RGB", (128, 48), "white"), t, (1, 2, 3))
    assert view.size == (128, 64)  # 1 x 2 crops: twice as wide as high, at the image's own width
    assert view.getpixel((60, 2)) == (1, 2, 3) and view.getpixel((60, 32)) == (255, 255, 255)


# ------------------------------------------------------------------ token counts
@pytest.fixture(scope="module")
def anyres_model(tiny_assets):
    from mmkit.recipes import apply_overrides, get_recipe
    from mmkit.vlm import build_model

    r = apply_overrides(get_recipe("llava-tiny"), ["image_mode=anyres", f"anyres_grids={json.dumps(GRIDS)}",
                                                   "max_length=512"])
    return build_model(r)


@pytest.mark.parametrize("w,h", SIZES)
def test_token_count_equals_the_calculator(anyres_model, w, h):
    m = anyres_model
    tiles = m.preprocess([Image.new("RGB", (w, h), "white")])[0]
    pins = [(r * 64, c * 64) for r, c in GRIDS]
    want = T.llava_next_tokens(w, h, crop=64, patch=8, pinpoints=pins)
    assert len(m.expand_image(tiles)) == want
    assert m.num_image_tokens() == 64 + 64 + 8  # an image of the encoder's own size: one crop + the global view
    with torch.no_grad():
        assert m.image_embeds([tiles])[0].shape[0] == want  # what the model writes, not only what it counts


def test_pixel_shuffle_tiles_count_like_a_coarser_patch(tiny_assets):
    from mmkit.recipes import apply_overrides, get_recipe
    from mmkit.vlm import build_model

    m = build_model(apply_overrides(get_recipe("llava-tiny"), [
        "image_mode=anyres", f"anyres_grids={json.dumps(GRIDS)}", "bridge=pixel_shuffle",
        'bridge_kwargs={"scale_factor": 2}']))
    pins = [(r * 64, c * 64) for r, c in GRIDS]
    for w, h in SIZES[:4]:
        tiles = m.preprocess([Image.new("RGB", (w, h))])[0]
        with torch.no_grad():
            n = m.image_embeds([tiles])[0].shape[0]
        assert n == len(m.expand_image(tiles)) == T.llava_next_tokens(w, h, crop=64, patch=16, pinpoints=pins)


def test_default_models_are_unchanged_and_query_bridges_refuse_tiles(llava_model, tiny_assets):
    from mmkit.recipes import apply_overrides, get_recipe
    from mmkit.vlm import build_model

    assert llava_model.tiling is None and llava_model.num_image_tokens() == 64
    assert "tiling" not in "".join(n for n, _ in llava_model.named_parameters())
    with pytest.raises(ValueError, match="image_mode='anyres'"):
        build_model(apply_overrides(get_recipe("llava-tiny"), [f"anyres_grids={json.dumps(GRIDS)}"]))
    q = build_model(apply_overrides(get_recipe("llava-tiny"), ["image_mode=anyres", "bridge=qwen_vl",
                                                                'bridge_kwargs={"num_queries": 16}']))
    with pytest.raises(ValueError, match="tokens lie on the patch grid"):
        q.expand_image(q.preprocess([Image.new("RGB", (128, 128))])[0])


# ------------------------------------------------------------------ training
def test_tiled_model_trains_on_small_text(anyres_model):
    """A few optimizer steps on one batch of 128-px OCR scenes: the loss falls, the newline learns."""
    from mmkit.data.shapes import SMALL_TEXT_HEIGHT, ShapesConfig, ShapesWorld
    from mmkit.train import set_trainable

    m = anyres_model
    w = ShapesWorld(ShapesConfig(image_size=128, text_height=SMALL_TEXT_HEIGHT))
    batch = m.processor([w.sample("train", i, "ocr") for i in range(2)])
    batch = {k: v for k, v in batch.items() if k != "ids"}
    assert isinstance(batch["pixel_values"], list) and batch["pixel_values"][0].grid == (2, 2)
    set_trainable(m, ["bridge"])
    assert m.tiling.image_newline.requires_grad
    before = m.tiling.image_newline.detach().clone()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(4):
        loss = m(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] * 0.8, losses
    assert not torch.equal(before, m.tiling.image_newline.detach())
    assert len(m.generate(records=[w.sample("test", 0, "ocr")], max_new_tokens=3)) == 1


def test_explain_puts_a_tiled_image_back_on_its_crops(anyres_model):
    """LM attention from the answer, one map per image: the crops' tokens stitched on the crop
    grid, the global view's apart, the newlines left out; recomputed here by hand."""
    import numpy as np

    m = anyres_model
    wide, square = Image.new("RGB", (128, 48), "white"), Image.new("RGB", (64, 64), "red")
    question, answer = "What colour is the circle?", "red"
    impl = m.lm.config._attn_implementation
    info = m.explain([wide, square], question, answer)
    assert m.lm.config._attn_implementation == impl
    tiles = m.preprocess([wide, square])
    assert info["grid"] == (8, 8) and info["image_tokens"] == [len(m.expand_image(t)) for t in tiles]
    assert info["image_tokens"] == [64 + 6 * (16 + 1), 64 + 8 * (8 + 1)]  # 128x48 on 1 x 2: 6 of 8 rows kept
    assert [t["grid"] for t in info["tiles"]] == [(1, 2), (1, 1)]
    assert all(t["crop"] == (64, 64) and t["token_grid"] == (8, 8) for t in info["tiles"])
    for maps, gmaps, t in zip(info["maps"], info["global_maps"], info["tiles"]):
        (R, C), (th, tw) = t["grid"], t["token_grid"]
        assert set(maps) == set(gmaps) == {"all layers", "last layer"}
        for a in maps.values():  # crops x per-crop grid
            assert a.shape == (R * th, C * tw) and np.all(a >= 0) and a.sum() == pytest.approx(1.0, abs=1e-5)
        for a in gmaps.values():
            assert a.shape == (th, tw) and np.all(a >= 0) and a.sum() == pytest.approx(1.0, abs=1e-5)
    assert not info["maps"][0]["all layers"][[0, 7]].any() and info["maps"][0]["all layers"][1:7].all()
    # views: the maps' framing (the crop grid's proportions), the global view's (one crop's)
    assert [v.size for v in info["views"]] == [(128, 64), (64, 64)]
    assert [v.size for v in info["global_views"]] == [(128, 128), (64, 64)]
    assert 0 < sum(info["image_share"]) < 1

    rec = m.prompt_record([wide, square], question)
    rec["conversations"].append({"from": "gpt", "value": answer})
    batch = m.processor([rec])
    m.lm.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = m.lm(inputs_embeds=m.embed(batch["input_ids"], batch["pixel_values"]),
                       attention_mask=batch["attention_mask"], output_attentions=True)
    finally:
        m.lm.set_attn_implementation(impl)
    rows = (batch["labels"][0, 1:] != -100).nonzero().flatten()  # the positions that predict the answer
    img = (batch["input_ids"][0] == m.image_token_id).nonzero().flatten()
    att = torch.stack([a[0].mean(0) for a in out.attentions])[:, rows][:, :, img].mean(1).mean(0)  # (166 + 136,)
    first, second = att[:166], att[166:]
    crops = torch.zeros(8, 16)
    crops[1:7] = first[64:].reshape(6, 17)[:, :16]  # the 17th token of a row is its newline
    assert np.allclose(info["maps"][0]["all layers"], (crops / crops.sum()).numpy(), atol=1e-5)
    assert np.allclose(info["global_maps"][0]["all layers"], (first[:64] / first[:64].sum()).reshape(8, 8), atol=1e-5)
    crops = second[64:].reshape(8, 9)[:, :8]
    assert np.allclose(info["maps"][1]["all layers"], (crops / crops.sum()).numpy(), atol=1e-5)


# ------------------------------------------------------------------ OCR world and metric
def test_small_text_config():
    from mmkit.data.shapes import SMALL_TEXT_HEIGHT, ShapesConfig, ShapesWorld

    assert ShapesConfig().text_height == (0.11, 0.14)  # the default world is unchanged
    small = ShapesWorld(ShapesConfig(image_size=128, text_height=SMALL_TEXT_HEIGHT))
    big = ShapesWorld(ShapesConfig(image_size=128))
    a, b = small.sample("test", 3, "ocr"), big.sample("test", 3, "ocr")
    assert a["conversations"][1]["value"] == b["conversations"][1]["value"]  # same text, smaller glyphs
    assert SMALL_TEXT_HEIGHT[0] <= a["meta"]["scene"].text.h <= SMALL_TEXT_HEIGHT[1]
    with pytest.raises(ValueError, match="text_height"):
        ShapesConfig(text_height=(0.01, 0.02))
    # round trip through a recipe's JSON (lists)
    assert ShapesConfig(text_height=[0.05, 0.06]).text_height == (0.05, 0.06)


def test_ocr_metric():
    from mmkit.eval import _ocr_metrics, character_error_rate, edit_distance

    assert edit_distance("KX7", "KX7") == 0 and edit_distance("KX7", "KY7") == 1 and edit_distance("", "AB") == 2
    assert edit_distance("AXB", "AB") == 1
    assert character_error_rate(["kx 7."], ["KX7"]) == 0.0
    assert character_error_rate(["KY", "ABCD"], ["KX7", "ABCD"]) == pytest.approx(2 / 7)
    recs = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": t}]} for t in ("KX7", "AB")]
    res = _ocr_metrics(recs, ["kx7", "AC"])
    assert res["accuracy"] == 0.5 and res["cer"] == pytest.approx(1 / 5)


def test_evaluate_ocr_scores_a_perfect_reader(tiny_assets):
    from mmkit.eval import evaluate

    class Reader:  # answers with the scene's own text: exact match 1, CER 0
        def generate(self, records, max_new_tokens):
            return [r["meta"]["scene"].text.text.lower() for r in records]

    res = evaluate(Reader(), "ocr", n=5)
    assert res["accuracy"] == 1.0 and res["cer"] == 0.0 and res["task"] == "ocr"


def test_tiled_checkpoint_loads_and_eval_ocr_runs(tiny_assets, tmp_path, capsys):
    from mmkit.cli import main
    from mmkit.train import load_model
    from mmkit.vlm import build_model

    out = tmp_path / "run"
    assert main(["train", "--recipe", "llava-tiny", "--out", str(out), "--quiet", "--set", "image_mode=anyres",
                 "--set", f"anyres_grids={json.dumps(GRIDS)}", "--set", "max_length=512",
                 "--set", 'shapes={"image_size": 128, "text_height": [0.05, 0.06]}',
                 "--set", 'stages.1.tasks={"ocr": 1}', "--set", "stages.*.steps=2",
                 "--set", "stages.*.batch_size=2"]) == 0
    m = load_model(out)
    assert m.tiling is not None and m.tiling.grids == tuple(map(tuple, GRIDS))
    fresh = build_model(m.recipe).tiling.image_newline  # the same seed: the untrained newline
    assert not torch.equal(m.tiling.image_newline, fresh)  # trained, saved and loaded back
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out), "--task", "ocr", "--n", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["task"] == "ocr" and res["n"] == 2 and 0 <= res["accuracy"] <= 1 and res["cer"] >= 0


# ------------------------------------------------------------------ figures and the bench
def test_draw_tiles():
    from mmkit.viz import draw_tiles

    img = draw_tiles(Image.new("RGB", (200, 100), "white"), (1, 2), crop=64)
    assert img.size == (128, 64)
    assert img.getpixel((64, 0)) != img.getpixel((40, 20))  # the crop border is drawn
    with pytest.raises(ValueError, match="grid"):
        draw_tiles(Image.new("RGB", (10, 10)), (0, 2))


@pytest.mark.slow
def test_resolution_bench_runs_at_a_tiny_scale(tiny_assets, tmp_path):
    from mmkit.bench import RESOLUTION_VARIANTS, format_resolution, resolution_bench

    variants = {k: RESOLUTION_VARIANTS[k] for k in ("64 px, one view", "128 px, AnyRes tiles")}
    res = resolution_bench(steps=2, n=2, batch_size=2, variants=variants, out_dir=tmp_path)
    rows = {r["model"]: r for r in res["rows"]}
    assert rows["64 px, one view"]["image_tokens"] == 64 and rows["128 px, AnyRes tiles"]["image_tokens"] == 336
    assert all(r["s_per_step"] > 0 and 0 <= r["ocr_exact"] <= 1 for r in res["rows"])
    assert (tmp_path / "resolution.png").stat().st_size > 0
    assert json.loads((tmp_path / "resolution.json").read_text())["rows"] == res["rows"]
    assert "AnyRes tiles | 336" in format_resolution(res["rows"])


def test_bench_resolution_command_passes_its_budget(monkeypatch, capsys):
    import mmkit.bench as bench
    from mmkit.cli import main

    seen = {}

    def fake(steps, n, out_dir=None):
        seen.update(steps=steps, n=n, out_dir=out_dir)
        return {"scene_size": 128, "steps": steps, "n": n, "threads": 1,
                "rows": [{"model": "128 px, AnyRes tiles", "image_tokens": 336, "ocr_exact": 0.5, "ocr_cer": 0.25,
                          "vqa": 0.7, "s_per_step": 0.1, "train_s": 1.0}]}

    monkeypatch.setattr(bench, "resolution_bench", fake)
    assert main(["bench", "resolution", "--train-steps", "3", "--n", "2"]) == 0
    assert seen == {"steps": 3, "n": 2, "out_dir": None}
    out = capsys.readouterr().out
    assert "| 128 px, AnyRes tiles | 336 | 0.500 | 0.250 | 0.700 |" in out
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 3
