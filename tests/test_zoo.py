"""The tiny pre-trained encoder and LM: the shipped ones load and are good; the build works."""
from __future__ import annotations

import json

import pytest
import torch

from mmkit import zoo
from mmkit.paths import assets_dir

SHIPPED = assets_dir() / "tiny"
needs_assets = pytest.mark.skipif(not (SHIPPED / "vision" / "model.safetensors").exists(),
                                  reason="assets/tiny not built (run `mmkit zoo build`)")


@needs_assets
def test_shipped_assets_are_small_and_load():
    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size <= 25 * 2**20, f"assets/tiny is {size / 2**20:.1f} MB, over the 25 MB budget"
    vision, lm, tok = zoo.load_tiny()
    assert vision.backend == "tiny" and vision.grid() == (8, 8)
    assert lm.config.model_type == "llama" and tok.convert_tokens_to_ids("<image>") is not None
    report = json.loads((SHIPPED / "report.json").read_text())
    assert report["smoke"] is False


@pytest.fixture(scope="module")
def probe_features():
    """Layer -2 patch features (what a bridge reads), mean-pooled, on one-object scenes."""
    from mmkit.data.shapes import COLORS, SHAPES, ShapesConfig, ShapesWorld
    from mmkit.vision import load_vision_encoder

    enc = load_vision_encoder("tiny").eval()
    world = ShapesWorld(ShapesConfig(min_objects=1, max_objects=1, text_prob=0.0), seed=0)

    def feats(split, n):
        scenes = [world.scene(split, i) for i in range(n)]
        with torch.no_grad():
            f = enc.features(enc.preprocess([world.render(s) for s in scenes]), layer=-2).mean(1)
        objs = [s.objects[0] for s in scenes]
        return (f, torch.tensor([list(COLORS).index(o.color) for o in objs]),
                torch.tensor([list(SHAPES).index(o.shape) for o in objs]))

    return feats("train", 1200), feats("test", 400)


@needs_assets
def test_shipped_encoder_linear_probe_colour(probe_features):
    (fx, cx, _), (vx, cv, _) = probe_features
    assert zoo.linear_probe(fx, cx, vx, cv) >= 0.95


@needs_assets
@pytest.mark.xfail(strict=True, reason="known gap: the CLIP-trained TinyViT does not yet make shape "
                   "linearly readable (0.50 measured mean-pooled, chance 0.17); see docs/benchmarks.md")
def test_shipped_encoder_linear_probe_shape(probe_features):
    (fx, _, sx), (vx, _, sv) = probe_features
    assert zoo.linear_probe(fx, sx, vx, sv) >= 0.95


def test_clip_loss_prefers_matching_pairs():
    a = torch.randn(8, 16)
    good = zoo.clip_loss(a, a + 0.01 * torch.randn(8, 16), torch.tensor(2.0))
    bad = zoo.clip_loss(a, torch.randn(8, 16), torch.tensor(2.0))
    assert good < bad
    assert zoo.retrieval_r1(a, a) == 1.0


@pytest.mark.slow
def test_smoke_build_writes_loadable_assets(tmp_path, monkeypatch):
    report = zoo.build(out=tmp_path, smoke=True, progress=False)
    assert {"vision", "lm"} <= report.keys() and report["smoke"] is True
    monkeypatch.setenv("MMKIT_ASSETS", str(tmp_path))
    vision, lm, tok = zoo.load_tiny()
    with torch.no_grad():
        out = vision(torch.zeros(1, 3, 64, 64))
    assert len(out.hidden_states) == vision.num_layers + 1
    assert json.loads((tmp_path / "tiny" / "report.json").read_text())["smoke"] is True
