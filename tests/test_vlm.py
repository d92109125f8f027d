"""The processor, the merge of image tokens into the LM, LLaVA projectors, generate."""
from __future__ import annotations

import pytest
import torch

from mmkit.convert import from_hf, load_hf

from mmkit.data.processor import IGNORE_INDEX, ProcessorError, collate
from mmkit.language import IMAGE_TOKEN
from mmkit.vlm import MergeError


def test_placeholder_expands_to_bridge_token_count(llava_model, world):
    rec = world.sample("train", 0, task="vqa")
    enc = llava_model.processor.encode(rec)
    n_img = sum(t == llava_model.image_token_id for t in enc.input_ids)
    assert n_img == llava_model.num_image_tokens() == 64  # 8x8 grid, one token per patch
    assert len(enc.pixel_values) == 1 and enc.pixel_values[0].shape == (3, 64, 64)


def test_labels_only_on_assistant_turns(llava_model, world):
    rec = world.sample("train", 3, task="vqa")
    enc = llava_model.processor.encode(rec)
    tok = llava_model.tokenizer
    answer_ids = [i for i, l in zip(enc.input_ids, enc.labels) if l != IGNORE_INDEX]
    # The supervised text is exactly the answer plus the end-of-turn marker.
    assert tok.decode(answer_ids) == rec["conversations"][-1]["value"] + "<|im_end|>\n"
    # Image positions never carry a label.
    assert all(l == IGNORE_INDEX for t, l in zip(enc.input_ids, enc.labels) if t == llava_model.image_token_id)


def test_multi_turn_labels_cover_every_answer(llava_model, world):
    rec = world.sample("train", 5, task="vqa")
    rec["conversations"] += [{"from": "human", "value": "And again?"}, {"from": "gpt", "value": "blue"}]
    enc = llava_model.processor.encode(rec)
    text = llava_model.tokenizer.decode([i for i, l in zip(enc.input_ids, enc.labels) if l != IGNORE_INDEX])
    assert text == rec["conversations"][1]["value"] + "<|im_end|>\n" + "blue<|im_end|>\n"


def test_wrong_placeholder_count_names_the_sample(llava_model, world):
    rec = world.sample("train", 1, task="vqa")
    rec["conversations"][0]["value"] = IMAGE_TOKEN + IMAGE_TOKEN + "two placeholders, one image"
    rec["id"] = "sample-42"
    with pytest.raises(ProcessorError, match=r"sample-42.*2 <image> placeholder\(s\) but 1 image"):
        llava_model.processor.encode(rec)


def test_collate_pads_right_for_training_left_for_generation(llava_model, world):
    recs = [world.sample("train", i, task=t) for i, t in enumerate(["vqa", "detail"])]
    p = llava_model.processor
    enc = [p.encode(r) for r in recs]
    pad = llava_model.tokenizer.pad_token_id
    right = collate(enc, pad_id=pad, padding_side="right")
    left = collate(enc, pad_id=pad, padding_side="left")
    short = min(range(2), key=lambda i: len(enc[i]))
    assert right["attention_mask"][short, -1] == 0 and right["attention_mask"][short, 0] == 1
    assert left["attention_mask"][short, 0] == 0 and left["attention_mask"][short, -1] == 1
    assert (right["labels"][right["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert right["pixel_values"].shape == (2, 3, 64, 64)


def test_merge_writes_bridge_outputs_at_image_positions(llava_model, world):
    batch = llava_model.processor([world.sample("train", i) for i in range(2)])
    ids, pv = batch["input_ids"], batch["pixel_values"]
    with torch.no_grad():
        embeds = llava_model.embed(ids, pv)
        img = llava_model.encode_images(pv)  # (2, 64, D)
        text = llava_model.lm.get_input_embeddings()(ids)
    is_img = ids == llava_model.image_token_id
    assert torch.equal(embeds[is_img], img.reshape(-1, img.shape[-1]))  # row-major order
    assert torch.equal(embeds[~is_img], text[~is_img])
    with pytest.raises(MergeError, match="image-token positions"):
        llava_model.embed(ids, pv[:1])


def test_forward_loss_and_logits(llava_model, world):
    batch = llava_model.processor([world.sample("train", i) for i in range(2)])
    out = llava_model(**{k: v for k, v in batch.items() if k != "ids"})
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(out.loss)


def test_batched_generation_equals_one_by_one(llava_model, world):
    recs = [world.sample("test", i, task=t) for i, t in enumerate(["vqa", "caption", "vqa"])]
    batched = llava_model.generate(records=recs, max_new_tokens=8)
    single = [llava_model.generate(records=[r], max_new_tokens=8)[0] for r in recs]
    assert batched == single


@pytest.mark.parametrize("name", ["linear", "mlp", "mlp_norm"])
def test_projectors_map_each_patch(name):
    from mmkit.bridges import build_bridge

    b = build_bridge(name, 32, 48)
    x = torch.randn(3, 16, 32)
    assert b(x, (4, 4)).shape == (3, 16, 48) and b.num_tokens((4, 4)) == 16


def test_mlp_projector_parity_with_transformers():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from mmkit.bridges.llava import MLPProjector

    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                num_attention_heads=2, vocab_size=100),
        projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    ref = LlavaMultiModalProjector(cfg).eval()
    ours = from_hf(ref).eval()
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        diff = (ref(x) - ours(x)).abs().max().item()
    assert diff <= 1e-5
    # A whole-checkpoint state dict (prefixed keys) loads too; a wrong one is refused.
    fresh = MLPProjector(32, 48)
    load_hf(fresh, {f"multi_modal_projector.{k}": v for k, v in ref.state_dict().items()})
    assert torch.equal(fresh.linear_1.weight, ref.linear_1.weight)
    with pytest.raises(Exception, match="missing"):
        load_hf(MLPProjector(32, 48), {"linear_1.weight": ref.linear_1.weight})


def test_every_family_builds_through_the_one_registry_and_honours_lm_dtype(tiny_assets):
    """One builder path: every family's model gets the recipe's LM options (here ``lm_dtype``)."""
    from mmkit.recipes import RECIPES, apply_overrides, get_recipe
    from mmkit.vlm import FAMILIES, build_model

    by_family = {}
    for name in sorted(RECIPES):
        r = get_recipe(name)
        if name.endswith("-tiny") and r.family not in by_family:
            by_family[r.family] = name
    assert set(by_family) == set(FAMILIES), f"a family without a tiny recipe: {set(FAMILIES) - set(by_family)}"
    for family, name in by_family.items():
        model = build_model(apply_overrides(get_recipe(name), ["lm_dtype=bfloat16"]), pretrained=False)
        dtypes = {p.dtype for p in model.lm.parameters()}
        assert dtypes == {torch.bfloat16}, f"{name} ({family}): LM weights are {dtypes}, not bfloat16"
        assert model.recipe.family == family
