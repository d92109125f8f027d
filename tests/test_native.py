"""Native models: documents (KOSMOS-1 / PaLM-E) and the unified decoder that reads and draws."""
from __future__ import annotations

import pytest
import torch

from mmkit.data.processor import IGNORE_INDEX


def _labelled(model, batch, row: int = 0) -> str:
    lab = batch["labels"][row].tolist()
    return model.tokenizer.decode([t for t in lab if t != IGNORE_INDEX])


# ----------------------------------------------------------------- documents (processor)
@pytest.fixture(scope="module")
def kosmos(tiny_assets):
    from mmkit.recipes import get_recipe
    from mmkit.vlm import build_model

    return build_model(get_recipe("kosmos-tiny"))


@pytest.fixture(scope="module")
def palme(tiny_assets):
    from mmkit.recipes import get_recipe
    from mmkit.vlm import build_model

    return build_model(get_recipe("palme-tiny"))


def _doc_record(world):
    return world.sample("train", 3, "interleaved", shots=2, fmt="vqa")


def test_document_text_and_labels(kosmos, palme, world):
    rec = _doc_record(world)
    doc, answer = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
    tok = kosmos.tokenizer
    # KOSMOS-1: <s> ... </s>, every text token labelled, no image position labelled
    b = kosmos.processor([rec])
    ids = b["input_ids"][0]
    text = tok.decode(ids)
    assert text.startswith(tok.bos_token + "<img>") and text.endswith(" " + answer + tok.eos_token)
    assert "<|im_start|>" not in text  # a document, not a chat
    is_image = (ids == kosmos.image_token_id) | torch.isin(ids, torch.tensor(kosmos.image_wrap_ids))
    labels = b["labels"][0]
    assert (labels[is_image] == IGNORE_INDEX).all()
    assert (labels[~is_image] == ids[~is_image]).all()
    # PaLM-E: only what follows the prefix, the answer and the end of the document
    b = palme.processor([rec])
    assert _labelled(palme, b).strip() == answer + tok.eos_token
    # generation prompt: ends with the separator, no end-of-document
    g = palme.processor([rec], for_generation=True)
    gt = tok.decode(g["input_ids"][0][g["attention_mask"][0].bool()])
    assert gt.endswith(doc.split("<image>")[-1]) and tok.eos_token not in gt  # "... Answer:" (no space)


def test_document_separators(palme, world):
    tok = palme.tokenizer
    vqa = world.sample("train", 1, "vqa")
    text = tok.decode(palme.processor([vqa])["input_ids"][0])
    q, a = (t["value"] for t in vqa["conversations"])
    assert text.endswith(q.split("\n")[-1] + "\n" + a + tok.eos_token)  # question, new line, answer
    cap = world.sample("train", 2, "interleaved", shots=1, fmt="caption")
    text = tok.decode(palme.processor([cap])["input_ids"][0])
    assert text.endswith("\n" + cap["conversations"][1]["value"] + tok.eos_token)  # no doubled new line


def test_processor_rejects_unknown_modes(palme):
    from mmkit.data.processor import Processor

    with pytest.raises(ValueError, match="text_format"):
        Processor(palme.tokenizer, None, None, text_format="markdown")
    with pytest.raises(ValueError, match="loss_on"):
        Processor(palme.tokenizer, None, None, loss_on="everything")


def test_kosmos_decoder_is_from_scratch_palme_is_pretrained(kosmos, palme, tiny_assets):
    from mmkit.language import load_language_model

    lm, _ = load_language_model("tiny")
    ref = lm.model.layers[0].mlp.down_proj.weight
    assert torch.equal(palme.lm.model.layers[0].mlp.down_proj.weight, ref)
    assert not torch.allclose(kosmos.lm.model.layers[0].mlp.down_proj.weight, ref)
    assert kosmos.lm_init == "scratch" and palme.lm_init == "pretrained"


def test_interleaved_family_checks_its_recipe(tiny_assets):
    from mmkit.recipes import get_recipe
    from mmkit.vlm import build_model

    r = get_recipe("kosmos-tiny")
    r.text_format = "chat"
    with pytest.raises(ValueError, match="text_format='document'"):
        build_model(r)
    r = get_recipe("kosmos-tiny")
    r.bridge_kwargs["lm_init"] = "half"
    with pytest.raises(ValueError, match="lm_init"):
        build_model(r)


def test_token_budget(kosmos, palme, world):
    from mmkit.native.interleaved import token_budget

    rec = _doc_record(world)
    k, p = token_budget(kosmos, rec), token_budget(palme, rec)
    assert k["images"] == p["images"] == 3 == k["placeholders"]
    assert k["per_image"] == [16 + 2] * 3  # 16 resampler latents + <img> </img>
    assert p["per_image"] == [64] * 3  # one token per patch of the 8x8 grid
    assert k["text_tokens"] == p["text_tokens"]  # the same words
    assert k["total"] == k["image_tokens"] + k["text_tokens"]
    assert p["labelled"] < k["labelled"] == k["text_tokens"]


def test_kosmos_learns_from_documents(kosmos, world):
    """A few real steps on interleaved documents lower the loss on held-out documents."""
    from mmkit.recipes import get_recipe
    from mmkit.vlm import build_model

    torch.manual_seed(0)
    model = build_model(get_recipe("kosmos-tiny"))
    val = model.processor([world.sample("val", i, "interleaved") for i in range(16)])
    val = {k: v for k, v in val.items() if k != "ids"}

    def val_loss():
        model.eval()
        with torch.no_grad():
            return float(model(**val).loss)

    before = val_loss()
    params = [p for n, p in model.named_parameters() if not n.startswith("vision.")]
    opt = torch.optim.AdamW(params, lr=2e-3)
    model.train()
    for step in range(30):
        b = model.processor(world.samples("train", "interleaved", start=step * 8, n=8))
        loss = model(**{k: v for k, v in b.items() if k != "ids"}).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = val_loss()
    assert after < before - 2.0, (before, after)  # a fresh decoder starts near ln(V) = 7.6


# ------------------------------------------------------------------- the unified decoder
@pytest.fixture(scope="module")
def unified(tiny_assets, tmp_path_factory):
    """unified-tiny over a small untrained VQ-VAE (shapes and masks need no trained codes)."""
    from mmkit.native.vq import VQConfig, VQVAE
    from mmkit.recipes import get_recipe
    from mmkit.vlm import build_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vq")
    VQVAE(VQConfig(hidden=32, codebook_size=64, code_dim=16)).save_pretrained(folder)
    r = get_recipe("unified-tiny")
    r.vision = str(folder)
    return build_model(r)


def test_one_vocabulary(unified):
    lm, tok = unified.lm, unified.tokenizer
    assert unified.code_start == len(tok) and unified.num_codes == 64
    assert lm.get_input_embeddings().num_embeddings == len(tok) + 64
    assert lm.get_output_embeddings().weight.shape[0] == len(tok) + 64  # one softmax for both
    assert unified.codes_per_image == 64 and unified.num_image_tokens() == 66


def test_read_and_draw_records(unified, world):
    tok = unified.tokenizer
    draw, read = world.sample("train", 0, "draw"), world.sample("train", 1, "vqa")
    b = unified.processor([draw, read])
    ids, labels = b["input_ids"], b["labels"]
    for row in range(2):
        boi = (ids[row] == unified.boi_id).nonzero().flatten()
        assert len(boi) == 1
        codes = ids[row, boi + 1: boi + 65]
        assert ((codes >= unified.code_start) & (codes < unified.code_start + 64)).all()
        assert ids[row, boi + 65] == unified.eoi_id
    # draw: the picture is the answer: <boi> (the decision to draw), its codes, <eoi>, <|im_end|>
    lab = labels[0][labels[0] != IGNORE_INDEX]
    assert int(lab[0]) == unified.boi_id and (lab[1:65] >= unified.code_start).all()
    assert tok.decode(lab[65:]).startswith("<eoi><|im_end|>")
    # read: only the answer; the codes of the picture in the question are context
    lab = labels[1][labels[1] != IGNORE_INDEX]
    assert (lab < unified.code_start).all()
    assert tok.decode(lab).startswith(read["conversations"][1]["value"])
    # the codes are the VQ-VAE's
    want = unified.vq.encode(unified.vq.preprocess([draw["image"]])).flatten() + unified.code_start
    row0 = ids[0]
    start = int((row0 == unified.boi_id).nonzero()[0]) + 1
    assert torch.equal(row0[start:start + 64], want)


def test_loss_is_text_mean_plus_image_mean(unified, world):
    import torch.nn.functional as F

    b = unified.processor([world.sample("train", 0, "draw"), world.sample("train", 1, "vqa")])
    b = {k: v for k, v in b.items() if k != "ids"}
    unified.eval()
    out = unified(**b)
    tgt, logit = b["labels"][:, 1:], out.logits[:, :-1]
    nll = F.cross_entropy(logit.reshape(-1, logit.shape[-1]), tgt.reshape(-1), reduction="none",
                          ignore_index=IGNORE_INDEX).view_as(tgt)
    img = tgt >= unified.code_start
    txt = (tgt != IGNORE_INDEX) & ~img
    assert torch.allclose(out.losses["text"], nll[txt].mean(), atol=1e-5)
    assert torch.allclose(out.losses["image"], nll[img].mean(), atol=1e-5)
    assert torch.allclose(out.loss, nll[txt].mean() + nll[img].mean(), atol=1e-5)


def test_modality_mask():
    from mmkit.native.unified import ModalityMask

    V, start, K, boi, eoi, stop = 20, 10, 6, 8, 9, 1
    guard = ModalityMask(start, K, 3, boi, eoi, prompt_len=2, max_text=2, stop_ids=[stop])
    # prompt = the first 2 ids; rows: a finished set of 3 codes, a closed picture and two
    # words, a picture with 2 codes, a picture with 1 code
    ids = torch.tensor([[4, 5, 8, 10, 11, 12],
                        [4, 5, 8, 9, 3, 4],  # <boi> <eoi> (closed), then 2 text words
                        [4, 5, 3, 8, 10, 11], [4, 5, 3, 4, 8, 10]])
    assert guard.state(ids).tolist() == [3, -1, 2, 1]
    ok = torch.isfinite(guard(ids, torch.zeros(len(ids), V)))
    assert ok[0].nonzero().flatten().tolist() == [eoi]            # all 3 codes: only <eoi>
    assert ok[1].nonzero().flatten().tolist() == [stop]           # text budget (2) spent outside a picture
    assert ok[2].nonzero().flatten().tolist() == list(range(start, start + K))  # mid-picture: codes only
    assert ok[3].nonzero().flatten().tolist() == list(range(start, start + K))
    # temperatures: words almost greedy, pictures at their own temperature
    hot = ModalityMask(start, K, 3, boi, eoi, temperatures=(0.5, 2.0))
    raw = torch.randn(2, V)
    out = hot(torch.tensor([[4, 8, 10], [4, 5, 6]]), raw.clone())  # row 0 inside a picture, row 1 in text
    codes = slice(start, start + K)
    assert torch.allclose(out[0, codes], raw[0, codes] / 2.0)
    assert torch.allclose(out[1, :eoi], raw[1, :eoi] / 0.5)  # (<eoi> is masked outside a picture)
    free = ModalityMask(start, K, 3, boi, eoi)(torch.tensor([[4, 5]]), torch.zeros(1, V))
    allowed = torch.isfinite(free[0]).nonzero().flatten().tolist()
    assert boi in allowed and eoi not in allowed and not any(start <= i < start + K for i in allowed)


def test_split_reply_and_forced_drawing(unified):
    from transformers import LogitsProcessorList

    from mmkit.native.unified import ModalityMask

    tok = unified.tokenizer
    codes = (torch.arange(64) % 64 + unified.code_start).tolist()
    words = tok("Here:", add_special_tokens=False)["input_ids"]
    rep = unified.split_reply(words + [unified.boi_id, *codes, unified.eoi_id])
    assert rep["text"] == "Here:<image>" and len(rep["images"]) == 1
    assert rep["images"][0].size == (64, 64)
    assert unified.split_reply([unified.boi_id, *codes[:10]])["images"] == []  # unfinished: no picture
    # a prompt that ends in <boi> must give exactly 64 codes and then <eoi>, whatever the weights
    prompt = torch.tensor([[*words, unified.boi_id]])
    guard = ModalityMask(unified.code_start, 64, 64, unified.boi_id, unified.eoi_id)
    out = unified.lm.generate(input_ids=prompt, max_new_tokens=66, do_sample=True, top_k=None,
                              logits_processor=LogitsProcessorList([guard]), pad_token_id=tok.pad_token_id)
    new = out[0, prompt.shape[1]:]
    assert ((new[:64] >= unified.code_start) & (new[:64] < unified.code_start + 64)).all()
    assert int(new[64]) == unified.eoi_id


def test_generate_returns_text_or_pictures(unified, world):
    rec = world.sample("test", 0, "vqa")
    texts = unified.generate(records=[rec], max_new_tokens=3)
    assert isinstance(texts[0], str)
    full = unified.generate(records=[rec], max_new_tokens=3, return_images=True)
    assert set(full[0]) == {"text", "images"}
    info = unified.explain([rec["image"]], "What colour is the circle?", "red")
    assert info["grid"] == (8, 8) and info["maps"][0]["all layers"].shape == (8, 8)
    assert abs(info["maps"][0]["all layers"].sum() - 1) < 1e-5


def test_unified_recipe_checks(tiny_assets, unified):
    from mmkit.recipes import get_recipe
    from mmkit.vlm import build_model

    r = get_recipe("unified-tiny")
    r.vision = unified.recipe.vision
    r.bridge_kwargs = {"lm_init": "pretrained", "lm_config": {"num_hidden_layers": 2}}
    with pytest.raises(ValueError, match="lm_config"):
        build_model(r)
    r.bridge_kwargs = {"lm_init": "scratch", "colour": 1}
    with pytest.raises(ValueError, match="unknown unified bridge_kwargs"):
        build_model(r)
    r.bridge_kwargs = {"lm_init": "pretrained"}
    m = build_model(r)
    from mmkit.language import load_language_model

    lm, tok = load_language_model("tiny")
    n = len(tok)
    assert torch.equal(m.lm.get_input_embeddings().weight[:n], lm.get_input_embeddings().weight[:n])


# ------------------------------------------------------------ the shipped model, chat, CLI
def _shipped_unified():
    from mmkit.paths import assets_dir

    path = assets_dir() / "tiny" / "models" / "unified-tiny"
    if not (path / "model.safetensors").exists():
        pytest.skip("unified-tiny is not shipped here (`mmkit zoo models --only unified-tiny`)")
    return path


def test_shipped_unified_reads_and_draws_in_the_demo_session(tiny_assets):
    from mmkit.demo import ChatSession, _save_drawing
    from mmkit.train import load_model

    model = load_model(_shipped_unified())
    assert model.writes_images
    session = ChatSession(model, "unified-tiny")
    assert session.tokens_per_image == 66
    torch.manual_seed(0)
    answer = session.reply("Draw a large red circle on the left.")
    drawn = session.last_drawings
    assert answer.count("<image>") == len(drawn) == 1 and drawn[0].size == (64, 64)
    # the drawing is part of the conversation: the next question reads it back as codes
    rec = session.record()
    assert rec["images"] == drawn and rec["conversations"][-1]["value"] == answer
    follow = session.reply("What colour is the circle?")
    assert isinstance(follow, str) and session.last_drawings == []
    assert _save_drawing(drawn[0]).endswith(".png")


def test_cli_chat_saves_drawings_and_eval_draw(tiny_assets, tmp_path, capsys):
    from mmkit.cli import main

    path = _shipped_unified()
    torch.manual_seed(0)
    assert main(["chat", "--checkpoint", str(path), "--save-images", str(tmp_path),
                 "Draw a small blue star at the top."]) == 0
    out = capsys.readouterr().out
    assert "saved to" in out and (tmp_path / "drawn_0.png").is_file()
    assert main(["eval", "--checkpoint", str(path), "--task", "draw", "--n", "4", "--json"]) == 0
    import json

    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["task"] == "draw" and res["n"] == 4 and res["drawn"] == 1.0


def test_draw_task_needs_a_model_that_writes_images(kosmos):
    from mmkit.eval import evaluate

    with pytest.raises(ValueError, match="writes images"):
        evaluate(kosmos, "draw", n=2)
