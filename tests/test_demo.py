"""The chat demo: its functions called directly, then the launched app over HTTP.

One llava-tiny trained for a few steps (or the shipped ``assets/tiny/models/llava-tiny``)
serves every test. The app is launched in-process on a free 127.0.0.1 port and driven
with ``gradio_client``: a normal turn, each bad input of ``BAD_INPUTS``, then a normal
turn again to show the server survived.
"""
from __future__ import annotations

import io
import shutil
import socket
import struct
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mmkit.bridges import Bridge, register_bridge

QUESTION = "What colour is the circle?"


# ------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def demo_ckpt(tiny_assets, tmp_path_factory) -> Path:
    """A llava-tiny checkpoint: the shipped one, or trained for a few steps."""
    from mmkit.paths import assets_dir

    shipped = assets_dir() / "tiny" / "models" / "llava-tiny"
    if (shipped / "recipe.json").is_file() or (shipped / "checkpoint" / "recipe.json").is_file():
        return shipped
    from mmkit.recipes import apply_overrides, get_recipe
    from mmkit.train import Trainer
    from mmkit.vlm import build_model

    out = tmp_path_factory.mktemp("llava-tiny")
    r = apply_overrides(get_recipe("llava-tiny"), ["stages.*.batch_size=2", "stages.0.steps=2",
                                                   "stages.1.steps=2", "stages.*.warmup_steps=1"])
    Trainer(build_model(r), r, out, progress=False).train()
    return out


@pytest.fixture(scope="session")
def bad_dirs(demo_ckpt, tmp_path_factory) -> dict[str, Path]:
    """Checkpoint folders that cannot be used: missing, incomplete, and one that fails to load."""
    from mmkit.train import find_checkpoint

    root = tmp_path_factory.mktemp("bad_ckpts")
    incomplete = root / "incomplete"
    incomplete.mkdir()
    shutil.copy(find_checkpoint(demo_ckpt) / "recipe.json", incomplete / "recipe.json")
    broken = root / "broken"
    broken.mkdir()
    shutil.copy(find_checkpoint(demo_ckpt) / "recipe.json", broken / "recipe.json")
    (broken / "model.safetensors").write_bytes(b"not safetensors at all")
    return {"missing": root / "missing", "incomplete": incomplete, "broken": broken}


@pytest.fixture(scope="session")
def store(demo_ckpt, bad_dirs):
    from mmkit.demo import ModelStore, discover_models

    return ModelStore(discover_models([demo_ckpt, *bad_dirs.values()], shipped=False))


@pytest.fixture()
def session(store):
    from mmkit.demo import ChatSession

    return ChatSession(store.get(store.labels[0]), store.labels[0])


@pytest.fixture(scope="session")
def scene() -> Image.Image:
    from mmkit.data.shapes import ShapesWorld

    return ShapesWorld().sample("test", 0, task="vqa")["image"]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(w: int = 10000, h: int = 10000) -> bytes:
    """A valid, fully decodable 1-bit PNG of w x h pixels, in a few kB."""
    row = b"\x00" + b"\x00" * ((w + 7) // 8)  # filter byte + packed pixels
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(row * h, 6)) + _png_chunk(b"IEND", b""))


@pytest.fixture(scope="session")
def files(scene, tmp_path_factory) -> dict[str, Path]:
    """Good and bad uploads, as files on disk (what Gradio hands over)."""
    d = tmp_path_factory.mktemp("uploads")
    buf = io.BytesIO()
    scene.save(buf, format="PNG")
    png = buf.getvalue()
    out = {
        "scene": d / "scene.png",
        "not_image": d / "notes.png",
        "corrupt": d / "corrupt.png",
        "truncated": d / "truncated.png",
        "one_pixel": d / "pixel.png",
        "huge": d / "huge.png",
        "gray": d / "gray.png",
        "rgba": d / "rgba.png",
        "palette": d / "palette.png",
    }
    out["scene"].write_bytes(png)
    out["not_image"].write_text("these are my notes, not a picture\n" * 20)
    out["corrupt"].write_bytes(png[:8] + bytes(range(256)) * 4)
    out["truncated"].write_bytes(png[: len(png) // 2])
    Image.new("RGB", (1, 1), (255, 0, 0)).save(out["one_pixel"])
    out["huge"].write_bytes(huge_png())
    scene.convert("L").save(out["gray"])
    rgba = scene.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(out["rgba"])
    scene.convert("P", palette=Image.ADAPTIVE, colors=16).save(out["palette"])
    return out


# Each bad input, and a phrase its message must contain.
BAD_INPUTS = [
    ("not_image", QUESTION, "not an image"),
    ("corrupt", QUESTION, "corrupt"),
    ("truncated", QUESTION, "truncated"),
    ("one_pixel", QUESTION, "only 1x1 pixels"),
    ("huge", QUESTION, "10000x10000"),
    ("scene", "", "message is empty"),
    ("scene", "a" * 20_000, "20,000 characters"),
    ("too_many", QUESTION, "takes at most 3"),
]


def _uploads(files, key):
    return [files["scene"]] * 4 if key == "too_many" else [files[key]]


def _answer_to(session, record: dict) -> str:
    """What the model answers to ``record`` without its last (assistant) turn."""
    prompt = {**record, "conversations": record["conversations"][:-1]}
    return session.model.generate(records=[prompt], max_new_tokens=4)[0]


# ------------------------------------------------------------------ model discovery
def test_discover_models_lists_shipped_and_reports_bad_folders(demo_ckpt, bad_dirs, tmp_path, monkeypatch):
    from mmkit.demo import ModelStore, discover_models, no_model_message

    models = tmp_path / "tiny" / "models"
    shutil.copytree(demo_ckpt, models / "llava-tiny")
    monkeypatch.setenv("MMKIT_ASSETS", str(tmp_path))
    entries = discover_models([demo_ckpt, *bad_dirs.values()])
    assert entries[0].shipped and entries[0].label == "llava-tiny (shipped)" and entries[0].error is None
    assert entries[1].label == f"llava-tiny ({demo_ckpt})" and entries[1].family == "prefix"
    errors = {e.path.name: e.error for e in entries if e.error}
    assert "does not exist" in errors["missing"] and "mmkit train" in errors["missing"]
    assert "incomplete" in errors["incomplete"] and "model.safetensors" in errors["incomplete"]
    assert "broken" not in errors  # looks complete: it fails only when loaded
    # labels are unique even for the same folder twice
    twice = discover_models([demo_ckpt, demo_ckpt], shipped=False)
    assert len({e.label for e in twice}) == 2
    # no model at all: the message says how to get one
    empty = ModelStore(discover_models([], shipped=False))
    from mmkit.demo import ChatError

    with pytest.raises(ChatError, match="mmkit zoo models --only llava-tiny"):
        empty.get(None)
    assert "mmkit demo --checkpoint" in no_model_message()
    # the shipped models come in zoo.SHIPPED_MODELS order (the reference llava first: the
    # demo's default), then any other folder by name
    for name in ("a-custom", "unified-tiny", "flamingo-tiny"):
        shutil.copytree(demo_ckpt, models / name)
    order = [e.path.name for e in discover_models() if e.shipped]
    assert order == ["llava-tiny", "flamingo-tiny", "unified-tiny", "a-custom"]


def test_store_loads_once_and_reports_load_errors(store, bad_dirs):
    from mmkit.demo import ChatError

    label = store.labels[0]
    assert store.get(label) is store.get(label)  # cached
    broken = next(l for l in store.labels if str(bad_dirs["broken"]) in l)
    with pytest.raises(ChatError, match="Could not load"):
        store.get(broken)
    missing = next(e.label for e in store.entries if e.error and "missing" in e.label)
    with pytest.raises(ChatError, match="does not exist"):
        store.get(missing)


# ------------------------------------------------------------------ chat functions
def test_stream_gives_growing_partials_then_the_full_answer(session, scene):
    # Sampled (seeded) so that a barely trained model still writes several words: the
    # streamer hands text over a word at a time.
    kw = dict(max_new_tokens=16, min_new_tokens=16, temperature=1.0)
    torch.manual_seed(0)
    parts = list(session.stream(QUESTION, [scene], **kw))
    assert len(parts) >= 3
    assert all(b.startswith(a) for a, b in zip(parts, parts[1:]))
    # the last item is exactly what generate() answers for the same prompt and seed
    torch.manual_seed(0)
    ref = session.model.generate([scene], QUESTION, **kw)[0]
    assert parts[-1] == ref and ref
    assert [t.role for t in session.turns] == ["user", "assistant"]


def test_multi_turn_keeps_images_and_history(session, scene):
    a1 = session.reply(QUESTION, [scene], max_new_tokens=6)
    a2 = session.reply("And how many shapes are there?", max_new_tokens=6)
    rec = session.record()
    assert len(rec["images"]) == 1 and rec["images"][0].size == scene.size
    conv = rec["conversations"]
    assert [c["from"] for c in conv] == ["human", "gpt", "human", "gpt"]
    assert conv[0]["value"] == "<image>\n" + QUESTION and conv[1]["value"] == a1
    assert conv[2]["value"] == "And how many shapes are there?" and conv[3]["value"] == a2
    # the second answer was generated from the whole history, image included
    prompt = {**rec, "conversations": conv[:3]}
    assert session.model.generate(records=[prompt], max_new_tokens=6)[0] == a2
    session.clear()
    assert session.turns == [] and session.last_request is None


def test_limits_come_from_the_model(session):
    assert session.tokens_per_image == 64  # 8x8 patches, one token each
    assert session.max_length == 256
    assert session.max_images == (256 - 32) // 64 == 3
    assert "64 tokens" in session.describe()
    session.model.max_images = 1  # a model may state its own limit
    try:
        assert session.max_images == 1
    finally:
        del session.model.max_images


@pytest.mark.parametrize("key,text,phrase", BAD_INPUTS, ids=[b[0] if b[1] == QUESTION else b[2] for b in BAD_INPUTS])
def test_bad_input_is_refused_with_a_clear_message(session, files, key, text, phrase):
    from mmkit.demo import ChatError

    session.reply(QUESTION, [files["scene"]], max_new_tokens=4)
    before = list(session.turns)
    with pytest.raises(ChatError) as err:
        session.reply(text, _uploads(files, key), max_new_tokens=4)
    assert phrase in str(err.value)
    if key not in ("too_many",) and text == QUESTION:  # image errors name the file, not a temp path
        assert f"**{files[key].name}**" in str(err.value) and "How to fix" in str(err.value)
    assert session.turns == before  # nothing half-added
    # the conversation goes on where it was: the next question is answered from the first
    # turn's image and history, as generate() answers that record
    answer = session.reply("How many shapes are there?", max_new_tokens=4)
    assert session.turns[:2] == before and [t.role for t in session.turns] == ["user", "assistant"] * 2
    rec = session.record()
    assert len(rec["images"]) == 1
    assert [c["value"] for c in rec["conversations"][2:]] == ["How many shapes are there?", answer]
    assert _answer_to(session, rec) == answer


@pytest.mark.parametrize("key", ["gray", "rgba", "palette"])
def test_gray_rgba_palette_images_are_answered(session, files, key):
    assert isinstance(session.reply(QUESTION, [files[key]], max_new_tokens=4), str)
    assert session.record()["images"][0].mode == "RGB"


def test_conversation_longer_than_the_model_reads_is_refused(session, scene):
    from mmkit.demo import ChatError

    session.reply(QUESTION, [scene] * 3, max_new_tokens=4)  # 3 x 64 image tokens
    with pytest.raises(ChatError, match="Press Clear"):
        session.reply(QUESTION, [scene], max_new_tokens=4)
    session.clear()
    answer = session.reply(QUESTION, [scene], max_new_tokens=4)
    # a fresh conversation: one image, one exchange, the answer of a new chat about the scene
    rec = session.record()
    assert len(rec["images"]) == 1 and len(rec["conversations"]) == 2
    assert rec["conversations"][0]["value"] == "<image>\n" + QUESTION and rec["conversations"][1]["value"] == answer
    assert session.model.generate([scene], QUESTION, max_new_tokens=4)[0] == answer


def test_typed_image_placeholder_does_not_break_the_count(session, scene):
    session.reply("<image> what is this <image>?", [scene], max_new_tokens=4)
    assert session.record()["conversations"][0]["value"].count("<image>") == 1


# --------------------------------------------------------------------------- explain
def _denormalise(model, pv: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(model.vision.image_mean).view(3, 1, 1)
    std = torch.tensor(model.vision.image_std).view(3, 1, 1)
    return ((pv * std + mean).clamp(0, 1) * 255).permute(1, 2, 0).numpy()


def test_explain_llava_maps_on_the_patch_grid(session, scene):
    model = session.model
    impl = model.lm.config._attn_implementation
    wide = scene.resize((128, 64))
    session.reply(QUESTION, [scene, wide], max_new_tokens=6)
    info = session.explain()
    assert info["image_tokens"] == [64, 64] and info["grid"] == (8, 8) and info["gates"] is None
    assert len(info["maps"]) == 2 and "LM's attention" in info["source"]
    for maps in info["maps"]:
        assert set(maps) == {"all layers", "last layer"}
        for m in maps.values():
            assert m.shape == (8, 8) and np.all(m >= 0) and m.sum() == pytest.approx(1.0, abs=1e-5)
    assert all(0.0 < s < 1.0 for s in info["image_share"])
    assert model.lm.config._attn_implementation == impl  # eager only for that one pass
    # the maps are the LM's attention from the answer positions, recomputed by hand
    rec = session.last_request["record"]
    batch = model.processor([rec])
    base = model.lm
    base.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model.lm(inputs_embeds=model.embed(batch["input_ids"], batch["pixel_values"]),
                           attention_mask=batch["attention_mask"], output_attentions=True)
    finally:
        base.set_attn_implementation(impl)
    ids = batch["input_ids"][0]
    rows = (batch["labels"][0, 1:] != -100).nonzero().flatten()  # positions predicting the answer
    img = (ids == model.image_token_id).nonzero().flatten()
    att = torch.stack([a[0].mean(0) for a in out.attentions])[:, rows][:, :, img[64:]].mean(1)  # (L, 64)
    expect = att.mean(0) / att.mean(0).sum()
    assert np.allclose(info["maps"][1]["all layers"].ravel(), expect.numpy(), atol=1e-5)
    # views: the image as framed by preprocess ("pad": letterboxed), so heat lands right
    view = info["views"][1]
    assert view.size == (128, 128)
    seen = _denormalise(model, model.preprocess([wide])[0])
    drawn = np.asarray(view.resize((64, 64), Image.BICUBIC), dtype=np.float32)
    assert np.abs(drawn - seen).mean() < 2.0
    fill = np.array([round(c * 255) for c in model.vision.image_mean])
    assert np.abs(np.asarray(view)[:32].reshape(-1, 3) - fill).max() <= 1  # top band is padding


def test_inspect_panel_images_and_summary(session, scene):
    from mmkit.demo import ChatError, inspect_last

    with pytest.raises(ChatError, match="ask a question first"):
        inspect_last(session)
    session.reply("Hello", max_new_tokens=3)
    with pytest.raises(ChatError, match="no image"):
        inspect_last(session)
    session.clear()
    session.reply(QUESTION, [scene.resize((96, 48))], max_new_tokens=6)
    gallery, summary = inspect_last(session)
    assert [c for _, c in gallery] == ["image 1: all layers", "image 1: last layer"]
    assert gallery[0][0].size == (288, 288)  # 96x96 letterboxed view, upscaled x3 to >= 256 px
    assert "Tokens each image cost:** image 1: 64" in summary and "8 x 8" in summary


def test_inspect_panel_for_a_tiled_model_draws_the_crop_grid(tiny_assets, scene):
    from mmkit.demo import ChatSession, inspect_last
    from mmkit.recipes import apply_overrides, get_recipe
    from mmkit.viz.tiles import draw_tiles
    from mmkit.vlm import build_model

    model = build_model(apply_overrides(get_recipe("llava-tiny"), [
        "image_mode=anyres", "anyres_grids=[[1, 1], [1, 2], [2, 1], [2, 2]]", "max_length=512"])).eval()
    session = ChatSession(model)
    wide = scene.resize((128, 64))
    session.reply(QUESTION, [wide], max_new_tokens=4)
    gallery, summary = inspect_last(session)
    assert [c for _, c in gallery] == ["image 1: crops, all layers", "image 1: crops, last layer",
                                       "image 1: global view, all layers", "image 1: global view, last layer",
                                       "image 1: how AnyRes cut it, 1 x 2 crops in reading order"]
    assert gallery[0][0].size == (256, 128) and gallery[2][0].size == (256, 256)  # crops' framing, global view's
    grid = np.asarray(gallery[-1][0])
    assert np.array_equal(grid, np.asarray(draw_tiles(wide, (1, 2), crop=128)))
    assert ("image 1 was cut into 1 x 2 crops of 64 px plus a global view; each crop costs 64 tokens"
            in summary)
    assert "8 x 8 = 64 patches per crop" in summary and "image 1: 200" in summary  # 64 + 8 rows of 16 + newline


@register_bridge("test_queries")
class QueryBridge(Bridge):
    """A bridge that attends: 4 learned queries cross-attend to the patches (for explain)."""

    def __init__(self, vision_dim: int, lm_dim: int, num_queries: int = 4):
        super().__init__()
        from mmkit.nn import Attention

        self.queries = nn.Parameter(torch.randn(num_queries, lm_dim) * 0.5)
        self.xattn = Attention(lm_dim, 4, kv_dim=vision_dim)

    def num_tokens(self, grid):
        return self.queries.shape[0]

    def forward(self, features, grid=None):
        q = self.queries.expand(features.shape[0], -1, -1)  # (N, Q, D)
        return self.xattn(q, features)

    def attention_maps(self, seen):
        w = seen[f"{self._inspect_path}.xattn.weights"]  # (N, H, Q, h*w)
        return w.mean(1)


def test_explain_uses_the_bridge_attention_maps(tiny_assets, scene):
    from mmkit.demo import ChatSession, inspect_last
    from mmkit.nn import inspect
    from mmkit.recipes import apply_overrides, get_recipe
    from mmkit.vlm import build_model

    model = build_model(apply_overrides(get_recipe("llava-tiny"), ["bridge=test_queries"])).eval()
    session = ChatSession(model)
    assert session.tokens_per_image == 4
    session.reply(QUESTION, [scene], max_new_tokens=4)
    info = session.explain()
    assert info["image_tokens"] == [4] and info["image_share"] is None
    maps = info["maps"][0]
    assert list(maps)[0] == "mean over outputs" and len(maps) == 4  # mean + 3 most focused
    with torch.no_grad(), inspect(model) as seen:
        model.encode_images(model.preprocess([scene]))
    w = seen["bridge.xattn.weights"][0].mean(0)  # (Q, 64)
    assert np.allclose(maps["mean over outputs"].ravel(), w.mean(0).numpy(), atol=1e-6)
    top = int(w.amax(-1).argmax())
    assert np.allclose(maps[f"output {top}"].ravel(), w[top].numpy(), atol=1e-6)
    gallery, summary = inspect_last(session)
    assert len(gallery) == 4 and "4 outputs attend" in summary


def test_lora_model_chats_and_explains(tiny_assets, scene):
    """A LoRA-wrapped LM (peft, as in QLoRA checkpoints) goes through the same path."""
    from mmkit.demo import ChatSession
    from mmkit.recipes import apply_overrides, get_recipe
    from mmkit.vlm import build_model

    model = build_model(apply_overrides(get_recipe("llava-tiny"), ['lora={"r": 4}'])).eval()
    assert hasattr(model.lm, "get_base_model")
    session = ChatSession(model)
    session.reply(QUESTION, [scene], max_new_tokens=4)
    info = session.explain()
    assert info["maps"][0]["all layers"].shape == (8, 8)
    assert model.lm.get_base_model().config._attn_implementation == "sdpa"


# ------------------------------------------------------------------ notebook widget
def test_notebook_chat_uses_the_same_functions(demo_ckpt, files):
    from mmkit.viz.chat import NotebookChat, chat

    nb = NotebookChat(demo_ckpt, max_new_tokens=5)
    answer = nb.send(QUESTION, [("scene.png", files["scene"].read_bytes())])
    assert isinstance(answer, str) and nb.chat.turns[-1].text == answer
    assert "scene.png" in nb.conversation.value
    assert nb.send("", []) is None and "message is empty" in nb.conversation.value
    assert nb.send(QUESTION, [("notes.png", files["not_image"].read_bytes())]) is None
    assert "notes.png" in nb.conversation.value and "not an image" in nb.conversation.value
    gallery = nb.inspect()
    assert len(gallery) == 2 and len(nb.maps.children) == 2 and "Tokens each image cost" in nb.inspect_text.value
    nb.clear()
    assert nb.chat.turns == [] and nb.maps.children == ()
    assert nb.inspect() == [] and "ask a question first" in nb.inspect_text.value
    assert type(chat(nb.chat.model)).__name__ == "VBox"


# ---------------------------------------------------------------- the launched app
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(demo_ckpt, bad_dirs):
    from mmkit.demo import launch

    app = launch([demo_ckpt, *bad_dirs.values()], port=_free_port(), block=False, warm=False)
    yield app
    app.close()


def _last(chat_value) -> str:
    content = chat_value[-1]["content"]
    return " ".join(c.get("text", "") for c in content) if isinstance(content, list) else str(content)


def test_app_is_local_and_offline(app):
    import os

    assert app.local_url.startswith("http://127.0.0.1:")
    assert getattr(app, "share_url", None) is None
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and app.analytics_enabled is False
    page = urllib.request.urlopen(app.local_url, timeout=30).read().decode()
    assert "mmkit chat" in page


def test_app_over_gradio_client(app, files, bad_dirs, demo_ckpt):
    from gradio_client import Client, handle_file

    client = Client(app.local_url, verbose=False)
    assert {"/chat", "/inspect", "/clear", "/select"} <= set(client.view_api(print_info=False, return_format="dict")
                                                           ["named_endpoints"])
    labels = app.mmkit_store.labels
    # this test's own llava checkpoint (the shipped models of other families are listed too)
    good = next(e.label for e in app.mmkit_store.entries
                if e.error is None and Path(e.path).resolve() == Path(demo_ckpt).resolve())

    def ask(text, paths, label=good):
        job = client.submit(label, {"text": text, "files": [handle_file(str(p)) for p in paths]}, 8, 0.0,
                            api_name="/chat")
        final = job.result(timeout=120)
        return final[0], job.outputs()

    # the bad checkpoint folders are reported in the chat from the start
    intro = client.predict(good, api_name="/clear")[0]
    text = " ".join(_last([m]) for m in intro)
    assert "does not exist" in text and "incomplete" in text

    chat_value, outputs = ask(QUESTION, [files["scene"]])
    assert len(outputs) >= 3  # streamed: placeholder, partial(s), final
    assert chat_value[-1]["role"] == "assistant" and not _last(chat_value).startswith("⚠️")
    assert any(c.get("type") == "file" for m in chat_value for c in m["content"])  # the image is shown
    gallery, summary = client.predict(api_name="/inspect")
    assert len(gallery) == 2 and "Tokens each image cost" in summary

    for key, text, phrase in BAD_INPUTS:
        chat_value, _ = ask(text, _uploads(files, key))
        assert _last(chat_value).startswith("⚠️") and phrase in _last(chat_value), key
    chat_value, _ = ask(QUESTION, [files["scene"]], label=next(l for l in labels if "broken" in l))
    assert "Could not load" in _last(chat_value)

    for key in ("gray", "rgba", "palette", "scene"):  # still serving normal requests
        client.predict(good, api_name="/clear")
        chat_value, _ = ask(QUESTION, [files[key]])
        assert not _last(chat_value).startswith("⚠️") and chat_value[-1]["role"] == "assistant", key


def test_cli_demo_arguments():
    from mmkit.cli import build_parser

    args = build_parser().parse_args(["demo", "--checkpoint", "a", "--checkpoint", "b", "--port", "7999"])
    assert args.checkpoint == ["a", "b"] and args.port == 7999 and args.share is False
    assert build_parser().parse_args(["demo", "--share"]).share is True


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="Debian chromium is not installed")
def test_page_screenshot(app, tmp_path):
    import subprocess

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    shot = tmp_path / "demo.png"
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
                    "--window-size=1280,900", f"--screenshot={shot}", app.local_url],
                   check=True, capture_output=True, timeout=120)
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert img.shape[1] >= 800 and img.std() > 5  # a page with something on it, not blank


# ------------------------------------------------------------ scenes, truth, score
def test_new_scene_has_one_example_per_question_type_with_its_truth():
    from mmkit.data.shapes import VQA_QTYPES, ShapesWorld
    from mmkit.demo import ChatError, new_scene

    a, b = new_scene(41), new_scene(41)
    assert a.seed >= 41 and a.seed == b.seed and a.examples == b.examples  # seeded
    assert [e["qtype"] for e in a.examples] == list(VQA_QTYPES)
    world = ShapesWorld()
    assert a.scene.to_dict() == world.scene("test", a.seed).to_dict()  # the test split
    assert a.image.tobytes() == world.render(a.scene).tobytes()  # as evaluation renders it
    for e in a.examples:
        assert a.truth(e["question"]) == e["answer"]
    assert new_scene().seed != new_scene().seed or True  # random seeds: no error
    with pytest.raises(ChatError, match="whole number"):
        new_scene(-1)


def test_answer_reads_every_generated_question_back():
    """``ShapesWorld.answer`` gives the generator's own answer for every phrasing it writes,
    and None when the scene graph cannot decide."""
    from mmkit.data.shapes import ShapesWorld

    world = ShapesWorld()
    for i in range(300):
        rec = world.sample("test", i, "vqa")
        q, a = (c["value"] for c in rec["conversations"])
        assert world.answer(rec["meta"]["scene"], q) == a, q
        assert world.answer(rec["meta"]["scene"], q.upper().rstrip("?")) == a  # any case, "?" optional
    scene = world.scene("test", 0)  # two circles, a green triangle, a cyan circle
    assert world.answer(scene, "What colour is the circle?") is None  # two circles: undecidable
    assert world.answer(scene, "How many circles are there?") == "2"
    assert world.answer(scene, "How many objects are there?") == str(len(scene.objects))
    assert world.answer(scene, "How many dogs are there?") is None
    assert world.answer(scene, "Is there a red dog?") is None
    assert world.answer(scene, "Tell me a story.") is None


def test_judge_scores_with_vqa_matching(session, scene):
    from mmkit.demo import new_scene

    s = new_scene(3)
    session.set_scene(s)
    color = next(e for e in s.examples if e["qtype"] == "color")
    count = next(e for e in s.examples if e["qtype"] == "count")
    assert session.judge(color["question"], f"The {color['answer'].upper()}.")["ok"]  # eval's normalisation
    wrong = session.judge(color["question"], "no idea")
    assert wrong["ok"] is False and wrong["truth"] == color["answer"] and wrong["score"] == (1, 2)
    words = ["zero", "one", "two", "three", "four"]
    assert session.judge(count["question"], words[int(count["answer"])])["ok"]  # "two" matches "2"
    assert session.judge("Tell me a story.", "once") is None and session.score == [2, 3]
    # the scene goes with the first question; the answer is the model's to that record
    session.clear()
    assert session.score == [0, 0] and session.scene is None
    session.set_scene(s)
    answer = session.reply(color["question"], max_new_tokens=4)
    rec = session.record()
    assert rec["images"][0].tobytes() == s.image.tobytes()
    assert session.model.generate([s.image], color["question"], max_new_tokens=4)[0] == answer
    # an uploaded image ends the scene: nothing more is judged
    session.reply(QUESTION, [scene], max_new_tokens=4)
    assert session.scene is None and session.judge(color["question"], color["answer"]) is None


def test_photo_heuristic_and_note(session, scene):
    from mmkit.data.shapes import ShapesWorld, looks_like_shapesworld
    from mmkit.demo import PHOTO_NOTE, photo_note

    world = ShapesWorld()
    assert all(looks_like_shapesworld(world.render(world.scene("test", i), size)) for i in range(60)
               for size in (64, 224))
    assert all(looks_like_shapesworld(world.sample("test", i, "ocr")["image"]) for i in range(20))
    rng = np.random.default_rng(0)
    x = np.linspace(0, 1, 200)

    def photo(seed):  # smooth colour gradients + sensor noise: what a phone photo looks like to this test
        r = np.random.default_rng(seed)
        base = np.stack([np.outer(x, 1 - x) * r.uniform(100, 255), np.outer(1 - x, x) * r.uniform(50, 255),
                         np.full((200, 200), r.uniform(30, 200))], -1)
        return Image.fromarray(np.clip(base + r.normal(0, 20, base.shape), 0, 255).astype(np.uint8))

    assert not any(looks_like_shapesworld(photo(s)) for s in range(30))
    assert not looks_like_shapesworld(Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)))
    assert not looks_like_shapesworld(Image.new("RGB", (50, 50), (10, 10, 10)))
    assert photo_note([scene], session.model) is None
    assert photo_note([scene, photo(0)], session.model) == PHOTO_NOTE and "llava-hf" in PHOTO_NOTE


def test_model_cards_come_from_the_report_and_the_recipe(demo_ckpt, tmp_path, monkeypatch):
    import json

    from mmkit import zoo
    from mmkit.demo import discover_models, model_card

    models = tmp_path / "tiny" / "models"
    for name in ("llava-tiny", "flamingo-tiny", "new-tiny"):
        shutil.copytree(demo_ckpt, models / name)
    (tmp_path / "tiny" / "report.json").write_text(json.dumps({"models": {
        "llava-tiny": {"vqa": 0.7633, "vqa_n": 300, "train_seconds": 1669.0, "torch_threads": 2},
        "new-tiny": {"vqa": 0.5, "vqa_n": 100, "train_seconds": 60.0}}}))
    monkeypatch.setenv("MMKIT_ASSETS", str(tmp_path))
    monkeypatch.setattr(zoo, "SHIPPED_MODELS", (*zoo.SHIPPED_MODELS, "new-tiny"))  # a model added later
    entries = discover_models()
    assert [e.path.name for e in entries] == ["llava-tiny", "flamingo-tiny", "new-tiny"]
    cards = [model_card(e) for e in entries]
    assert cards[0].startswith("**llava-tiny**: projector (prefix) (LLaVA")  # recipe.json says llava-tiny
    assert "trained 27.8 min on 2 CPU threads" in cards[0] and "VQA 0.76 on the test split (n = 300)" in cards[0]
    assert "VQA" not in cards[1]  # no report line for it: no number made up
    assert "VQA 0.50 on the test split (n = 100)" in cards[2] and "trained 1.0 min" in cards[2]
    mine = discover_models([demo_ckpt, tmp_path / "missing"], shipped=False)
    assert "your checkpoint" in model_card(mine[0]) and "cannot be used" in model_card(mine[1])


def test_inspect_draws_each_family_picture(session, scene):
    """Flamingo's gates and media mask, a box in the answer, a drawing: each becomes a
    picture in the gallery (a llava conversation stands in for the other families' answers)."""
    from mmkit.demo import _family_pictures, inspect_last

    session.reply(QUESTION, [scene], max_new_tokens=4)
    gallery, summary = inspect_last(session)
    assert summary.startswith("**What this picture means:** Each heatmap is the LM's attention")
    views = [scene]
    session.last_request["answer"] = "<ref>the circle</ref><box>(100,100),(500,600)</box>"
    pics = dict((c, im) for im, c in _family_pictures(session, {"gates": {"xattn layer 0": 0.5}}, views))
    assert set(pics) == {"gates: how much each layer lets the image in", "the box(es) in the answer"}
    boxed = np.asarray(pics["the box(es) in the answer"])
    assert boxed.shape[:2] == (256, 256) and (boxed == [255, 0, 255]).all(-1).sum() > 100  # magenta outline


def test_startup_lists_every_shipped_model_quickly(tiny_assets):
    """Launch to first page, every shipped model listed (they load lazily). Loose bound: the
    cores are shared; the figure on an idle machine is in docs/benchmarks.md."""
    import time

    from mmkit.demo import launch
    from mmkit.zoo import SHIPPED_MODELS

    t0 = time.perf_counter()
    app = launch([], port=_free_port(), block=False, warm=False)
    try:
        page = urllib.request.urlopen(app.local_url, timeout=30).read().decode()
        elapsed = time.perf_counter() - t0
        assert "mmkit chat" in page and elapsed < 30, elapsed
        shipped = [e.recipe for e in app.mmkit_store.entries if e.shipped]
        assert shipped == [n for n in SHIPPED_MODELS if n in shipped] and shipped[:1] == [SHIPPED_MODELS[0]]
        assert not app.mmkit_store._models  # nothing loaded yet
    finally:
        app.close()


def test_app_new_scene_then_example_is_judged(app):
    from gradio_client import Client

    client = Client(app.local_url, verbose=False)
    good = app.mmkit_store.labels[0]
    out = client.predict(good, "7", api_name="/new_scene")
    chat, info = out[0], out[1]
    assert "seed 7" in _last(chat) and "Scene seed 7" in info
    assert any(c.get("type") == "file" for m in chat for c in m["content"])  # the scene is shown
    buttons = [b for b in out[3:] if isinstance(b, str) and b]
    question = buttons[0] if buttons else "How many objects are there?"
    final = client.submit(good, {"text": question, "files": []}, 8, 0.0, api_name="/chat").result(timeout=120)
    verdict = _last(final[0])
    assert ("✓ right" in verdict or "✗ wrong" in verdict) and "true answer is" in verdict
    assert "Score in this conversation" in final[-1]
    bad = client.predict(good, "minus one", api_name="/new_scene")
    assert "not a whole number" in _last(bad[0])


def test_every_family_and_recipe_has_a_card():
    """A family added to the registry without a card (what it is, its papers, what its
    Inspect picture means) fails here."""
    from mmkit.demo import FAMILY_CARDS, _family_card
    from mmkit.recipes import RECIPES, get_recipe
    from mmkit.vlm import FAMILIES

    assert set(FAMILIES) <= set(FAMILY_CARDS)
    for name in RECIPES:
        r = get_recipe(name)
        kind, papers, meaning = _family_card(r.family, r.bridge)
        assert kind and papers and meaning.endswith("."), name


@pytest.mark.parametrize("recipe", ["qwenvl-tiny", "blip2-tiny", "fuyu-tiny", "eve-tiny", "kosmos-tiny"])
def test_inspect_works_for_each_family(tiny_assets, recipe):
    """Each family's own ``explain`` through the demo's Inspect panel (untrained weights:
    the pictures, not what they show, are under test)."""
    from mmkit.demo import ChatSession, _family_card, inspect_last, new_scene
    from mmkit.recipes import get_recipe
    from mmkit.vlm import build_model

    r = get_recipe(recipe)
    model = build_model(r).eval()
    conversation = ChatSession(model, recipe)
    scene = new_scene(0)
    conversation.set_scene(scene)
    conversation.reply(scene.examples[0]["question"], max_new_tokens=3)
    gallery, summary = inspect_last(conversation)
    assert gallery and all(im.size[0] >= 256 for im, _ in gallery)
    assert summary.startswith(f"**What this picture means:** {_family_card(r.family, r.bridge)[2]}")
