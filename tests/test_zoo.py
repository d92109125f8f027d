"""The tiny pre-trained encoder and LM (``mmkit.pretrain``, built by ``mmkit.zoo``): the shipped
ones load and are good; the pre-training pieces work; the build works."""
from __future__ import annotations

import json

import pytest
import torch

from mmkit import zoo
from mmkit.data.shapes import ShapesWorld
from mmkit.paths import assets_dir
from mmkit.pretrain.clip import (
    CaptionDecoder,
    caption_loss,
    clip_loss,
    object_token_probe,
    patch_targets,
    region_loss,
    region_phrases,
    swap_one_shape,
)
from mmkit.pretrain.lm import reading_corpus, train_lm
from mmkit.pretrain.probes import linear_probe, retrieval_r1

SHIPPED = assets_dir() / "tiny"
needs_assets = pytest.mark.skipif(not (SHIPPED / "vision" / "model.safetensors").exists(),
                                  reason="assets/tiny not built (run `mmkit zoo build`)")


@needs_assets
def test_shipped_assets_are_small_and_load():
    def mb(*parts):
        return sum(f.stat().st_size for p in parts for f in (SHIPPED / p).rglob("*") if f.is_file()) / 2**20

    # the pre-trained encoder and LM: 25 MB at most together; one reference per family, each
    # its trained tensors in fp16: 6 MB at most; everything under assets/: 100 MB
    assert mb("vision", "lm") <= 25, f"tiny vision + lm are {mb('vision', 'lm'):.1f} MB, over 25 MB"
    for ref in (SHIPPED / "models").iterdir():
        assert mb(f"models/{ref.name}") <= 6, f"{ref.name} is {mb(f'models/{ref.name}'):.1f} MB, over 6 MB"
    everything = sum(f.stat().st_size for f in SHIPPED.parent.rglob("*") if f.is_file()) / 2**20
    assert everything <= 100, f"assets/ is {everything:.1f} MB, over the 100 MB budget"
    vision, lm, tok = zoo.load_tiny()
    assert vision.backend == "tiny" and vision.grid() == (8, 8)
    assert lm.config.model_type == "llama" and tok.convert_tokens_to_ids("<image>") is not None
    report = json.loads((SHIPPED / "report.json").read_text())
    assert report["smoke"] is False


@pytest.fixture(scope="module")
def probe_features():
    """Layer -2 patch features (what a bridge reads), (N, 64, D), on one-object scenes."""
    from mmkit.data.shapes import COLORS, SHAPES, ShapesConfig, ShapesWorld
    from mmkit.vision import load_vision_encoder

    enc = load_vision_encoder("tiny").eval()
    world = ShapesWorld(ShapesConfig(min_objects=1, max_objects=1, text_prob=0.0), seed=0)

    def feats(split, n):
        scenes = [world.scene(split, i) for i in range(n)]
        with torch.no_grad():
            f = enc.features(enc.preprocess([world.render(s) for s in scenes]), layer=-2)
        objs = [s.objects[0] for s in scenes]
        return (f, torch.tensor([list(COLORS).index(o.color) for o in objs]),
                torch.tensor([list(SHAPES).index(o.shape) for o in objs]))

    return feats("train", 1200), feats("test", 400)


@needs_assets
def test_shipped_encoder_linear_probe_colour(probe_features):
    (fx, cx, _), (vx, cv, _) = probe_features
    assert linear_probe(fx.mean(1), cx, vx.mean(1), cv) >= 0.95


@needs_assets
def test_shipped_encoder_linear_probe_shape(probe_features):
    """Shape from the layer -2 tokens max-pooled: the pooling CLIP trained this encoder with
    (``mmkit.pretrain.clip.image_embedding``), i.e. the probe on the encoder's own image vector (0.98 measured)."""
    (fx, _, sx), (vx, _, sv) = probe_features
    assert linear_probe(fx.amax(1), sx, vx.amax(1), sv) >= 0.95


@needs_assets
def test_shipped_encoder_binds_shape_to_each_objects_own_token():
    """The token under an object names *its* shape (scenes of 1-3 objects): what a bridge
    needs for "the orange object's shape". 0.94 measured; 0.57 before patch-phrase alignment."""
    from mmkit.vision import load_vision_encoder

    assert object_token_probe(load_vision_encoder("tiny").eval(), 800, 300) >= 0.88


@needs_assets
@pytest.mark.xfail(strict=True, reason="known gap: mean-pooled over all 64 patches, the object's shape (2-9 "
                   "patches) is diluted by the background (0.93 measured, chance 0.17); see docs/benchmarks.md")
def test_shipped_encoder_linear_probe_shape_mean_pooled(probe_features):
    (fx, _, sx), (vx, _, sv) = probe_features
    assert linear_probe(fx.mean(1), sx, vx.mean(1), sv) >= 0.95


def test_clip_loss_prefers_matching_pairs():
    a = torch.randn(8, 16)
    good = clip_loss(a, a + 0.01 * torch.randn(8, 16), torch.tensor(2.0))
    bad = clip_loss(a, torch.randn(8, 16), torch.tensor(2.0))
    assert good < bad
    assert retrieval_r1(a, a) == 1.0


def test_zoo_keeps_the_pretraining_names_notebook_01_uses():
    from mmkit.pretrain import clip, probes

    for name in ("TextTower", "clip_loss", "image_embedding", "object_token_probe", "region_loss", "train_vision"):
        assert getattr(zoo, name) is getattr(clip, name)
    assert zoo.linear_probe is probes.linear_probe and zoo.retrieval_r1 is probes.retrieval_r1


def test_conv_stem_keeps_the_token_grid_and_sees_across_patch_borders(tmp_path):
    from mmkit.vision import TinyViT, ViTConfig

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2, stem="conv")
    vit, patchify = TinyViT(cfg).eval(), TinyViT(ViTConfig(**{**cfg.__dict__, "stem": "patch"})).eval()
    x = torch.randn(1, 3, 32, 32)
    y = x.clone()
    y[..., 0, 7] += 5.0  # a pixel in patch column 0, right at the border with column 1
    with torch.no_grad():
        for m in (vit, patchify):
            assert m.patch_embed(x).shape == (1, 32, 4, 4)
        changed = lambda m: (m.patch_embed(y) - m.patch_embed(x)).abs().amax(1)[0, 0]  # (w,) top row
        assert changed(patchify)[1] == 0 and changed(vit)[1] > 0  # only the conv stem's column 1 sees it
    vit.save_pretrained(tmp_path)
    again = TinyViT.from_pretrained(tmp_path)
    assert again.config.stem == "conv"
    with pytest.raises(ValueError, match="power of two"):
        ViTConfig(patch_size=6, image_size=48, stem="conv")


def test_caption_decoder_masks_and_reads_the_image():
    torch.manual_seed(0)
    dec = CaptionDecoder(vocab_size=50, image_dim=24, dim=32, layers=2, heads=4).eval()
    ids, img = torch.randint(0, 50, (2, 7)), torch.randn(2, 5, 24)
    later = ids.clone()
    later[:, 4:] = (later[:, 4:] + 1) % 50
    with torch.no_grad():
        out = dec(ids, img)
        assert out.shape == (2, 7, 50)
        # causal: changing tokens 4.. leaves the predictions at 0..3 untouched
        assert torch.allclose(dec(later, img)[:, :4], out[:, :4], atol=1e-6)
        assert not torch.allclose(dec(later, img)[:, 4:], out[:, 4:], atol=1e-3)
        # every position reads the image tokens through cross-attention
        assert (dec(ids, img + 1.0) - out).abs().amax(-1).min() > 1e-4


def test_caption_loss_parallel_prediction_depends_only_on_the_image():
    torch.manual_seed(0)
    dec = CaptionDecoder(vocab_size=30, image_dim=16, dim=16, layers=1, heads=2)
    img = torch.randn(3, 4, 16, requires_grad=True)
    ids, mask = torch.randint(1, 30, (3, 6)), torch.ones(3, 6, dtype=torch.long)
    mask[0, 4:] = 0  # padding is not scored
    loss = caption_loss(dec, img, ids, mask, start_id=0, parallel=True)
    loss.backward()
    assert img.grad.abs().sum() > 0  # the loss trains whatever produced the image tokens
    # parallel: the decoder reads only the start token, so the caption's own tokens cannot leak in
    with torch.no_grad():
        a = dec(torch.zeros_like(ids), img, parallel=True)
        assert torch.allclose(caption_loss(dec, img, ids, mask, 0, parallel=True),
                              torch.nn.functional.cross_entropy(a.flatten(0, 1), ids.masked_fill(mask == 0, -100).flatten()))
    # a few steps on one fixed batch lower the loss: the decoder learns from image tokens
    opt = torch.optim.AdamW(dec.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = caption_loss(dec, img.detach(), ids, mask, 0)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


def test_hard_negatives_swap_one_shape_and_count_in_the_loss():
    from mmkit.data.shapes import SHAPES, ShapesWorld

    world = ShapesWorld(seed=0)
    for i in range(20):
        true, hard = world.caption(world.scene("train", i)), swap_one_shape(world, "train", i)
        diff = [(a, b) for a, b in zip(true.split(), hard.split()) if a != b]
        assert len(true.split()) == len(hard.split()) and len(diff) == 1, (true, hard)
        assert all(w.strip(",.") in SHAPES for w in diff[0])
    a = torch.randn(8, 16)
    easy = clip_loss(a, a, torch.tensor(2.0), hard_txt=-a)
    close = clip_loss(a, a, torch.tensor(2.0), hard_txt=a + 0.1 * torch.randn(8, 16))
    assert clip_loss(a, a, torch.tensor(2.0)) < easy < close  # a near-copy caption is a harder negative


def test_patch_targets_mark_each_objects_own_patches_and_the_region_loss_learns_them():
    from types import SimpleNamespace

    from mmkit.data.shapes import Obj

    big = Obj("circle", "red", "large", cx=0.5, cy=0.5, r=0.2, rgb=(220, 30, 30))
    tiny = Obj("star", "blue", "small", cx=0.06, cy=0.94, r=0.02, rgb=(30, 30, 220))  # inside one patch
    t = patch_targets([SimpleNamespace(objects=[big, tiny])], (8, 8), lambda o: {"circle": 0, "star": 1}[o.shape])
    grid = t.view(8, 8)
    assert grid[3:5, 3:5].eq(0).all() and grid[7, 0] == 1 and grid[0, 0] == -1 and grid[0, 7] == -1
    assert int(grid.eq(0).sum()) == 12  # the patch centres within r = 0.2 of the middle (4 + 8 edge-adjacent)
    phrases = region_phrases()
    assert len(phrases) == 96 and len(set(phrases)) == 96 and "small red circle" in phrases
    # the loss falls when each object patch's token moves towards its own phrase
    torch.manual_seed(0)
    tokens, phrase_emb = torch.randn(2, 64, 16, requires_grad=True), torch.randn(96, 8)
    proj, targets = torch.nn.Linear(16, 8, bias=False), torch.randint(-1, 96, (2, 64))
    opt = torch.optim.Adam([tokens, *proj.parameters()], lr=0.05)
    first = None
    for _ in range(60):
        loss = region_loss(tokens, targets, proj, phrase_emb, torch.tensor(2.0))
        opt.zero_grad(); loss.backward(); opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.3 * first
    assert region_loss(tokens, torch.full((2, 64), -1), proj, phrase_emb, torch.tensor(2.0)).item() == 0.0


def test_reading_corpus_answers_from_its_description():
    """Each reading document holds a scene's description, a question, and an answer found in it."""
    from mmkit.data.shapes import ShapesConfig, ShapesWorld

    world = ShapesWorld(ShapesConfig(image_size=64), seed=0)
    docs = reading_corpus(world, "train", 12, start=100)
    assert docs == reading_corpus(world, "train", 12, start=100)  # deterministic
    assert len(docs) == 12 and len(set(docs)) == 12
    for doc in docs:
        user, assistant = doc.split("<|im_start|>assistant\n")
        assert user.startswith("<|im_start|>user\nThere ") and "<image>" not in doc
        answer = assistant.removesuffix("<|im_end|>\n")
        assert answer in ("yes", "no") or answer.isdigit() or answer in user.split("\n")[1]  # in the description


def test_train_lm_takes_its_size_and_reading_documents_from_the_settings(tiny_assets):
    from mmkit.data.shapes import ShapesConfig, ShapesWorld

    world = ShapesWorld(ShapesConfig(image_size=64), seed=0)
    _, _, tok = zoo.load_tiny()
    s = dict(zoo.SETTINGS["smoke"], lm_steps=1, corpus=40, ppl_n=8, reading=8,
             lm_config={"hidden_size": 64, "num_heads": 2, "intermediate_size": 128, "num_layers": 1})
    lm, report = train_lm(world, tok, s, progress=False)
    assert (lm.config.hidden_size, lm.config.num_hidden_layers) == (64, 1) and report["steps"] == 1


@pytest.mark.slow
def test_smoke_build_writes_loadable_assets(tmp_path, monkeypatch):
    report = zoo.build(out=tmp_path, smoke=True, progress=False)
    assert {"vision", "lm"} <= report.keys() and report["smoke"] is True
    assert {"blind_vqa", "reading_vqa", "reading_per_type"} <= report["lm"].keys()
    monkeypatch.setenv("MMKIT_ASSETS", str(tmp_path))
    vision, lm, tok = zoo.load_tiny()
    with torch.no_grad():
        out = vision(torch.zeros(1, 3, 64, 64))
    assert len(out.hidden_states) == vision.num_layers + 1
    assert json.loads((tmp_path / "tiny" / "report.json").read_text())["smoke"] is True


def test_shipped_family_models_build_and_load(tiny_assets, tmp_path):
    """`mmkit zoo models` (smoke size): a checkpoint folder in fp16 that load_model and the demo read."""
    from safetensors.torch import load_file

    from mmkit.demo import discover_models
    from mmkit.train import load_model

    report = zoo.build_models(["llava-tiny"], out=tmp_path, smoke=True, progress=False, curve_every=3)
    d = tmp_path / zoo.MODELS_DIR / "llava-tiny"
    assert (d / "recipe.json").is_file() and not (d / "trainer_state.pt").exists()
    curve = [json.loads(line) for line in (d / "curve.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [3, 4]  # smoke: 2 + 2 steps, a point every 3 and at the end
    assert report["llava-tiny"]["train_seconds"] == pytest.approx(curve[-1]["train_seconds"], abs=0.1)
    weights = load_file(str(d / "model.safetensors"))
    assert weights and all(v.dtype == torch.float16 for v in weights.values())
    assert report["llava-tiny"]["bytes"] == sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    model = load_model(d)
    assert isinstance(model.generate([ShapesWorld().sample("test", 0, "vqa")["image"]], "What colour?")[0], str)
    entries = discover_models([d], shipped=False)
    assert len(entries) == 1 and entries[0].error is None
    with pytest.raises(ValueError, match="zoo models"):
        zoo.build(out=tmp_path, smoke=True, only="llava-tiny")


def test_a_shipped_flamingo_keeps_its_gate_curves(tiny_assets, tmp_path):
    """Notebook 04 draws the reference's gates over training from the shipped folder."""
    from mmkit.callbacks import load_gates
    from mmkit.train import load_model

    zoo.build_models(["flamingo-tiny"], out=tmp_path, smoke=True, progress=False)
    d = tmp_path / zoo.MODELS_DIR / "flamingo-tiny"
    gates = load_gates(d)
    assert [r["global_step"] for r in gates.history] == [0, 1, 2]  # smoke: 2 steps, every step logged
    last = load_model(d).gate_values()["xattn"]
    assert all(c[0] == 0.0 for c in gates.curves("xattn").values())
    assert {f"layer {i}": pytest.approx(v, abs=2e-3) for i, v in last.items()} == \
        {k: c[2] for k, c in gates.curves("xattn").items()}  # the shipped (fp16) weights' gates
    with pytest.raises(FileNotFoundError, match="GateLogger"):
        load_gates(tmp_path)


def test_answer_mask_marks_only_what_the_assistant_writes():
    from mmkit.language import load_language_model
    from mmkit.pretrain.common import tokenize
    from mmkit.pretrain.lm import answer_mask

    _, tok = load_language_model("tiny")
    doc = "<|im_start|>user\nWhat shape is the red object?<|im_end|>\n<|im_start|>assistant\nstar<|im_end|>\n"
    two = doc + "<|im_start|>user\nAnd its size?<|im_end|>\n<|im_start|>assistant\nsmall<|im_end|>\n"
    ids, _ = tokenize(tok, [doc, two], 160)
    m = answer_mask(ids, tok)
    assert tok.decode(ids[0][m[0]]) == "star<|im_end|>"
    assert tok.decode(ids[1][m[1]]) == "star<|im_end|>small<|im_end|>"


def test_build_settings_override_and_reading_curve(tmp_path):
    from mmkit import zoo

    with pytest.raises(ValueError, match="unknown setting"):
        zoo.build(tmp_path, smoke=True, only="lm", settings={"lm_stepz": 3}, progress=False)
    rep = zoo.build(tmp_path, smoke=True, only="lm", settings={"lm_steps": 4, "reading": 16, "answer_weight": 3.0},
                    curve_every=2, progress=False)
    assert [c["step"] for c in rep["lm"]["lm_curve"]] == [2, 4]
    assert rep["lm"]["steps"] == 4 and rep["lm"]["settings"]["answer_weight"] == 3.0
    assert all(0.0 <= c["reading_vqa"] <= 1.0 for c in rep["lm"]["lm_curve"])


def test_length_buckets_cover_every_row_once_and_cut_padding():
    from mmkit.pretrain.common import length_buckets

    lengths = [5, 100, 7, 98, 6, 5, 101, 50]
    groups = length_buckets(lengths, overhead=10.0)
    assert sorted(r for g in groups for r in g) == list(range(len(lengths)))
    cost = sum(len(g) * max(lengths[r] for r in g) for g in groups)
    assert cost < len(lengths) * max(lengths) / 2  # the short rows no longer pay for the long ones
    assert length_buckets([9, 9, 9]) == [[0, 1, 2]]  # equal lengths share one group


def test_lm_backward_in_buckets_gives_the_padded_batchs_loss_and_gradients():
    from transformers import LlamaForCausalLM

    from mmkit.language import load_language_model, special_token_ids, tiny_lm_config
    from mmkit.pretrain.common import tokenize
    from mmkit.pretrain.lm import answer_mask, lm_backward

    _, tok = load_language_model("tiny")
    torch.manual_seed(0)
    lm = LlamaForCausalLM(tiny_lm_config(len(tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                         **special_token_ids(tok)))
    docs = reading_corpus(ShapesWorld(seed=0), "train", 6) + ["a red star.", "<|im_start|>user\nhi<|im_end|>\n"]
    ids, mask = tokenize(tok, docs, 160)
    answers = answer_mask(ids, tok)

    def grads(**kw):
        lm.zero_grad()
        loss = lm_backward(lm, ids, mask, **kw)
        return loss, [p.grad.clone() for p in lm.parameters()]

    # one padded batch, weight 1: exactly transformers' own mean next-token loss
    ref = float(lm(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss)
    loss, g_full = grads(buckets=False)
    assert loss == pytest.approx(ref, rel=1e-5)
    loss_b, g_b = grads(buckets=True)
    assert loss_b == pytest.approx(ref, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(g_full, g_b))
    # answer weighting: buckets change nothing either, and the weight does change the loss
    lw, gw = grads(answers=answers, weight=5.0, buckets=False)
    lwb, gwb = grads(answers=answers, weight=5.0, buckets=True)
    assert lwb == pytest.approx(lw, rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(gw, gwb))
    assert not all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(gw, g_full))
