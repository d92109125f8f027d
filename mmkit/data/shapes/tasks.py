"""Tasks: every scene becomes LLaVA-format conversation records.

:class:`ShapesWorld` is a :class:`~mmkit.data.shapes.scene.SceneSampler` that also renders
(:mod:`mmkit.data.shapes.render`), boxes (:mod:`mmkit.data.grounding`) and describes
(:mod:`mmkit.data.shapes.text`) its scenes, and asks about them: one record per task of
:data:`~mmkit.data.shapes.scene.TASKS` (caption, detail, vqa, pope, ground, region, ocr, multi,
interleaved, draw, chat), each question phrased one of several ways by a named random stream,
with mixtures of tasks and a plain-text corpus for language-model pre-training on top.
:class:`ShapesDataset` is the indexable view a training loop reads; :func:`benchmark` times it.
"""
from __future__ import annotations

import re
import time
from typing import Any, Iterator, Mapping, Sequence

from PIL import Image

from mmkit.data.grounding import Box, format_box, format_ref_box, to_box
from mmkit.data.shapes.render import render_scene
from mmkit.data.shapes.scene import (
    LABEL_ATTRS, _OPPOSITE, MULTI_QTYPES, POPE_TYPES, TASKS, VQA_QTYPES, Obj, Rng, Scene, SceneSampler, ShapesConfig, Size,
    TextLabel, _parse_size, relations,
)
from mmkit.data.shapes.text import PLURALS, _cap, caption, detail, draw_prompt, styled_caption

__all__ = ["ShapesWorld", "ShapesDataset", "benchmark"]


def _known_task(name: str) -> bool:
    """A task of TASKS, or "vqa/TYPE" / "multi/TYPE" with the question type fixed."""
    task, slash, qtype = name.partition("/")
    if not slash:
        return task in TASKS
    return qtype in {"vqa": VQA_QTYPES, "multi": MULTI_QTYPES}.get(task, ())


# ------------------------------------------------------------------------------------------------
# Question templates. Several phrasings per type (chosen deterministically), one answer format.
# ------------------------------------------------------------------------------------------------

_T_CAPTION = ("Describe the image briefly.", "Write a short caption for the image.",
              "What is in this picture? Answer in one sentence.", "Give a one-sentence caption.")
_T_DRAW = ("Draw {desc}.", "Draw a picture of {desc}.", "Make an image of {desc}.",
           "Paint {desc}.")
_T_DETAIL = ("Describe the image in detail.", "Give a detailed description of this picture.",
             "Describe every object in the image and where it is.",
             "What do you see? Describe the image carefully.")
_T_COLOR = ("What colour is the {shape}?", "What color is the {shape}?",
            "Which colour is the {shape}?", "What is the colour of the {shape}?")
_T_SHAPE = ("What shape is the {color} object?", "Which shape is {color}?",
            "What is the shape of the {color} object?", "The {color} object is which shape?")
_T_COUNT_SHAPE = ("How many {plural} are there?", "How many {plural} are in the image?",
                  "Count the {plural}.", "How many {plural} can you see?")
_T_COUNT_COLOR = ("How many {color} objects are there?", "How many objects are {color}?",
                  "Count the {color} objects.")
_T_COUNT_ALL = ("How many objects are there?", "How many shapes are in the image?",
                "Count the objects in the image.")
_T_EXISTS = ("Is there a {color} {shape}?", "Is there a {color} {shape} in the picture?",
             "Do you see a {color} {shape}?", "Does the image contain a {color} {shape}?")
_T_RELATION = ("Is the {a} {rel} the {b}?", "Is it true that the {a} is {rel} the {b}?",
               "Looking at the image, is the {a} {rel} the {b}?")
_REL_VARIANTS = {"left": ("to the left of", "left of"), "right": ("to the right of", "right of"),
                 "above": ("above",), "below": ("below",)}
_T_POPE = "Is there a {color} {shape} in the image?"     # POPE's fixed prompt, no variants
_T_GROUND = ("Locate {ref} in the image.", "Give the bounding box of {ref}.",
             "Where is {ref}? Answer with a box.", "Find {ref}.")
_T_REGION = ("What is in the region {box}?", "What object is inside {box}?",
             "Describe the object at {box} briefly.")
_T_OCR = ("What is written in the image?", "What text appears in the image?",
          "Read the text in the image.", "What does the text in the image say?")
_T_MULTI = {
    "more_shape": ("Which picture has more {plural}?", "Which picture contains more {plural}?"),
    "more_objects": ("Which picture has more objects?", "Which picture shows more shapes?"),
    "which_has": ("Which picture contains a {color} {shape}?", "In which picture is there a {color} {shape}?"),
    "both_have": ("Do both pictures contain a {shape}?", "Is there a {shape} in both pictures?"),
}


def _question_patterns() -> list[tuple[str, "re.Pattern[str]"]]:
    """Every VQA template as a regular expression (what ``ShapesWorld.answer`` reads back)."""
    word, name = r"(?P<{}>[a-z]+)", r"(?P<{}>[a-z]+ [a-z]+)"
    rels = "|".join(re.escape(v) for vs in _REL_VARIANTS.values() for v in vs)
    slots = {"shape": word.format("shape"), "color": word.format("color"), "plural": word.format("plural"),
             "a": name.format("a"), "b": name.format("b"), "rel": f"(?P<rel>{rels})"}
    out = []
    for qtype, templates in (("color", _T_COLOR), ("shape", _T_SHAPE), ("count", _T_COUNT_SHAPE),
                             ("count", _T_COUNT_COLOR), ("count", _T_COUNT_ALL), ("exists", _T_EXISTS),
                             ("relation", _T_RELATION)):
        for t in templates:
            pattern = re.escape(t.lower().rstrip("?."))
            for k, v in slots.items():
                pattern = pattern.replace(re.escape("{" + k + "}"), v)
            out.append((qtype, re.compile(pattern)))
    return out


# ------------------------------------------------------------------------------------------------
# The world
# ------------------------------------------------------------------------------------------------

class ShapesWorld(SceneSampler):
    """Deterministic generator of scenes, images and conversation records.

    Usage::

        world = ShapesWorld()                        # default 64x64, 1-3 objects, seed 0
        scene = world.scene("train", 0)              # the scene graph (objects, background, text)
        image = world.render(scene, 224)             # the same scene at any size
        rec = world.sample("train", 0, "vqa")        # {"id", "image", "conversations", "meta"}
        rec["conversations"][1]["value"]             # 'star'
        recs = world.samples("train", {"vqa": 2, "caption": 1}, start=0, n=64)

    ``ShapesWorld(config=None, seed=0)``: the constructor, :meth:`scene`, :meth:`allowed_pairs`
    and :meth:`object_frequencies` come from :class:`~mmkit.data.shapes.scene.SceneSampler`;
    this class adds the pixels, the boxes, the words and the records.
    """

    # -- pixels and boxes ------------------------------------------------------------------------

    def render(self, scene: Scene, size: Size | None = None) -> Image.Image:
        """Anti-aliased RGB image of the scene, ``size`` = int or (W, H); default config.image_size.

        Shapes are drawn at 2-4x resolution with PIL and box-downsampled; text is drawn by FreeType
        at the final resolution. Cost at 64 px: a fraction of a millisecond.
        """
        return render_scene(scene, self.size if size is None else size)

    def pixel_box(self, obj: Obj, size: Size | None = None) -> tuple[float, float, float, float]:
        """Tight bounding box of an object in pixels (x1, y1, x2, y2) for a given image size."""
        W, H = self.size if size is None else _parse_size(size)
        S = min(W, H)
        return (obj.cx * W - obj.hx * S, obj.cy * H - obj.hy * S, obj.cx * W + obj.hx * S, obj.cy * H + obj.hy * S)

    def box(self, obj: Obj | TextLabel, size: Size | None = None) -> Box:
        """Qwen-VL box of an object (or of the text): ints in [0, 1000), normalised by W and H.
        Depends on the aspect ratio of ``size`` (shapes keep their form; the box does not)."""
        W, H = self.size if size is None else _parse_size(size)
        S = min(W, H)
        if isinstance(obj, TextLabel):
            hx, hy = obj.w / 2, obj.h / 2
        else:
            hx, hy = obj.hx, obj.hy
        return to_box(obj.cx - hx * S / W, obj.cy - hy * S / H, obj.cx + hx * S / W, obj.cy + hy * S / H)

    # -- language from the scene graph (mmkit.data.shapes.text) -------------------------------

    caption = staticmethod(caption)
    draw_prompt = staticmethod(draw_prompt)
    detail = staticmethod(detail)

    # -- question generators (no pixels needed) --------------------------------------------------

    def _feasible_qtypes(self, scene: Scene) -> list[str]:
        out = []
        for q in self.config.vqa_qtypes:
            if q == "color" and not any(scene.count(shape=o.shape) == 1 for o in scene.objects):
                continue
            if q == "shape" and not any(scene.count(color=o.color) == 1 for o in scene.objects):
                continue
            if q == "relation" and not self._relation_pairs(scene):
                continue
            out.append(q)
        return out

    @staticmethod
    def _relation_pairs(scene: Scene) -> list[tuple[Obj, Obj, str]]:
        return [(a, b, r) for a in scene.objects for b in scene.objects if a is not b for r in relations(a, b)]

    def _absent_pair(self, scene: Scene, rng: Rng, near: bool) -> tuple[str, str]:
        """A colour-shape pair that is NOT in the scene and is allowed in its split. ``near``:
        prefer a confusable one (same shape or same colour as a present object)."""
        present = scene.pairs()
        cands = [p for p in self.allowed_pairs(scene.split) if p not in present]
        if near:
            shapes = {s for _, s in present}
            colors = {c for c, _ in present}
            close = [p for p in cands if p[1] in shapes or p[0] in colors]
            cands = close or cands
        return rng.choice(cands)

    def vqa(self, scene: Scene, rng: Rng, qtype: str | None = None) -> tuple[str, str, dict]:
        """One VQA question about ``scene``: ``(question, answer, meta)``. The answer is one word
        or a number. ``qtype`` must be feasible for the scene (see ``sample`` for retries)."""
        feasible = self._feasible_qtypes(scene)
        if qtype is None:
            qtype = rng.choice(feasible)
        elif qtype not in feasible:
            raise ValueError(f"qtype {qtype!r} is not answerable for this scene (feasible: {feasible})")
        meta: dict[str, Any] = {"qtype": qtype}
        if qtype == "color":                                # ask about a shape that is unique
            o = rng.choice([o for o in scene.objects if scene.count(shape=o.shape) == 1])
            q, a = rng.choice(_T_COLOR).format(shape=o.shape), o.color
            meta["target"] = o.pair
        elif qtype == "shape":                              # ask about a colour that is unique
            o = rng.choice([o for o in scene.objects if scene.count(color=o.color) == 1])
            q, a = rng.choice(_T_SHAPE).format(color=o.color), o.shape
            meta["target"] = o.pair
        elif qtype == "count":
            kind = rng.weighted(("shape", "color", "all"), (0.5, 0.3, 0.2))
            if kind == "shape":
                present = sorted({o.shape for o in scene.objects}, key=self.config.shapes.index)
                absent = [s for s in self.config.shapes if s not in present]
                shape = rng.choice(absent) if absent and rng.chance(0.2) else rng.choice(present)
                q, a = rng.choice(_T_COUNT_SHAPE).format(plural=PLURALS[shape]), str(scene.count(shape=shape))
                meta.update(count_kind="shape", target=shape)
            elif kind == "color":
                present = sorted({o.color for o in scene.objects}, key=self.config.colors.index)
                absent = [c for c in self.config.colors if c not in present]
                color = rng.choice(absent) if absent and rng.chance(0.2) else rng.choice(present)
                q, a = rng.choice(_T_COUNT_COLOR).format(color=color), str(scene.count(color=color))
                meta.update(count_kind="color", target=color)
            else:
                q, a = rng.choice(_T_COUNT_ALL), str(len(scene.objects))
                meta.update(count_kind="all", target=None)
        elif qtype == "relation":
            a_obj, b_obj, rel = rng.choice(self._relation_pairs(scene))
            truth = rng.chance(0.5)
            asked = rel if truth else _OPPOSITE[rel]        # the opposite is also unambiguous
            q = rng.choice(_T_RELATION).format(a=a_obj.name, b=b_obj.name, rel=rng.choice(_REL_VARIANTS[asked]))
            a = "yes" if truth else "no"
            meta.update(relation=asked, subject=a_obj.pair, object=b_obj.pair)
        else:                                               # exists
            if rng.chance(0.5):
                pair = rng.choice(scene.objects).pair
                a = "yes"
            else:
                pair = self._absent_pair(scene, rng, near=rng.chance(0.5))
                a = "no"
            q = rng.choice(_T_EXISTS).format(color=pair[0], shape=pair[1])
            meta["target"] = pair
        meta["answer"] = a
        return q, a, meta

    def examples(self, scene: Scene, key: str = "examples") -> list[dict]:
        """One VQA question per feasible type of :data:`VQA_QTYPES` about ``scene``, each with
        its true answer: ``[{"qtype", "question", "answer"}]``, deterministic in ``key``."""
        return [dict(zip(("question", "answer"), self.vqa(scene, Rng(f"{key}/{qt}"), qt)[:2]), qtype=qt)
                for qt in VQA_QTYPES if qt in self._feasible_qtypes(scene)]

    def answer(self, scene: Scene, question: str) -> str | None:
        """The true answer to a question phrased as :meth:`vqa` phrases them (any of its
        templates, any case, "?" optional), read off the scene graph; None when the question
        is not one of those phrasings, names a colour or shape the world does not have, or
        the scene cannot decide it (two circles for "What colour is the circle?").

        >>> w = ShapesWorld(); s = w.scene("test", 0)
        >>> w.answer(s, "How many objects are there?") == str(len(s.objects))
        True
        """
        text = " ".join(question.lower().replace("<image>", " ").split()).rstrip(" ?.")
        for qtype, fields in _question_patterns():
            m = fields.fullmatch(text)
            if m:
                return self._answer_from(scene, qtype, m.groupdict())
        return None

    def _answer_from(self, scene: Scene, qtype: str, g: dict[str, str]) -> str | None:
        colors, shapes = set(self.config.colors), set(self.config.shapes)
        shape, color = g.get("shape"), g.get("color")
        if g.get("plural") not in (None, "objects", "shapes"):  # "How many circles", not "... objects"
            shape = {p: s for s, p in PLURALS.items()}.get(g["plural"], "?")
        if (color and color not in colors) or (shape and shape not in shapes):
            return None
        if qtype == "color":
            found = [o for o in scene.objects if o.shape == shape]
            return found[0].color if len(found) == 1 else None
        if qtype == "shape":
            found = [o for o in scene.objects if o.color == color]
            return found[0].shape if len(found) == 1 else None
        if qtype == "count":
            return str(scene.count(color=color, shape=shape))
        if qtype == "exists":
            return "yes" if scene.has(color, shape) else "no"
        pair = [tuple(g[k].split()) for k in ("a", "b")]  # relation: "red circle" -> ("red", "circle")
        objs = [scene.find(*p) for p in pair]
        if None in objs:
            return None
        rel = next(r for r, words in _REL_VARIANTS.items() if g["rel"] in words)
        held = relations(objs[0], objs[1])
        return "yes" if rel in held else "no" if _OPPOSITE[rel] in held else None

    def pope(self, scene: Scene, rng: Rng, pope_type: str | None = None, label: str | None = None) -> tuple[str, str, dict]:
        """A POPE probe: ``(question, "yes" | "no", meta)``.

        Negatives (objects really absent from the scene) are sampled three ways, as in POPE:
        ``random`` (any absent pair), ``popular`` (among the 3 most frequent absent pairs of the
        split) and ``adversarial`` (an absent pair sharing the shape or the colour of a present
        object: "red star" when there is a blue star, the hallucination-prone case).
        """
        pope_type = pope_type or rng.choice(POPE_TYPES)
        if pope_type not in POPE_TYPES:
            raise ValueError(f"pope_type must be one of {POPE_TYPES}, got {pope_type!r}")
        label = label or ("yes" if rng.chance(0.5) else "no")
        present = scene.pairs()
        if label == "yes":
            pair = rng.choice(scene.objects).pair
        elif pope_type == "random":
            pair = self._absent_pair(scene, rng, near=False)
        elif pope_type == "popular":
            ranked = [p for p, _ in self.object_frequencies(scene.split) if p not in present]
            pair = rng.choice(ranked[:3])
        else:
            pair = self._absent_pair(scene, rng, near=True)
        q = _T_POPE.format(color=pair[0], shape=pair[1])
        return q, label, {"pope_type": pope_type, "label": label, "answer": label, "target": pair}

    # -- records ---------------------------------------------------------------------------------

    def sample(self, split: str, index: int, task: str = "vqa", *, size: Size | None = None,
               qtype: str | None = None, pope_type: str | None = None, shots: int | None = None,
               fmt: str | None = None) -> dict:
        """One LLaVA-format record for ``task`` at ``(split, index)``; deterministic.

        Optional overrides: ``qtype`` (vqa: one of VQA_QTYPES; multi: one of MULTI_QTYPES),
        ``pope_type``, ``shots`` and ``fmt`` ("caption" | "vqa" | "label"; a label document's attribute is
        ``qtype``, one of LABEL_ATTRS) for interleaved. A forced qtype that
        the scene at ``index`` cannot answer (e.g. "relation" with one object) is asked about a
        deterministic variant scene instead; ``meta["scene"]`` is always the scene shown.
        """
        self._check(split, index)
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
        W, H = self.size if size is None else _parse_size(size)
        rng = Rng(self._key(split, index, task))
        meta: dict[str, Any] = {"task": task, "split": split, "index": index, "seed": self.seed,
                                "size": (W, H), "qtype": None}
        rid = f"{split}/{index}/{task}"

        if task == "multi":
            return self._multi(split, index, rng, meta, rid, qtype, (W, H))
        if task == "interleaved":
            return self._interleaved(split, index, rng, meta, rid, shots, fmt, qtype, (W, H))

        scene = self.scene(split, index, with_text=(task == "ocr"))
        if task == "chat":
            return self._chat(scene, rng, meta, rid, (W, H))
        if task == "draw":                                  # text -> image: the picture is the answer
            meta.update(answer="<image>", scene=scene, prompt=self.draw_prompt(scene))
            return {"id": rid, "image": self.render(scene, (W, H)),
                    "conversations": [
                        {"from": "human", "value": rng.choice(_T_DRAW).format(desc=meta["prompt"])},
                        {"from": "gpt", "value": "<image>"}],
                    "meta": meta}
        if task == "caption":  # written in the world's caption style (brief unless configured)
            q, a = rng.choice(_T_CAPTION), styled_caption(scene, self.config.caption_style, self.config.caption_noise)
        elif task == "detail":
            q, a = rng.choice(_T_DETAIL), self.detail(scene)
        elif task == "vqa":
            if qtype is not None and qtype not in VQA_QTYPES:
                raise ValueError(f"vqa qtype must be one of {VQA_QTYPES}, got {qtype!r}")
            def answerable(sc: Scene) -> bool:
                feasible = self._feasible_qtypes(sc)
                return qtype in feasible if qtype else bool(feasible)

            attempt = 0
            while not answerable(scene):                    # deterministic variant scenes
                attempt += 1
                if attempt > 50:
                    raise ValueError(f"could not find a scene answering qtype={qtype!r} with this config")
                scene = self._build_scene(split, self._key(split, index, f"scene/{qtype}/{attempt}"))
            q, a, m = self.vqa(scene, rng, qtype)
            meta.update(m)
        elif task == "pope":
            q, a, m = self.pope(scene, rng, pope_type)
            meta.update(m)
        elif task == "ground":
            o = rng.choice(scene.objects)
            box = self.box(o, (W, H))
            q = rng.choice(_T_GROUND).format(ref=o.ref)
            a = format_ref_box(o.ref, box)
            meta.update(box=box, ref=o.ref, target=o.pair)
        elif task == "region":
            o = rng.choice(scene.objects)
            box = self.box(o, (W, H))
            q = rng.choice(_T_REGION).format(box=format_box(box))
            a = o.phrase
            meta.update(box=box, target=o.pair)
        else:  # ocr
            if scene.text is None:                          # cannot happen with sane configs
                raise RuntimeError(f"ocr: no room for text in scene {scene.key!r}; lower max_objects")
            q, a = rng.choice(_T_OCR), scene.text.text
            meta["text_box"] = self.box(scene.text, (W, H))
        meta["answer"] = a
        meta["scene"] = scene
        return {
            "id": rid,
            "image": self.render(scene, (W, H)),
            "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}],
            "meta": meta,
        }

    def _chat(self, scene: Scene, rng: Rng, meta: dict, rid: str, size: tuple[int, int]) -> dict:
        """Up to ``config.chat_turns`` vqa turns on one scene, each a different question type
        in a random order; ``<image>`` only in the first human turn."""
        left, qtypes = self._feasible_qtypes(scene), []
        while left and len(qtypes) < self.config.chat_turns:
            qtypes.append(rng.choice(left))
            left.remove(qtypes[-1])
        conv, answers = [], []
        for i, qt in enumerate(qtypes):
            q, a, _ = self.vqa(scene, rng, qt)
            conv += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q}, {"from": "gpt", "value": a}]
            answers.append(a)
        meta.update(qtypes=qtypes, answers=answers, answer=answers[-1], scene=scene)
        return {"id": rid, "image": self.render(scene, size), "conversations": conv, "meta": meta}

    def _multi(self, split, index, rng, meta, rid, qtype, size) -> dict:
        if qtype is not None and qtype not in MULTI_QTYPES:
            raise ValueError(f"multi qtype must be one of {MULTI_QTYPES}, got {qtype!r}")
        if qtype is None:                                   # "more objects" needs varying counts
            fixed = self.config.min_objects == self.config.max_objects
            qtype = rng.choice([q for q in MULTI_QTYPES if not (fixed and q == "more_objects")])
        s1 = self.scene(split, index)
        for attempt in range(100):
            s2 = self._build_scene(split, self._key(split, index, f"multi/{attempt}"))
            scenes = (s1, s2)
            if qtype == "more_shape":
                cands = [s for s in self.config.shapes if s1.count(shape=s) != s2.count(shape=s)]
                if not cands:
                    continue
                shape = rng.choice(cands)
                c = [sc.count(shape=shape) for sc in scenes]
                q = rng.choice(_T_MULTI[qtype]).format(plural=PLURALS[shape])
                a = f"Picture {1 if c[0] > c[1] else 2}"
                meta.update(target=shape, counts=c)
            elif qtype == "more_objects":
                c = [len(sc.objects) for sc in scenes]
                if c[0] == c[1]:
                    continue
                q, a = rng.choice(_T_MULTI[qtype]), f"Picture {1 if c[0] > c[1] else 2}"
                meta.update(counts=c)
            elif qtype == "which_has":
                cands = sorted(s1.pairs() ^ s2.pairs())
                if not cands:
                    continue
                pair = rng.choice(cands)
                q = rng.choice(_T_MULTI[qtype]).format(color=pair[0], shape=pair[1])
                a = f"Picture {1 if s1.find(*pair) else 2}"
                meta.update(target=pair)
            else:  # both_have
                shapes = sorted({o.shape for sc in scenes for o in sc.objects}, key=self.config.shapes.index)
                shape = rng.choice(shapes)
                both = s1.has(shape=shape) and s2.has(shape=shape)
                q, a = rng.choice(_T_MULTI[qtype]).format(shape=shape), "yes" if both else "no"
                meta.update(target=shape)
            break
        else:
            raise RuntimeError(f"multi: no second picture found for qtype={qtype!r} (config too restrictive?)")
        meta.update(qtype=qtype, answer=a, scenes=list(scenes))
        human = "".join(f"Picture {i + 1}: <image>\n" for i in range(len(scenes))) + q
        return {"id": rid, "images": [self.render(s, size) for s in scenes],
                "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": a}],
                "meta": meta}

    def _interleaved(self, split, index, rng, meta, rid, shots, fmt, qtype, size) -> dict:
        k = shots if shots is not None else rng.randint(*self.config.shots)
        if k < 1:
            raise ValueError(f"interleaved needs shots >= 1, got {k}")
        forced = fmt is not None
        labels = self.config.label_attrs
        fmt = fmt or rng.choice(("caption", "caption", "vqa") + (("label",) if labels else ()))
        if fmt not in ("caption", "vqa", "label"):
            raise ValueError(f"interleaved fmt must be 'caption', 'vqa' or 'label', got {fmt!r}")
        if fmt == "label":                                  # "<image>\nred\n<image>\nblue\n<image>\n" -> the label
            return self._label_document(split, index, rng, meta, rid, k, qtype, size)
        scenes = [self._build_scene(split, self._key(split, index, f"shot/{j}")) for j in range(k)]
        scenes.append(self.scene(split, index))            # the query image is the index's scene
        common = set(self.config.vqa_qtypes)               # question types every shot can answer
        for s in scenes:
            common &= set(self._feasible_qtypes(s))
        if fmt == "vqa" and qtype is None and not common:
            if forced:
                raise ValueError("interleaved fmt='vqa': no question type is answerable for every shot; "
                                 "add 'count' or 'exists' to ShapesConfig.vqa_qtypes")
            fmt = "caption"
        if fmt == "caption":
            texts = [_cap(self.caption(s)) for s in scenes]
            doc = "".join(f"<image>\n{t}\n" for t in texts[:-1]) + "<image>\n"
            answers = texts
        else:                                               # one question type for every shot
            qtype = qtype or rng.choice(sorted(common, key=VQA_QTYPES.index))
            qas = [self.vqa(s, Rng(self._key(split, index, f"shot/{j}/qa")), qtype)
                   for j, s in enumerate(scenes)]
            doc = "".join(f"<image>\nQuestion: {q} Answer: {a}\n" for q, a, _ in qas[:-1])
            doc += f"<image>\nQuestion: {qas[-1][0]} Answer:"
            answers = [a for _, a, _ in qas]
            meta["qtype"] = qtype
        meta.update(shots=k, format=fmt, answer=answers[-1], shot_answers=answers[:-1], scenes=scenes)
        return {"id": rid, "images": [self.render(s, size) for s in scenes],
                "conversations": [{"from": "human", "value": doc}, {"from": "gpt", "value": answers[-1]}],
                "meta": meta}

    def _label_document(self, split, index, rng, meta, rid, k, attr, size) -> dict:
        """Few-shot labelling: one-object scenes, each followed by one attribute word; which
        attribute only the examples tell (Flamingo's in-context learning, at ShapesWorld size).
        ``mmkit.eval.few_shot_record`` writes its test prompts in the same form."""
        attrs = self.config.label_attrs or LABEL_ATTRS
        attr = attr or rng.choice(attrs)
        if attr not in LABEL_ATTRS:
            raise ValueError(f"interleaved label attribute must be one of {LABEL_ATTRS}, got {attr!r}")
        scenes = [self._build_scene(split, self._key(split, index, f"label/{j}"), n_objects=1) for j in range(k + 1)]
        labels = [getattr(s.objects[0], attr) for s in scenes]
        doc = "".join(f"<image>\n{a}\n" for a in labels[:-1]) + "<image>\n"
        meta.update(shots=k, format="label", label=attr, answer=labels[-1], shot_answers=labels[:-1], scenes=scenes)
        return {"id": rid, "images": [self.render(s, size) for s in scenes],
                "conversations": [{"from": "human", "value": doc}, {"from": "gpt", "value": labels[-1]}],
                "meta": meta}

    # -- mixtures, corpora -----------------------------------------------------------------------

    @staticmethod
    def _task_weights(tasks: Mapping[str, float] | Sequence[str] | str) -> tuple[list[str], list[float]]:
        if isinstance(tasks, str):
            tasks = list(TASKS) if tasks == "all" else [t.strip() for t in tasks.split(",") if t.strip()]
        if not isinstance(tasks, Mapping):
            tasks = {t: 1.0 for t in tasks}
        names, weights = list(tasks.keys()), [float(w) for w in tasks.values()]
        bad = [t for t in names if not _known_task(t)]
        if bad:
            raise ValueError(f"unknown task(s) {bad}; choose from {TASKS} (or 'all'), or fix a question type "
                             f"with 'vqa/TYPE' ({', '.join(VQA_QTYPES)}) or 'multi/TYPE' ({', '.join(MULTI_QTYPES)})")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"task weights must be >= 0 and not all zero, got {dict(zip(names, weights))}")
        return names, weights

    def choose_task(self, split: str, index: int, tasks: Mapping[str, float] | Sequence[str] | str) -> str:
        """The task that a mixture assigns to ``index`` (deterministic)."""
        names, weights = self._task_weights(tasks)
        if len(names) == 1:
            return names[0]
        return Rng(self._key(split, index, "mix")).weighted(names, weights)

    def samples(self, split: str, tasks: Mapping[str, float] | Sequence[str] | str = "vqa",
                start: int = 0, n: int = 16, *, size: Size | None = None) -> list[dict]:
        """Records for indices ``start .. start+n-1``; ``tasks`` is a task name, "all", a
        comma-separated string / list (uniform mix) or ``{task: weight}``. A name may fix the
        question type: ``{"vqa": 6, "vqa/shape": 2}`` asks shape questions more often."""
        out = []
        for i in range(start, start + n):
            task, _, qtype = self.choose_task(split, i, tasks).partition("/")
            out.append(self.sample(split, i, task, size=size, qtype=qtype or None))
        return out

    def text_corpus(self, split: str, n: int, start: int = 0) -> list[str]:
        """Plain-text documents for language-model pre-training (no images, no placeholders):
        captions, detailed descriptions and question/answer pairs, rendered as text, e.g.
        ``"Question: How many stars are there?\\nAnswer: 2"``. Covers the whole vocabulary of the
        world, including box strings and OCR letters, so a tokenizer trained on it knows them."""
        self._check(split)
        kinds = ("caption", "detail", "vqa", "pope", "ground", "region", "ocr")
        weights = (0.25, 0.2, 0.3, 0.05, 0.08, 0.07, 0.05)
        out = []
        for i in range(start, start + n):
            rng = Rng(self._key(split, i, "text"))
            kind = rng.weighted(kinds, weights)
            scene = self.scene(split, i, with_text=(kind == "ocr"))
            if kind == "vqa" and not self._feasible_qtypes(scene):
                kind = "caption"                           # e.g. vqa_qtypes=("relation",), 1 object
            if kind == "caption":
                out.append(_cap(self.caption(scene)))
                continue
            if kind == "detail":
                out.append(self.detail(scene))
                continue
            if kind == "vqa":
                q, a, _ = self.vqa(scene, rng)
            elif kind == "pope":
                q, a, _ = self.pope(scene, rng)
            elif kind == "ground":
                o = rng.choice(scene.objects)
                q, a = rng.choice(_T_GROUND).format(ref=o.ref), format_ref_box(o.ref, self.box(o))
            elif kind == "region":
                o = rng.choice(scene.objects)
                q, a = rng.choice(_T_REGION).format(box=format_box(self.box(o))), o.phrase
            else:
                q, a = rng.choice(_T_OCR), scene.text.text  # type: ignore[union-attr]
            out.append(f"Question: {q}\nAnswer: {a}")
        return out


class ShapesDataset:
    """Indexable, iterable view of ShapesWorld: ``ds[i]`` is ``world.sample(split, start + i, task)``
    where the task comes from the ``tasks`` mixture. Needs no torch, but works as a
    ``torch.utils.data.Dataset`` (it has ``__len__`` and ``__getitem__``)."""

    def __init__(self, world: ShapesWorld | None = None, split: str = "train",
                 tasks: Mapping[str, float] | Sequence[str] | str = "vqa", length: int = 1000,
                 start: int = 0, size: Size | None = None):
        self.world = world or ShapesWorld()
        self.world._check(split)
        ShapesWorld._task_weights(tasks)                   # validate early, with a clear error
        if length < 0 or start < 0:
            raise ValueError(f"length and start must be >= 0, got length={length}, start={start}")
        self.split, self.tasks, self.length, self.start, self.size = split, tasks, length, start, size

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not isinstance(i, int):
            raise TypeError(f"ShapesDataset indices must be int, got {type(i).__name__}")
        if i < 0:
            i += self.length
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for ShapesDataset of length {self.length}")
        idx = self.start + i
        task = self.world.choose_task(self.split, idx, self.tasks)
        return self.world.sample(self.split, idx, task, size=self.size)

    def __iter__(self) -> Iterator[dict]:
        for i in range(self.length):
            yield self[i]

    def __repr__(self) -> str:
        return f"ShapesDataset(split={self.split!r}, tasks={self.tasks!r}, length={self.length}, start={self.start})"


def benchmark(n: int = 2000, size: Size = 64, task: str = "vqa", split: str = "train") -> dict:
    """Generate ``n`` samples (scene + rendering + text) on this core and time it."""
    world = ShapesWorld(ShapesConfig(image_size=size))
    for i in range(20):                                   # warm-up: fonts, caches
        world.sample(split, 10**9 + i, task)
    t0 = time.perf_counter()
    for i in range(n):
        world.sample(split, i, task)
    dt = time.perf_counter() - t0
    return {"samples_per_s": n / dt, "seconds": dt, "n": n, "size": size, "task": task}
