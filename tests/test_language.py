"""The language-model side: tokenizer, special tokens, chat template, loading, LoRA, 4-bit."""
from __future__ import annotations

import warnings

import pytest
import torch

from mmkit.language import (
    CHATML_TEMPLATE,
    CONTROL_TOKENS,
    IM_END,
    IMAGE_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    STRUCTURAL_TOKENS,
    add_special_tokens,
    bnb_config,
    build_tiny_tokenizer,
    compute_dtype_for_device,
    find_lora_targets,
    load_language_model,
    special_token_ids,
    split_digits_tokenizer,
    tiny_lm_config,
    to_chat_messages,
)

CAPTION = "a large red circle left of a small blue star."
GROUNDING = "<ref>the red circle</ref><box>(120,340),(560,780)</box>"


def _corpus() -> list[str]:
    colors = ["red", "green", "blue", "yellow", "purple", "orange"]
    shapes = ["circle", "square", "star", "triangle"]
    out = []
    for i in range(400):
        c1, c2 = colors[i % 6], colors[(i * 5 + 1) % 6]
        s1, s2 = shapes[i % 4], shapes[(i // 4) % 4]
        size = "large" if i % 3 else "small"
        out.append(f"a {size} {c1} {s1} left of a small {c2} {s2}.")
        out.append(f"<ref>the {c1} {s1}</ref><box>({i % 1000},{(7 * i) % 1000}),({(3 * i) % 1000},999)</box>")
        out.append(f"How many {s1}s are there? {i % 5}")
    return out


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(_corpus(), vocab_size=600)


def _tiny_cfg(tok, **kw):
    return tiny_lm_config(len(tok), hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                          max_position_embeddings=128, **special_token_ids(tok), **kw)


@pytest.fixture(scope="module")
def lm_dir(tok, tmp_path_factory):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("lm")
    LlamaForCausalLM(_tiny_cfg(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_is_deterministic(tok):
    again = build_tiny_tokenizer(_corpus(), vocab_size=600)
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert len(tok) <= 600


@pytest.mark.parametrize("text", [CAPTION, GROUNDING, "<image>\nWhat colour is the star?", "naïve ✓ 123"])
def test_round_trip(tok, text):
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.bos_token_id not in ids  # bos is never added automatically


def test_special_tokens_are_single_ids(tok):
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    for t in SPECIAL_TOKENS:
        assert tok(t)["input_ids"] == [tok.convert_tokens_to_ids(t)], t
        assert tok(f"x{t}y")["input_ids"].count(tok.convert_tokens_to_ids(t)) == 1, t
    assert tok.eos_token == IM_END and tok.pad_token == PAD_TOKEN and tok.bos_token == "<|endoftext|>"
    assert tok.padding_side == "right"


def test_skip_special_tokens_keeps_structural_text(tok):
    ids = tok(f"{IMAGE_TOKEN}\n{GROUNDING}{IM_END}{PAD_TOKEN}")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "\n" + GROUNDING
    for t in STRUCTURAL_TOKENS:
        assert tok.decode(tok(t)["input_ids"], skip_special_tokens=True) == t
    for t in CONTROL_TOKENS:
        assert tok.decode(tok(t)["input_ids"], skip_special_tokens=True) == ""


def test_chat_template(tok):
    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image>\nColour?"},
            {"from": "gpt", "value": "red"}]
    msgs = to_chat_messages(conv)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert tok.chat_template == CHATML_TEMPLATE
    assert tok.apply_chat_template(msgs, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<image>\nColour?<|im_end|>\n"
        "<|im_start|>assistant\nred<|im_end|>\n")
    assert tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True).endswith(
        "Colour?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="unknown role"):
        to_chat_messages([{"from": "bot", "value": "x"}])


def test_tiny_lm_config_param_count():
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        m = LlamaForCausalLM(tiny_lm_config(2048))
    assert sum(p.numel() for p in m.parameters()) == 2_164_416  # the number in the docstring
    assert m.config.tie_word_embeddings and m.config.head_dim == 32


# --------------------------------------------------------------------------- loading


def test_split_digits(tok, lm_dir):
    whole = tok(GROUNDING)["input_ids"]
    assert any(len(tok.decode([i])) > 1 and tok.decode([i]).isdigit() for i in whole)  # BPE merged digits
    _, t = load_language_model(str(lm_dir), split_digits=True)
    ids = t(GROUNDING + " 42")["input_ids"]
    digits = [t.decode([i]) for i in ids if t.decode([i]).strip().isdigit()]
    assert digits and all(len(d) == 1 for d in digits)  # one token per digit
    assert "".join(digits) == "120340560780" + "42"
    assert t.decode(ids) == GROUNDING + " 42" and len(t) == len(tok)  # same text, same vocabulary
    assert t("<box>")["input_ids"] == tok("<box>")["input_ids"]  # added tokens are untouched
    assert split_digits_tokenizer(t) is t


def test_load_by_path_and_tiny(lm_dir, tok, tmp_path, monkeypatch):
    model, t = load_language_model(str(lm_dir))
    assert t.mmkit_added_tokens == []  # the tiny tokenizer already has every token
    assert model.dtype == torch.float32 and len(t) == len(tok)
    ids = t(CAPTION, return_tensors="pt")
    assert model(**ids).logits.shape == (1, ids.input_ids.shape[1], len(tok))

    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "lm").symlink_to(lm_dir, target_is_directory=True)
    monkeypatch.setenv("MMKIT_ASSETS", str(tmp_path))
    model2, _ = load_language_model("tiny")
    assert torch.equal(model2.lm_head.weight, model.lm_head.weight)

    monkeypatch.setenv("MMKIT_ASSETS", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="mmkit zoo build"):
        load_language_model("tiny")
    with pytest.raises(FileNotFoundError):
        load_language_model("./no/such/folder")


def test_add_special_tokens_resizes_with_mean_rows(lm_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(lm_dir)
    t = AutoTokenizer.from_pretrained(lm_dir)
    n = len(t)
    old = model.get_input_embeddings().weight.detach().clone()
    added = add_special_tokens(model, t, ["<point>", "<ref>", "<|extra|>"])
    assert added == ["<point>", "<|extra|>"]
    w = model.get_input_embeddings().weight
    assert w.shape[0] == len(t) == n + 2
    assert torch.allclose(w[n:], old.mean(0).expand(2, -1), atol=1e-6)
    assert torch.equal(w[:n], old)
    assert model.lm_head.weight.shape[0] == n + 2  # tied, grew too
    assert t("<point>")["input_ids"] == [n] and t.decode([n], skip_special_tokens=True) == ""
    assert add_special_tokens(model, t, ["<point>"]) == []


def test_base_tokenizer_gets_chatml_and_pad(tok, tmp_path):
    from transformers import LlamaForCausalLM

    base = build_tiny_tokenizer(_corpus()[:50], vocab_size=400)
    base.chat_template = None
    base.pad_token = None
    torch.manual_seed(0)
    LlamaForCausalLM(_tiny_cfg(base)).save_pretrained(tmp_path)
    base.save_pretrained(tmp_path)
    # Make the saved tokenizer lack <image> too: drop it from tokenizer.json's added tokens.
    import json
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["content"] != IMAGE_TOKEN]
    spec["model"]["vocab"].pop(IMAGE_TOKEN)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["extra_special_tokens"] = [t for t in cfg.get("extra_special_tokens", []) if t != IMAGE_TOKEN]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))

    with pytest.warns(UserWarning, match="no chat template"):
        model, t = load_language_model(str(tmp_path))
    assert t.chat_template == CHATML_TEMPLATE and t.pad_token == PAD_TOKEN
    assert IMAGE_TOKEN in t.mmkit_added_tokens and len(t(IMAGE_TOKEN)["input_ids"]) == 1
    assert model.get_input_embeddings().weight.shape[0] >= len(t)
    assert model.config.pad_token_id == t.pad_token_id


# --------------------------------------------------------------------------- LoRA / 4-bit


def test_find_lora_targets_llama_and_gpt2(tok):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

    llama = LlamaForCausalLM(_tiny_cfg(tok))
    assert find_lora_targets(llama) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    targets = find_lora_targets(gpt2)
    assert {"c_attn", "c_proj"} <= set(targets) and "lm_head" not in targets


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls the v5-deprecated checkpointing names
def test_lora_only_adapters_trainable(lm_dir):
    model, t = load_language_model(str(lm_dir), lora=dict(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    ids = t(CAPTION, return_tensors="pt").input_ids
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_dtypes_and_bnb_config():
    assert compute_dtype_for_device("cpu") == torch.float32
    cfg = bnb_config("4bit", torch.bfloat16)
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="4bit"):
        bnb_config("3bit")


def test_4bit_load_on_cpu(lm_dir):
    from mmkit.quant import nf4_unavailable_reason

    reason = nf4_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls gradient_checkpointing_enable
        model, t = load_language_model(str(lm_dir), quantization="4bit", device="cpu", lora=dict(r=4))
    q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(q).__name__ == "Linear4bit" and q.weight.quant_type == "nf4"
    ref, _ = load_language_model(str(lm_dir))
    ids = t(CAPTION, return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item()
    assert diff < 0.5  # NF4 changes the weights a little, not the function
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
