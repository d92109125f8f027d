"""Conversation data (LLaVA / Qwen-VL) and image loading: every error says where and how to fix."""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from mmkit.data.conversations import (
    DataError,
    convert_inline_images,
    load_conversations,
    load_hf_dataset,
    validate_record,
)
from mmkit.data.images import ImageError, image_summary, load_image

HOW = "How to fix:"


# --------------------------------------------------------------------------- helpers


def _png(path: Path, size=(16, 12), color=(200, 30, 30), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def _noise_jpeg_bytes(size=(64, 64)) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _rec(id="r1", image="a.png", turns=None, **kw):
    turns = turns if turns is not None else [("human", "<image>\nWhat colour is the circle?"), ("gpt", "red")]
    r = {"id": id, "conversations": [{"from": f, "value": v} for f, v in turns], **kw}
    if image is not None:
        r["image"] = image
    return r


def _jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "imgs" / "b.png", color=(0, 0, 255))
    _png(tmp_path / "imgs" / "sub" / "c.png", color=(0, 255, 0))
    return tmp_path / "imgs"


def _error(tmp_path, folder, bad_record, *, line=2, **kw) -> str:
    """Write good, bad, good as JSONL; load strictly; return the message."""
    path = _jsonl(tmp_path / "data.jsonl", [_rec("ok1"), bad_record, _rec("ok2")])
    with pytest.raises(DataError) as ei:
        load_conversations(path, folder, **kw)
    msg = str(ei.value)
    assert "data.jsonl" in msg and f"line {line}" in msg and HOW in msg, msg
    return msg


# --------------------------------------------------------------------------- good data


def test_good_jsonl_and_json(tmp_path, folder):
    recs = [
        _rec("one"),
        _rec("two", image=None, images=["a.png", "sub/c.png"],
             turns=[("human", "<image> and <image>: same colour?"), ("gpt", "no")]),
        _rec("text-only", image=None, turns=[("human", "Say hi."), ("gpt", "hi")]),
        _rec("sys", turns=[("system", "Be brief."), ("user", "<image>\nShape?"), ("assistant", "circle"),
                           ("human", "Colour?"), ("gpt", "red")]),
    ]
    jl = _jsonl(tmp_path / "data.jsonl", recs)
    js = tmp_path / "data.json"
    js.write_text(json.dumps(recs, indent=2))
    a = load_conversations(jl, folder)
    b = load_conversations(js, folder)
    assert a == b and len(a) == 4
    assert a[0]["images"] == [str((folder / "a.png").resolve())]
    assert a[1]["images"] == [str((folder / "a.png").resolve()), str((folder / "sub" / "c.png").resolve())]
    assert a[2]["images"] == []
    assert [c["from"] for c in a[3]["conversations"]] == ["system", "human", "gpt", "human", "gpt"]


def test_default_image_folder_is_data_folder(tmp_path, folder):
    path = _jsonl(folder / "d.jsonl", [_rec("x"), {"conversations": _rec()["conversations"], "image": "b.png"}])
    recs = load_conversations(path)
    assert recs[0]["images"] == [str((folder / "a.png").resolve())]
    assert recs[1]["id"] == "d-2"  # missing ids get "<stem>-<line>"


def test_single_image_without_placeholder_gets_one_prepended(folder):
    r = validate_record(_rec(turns=[("human", "What shape?"), ("gpt", "star")]), where="x", image_folder=folder)
    assert r["conversations"][0]["value"] == "<image>\nWhat shape?"


def test_qwen_vl_inline_images(tmp_path, folder):
    assert convert_inline_images("Picture 1: <img>a.jpg</img>\nHi") == ("Picture 1: <image>\nHi", ["a.jpg"])
    rec = {"id": "identity_0", "conversations": [
        {"from": "user", "value": "Picture 1: <img>a.png</img>\nPicture 2: <img>b.png</img>\nSame colour?"},
        {"from": "assistant", "value": "No. <ref>the circle</ref><box>(10,20),(300,400)</box>"}]}
    out = load_conversations(_jsonl(tmp_path / "q.jsonl", [rec]), folder)[0]
    assert out["images"] == [str((folder / n).resolve()) for n in ("a.png", "b.png")]
    assert out["conversations"][0] == {"from": "human",
                                       "value": "Picture 1: <image>\nPicture 2: <image>\nSame colour?"}
    assert out["conversations"][1]["value"].endswith("<box>(10,20),(300,400)</box>")
    # both styles at once is ambiguous
    with pytest.raises(DataError, match="ambiguous"):
        validate_record({**rec, "image": "a.png"}, where="q", image_folder=folder)


def test_pil_images_and_messages_alias(folder):
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    r = validate_record({"image": img, "messages": [{"role": "user", "content": "<image>\nx"},
                                                    {"role": "assistant", "content": "y"}]}, where="mem")
    assert r["images"][0].mode == "RGB" and r["id"] is None


def test_strict_false_collects_errors(tmp_path, folder):
    path = _jsonl(tmp_path / "data.jsonl", [_rec("ok"), "{not json", _rec("bad", turns=[("human", "<image>\nq")]),
                                            _rec("ok2")])
    recs, errors = load_conversations(path, folder, strict=False)
    assert [r["id"] for r in recs] == ["ok", "ok2"]
    assert len(errors) == 2 and "line 2" in str(errors[0]) and "line 3" in str(errors[1])


def test_check_images_modes(tmp_path, folder):
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rec = _rec(image="broken.png")
    assert validate_record(rec, where="x", image_folder=folder, check_images="exists")["images"]
    assert validate_record(_rec(image="nope.png"), where="x", image_folder=folder, check_images=False)
    with pytest.raises(DataError, match="unreadable image"):
        validate_record(rec, where="x", image_folder=folder, check_images=True)


# --------------------------------------------------------------------------- one test per error


def test_error_bad_json_line(tmp_path, folder):
    path = _jsonl(tmp_path / "data.jsonl", [_rec("ok"), '{"id": "x", "conversations": [}'])
    with pytest.raises(DataError) as ei:
        load_conversations(path, folder)
    msg = str(ei.value)
    assert "data.jsonl line 2" in msg and "column 31" in msg and HOW in msg and "one complete JSON object" in msg


def test_error_bad_json_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"id": "a", "conversations": []},\n  {"id": "b" "conversations": []}\n]')
    with pytest.raises(DataError) as ei:
        load_conversations(path)
    msg = str(ei.value)
    assert "data.json line 3" in msg and "column 14" in msg and HOW in msg


def test_error_not_an_object(tmp_path, folder):
    msg = _error(tmp_path, folder, ["human", "hi"])
    assert "must be a JSON object" in msg and '"conversations"' in msg


def test_error_json_list_names_index(tmp_path, folder):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([_rec("ok"), _rec("bad", turns=[("gpt", "hi")])]))
    with pytest.raises(DataError) as ei:
        load_conversations(path, folder)
    msg = str(ei.value)
    assert "data.json index 1, record 'bad'" in msg and "must be from the human" in msg and HOW in msg


def test_error_missing_conversations(tmp_path, folder):
    msg = _error(tmp_path, folder, {"id": "abc", "image": "a.png", "conversation": []})
    assert "record 'abc'" in msg and "missing the 'conversations'" in msg and "'conversation'" in msg


def test_error_empty_turn(tmp_path, folder):
    msg = _error(tmp_path, folder, _rec("abc", turns=[("human", "<image>\nq"), ("gpt", "  ")]))
    assert "record 'abc'" in msg and "turn 2 (gpt) is empty" in msg and "give the turn some text" in msg


def test_error_unknown_role(tmp_path, folder):
    msg = _error(tmp_path, folder, _rec("abc", turns=[("human", "<image>\nq"), ("bot", "a")]))
    assert "unknown role 'bot'" in msg and "'assistant'" in msg


def test_error_not_alternating(tmp_path, folder):
    msg = _error(tmp_path, folder, _rec("abc", turns=[("human", "<image>\nq"), ("human", "q2"), ("gpt", "a")]))
    assert "alternate" in msg and "turns 1 and 2" in msg and "merge" in msg


def test_error_system_not_first(tmp_path, folder):
    msg = _error(tmp_path, folder, _rec("abc", turns=[("human", "<image>\nq"), ("system", "s"), ("gpt", "a")]))
    assert "only allowed first" in msg


def test_error_first_turn_not_human(tmp_path, folder):
    msg = _error(tmp_path, folder, _rec("abc", turns=[("system", "s"), ("gpt", "<image>hello"), ("human", "q")]))
    assert "turn 2 is 'gpt'" in msg and "start the conversation" in msg


def test_error_last_turn_not_gpt(tmp_path, folder):
    bad = _rec("abc", turns=[("human", "<image>\nq"), ("gpt", "a"), ("human", "q2")])
    msg = _error(tmp_path, folder, bad)
    assert "no answer to train on" in msg and "require_answer=False" in msg
    assert validate_record(bad, where="x", image_folder=folder, require_answer=False)


def test_error_placeholder_count(tmp_path, folder):
    msg = _error(tmp_path, folder, _rec("abc", image=None, images=["a.png", "b.png"],
                                        turns=[("human", "<image>\nSame?"), ("gpt", "no")]))
    assert "1 '<image>' placeholder(s)" in msg and "2 image(s)" in msg and "exactly one '<image>'" in msg
    msg = _error(tmp_path, folder, _rec("abc", image=None, turns=[("human", "<image>\nq"), ("gpt", "a")]))
    assert "0 image(s)" in msg
    msg = _error(tmp_path, folder, _rec("abc", turns=[("human", "<image>\nq"), ("gpt", "<image>")]))
    assert "only be shown in human turns" in msg


def test_error_missing_image(tmp_path, folder):
    msg = _error(tmp_path, folder, _rec("abc", image="sub/missing.png"))
    assert "image file not found: 'sub/missing.png'" in msg
    assert str((folder / "sub" / "missing.png").resolve()) in msg
    assert f"image_folder={str(folder.resolve())!r}" in msg and "image_folder=" in msg.split(HOW)[1]


def test_error_unreadable_image(tmp_path, folder):
    (folder / "notes.jpg").write_text("these are my notes, not a picture")
    msg = _error(tmp_path, folder, _rec("abc", image="notes.jpg"))
    assert "unreadable image" in msg and "notes.jpg" in msg and "not an image" in msg and "text file" in msg


def test_error_missing_data_file(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_conversations(tmp_path / "nope.jsonl")


# --------------------------------------------------------------------------- datasets


def test_load_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    ds = datasets.Dataset.from_dict({
        "id": ["a", "b", "c"],
        "image": [red, blue, red],
        "conversations": [
            [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}],
            [{"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "blue"}],
            [{"from": "gpt", "value": "red"}, {"from": "human", "value": "?"}],
        ],
    }).cast_column("image", datasets.Image())
    recs, errors = load_hf_dataset(ds, strict=False)
    assert [r["id"] for r in recs] == ["a", "b"]
    assert isinstance(recs[0]["images"][0], Image.Image) and recs[1]["images"][0].getpixel((0, 0)) == (0, 0, 255)
    assert recs[1]["conversations"][0]["value"] == "<image>\nColour?"
    assert len(errors) == 1 and "row 2, record 'c'" in str(errors[0])
    with pytest.raises(DataError, match="column 'img' not found"):
        load_hf_dataset(ds, image_column="img")


# --------------------------------------------------------------------------- images


def test_load_image_modes(tmp_path):
    gray = load_image(_png(tmp_path / "g.png", color=77, mode="L"))
    assert gray.mode == "RGB" and gray.getpixel((0, 0)) == (77, 77, 77)
    rgba = load_image(_png(tmp_path / "t.png", color=(255, 0, 0, 0), mode="RGBA"))
    assert rgba.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white background
    half = load_image(Image.new("RGBA", (4, 4), (0, 0, 0, 128)))
    assert 120 <= half.getpixel((0, 0))[0] <= 135
    pal = Image.new("P", (6, 6), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").getpixel((0, 0)) == (10, 200, 30)
    pal.save(tmp_path / "pt.png", transparency=1)
    assert load_image(tmp_path / "pt.png").getpixel((0, 0)) == (255, 255, 255)
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = load_image(tmp_path / "c.jpg").getpixel((1, 1))
    assert r > 200 and g < 60 and b < 60
    a16 = np.full((4, 4), 65535 // 2, dtype=np.uint16)
    Image.fromarray(a16).save(tmp_path / "16.png")
    v = load_image(tmp_path / "16.png").getpixel((0, 0))
    assert v[0] == v[1] == v[2] and 120 <= v[0] <= 135  # scaled, not clipped to 255
    assert load_image(np.zeros((5, 7, 3), np.float32)).size == (7, 5)
    assert load_image(np.ones((3, 5, 7), np.float32)).getpixel((0, 0)) == (255, 255, 255)  # CHW
    assert load_image((tmp_path / "g.png").read_bytes()).size == (16, 12)
    assert image_summary(gray).startswith("16x12 RGB")


def test_load_image_not_an_image(tmp_path):
    (tmp_path / "page.jpg").write_text("<!DOCTYPE html><html>404 Not Found</html>")
    with pytest.raises(ImageError) as ei:
        load_image(tmp_path / "page.jpg", where="data.jsonl line 12, record 'abc'")
    msg = str(ei.value)
    assert "page.jpg" in msg and "data.jsonl line 12, record 'abc'" in msg and "HTML page" in msg and HOW in msg


def test_load_image_missing_and_empty(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.png")


def test_load_image_truncated(tmp_path):
    data = _noise_jpeg_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as ei:
        load_image(tmp_path / "cut.jpg", where="w")
    assert "truncated" in str(ei.value) and "cut.jpg" in str(ei.value) and "re-download" in str(ei.value)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated|corrupt"):
        load_image(tmp_path / "cut.png")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_load_image_corrupt(tmp_path):
    data = bytearray(_noise_jpeg_bytes())
    data[600:2000] = bytes(1400)  # zero out part of the entropy-coded data and tables
    data[20:300] = b"\xff" * 280
    (tmp_path / "bad.jpg").write_bytes(bytes(data))
    png = bytearray((_png(tmp_path / "ok.png")).read_bytes())
    png[40:60] = b"\x00" * 20  # inside IDAT: CRC / zlib error
    (tmp_path / "bad.png").write_bytes(bytes(png))
    for name in ("bad.jpg", "bad.png"):
        with pytest.raises(ImageError) as ei:
            load_image(tmp_path / name)
        assert name in str(ei.value) and HOW in str(ei.value)
        assert "corrupt" in str(ei.value) or "truncated" in str(ei.value)


def test_load_image_huge_is_rejected_fast(tmp_path):
    Image.new("1", (10_000, 10_000)).save(tmp_path / "huge.png")  # 1-bit: cheap to write
    t = time.perf_counter()
    with pytest.raises(ImageError) as ei:
        load_image(tmp_path / "huge.png")
    assert time.perf_counter() - t < 1.0
    msg = str(ei.value)
    assert "10000x10000" in msg and "max_pixels=40,000,000" in msg and "resize" in msg


def test_load_image_too_small(tmp_path):
    _png(tmp_path / "pixel.png", size=(1, 1))
    with pytest.raises(ImageError, match=r"only 1x1 pixels"):
        load_image(tmp_path / "pixel.png")
    assert load_image(tmp_path / "pixel.png", min_size=1).size == (1, 1)
