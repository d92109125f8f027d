"""ShapesWorld: a tiny, procedural, fully deterministic world of coloured shapes.

Why a toy world?
----------------
A multimodal LLM learns to connect pixels to words. Real data sets (COCO, LAION, LLaVA-Instruct)
are huge, need a network and a GPU, and you can never be sure what the "right" answer is.
ShapesWorld is the opposite: every image is drawn by this package from a small *scene graph*, so

* it needs no download and generates ~thousands of samples per second on one CPU core,
* every answer is known exactly (we wrote the scene, so we know how many circles there are),
* every notebook, test and student sees the same sample for the same ``(split, index)``.

The world
---------
A **scene** is a light background (plain, or a faint texture of stripes / grid / dots) with
1..N **objects**. Each object has

* a ``shape``  (:data:`SHAPES`: circle, square, triangle, star, diamond, hexagon),
* a ``color``  (:data:`COLORS`: eight named colours chosen to stay distinguishable),
* a ``size``   (:data:`SIZES`: "small" or "large"; at 64 px a small object is ~11-14 px across,
  a large one ~21-26 px),
* a position ``(cx, cy)`` in normalised ``[0, 1]`` image coordinates, and a radius ``r`` as a
  fraction of the image's shorter side, so the *same scene renders at any size* (32..448 px,
  square or not) and shapes never get squashed.

Inside one scene each colour-shape pair occurs at most once, so "the red circle" always names
exactly one object. Objects never overlap (rejection sampling). A scene may also carry a short
upper-case **text** (2-4 letters/digits) rendered with the bundled DejaVu Sans Bold font, for OCR;
``ShapesConfig.text_height`` sets its size (``SMALL_TEXT_HEIGHT``: legible only from 128 px on).

From the scene graph we write text for every task in :data:`TASKS`:

=============  =====================================================================================
``caption``    "a large red circle and a small blue star." (``ShapesConfig.caption_style``: ``web``
               noisy alt-text, ``brief`` this, ``detailed`` every object, place and relation)
``detail``     every object with size, colour, shape and position, the relations, the text
``vqa``        colour / shape / count / relation / exists questions; one-word answers
``pope``       POPE hallucination probes "Is there a red star in the image?" -> "yes" / "no", with
               negatives sampled three ways (random / popular / adversarial)
``ground``     "Locate the red circle." -> ``<ref>the red circle</ref><box>(x1,y1),(x2,y2)</box>``
``region``     the reverse: a box in the question, "a small red circle" as the answer
``ocr``        "What is written in the image?" -> "KX7"
``multi``      two images: "Picture 1: <image>\\nPicture 2: <image>\\nWhich picture has more stars?"
``interleaved`` a few-shot document "<image>\\nA red circle.\\n<image>\\nA blue star.\\n<image>\\n"
``draw``       the other direction, text -> image: "Draw a large red circle on the left." and
               the picture as the *answer* (``<image>`` in the gpt turn): for models that
               write images (mmkit.native.unified)
``chat``       several ``vqa`` questions about one image in one conversation, one question type
               per turn, as LLaVA-1.5 groups the questions of an image: more answers per
               image token seen
=============  =====================================================================================

Boxes follow Qwen-VL: integers in ``[0, 1000)``, normalised by the image width and height.

Every sample is a conversation record in the LLaVA format::

    {"id": "train/17/vqa",
     "image": <PIL.Image 64x64 RGB>,                       # or "images": [img1, img2, ...]
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the star?"},
                       {"from": "gpt",   "value": "red"}],
     "meta": {"task": "vqa", "qtype": "color", "answer": "red", "scene": Scene(...), ...}}

with exactly one ``<image>`` placeholder per image in the human turn.

Splits and compositional generalisation
---------------------------------------
:data:`SPLITS` are ``train``, ``val``, ``test`` and ``holdout``. A fixed set of colour-shape pairs,
:data:`HOLDOUT_PAIRS` (e.g. "purple circle"), never appears in train / val / test: not in an
image, and not even in a question ("Is there a purple circle?" is never asked there). Every
``holdout`` scene contains at least one of them. A model that has seen purple things and circles,
but never a purple circle, is tested on exactly that combination.

Determinism
-----------
Randomness never comes from global state or Python's ``hash()``. Every random stream is keyed
by a string such as ``"0/train/17/scene"`` (seed / split / index / purpose), hashed with BLAKE2b
into a seed for a private ``random.Random`` of which we only call ``random()``: the one method whose
output Python promises is stable across versions. Same ``(seed, split, index, config)`` -> same
sample, on any machine. Different splits hash different keys, so their streams are disjoint, and
because positions are continuous the chance that two splits draw the same scene is nil.

Frequencies are deliberately a little skewed (colours and shapes earlier in :data:`COLORS` /
:data:`SHAPES` are more common, see ``ShapesConfig.frequency_skew``), like real data where
"person" is everywhere. This is what makes POPE's "popular" negatives meaningful.

Where things live
-----------------
=====================================  ===========================================================
:mod:`mmkit.data.shapes.scene`         the vocabulary and geometry, :class:`Rng`, the scene graph
                                       (:class:`ShapesConfig`, :class:`Obj`, :class:`Scene`, ...),
                                       spatial relations, ``SceneSampler`` (the scene at an index)
:mod:`mmkit.data.shapes.render`        :func:`render_scene`: a scene -> an anti-aliased image
:mod:`mmkit.data.shapes.text`          captions and descriptions; :func:`normalize_answer`,
                                       :func:`parse_caption`
:mod:`mmkit.data.shapes.tasks`         :class:`ShapesWorld` (every task as a record),
                                       :class:`ShapesDataset`, :func:`benchmark`
:mod:`mmkit.data.grounding`            the box text format (shared with Qwen-VL-style grounding)
=====================================  ===========================================================

Everything is importable from here (``from mmkit.data.shapes import ShapesWorld``). The package
needs only Pillow (no torch, no numpy).
"""
from __future__ import annotations

# Importable from here besides __all__: the geometry and OCR inks that mmkit.native's drawing
# checker reads, render_scene, relations, the word lists, the Box type, SceneSampler and to_box.
from mmkit.data.grounding import Box, box_iou, find_boxes, format_box, format_ref_box, parse_boxes, to_box
from mmkit.data.shapes.render import FONT_PATH, looks_like_shapesworld, render_scene
from mmkit.data.shapes.scene import (
    _TEXT_COLORS, CAPTION_STYLES, COLORS, LABEL_ATTRS, HOLDOUT_PAIRS, MULTI_QTYPES, POPE_TYPES, SHAPE_EXTENT, SHAPE_POLYGONS, SHAPES,
    SIZE_RADIUS, SIZES, SMALL_TEXT_HEIGHT, SPLITS, TASKS, TEXT_ALPHABET, VQA_QTYPES, Background, Obj, Rng, SceneSampler, Scene,
    ShapesConfig, Size, TextLabel, relations,
)
from mmkit.data.shapes.tasks import ShapesDataset, ShapesWorld, benchmark
from mmkit.data.shapes.text import (
    NUMBER_WORDS, PLURALS, normalize_answer, parse_caption, position_phrase, styled_caption, web_caption,
)

__all__ = [
    "COLORS", "SHAPES", "SIZES", "SPLITS", "TASKS", "HOLDOUT_PAIRS", "VQA_QTYPES", "POPE_TYPES",
    "MULTI_QTYPES", "CAPTION_STYLES", "LABEL_ATTRS", "TEXT_ALPHABET", "SMALL_TEXT_HEIGHT", "FONT_PATH",
    "ShapesConfig", "Obj", "TextLabel", "Background", "Scene", "ShapesWorld", "ShapesDataset",
    "Rng", "format_box", "format_ref_box", "parse_boxes", "find_boxes", "box_iou",
    "normalize_answer", "parse_caption", "styled_caption", "web_caption", "benchmark", "looks_like_shapesworld",
]
