"""Fuyu: patchify any H x W, one linear layer, a |NEWLINE| after every patch row."""
from __future__ import annotations


import pytest
import torch

from PIL import Image

from mmkit.convert import from_hf
from mmkit.encoder_free.fuyu import Patchify, patchify
from mmkit.language import NEWLINE_TOKEN
from mmkit.recipes import apply_overrides, get_recipe


@pytest.fixture(scope="module")
def model(tiny_assets):
    from mmkit.vlm import build_model

    torch.manual_seed(0)
    return build_model(get_recipe("fuyu-tiny")).eval()


def _record(image, question="What colour is the circle?", answer="red"):
    return {"id": "r", "images": [image],
            "conversations": [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]}


# ----------------------------------------------------------------------- parity
def test_patchify_matches_transformers_fuyu_image_processor():
    from transformers.image_utils import SizeDict
    from transformers.models.fuyu.image_processing_fuyu import FuyuImageProcessor

    x = torch.randn(2, 3, 24, 40)  # non-square: 3 rows x 5 columns of 8 px patches
    want = FuyuImageProcessor().patchify_image(x, patch_size=SizeDict(height=8, width=8))
    got = patchify(x, 8)
    assert got.shape == (2, 15, 8 * 8 * 3)
    assert torch.equal(got, want)


def test_fuyu_matches_transformers_fuyu_for_causal_lm(model, world):
    """Patch embeddings and the whole model's logits on a non-square image, against
    transformers' FuyuForCausalLM built on the same tiny Llama (weights copied across)."""
    from transformers import FuyuConfig, FuyuForCausalLM

    torch.manual_seed(0)
    lm = model.lm
    cfg = FuyuConfig(text_config=lm.config.to_dict(), patch_size=8, num_channels=3,
                     image_token_id=model.image_token_id)
    hf = FuyuForCausalLM(cfg).eval()
    hf.model.language_model.load_state_dict(lm.model.state_dict())
    hf.lm_head.load_state_dict(lm.lm_head.state_dict())
    ours = from_hf(hf)
    assert torch.equal(ours.vision_embed_tokens.weight, hf.model.vision_embed_tokens.weight)
    model.bridge.load_state_dict(ours.state_dict())

    rec = _record(world.render(world.scene("test", 0), size=(40, 24)))  # W=40, H=24
    batch = model.processor([rec])
    pv = batch["pixel_values"]
    assert tuple(pv.shape) == (1, 3, 24, 40)
    with torch.no_grad():
        patches = patchify(pv, 8)  # (1, 15, 192): what HF's processor hands the model
        want_emb = hf.model.get_image_features(patches).last_hidden_state
        got_emb = model.encode_images(pv)
        assert (got_emb - want_emb).abs().max().item() <= 1e-5
        want = hf(input_ids=batch["input_ids"], image_patches=patches,
                  attention_mask=batch["attention_mask"]).logits
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pv).logits
    assert (got - want).abs().max().item() <= 1e-5


# ------------------------------------------------------------------------ layout
@pytest.mark.parametrize("size,grid", [((96, 48), (6, 12)), ((48, 96), (12, 6)), ((45, 70), (9, 6))])
def test_any_aspect_ratio_rows_of_patches_then_newline(model, world, size, grid):
    img = world.render(world.scene("test", 1), size=size)  # (W, H)
    enc = model.processor.encode(_record(img))
    (pv,) = enc.pixel_values
    h, w = grid
    assert tuple(pv.shape) == (3, h * 8, w * 8)  # padded bottom/right, never resized
    nl = model.tokenizer.convert_tokens_to_ids(NEWLINE_TOKEN)
    ids = torch.tensor(enc.input_ids)
    start = int((ids == model.image_token_id).nonzero()[0])
    block = ids[start:start + h * (w + 1)].view(h, w + 1)
    assert (block[:, :w] == model.image_token_id).all() and (block[:, w] == nl).all()
    assert int((ids == model.image_token_id).sum()) == h * w and int((ids == nl).sum()) == h
    # the original pixels sit top-left, unscaled; the padding is the mean colour (~0 after normalising)
    W, H = size
    outside = torch.ones(pv.shape[1:], dtype=torch.bool)
    outside[:H, :W] = False
    pad = pv[:, outside]
    assert pad.numel() == 3 * ((h * 8) * (w * 8) - H * W)
    assert pad.numel() == 0 or pad.abs().max() < 0.01
    assert torch.allclose(pv[:, :H, :W], model.preprocess([img])[0][:, :H, :W])
    assert pv[:, :H, :W].std() > 0.1


def test_newlines_keep_their_word_embedding_and_patches_go_in_order(model, world):
    img = world.render(world.scene("test", 2), size=(32, 16))
    batch = model.processor([_record(img)])
    ids, pv = batch["input_ids"], batch["pixel_values"]
    with torch.no_grad():
        emb = model.embed(ids, pv)[0]
        words = model.lm.get_input_embeddings()(ids)[0]
        patches = model.bridge(pv)[0]  # (2*4, D)
    is_img = ids[0] == model.image_token_id
    assert torch.equal(emb[~is_img], words[~is_img])
    assert torch.equal(emb[is_img], patches)


def test_max_size_scales_down_keeping_the_aspect_ratio():
    p = Patchify(8, max_size=64)
    (x,) = p.preprocess([Image.new("RGB", (200, 100), (10, 200, 30))])
    assert tuple(x.shape) == (3, 32, 64)  # 200x100 -> 64x32, already a multiple of 8
    (y,) = p.preprocess([Image.new("RGB", (20, 10), (10, 200, 30))])
    assert tuple(y.shape) == (3, 16, 24)  # small images are padded, never scaled up


def test_a_batch_of_different_sizes_equals_one_by_one(model, world):
    recs = [_record(world.render(world.scene("test", 3), size=(64, 32))),
            _record(world.render(world.scene("test", 4), size=(24, 56)), answer="a blue square")]
    batch = model.processor(recs)
    assert isinstance(batch["pixel_values"], list)  # two grids: collate keeps a list
    with torch.no_grad():
        both = model(**{k: v for k, v in batch.items() if k != "ids"}).logits
        for i, r in enumerate(recs):
            one = model.processor([r])
            alone = model(**{k: v for k, v in one.items() if k != "ids"}).logits[0]
            n = alone.shape[0]
            assert (both[i, :n] - alone).abs().max().item() <= 1e-4
        answers = model.generate(records=recs, max_new_tokens=3)
    assert len(answers) == 2


def test_errors_name_the_fix(model):
    with pytest.raises(ValueError, match="pad it first"):
        patchify(torch.zeros(1, 3, 20, 16), 8)
    with pytest.raises(Exception, match="processor"):
        model.embed(torch.tensor([[model.image_token_id] * 5]), torch.zeros(1, 3, 16, 16))
    wide, tall = Image.new("RGB", (32, 16)), Image.new("RGB", (16, 32))
    with pytest.raises(ValueError, match="one image at a time"):
        model.explain([wide, tall], "<image>\n<image>\nWhich is wider?", "the first")
    with pytest.raises(ValueError, match="unknown fuyu bridge_kwargs"):
        from mmkit.vlm import build_model

        build_model(apply_overrides(get_recipe("fuyu-tiny"), ["bridge_kwargs.pool=2"]))


def test_explain_maps_cover_the_patch_grid_of_a_wide_image(model, world):
    img = world.render(world.scene("test", 5), size=(64, 32))
    out = model.explain([img], "What colour is the circle?", "red")
    assert out["grid"] == (4, 8) and out["image_tokens"] == [4 * 9]
    m = out["maps"][0]["all layers"]
    assert m.shape == (4, 8) and abs(m.sum() - 1) < 1e-4
    assert out["views"][0].size == (64, 32)


# ----------------------------------------------------------------------- training
def test_training_lowers_the_loss_and_reloads(tiny_assets, tmp_path, world, write_llava_data):
    """A real (short) run of fuyu-tiny through the Trainer on 8 fixed colour questions."""
    from mmkit.train import Trainer, load_model
    from mmkit.vlm import build_model

    records = [world.sample("train", i, "vqa", qtype="color") for i in range(8)]
    data = write_llava_data(records, tmp_path, "colors.json")
    recipe = apply_overrides(get_recipe("fuyu-tiny"),
                             ["stages.0.steps=5", "stages.1.steps=20", "stages.*.batch_size=8",
                              "stages.*.warmup_steps=2", "stages.1.lr=0.003", "log_every=1",
                              f"stages.*.data={data}", f"stages.*.image_folder={tmp_path}"])
    m = build_model(recipe)
    batch = {k: v for k, v in m.processor(records).items() if k != "ids"}

    def loss():
        m.eval()
        with torch.no_grad():
            return float(m(**batch).loss)

    before = loss()
    Trainer(m, recipe, tmp_path / "run", progress=False).train()
    after = loss()
    assert after < 0.5 * before
    again = load_model(tmp_path / "run")
    with torch.no_grad():
        assert abs(float(again(**batch).loss) - after) < 1e-4
