"""Qwen-VL: the position-aware adapter, <img> wrapping, multi-image prompts, grounding boxes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmkit.bridges import build_bridge
from mmkit.bridges.qwen_vl import PositionAwareAdapter
from mmkit.data.grounding import box_from_pixels, box_to_pixels, format_grounding, parse_grounding
from mmkit.nn import inspect, resize_pos_embed, sincos_2d
from mmkit.viz.boxes import draw_boxes


# ----------------------------------------------------------------------------------- adapter
def _qwen_resampler_reference(ad: PositionAwareAdapter, x: torch.Tensor) -> torch.Tensor:
    """Qwen-VL's ``Resampler.forward`` (visual.py) + ``ln_post`` / ``proj``, written with
    torch's MultiheadAttention as Qwen-VL does, weights copied from ``ad``."""
    D, H = ad.query.shape[1], ad.attn.num_heads
    mha = nn.MultiheadAttention(D, H)  # Qwen-VL: (L, N, D) layout
    a = ad.attn
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        mha.out_proj.weight.copy_(a.out_proj.weight)
        mha.out_proj.bias.copy_(a.out_proj.bias)
    mha.eval()
    g = ad.query_grid[0]
    pos = sincos_2d(D, g)  # get_2d_sincos_pos_embed(embed_dim, grid_size)
    T = x.shape[1]
    side = math.isqrt(T)
    # get_abs_pos: bicubic resize of the query-grid table to the key grid
    pos_k = pos if side == g else F.interpolate(
        pos.reshape(1, g, g, D).permute(0, 3, 1, 2), size=(side, side), mode="bicubic", align_corners=False
    ).permute(0, 2, 3, 1).flatten(0, 2)
    kv = ad.ln_kv(ad.kv_proj(x)).permute(1, 0, 2)  # (T, N, D)
    q = ad.ln_q(ad.query)
    N = x.shape[0]
    out = mha(q.unsqueeze(1).repeat(1, N, 1) + pos.unsqueeze(1), kv + pos_k.unsqueeze(1), kv)[0]
    out = out.permute(1, 0, 2)  # (N, Q, D)
    return ad.ln_post(out) @ ad.proj.weight.T


@pytest.mark.parametrize("side", [8, 16])  # the built-for grid, and 128 px (key positions resized)
def test_adapter_matches_qwen_vl_resampler(side):
    torch.manual_seed(0)
    ad = PositionAwareAdapter(24, 32, num_queries=64, num_heads=4).eval()
    with torch.no_grad():
        for p in ad.parameters():  # non-trivial LayerNorm gains and biases
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, side * side, 24)
    with torch.no_grad():
        got = ad(x, (side, side))
        want = _qwen_resampler_reference(ad, x)
    assert got.shape == (2, 64, 32)
    assert (got - want).abs().max().item() <= 1e-5


def test_key_positions_resize_with_the_grid():
    ad = build_bridge("qwen_vl", 128, 192, num_queries=64, num_heads=4)
    assert torch.equal(ad.key_positions((8, 8)), ad.pos_embed)  # built-for grid: the table itself
    k16 = ad.key_positions((16, 16))
    assert k16.shape == (256, 192)
    assert torch.allclose(k16, resize_pos_embed(ad.pos_embed, (8, 8), (16, 16), mode="bicubic"))
    assert not torch.allclose(k16, sincos_2d(192, 16))  # resized, not recomputed on the new grid
    # same frame: patch (2i, 2j) of the 16x16 grid is closest to query (i, j)
    sim = F.normalize(k16, dim=-1) @ F.normalize(ad.pos_embed, dim=-1).T  # (256, 64)
    assert sim[2 * 16 * 3 + 2 * 5].argmax().item() == 3 * 8 + 5
    # num_tokens is the same at every resolution
    assert ad.num_tokens((8, 8)) == ad.num_tokens((16, 16)) == ad.num_tokens((6, 10)) == 64
    assert ad(torch.randn(1, 60, 128), (6, 10)).shape == (1, 64, 192)


def test_positions_on_queries_and_keys_not_values():
    torch.manual_seed(0)
    ad = PositionAwareAdapter(16, 16, num_queries=16, num_heads=2).eval()
    x = torch.randn(1, 64, 16)
    perm = torch.randperm(64)
    with torch.no_grad():
        # without positions attention is blind to order: shuffling the patches changes nothing
        ad.positions = False
        assert torch.allclose(ad(x, (8, 8)), ad(x[:, perm], (8, 8)), atol=1e-5)
        # with them it is not
        ad.positions = True
        assert not torch.allclose(ad(x, (8, 8)), ad(x[:, perm], (8, 8)), atol=1e-3)
        # values carry no positions: with all-equal features every value is the same vector,
        # so the output does not depend on where the attention goes
        same = torch.randn(1, 1, 16).expand(1, 64, 16)
        out = ad(same, (8, 8))
        assert torch.allclose(out, out[:, :1].expand_as(out), atol=1e-5)


def test_adapter_errors():
    with pytest.raises(ValueError, match="not a square number.*49 or 64"):
        PositionAwareAdapter(16, 16, num_queries=50)
    ad = PositionAwareAdapter(16, 16, num_queries=16, num_heads=2)
    with pytest.raises(ValueError, match="drop the CLS"):
        ad(torch.randn(1, 65, 16), (8, 8))


# ------------------------------------------------------------------------- model, processor
@pytest.fixture(scope="module")
def qwen_model(tiny_assets):
    from mmkit.recipes import get_recipe
    from mmkit.vlm import build_model

    return build_model(get_recipe("qwenvl-tiny"))


def test_model_at_128px_and_attention_maps(qwen_model):
    from mmkit.data.shapes import ShapesWorld, ShapesConfig

    m = qwen_model
    assert m.vision.grid((128, 128)) == (16, 16)  # the 64 px encoder at 128 px
    world = ShapesWorld(ShapesConfig(image_size=128))
    rec = world.sample("test", 0, "ground")
    batch = m.processor([rec])
    ids = batch["input_ids"][0].tolist()
    tok = m.tokenizer
    img, end = tok.convert_tokens_to_ids("<img>"), tok.convert_tokens_to_ids("</img>")
    i = ids.index(img)
    assert ids[i + 1: i + 65] == [m.image_token_id] * 64 and ids[i + 65] == end  # <img> 64 tokens </img>
    assert (batch["labels"][0][i: i + 66] == -100).all()
    with torch.no_grad(), inspect(m) as seen:
        out = m(**{k: v for k, v in batch.items() if k != "ids"})
    assert torch.isfinite(out.loss)
    maps = m.bridge.attention_maps(seen)
    assert maps.shape == (1, 64, 256)
    assert torch.allclose(maps.sum(-1), torch.ones(1, 64), atol=1e-5)
    assert m.bridge.attention_maps({}) is None


def _two_image_record(world, text):
    a, b = world.sample("test", 1, "vqa")["image"], world.sample("test", 2, "vqa")["image"]
    return {"id": "two", "images": [a, b],
            "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "Picture 1"}]}


@pytest.mark.parametrize("which", ["llava", "qwen"])
def test_multi_image_picture_prompts(which, llava_model, qwen_model, tmp_path):
    from mmkit.data.processor import ProcessorError
    from mmkit.data.shapes import ShapesWorld

    m = llava_model if which == "llava" else qwen_model
    world = ShapesWorld()
    T = m.num_image_tokens()
    img, end = (m.tokenizer.convert_tokens_to_ids(t) for t in ("<img>", "</img>"))
    q = "Which picture has more objects?"
    # Qwen-VL style, empty tags standing for the given images ...
    inline = m.processor.encode(_two_image_record(world, f"Picture 1: <img></img>\nPicture 2: <img></img>\n{q}"))
    # ... the LLaVA convention with the same words ...
    llava = m.processor.encode(_two_image_record(world, f"Picture 1: <image>\nPicture 2: <image>\n{q}"))
    assert inline.input_ids == llava.input_ids and inline.labels == llava.labels
    assert inline.input_ids.count(m.image_token_id) == 2 * T and len(inline.pixel_values) == 2
    wrapped = m.image_wrap_ids is not None
    assert inline.input_ids.count(img) == (2 if wrapped else 0) and inline.input_ids.count(end) == (2 if wrapped else 0)
    text = m.tokenizer.decode(inline.input_ids)
    assert "Picture 1:" in text and "Picture 2:" in text
    # ... and paths inside the tags (Qwen-VL's data format)
    rec = _two_image_record(world, "")
    paths = []
    for k, im in enumerate(rec["images"]):
        paths.append(tmp_path / f"p{k}.png")
        im.save(paths[-1])
    by_path = {"id": "paths", "conversations": [
        {"from": "human", "value": f"Picture 1: <img>{paths[0]}</img>\nPicture 2: <img>{paths[1]}</img>\n{q}"},
        {"from": "gpt", "value": "Picture 1"}]}
    enc = m.processor.encode(by_path)
    assert enc.input_ids == inline.input_ids
    assert all(torch.allclose(a, b) for a, b in zip(enc.pixel_values, inline.pixel_values))
    # the model runs on it, and generate accepts the inline form
    batch = m.processor([by_path])
    with torch.no_grad():
        assert torch.isfinite(m(**{k: v for k, v in batch.items() if k != "ids"}).loss)
    assert isinstance(m.generate(rec["images"], f"Picture 1: <img></img>\nPicture 2: <img></img>\n{q}",
                                 max_new_tokens=2)[0], str)
    with pytest.raises(ProcessorError, match="ambiguous"):
        m.processor.encode({**by_path, "images": rec["images"]})


# ----------------------------------------------------------------------------------- grounding
def test_box_conversions():
    assert box_from_pixels((32, 16, 96, 64), (128, 128)) == (250, 125, 750, 500)
    assert box_from_pixels((0, 0, 128, 64), (128, 64)) == (0, 0, 999, 999)  # clamped into [0, 1000)
    # rounded outwards: the int box still covers the pixel box
    b = box_from_pixels((10.3, 20.7, 50.2, 60.9), (128, 128))
    px = box_to_pixels(b, (128, 128))
    assert px[0] <= 10.3 and px[1] <= 20.7 and px[2] >= 50.2 and px[3] >= 60.9
    assert box_to_pixels((250, 125, 750, 500), (400, 200)) == (100.0, 25.0, 300.0, 100.0)
    with pytest.raises(ValueError, match="empty"):
        box_from_pixels((5, 5, 5, 9), 64)


def test_format_and_parse_grounding():
    s = format_grounding("the red circle", (32, 16, 96, 64), (128, 128))
    assert s == "<ref>the red circle</ref><box>(250,125),(750,500)</box>"
    boxes, bad = parse_grounding(s, (128, 128))
    assert boxes == [("the red circle", (32.0, 16.0, 96.0, 64.0))] and bad == []
    # malformed model output is reported, not raised
    boxes, bad = parse_grounding("<ref>a</ref><box>(12,40)</box> and <box>(900,10),(100,20)</box> <box>(1,2),(3,4)</box>")
    assert boxes == [(None, (1, 2, 3, 4))]
    assert bad == ["<box>(12,40)</box>", "<box>(900,10),(100,20)</box>"]
    assert parse_grounding("no box at all") == ([], [])


def test_ground_metric_reports_malformed():
    from mmkit.eval import _ground_metrics

    recs = [{"conversations": [{"from": "gpt", "value": "<ref>x</ref><box>(100,100),(300,300)</box>"}]}] * 4
    preds = ["<ref>x</ref><box>(100,100),(300,300)</box>",         # exact
             "<ref>x</ref><box>(100,100),(200,200)</box>",         # IoU 0.25
             "<ref>x</ref><box>(100,100),(3000,300)</box>",        # malformed
             "<box>(1,1)</box><box>(110,100),(300,300)</box>"]     # one malformed, one good (IoU 0.95)
    m = _ground_metrics(recs, preds)
    assert m["acc_iou50"] == 0.5 and m["no_box"] == 1 and m["malformed"] == 2
    assert abs(m["mean_iou"] - (1 + 0.25 + 0 + 0.95) / 4) < 1e-9


def test_draw_boxes():
    from PIL import Image

    im = draw_boxes(Image.new("RGB", (64, 64), "white"), {"truth": (250, 250, 750, 750), "model": None}, scale=2)
    assert im.size == (128, 128)
    assert im.getpixel((32, 64)) != (255, 255, 255) and im.getpixel((64, 64)) == (255, 255, 255)


def test_grounding_panels_title_each_answer_with_its_iou():
    from mmkit.data.shapes import ShapesWorld
    from mmkit.viz.boxes import grounding_panels

    world = ShapesWorld()
    recs = [world.sample("test", i, "ground") for i in range(3)]
    truth = recs[0]["conversations"][1]["value"]                    # the true answer: IoU 1
    panels = grounding_panels(recs, [truth, "I cannot tell", "<ref>x</ref><box>(900,10),(100,20)</box>"])
    titles = list(panels)
    assert titles[0].endswith("IoU 1.00 ✓") and "IoU 0.00 ✗" in titles[1] and titles[2].endswith("(malformed)")
    assert all(p.size == (recs[0]["image"].width * 2, recs[0]["image"].height * 2) for p in panels.values())
    with pytest.raises(ValueError, match="3 records but 2 answers"):
        grounding_panels(recs, ["a", "b"])


# ------------------------------------------------------------------------------- end to end
def test_positions_let_the_adapter_find_an_object():
    """Trained for real: where is the one odd patch? With 2D positions the adapter learns it;
    without, attention is order-blind and it stays at chance (the variance of the target)."""

    def train(positions: bool) -> float:
        torch.manual_seed(0)
        D, g = 32, 8
        ad = PositionAwareAdapter(D, D, num_queries=16, num_heads=2, positions=positions)
        head = nn.Linear(16 * D, 2)
        opt = torch.optim.Adam([*ad.parameters(), *head.parameters()], lr=3e-3)
        background, obj = torch.randn(D), torch.randn(D)

        def batch(n, gen):
            where = torch.randint(0, g * g, (n,), generator=gen)
            x = background.expand(n, g * g, D).clone()
            x[torch.arange(n), where] = obj  # one object patch on a plain background
            return x, torch.stack([where // g, where % g], 1).float() / (g - 1) - 0.5  # (row, col) in [-0.5, 0.5]

        gen = torch.Generator().manual_seed(1)
        for _ in range(100):
            x, y = batch(32, gen)
            loss = ((head(ad(x, (g, g)).flatten(1)) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        x, y = batch(256, torch.Generator().manual_seed(2))
        with torch.no_grad():
            return ((head(ad(x, (g, g)).flatten(1)) - y) ** 2).mean().item()

    with_pos, without = train(True), train(False)
    assert without > 0.09  # chance: the variance of a uniform grid position is ~0.107
    assert with_pos < 0.2 * without, (with_pos, without)


def test_trainer_lowers_the_held_out_loss(tiny_assets):
    """The whole model through the Trainer, a few real steps on colour questions."""
    import tempfile

    from mmkit.data.shapes import ShapesConfig, ShapesWorld
    from mmkit.recipes import Stage, apply_overrides, get_recipe
    from mmkit.train import Trainer
    from mmkit.vlm import build_model

    recipe = apply_overrides(get_recipe("qwenvl-tiny"), ["image_size=64", "bridge_kwargs.num_queries=16",
                                                         'shapes={"vqa_qtypes": ["color"]}'])
    recipe.stages = [Stage("color", train=["bridge", "lm"], tasks={"vqa": 1.0}, steps=30, lr=3e-3,
                           lr_groups={"lm": 1e-3}, batch_size=8, warmup_steps=3)]
    torch.manual_seed(0)
    model = build_model(recipe)
    world = ShapesWorld(ShapesConfig(image_size=64, vqa_qtypes=("color",)))
    held_out = model.processor([world.sample("val", i, "vqa") for i in range(32)])
    held_out = {k: v for k, v in held_out.items() if k != "ids"}

    def loss():
        model.eval()
        with torch.no_grad():
            return float(model(**held_out).loss)

    before = loss()
    with tempfile.TemporaryDirectory() as out:
        Trainer(model, recipe, out, progress=False).train(resume=False)
    after = loss()
    assert after < 0.97 * before, (before, after)
