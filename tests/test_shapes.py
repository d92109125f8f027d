"""Tests for ShapesWorld (mmkit/data/shapes/): determinism, record format, geometry, answers."""
from __future__ import annotations

import itertools
import re
import subprocess
import sys

import numpy as np
import pytest

from mmkit.data.shapes import (
    COLORS, HOLDOUT_PAIRS, MULTI_QTYPES, POPE_TYPES, SHAPES, SPLITS, TASKS, TEXT_ALPHABET, VQA_QTYPES,
    Scene, ShapesConfig, ShapesDataset, ShapesWorld, benchmark, box_iou, find_boxes, format_box,
    format_ref_box, normalize_answer, parse_boxes, parse_caption,
)

BOX_RE = re.compile(r"<box>\((\d{1,3}),(\d{1,3})\),\((\d{1,3}),(\d{1,3})\)</box>")
WORD_RE = re.compile(r"[a-z0-9]+")


def _pixels(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int32)


def _n_images(rec: dict) -> int:
    return len(rec["images"]) if "images" in rec else 1


# -- vocabulary ----------------------------------------------------------------------------------

def test_vocabulary():
    assert len(COLORS) >= 8 and {"red", "green", "blue", "yellow", "purple", "orange", "pink", "cyan"} <= set(COLORS)
    assert {"circle", "square", "triangle", "star", "diamond", "hexagon"} <= set(SHAPES)
    assert set(TASKS) == {"caption", "detail", "vqa", "pope", "ground", "region", "ocr", "multi", "interleaved",
                          "draw", "chat"}
    assert SPLITS == ("train", "val", "test", "holdout")
    assert 6 <= len(HOLDOUT_PAIRS) <= 8 and all(c in COLORS and s in SHAPES for c, s in HOLDOUT_PAIRS)
    # colours stay far apart even after +-jitter, and far from every (light) background
    jit = ShapesConfig().color_jitter * 3 ** 0.5
    for a, b in itertools.combinations(COLORS.values(), 2):
        assert np.linalg.norm(np.subtract(a, b)) - 2 * jit > 60, (a, b)
    for c in COLORS.values():
        assert np.linalg.norm(np.subtract(c, (240, 240, 240))) - jit > 90, c


# -- determinism ---------------------------------------------------------------------------------

@pytest.mark.parametrize("task", TASKS)
def test_deterministic(task):
    a, b = ShapesWorld(seed=3), ShapesWorld(seed=3)
    for split, index in (("train", 5), ("holdout", 2)):
        ra, rb = a.sample(split, index, task), b.sample(split, index, task)
        assert ra["conversations"] == rb["conversations"]
        ims_a = ra.get("images", [ra.get("image")])
        ims_b = rb.get("images", [rb.get("image")])
        assert [im.tobytes() for im in ims_a] == [im.tobytes() for im in ims_b]
    # another index / seed / split gives another sample
    other = [a.sample("train", 6, task), ShapesWorld(seed=4).sample("train", 5, task), a.sample("val", 5, task)]
    ref = a.sample("train", 5, task)
    ref_px = [im.tobytes() for im in ref.get("images", [ref.get("image")])]
    for o in other:
        assert [im.tobytes() for im in o.get("images", [o.get("image")])] != ref_px


def test_splits_do_not_share_scenes(world):
    sig = {}
    for split in ("train", "val", "test"):
        sig[split] = {repr(world.scene(split, i).to_dict()) for i in range(300)}
        assert len(sig[split]) == 300
    assert not (sig["train"] & sig["val"]) and not (sig["train"] & sig["test"]) and not (sig["val"] & sig["test"])


def test_scene_dict_roundtrip(world):
    s = world.scene("train", 11, with_text=True)
    s2 = Scene.from_dict(s.to_dict())
    assert s2 == s
    assert world.render(s2).tobytes() == world.render(s).tobytes()


# -- records -------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", TASKS)
def test_every_task_gives_valid_record(world, task):
    for split in SPLITS:
        for index in range(6):
            rec = world.sample(split, index, task)
            assert set(rec) >= {"id", "conversations", "meta"} and isinstance(rec["id"], str)
            assert ("image" in rec) != ("images" in rec)
            conv = rec["conversations"]
            if task == "chat":  # several human/gpt turns; the image once, in the first question
                assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2) and len(conv) >= 2
                assert [t["value"].count("<image>") for t in conv] == [1] + [0] * (len(conv) - 1)
                assert [t["value"] for t in conv[1::2]] == rec["meta"]["answers"]
                conv = conv[-2:]
            assert [t["from"] for t in conv] == ["human", "gpt"]
            assert all(isinstance(t["value"], str) and t["value"].strip() for t in conv)
            if task == "draw":  # text -> image: the picture is the answer
                assert "<image>" not in conv[0]["value"] and conv[1]["value"] == "<image>"
                assert rec["meta"]["prompt"] in conv[0]["value"]
            else:
                asked = [t["value"] for t in rec["conversations"] if t["from"] == "human"]
                assert sum(v.count("<image>") for v in asked) == _n_images(rec)
                assert "<image>" not in conv[1]["value"]
            images = rec.get("images", [rec.get("image")])
            assert all(im.mode == "RGB" and im.size == (64, 64) for im in images)
            assert rec["meta"]["task"] == task and rec["meta"]["answer"] == conv[1]["value"]
            if task in ("vqa", "pope", "chat"):
                assert WORD_RE.fullmatch(conv[1]["value"]), conv[1]["value"]


def test_chat_asks_distinct_question_types_of_one_scene(world):
    """chat = the vqa questions of one scene: each turn a different type, each answer right."""
    turns = []
    for i in range(40):
        rec = world.sample("train", i, "chat")
        m = rec["meta"]
        assert len(set(m["qtypes"])) == len(m["qtypes"]) == min(4, len(world._feasible_qtypes(m["scene"])))
        assert rec["image"].tobytes() == world.render(m["scene"]).tobytes()
        turns.append(len(m["qtypes"]))
        for q, a in zip(rec["conversations"][0::2], rec["conversations"][1::2]):
            if "how many" in q["value"].lower():
                assert a["value"].isdigit()
    assert min(turns) >= 2 and max(turns) == 4
    two = ShapesWorld(ShapesConfig(chat_turns=2), seed=0)
    assert all(len(two.sample("train", i, "chat")["meta"]["qtypes"]) == 2 for i in range(10))


def test_multi_and_interleaved_structure(world):
    for i in range(30):
        m = world.sample("train", i, "multi")
        assert len(m["images"]) == 2 and m["meta"]["qtype"] in MULTI_QTYPES
        assert m["conversations"][0]["value"].startswith("Picture 1: <image>\nPicture 2: <image>\n")
        s1, s2 = m["meta"]["scenes"]
        q, a = m["meta"]["qtype"], m["conversations"][1]["value"]
        if q == "more_shape":
            c1, c2 = s1.count(shape=m["meta"]["target"]), s2.count(shape=m["meta"]["target"])
            assert c1 != c2 and a == f"Picture {1 if c1 > c2 else 2}"
        elif q == "more_objects":
            assert a == f"Picture {1 if len(s1.objects) > len(s2.objects) else 2}"
        elif q == "which_has":
            assert s1.has(*m["meta"]["target"]) != s2.has(*m["meta"]["target"])
            assert a == f"Picture {1 if s1.has(*m['meta']['target']) else 2}"
        else:
            shape = m["meta"]["target"]
            assert a == ("yes" if s1.has(shape=shape) and s2.has(shape=shape) else "no")

        r = world.sample("train", i, "interleaved")
        k = r["meta"]["shots"]
        assert len(r["images"]) == k + 1 == r["conversations"][0]["value"].count("<image>")
        if r["meta"]["format"] == "caption":
            cap = world.caption(r["meta"]["scenes"][-1])
            assert r["conversations"][1]["value"] == cap[0].upper() + cap[1:]
            assert r["conversations"][0]["value"].endswith("<image>\n")
        else:
            assert r["conversations"][0]["value"].endswith("Answer:")
        assert r["meta"]["format"] != "label"  # label documents only where ShapesConfig.label_attrs asks
    forced = world.sample("train", 0, "interleaved", shots=3, fmt="vqa", qtype="count")
    assert len(forced["images"]) == 4 and forced["meta"]["qtype"] == "count"


def test_label_documents_write_what_few_shot_evaluation_asks():
    from mmkit.eval import few_shot_record

    world = ShapesWorld(ShapesConfig(label_attrs=("color", "shape")))
    labels = [r for r in (world.sample("train", i, "interleaved") for i in range(60)) if r["meta"]["format"] == "label"]
    assert 5 <= len(labels) <= 30 and {r["meta"]["label"] for r in labels} == {"color", "shape"}
    for r in labels:
        scenes, k = r["meta"]["scenes"], r["meta"]["shots"]
        assert len(scenes) == len(r["images"]) == k + 1 and all(len(s.objects) == 1 for s in scenes)
        words = [getattr(s.objects[0], r["meta"]["label"]) for s in scenes]
        assert r["conversations"][0]["value"] == "".join(f"<image>\n{w}\n" for w in words[:-1]) + "<image>\n"
        assert r["conversations"][1]["value"] == words[-1]
    # the evaluation's prompts have the same form, for any attribute (size: a format never trained)
    one = ShapesWorld(ShapesConfig(min_objects=1, max_objects=1))
    test = few_shot_record(one, "test", 0, 2, "size")
    forced = world.sample("test", 0, "interleaved", shots=2, fmt="label", qtype="size")
    for rec in (test, forced):
        assert re.fullmatch(r"(<image>\n(small|large)\n){2}<image>\n", rec["conversations"][0]["value"])
    with pytest.raises(ValueError, match="label_attrs"):
        ShapesConfig(label_attrs=("count",))


# -- geometry: boxes, sizes ------------------------------------------------------------------------

def test_ground_boxes_cover_the_object():
    for size in (64, (96, 64), 128):
        world = ShapesWorld(ShapesConfig(image_size=size))
        checked = 0
        for i in range(60):
            rec = world.sample("train", i, "ground")
            ans = rec["conversations"][1]["value"]
            m = re.fullmatch(r"<ref>(the \w+ \w+)</ref>" + BOX_RE.pattern, ans)
            assert m, ans
            x1, y1, x2, y2 = map(int, m.groups()[1:])
            assert 0 <= x1 < x2 < 1000 and 0 <= y1 < y2 < 1000
            scene = rec["meta"]["scene"]
            color, shape = m.group(1).split()[1:]
            obj = scene.find(color, shape)
            assert obj is not None and rec["meta"]["box"] == (x1, y1, x2, y2)
            if scene.count(color=color) > 1:        # pixel test needs the colour to be unique
                continue
            px = _pixels(rec["image"])
            H, W = px.shape[:2]
            # the box centre has the object's colour (every shape contains its box centre)
            cx, cy = int((x1 + x2) / 2000 * W), int((y1 + y2) / 2000 * H)
            assert np.abs(px[cy, cx] - obj.rgb).max() < 40
            # every clearly-object pixel lies inside the box, and they span most of it (tight)
            core = np.linalg.norm(px - np.array(obj.rgb), axis=-1) < 60
            ys, xs = np.nonzero(core)
            bx1, by1, bx2, by2 = x1 * W / 1000, y1 * H / 1000, x2 * W / 1000, y2 * H / 1000
            assert xs.min() >= bx1 - 1 and xs.max() + 1 <= bx2 + 1 and ys.min() >= by1 - 1 and ys.max() + 1 <= by2 + 1
            assert (xs.max() + 1 - xs.min()) >= 0.7 * (bx2 - bx1) and (ys.max() + 1 - ys.min()) >= 0.7 * (by2 - by1)
            assert box_iou((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), (bx1, by1, bx2, by2)) > 0.6
            checked += 1
        assert checked > 30


def test_region_is_the_reverse_of_ground(world):
    for i in range(40):
        rec = world.sample("train", i, "region")
        boxes = parse_boxes(rec["conversations"][0]["value"])
        assert len(boxes) == 1 and boxes[0][0] is None
        box = boxes[0][1]
        target = [o for o in rec["meta"]["scene"].objects if world.box(o) == box]
        assert len(target) == 1 and rec["conversations"][1]["value"] == target[0].phrase


def test_render_sizes(world):
    scene = world.scene("train", 3, with_text=True)
    for size, expect in ((32, (32, 32)), (448, (448, 448)), ((96, 64), (96, 64)), ((64, 160), (64, 160))):
        img = world.render(scene, size)
        assert img.size == expect and img.mode == "RGB"
        px = _pixels(img)
        for o in scene.objects:                      # each object's colour is at its centre
            W, H = expect
            assert np.abs(px[int(o.cy * H), int(o.cx * W)] - o.rgb).max() < 40
    rec = world.sample("train", 3, "ground", size=(160, 96))
    assert rec["image"].size == (160, 96) and rec["meta"]["size"] == (160, 96)
    with pytest.raises(ValueError):
        world.render(scene, (0, 64))


def test_object_sizes_at_64px(world):
    for i in range(200):
        for o in world.scene("train", i).objects:
            x1, y1, x2, y2 = world.pixel_box(o, 64)
            span = max(x2 - x1, y2 - y1)
            # shapes are scaled to similar *area*, so a square spans a bit less than a diamond
            assert (9.5 <= span <= 14.5) if o.size == "small" else (18.5 <= span <= 27), (o, span)


def test_objects_do_not_overlap(world):
    for i in range(300):
        s = world.scene("train", i, with_text=True)
        boxes = [world.pixel_box(o, 64) for o in s.objects]
        t = s.text
        boxes.append(((t.cx - t.w / 2) * 64, (t.cy - t.h / 2) * 64, (t.cx + t.w / 2) * 64, (t.cy + t.h / 2) * 64))
        for a, b in itertools.combinations(boxes, 2):
            assert box_iou(a, b) == 0.0
        for b in boxes:
            assert 0 <= b[0] and 0 <= b[1] and b[2] <= 64 and b[3] <= 64


# -- box helpers ---------------------------------------------------------------------------------

def test_box_helpers_roundtrip_and_errors():
    b = (12, 340, 560, 999)
    assert format_box(b) == "<box>(12,340),(560,999)</box>"
    text = "here " + format_ref_box("the red circle", b) + "<box>(1,2),(3,4)</box> and <box>(5,6),(7,8)</box>"
    assert parse_boxes(text) == [("the red circle", b), ("the red circle", (1, 2, 3, 4)), (None, (5, 6, 7, 8))]
    assert parse_boxes("<box>( 1 , 2 ),( 3 , 4 )</box>") == [(None, (1, 2, 3, 4))]
    assert parse_boxes("no boxes") == []
    for bad in ("<box>(1,2),(3)</box>", "<box>(10,20),(5,30)</box>", "<box>(1,2),(3,1000)</box>",
                "<box>(1,2),(3,4)", "<box>red</box>", "<ref>x</ref><box>(1,2),(3,4)</box></box>"):
        with pytest.raises(ValueError, match="malformed box"):
            parse_boxes(bad)
    good, bad = find_boxes("<ref>a</ref><box>(1,2),(3,4)</box> <box>(9,9),(1,1)</box>")
    assert good == [("a", (1, 2, 3, 4))] and bad == ["<box>(9,9),(1,1)</box>"]
    for bad_box in ((5, 5, 5, 9), (0, 0, 1000, 10), (-1, 0, 4, 4)):
        with pytest.raises(ValueError):
            format_box(bad_box)
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)


def test_normalize_answer_and_parse_caption(world):
    assert normalize_answer("  The Colour RED. ") == "color red"
    assert normalize_answer("Two") == "2" and normalize_answer("Yes!") == "yes" and normalize_answer("grey") == "gray"
    assert normalize_answer("Picture 1") == normalize_answer("picture one")
    assert parse_caption('a large red circle and two small blue stars, with the text "RED STAR".') == [
        ("large", "red", "circle"), ("small", "blue", "star"), ("small", "blue", "star")]
    assert parse_caption("A green hexagon.") == [(None, "green", "hexagon")]
    for i in range(200):                              # the parser recovers every caption exactly
        s = world.scene("train", i, with_text=(i % 3 == 0))
        got = sorted(parse_caption(world.caption(s)))
        assert got == sorted((o.size, o.color, o.shape) for o in s.objects)
        assert sorted(parse_caption(world.detail(s), unique=True)) == got


# -- holdout -------------------------------------------------------------------------------------

def test_holdout_pairs_only_in_holdout(world):
    held = set(HOLDOUT_PAIRS)
    for i in range(300):
        assert world.scene("holdout", i).pairs() & held
        assert world.scene("holdout", i, with_text=True).pairs() & held
    for split in ("train", "val", "test"):
        for i in range(300):
            assert not (world.scene(split, i).pairs() & held)
    # ...and no text of a train sample even mentions a held-out pair (no "Is there a purple circle?")
    for rec in world.samples("train", "all", 0, 400) + world.samples("train", "pope", 0, 200):
        text = " ".join(t["value"] for t in rec["conversations"])
        assert not {(c, s) for _, c, s in parse_caption(text)} & held, text
    for doc in world.text_corpus("train", 300):
        assert not {(c, s) for _, c, s in parse_caption(doc)} & held, doc


# -- answers are right ---------------------------------------------------------------------------

def test_vqa_answers_match_scene(world):
    seen = set()
    for i in range(400):
        rec = world.sample("train", i, "vqa")
        meta, scene = rec["meta"], rec["meta"]["scene"]
        q, a = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
        seen.add(meta["qtype"])
        if meta["qtype"] == "count":
            kind, target = meta["count_kind"], meta["target"]
            n = scene.count(shape=target) if kind == "shape" else scene.count(color=target) if kind == "color" else len(scene.objects)
            assert a == str(n)
            if kind == "shape":
                assert target + "s" in q
        elif meta["qtype"] == "color":
            shape = meta["target"][1]
            assert shape in q and scene.count(shape=shape) == 1 and scene.find(*meta["target"]).color == a
        elif meta["qtype"] == "shape":
            color = meta["target"][0]
            assert color in q and scene.count(color=color) == 1 and scene.find(*meta["target"]).shape == a
        elif meta["qtype"] == "exists":
            c, s = re.search(r"a (\w+) (\w+)", q).groups()
            assert a == ("yes" if scene.has(c, s) else "no")
    assert seen == set(VQA_QTYPES)
    zeros = [world.sample("train", i, "vqa", qtype="count") for i in range(150)]
    assert any(r["conversations"][1]["value"] == "0" for r in zeros)


def test_relation_answers_are_correct_and_unambiguous(world):
    answers = []
    for i in range(150):
        rec = world.sample("train", i, "vqa", qtype="relation")
        meta, scene = rec["meta"], rec["meta"]["scene"]
        assert meta["qtype"] == "relation" and len(scene.objects) >= 2
        a_box = world.pixel_box(scene.find(*meta["subject"]), 64)
        b_box = world.pixel_box(scene.find(*meta["object"]), 64)
        rel = meta["relation"]
        axis = 0 if rel in ("left", "right") else 1
        before = a_box[axis + 2] < b_box[axis]        # a ends before b starts (left of / above)
        after = b_box[axis + 2] < a_box[axis]
        assert before or after, "relation asked although the boxes overlap on that axis"
        truth = before if rel in ("left", "above") else after
        a = rec["conversations"][1]["value"]
        assert a == ("yes" if truth else "no")
        answers.append(a)
        assert (meta["subject"][0] + " " + meta["subject"][1]) in rec["conversations"][0]["value"]
    assert 0.3 < answers.count("yes") / len(answers) < 0.7


def test_pope_negatives_really_absent(world):
    kinds = {}
    for split in ("train", "holdout"):
        for i in range(300):
            rec = world.sample(split, i, "pope")
            scene, meta = rec["meta"]["scene"], rec["meta"]
            c, s = re.fullmatch(r"<image>\nIs there a (\w+) (\w+) in the image\?", rec["conversations"][0]["value"]).groups()
            a = rec["conversations"][1]["value"]
            assert a in ("yes", "no") and a == ("yes" if scene.has(c, s) else "no")
            kinds.setdefault(meta["pope_type"], []).append(a)
            if meta["pope_type"] == "adversarial" and a == "no":
                assert any(o.shape == s or o.color == c for o in scene.objects)
    assert set(kinds) == set(POPE_TYPES)
    assert all(0.3 < v.count("yes") / len(v) < 0.7 for v in kinds.values())
    # popular negatives come from the split's most frequent objects
    top = [p for p, _ in world.object_frequencies("train")[:6]]
    for i in range(100):
        rec = world.sample("train", i, "pope", pope_type="popular")
        if rec["meta"]["label"] == "no":
            assert rec["meta"]["target"] in top


def test_ocr_text_present(world):
    for i in range(60):
        rec = world.sample("val", i, "ocr")
        scene, a = rec["meta"]["scene"], rec["conversations"][1]["value"]
        assert scene.text is not None and a == scene.text.text
        assert 2 <= len(a) <= 4 and set(a) <= set(TEXT_ALPHABET)
        x1, y1, x2, y2 = rec["meta"]["text_box"]
        px = _pixels(rec["image"])[y1 * 64 // 1000:y2 * 64 // 1000 + 1, x1 * 64 // 1000:x2 * 64 // 1000 + 1]
        assert (px.max(axis=-1) < 110).sum() >= 8          # dark glyph pixels inside the text box
    # the ocr scene keeps the objects of the plain scene whenever the text fits
    same = sum(world.scene("train", i, with_text=True).objects == world.scene("train", i).objects for i in range(50))
    assert same >= 40


def test_captions_and_details(world):
    s = world.scene("train", 1)
    cap = world.caption(s)
    assert cap.endswith(".") and cap.startswith("a ")
    det = world.detail(s)
    for o in s.objects:
        assert o.phrase[2:] in det.lower()
    rec = world.sample("train", 1, "detail")
    assert rec["conversations"][1]["value"] == det


# -- mixtures, dataset, corpus, speed ------------------------------------------------------------

def test_samples_mixture_and_dataset(world):
    mix = {"vqa": 2.0, "caption": 1.0, "ground": 1.0}
    recs = world.samples("train", mix, start=10, n=60)
    assert [r["meta"]["index"] for r in recs] == list(range(10, 70))
    assert {r["meta"]["task"] for r in recs} == set(mix)
    again = world.samples("train", mix, start=10, n=60)
    assert [r["conversations"] for r in recs] == [r["conversations"] for r in again]
    ds = ShapesDataset(world, "val", mix, length=25, start=10)
    assert len(ds) == 25 and ds[0]["conversations"] == world.samples("val", mix, 10, 1)[0]["conversations"]
    assert ds[-1]["meta"]["index"] == 34 and len(list(ds)) == 25
    with pytest.raises(IndexError):
        ds[25]
    with pytest.raises(ValueError, match="unknown task"):
        ShapesDataset(world, "train", {"vqa": 1, "nope": 1})
    with pytest.raises(ValueError, match="unknown split"):
        world.sample("training", 0)


def test_text_corpus(world):
    docs = world.text_corpus("train", 200)
    assert len(docs) == 200 and docs == world.text_corpus("train", 200)
    assert world.text_corpus("train", 5, start=195) == docs[195:]
    assert all(d.strip() and "<image>" not in d for d in docs)
    assert any(d.startswith("Question:") for d in docs) and any(d.startswith("There ") for d in docs)
    assert any("<box>" in d for d in docs) and len(set(docs)) > 150


def test_forced_qtypes(world):
    for q in VQA_QTYPES:
        assert all(world.sample("test", i, "vqa", qtype=q)["meta"]["qtype"] == q for i in range(10))
    for q in MULTI_QTYPES:
        assert world.sample("test", 0, "multi", qtype=q)["meta"]["qtype"] == q
    with pytest.raises(ValueError):
        world.sample("test", 0, "vqa", qtype="colour")


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="unknown colour"):
        ShapesConfig(colors=("red", "mauve"))
    with pytest.raises(ValueError, match="max_objects"):
        ShapesConfig(min_objects=3, max_objects=2)
    w = ShapesWorld(ShapesConfig(max_objects=6, image_size=(128, 96)))
    assert max(len(w.scene("train", i).objects) for i in range(50)) >= 5


def test_shapes_module_needs_no_torch():
    code = "import sys, mmkit.data.shapes as s; s.ShapesWorld().sample('train', 0); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_benchmark_times_exactly_the_samples_it_asks_for(monkeypatch):
    calls = []
    sample = ShapesWorld.sample

    def counting(self, split, index, task="vqa", **kw):
        calls.append((split, index, task, self.size))
        return sample(self, split, index, task, **kw)

    monkeypatch.setattr(ShapesWorld, "sample", counting)
    out = benchmark(n=100, size=48, task="caption", split="val")
    warm_up, timed = calls[:20], calls[20:]
    assert all(c[1] >= 10**9 for c in warm_up)           # warm-up indices never overlap the timed ones
    assert timed == [("val", i, "caption", (48, 48)) for i in range(100)]
    assert (out["n"], out["size"], out["task"]) == (100, 48, "caption")
    assert out["seconds"] > 0 and out["samples_per_s"] == pytest.approx(100 / out["seconds"])
    # ~1000 samples/s at 48 px on one busy core; 50/s would mean 20 ms a sample, something broken
    assert out["samples_per_s"] > 50


def test_a_mix_can_fix_the_question_type(world):
    recs = world.samples("train", {"vqa/shape": 1.0}, 0, 12)
    assert all(r["meta"]["task"] == "vqa" and r["meta"]["qtype"] == "shape" for r in recs)
    mixed = [r["meta"]["qtype"] for r in world.samples("train", {"vqa": 1.0, "vqa/count": 3.0}, 0, 200)]
    assert mixed.count("count") > 120  # ~3/4 fixed to count + the plain vqa's own count questions
    assert world.samples("train", "multi/more_shape", 0, 3)[0]["meta"]["qtype"] == "more_shape"
    for bad in ("vqa/size", "caption/color", "pope/shape"):
        with pytest.raises(ValueError, match="vqa/TYPE"):
            world.samples("train", {bad: 1.0}, 0, 1)
