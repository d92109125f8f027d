"""ShapesWorld: a tiny, procedural, fully deterministic world of coloured shapes.

Why a toy world?
----------------
A multimodal LLM learns to connect pixels to words. Real data sets (COCO, LAION, LLaVA-Instruct)
are huge, need a network and a GPU, and you can never be sure what the "right" answer is.
ShapesWorld is the opposite: every image is drawn by this file from a small *scene graph*, so

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
upper-case **text** (2-4 letters/digits) rendered with the bundled DejaVu Sans Bold font, for OCR.

From the scene graph we write text for every task in :data:`TASKS`:

=============  =====================================================================================
``caption``    "a large red circle and a small blue star."
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

This module needs only Pillow (no torch, no numpy).
"""
from __future__ import annotations

import hashlib
import math
import random
import re
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "COLORS", "SHAPES", "SIZES", "SPLITS", "TASKS", "HOLDOUT_PAIRS", "VQA_QTYPES", "POPE_TYPES",
    "MULTI_QTYPES", "TEXT_ALPHABET", "FONT_PATH",
    "ShapesConfig", "Obj", "TextLabel", "Background", "Scene", "ShapesWorld", "ShapesDataset",
    "Rng", "format_box", "format_ref_box", "parse_boxes", "find_boxes", "box_iou",
    "normalize_answer", "parse_caption", "benchmark",
]

# ------------------------------------------------------------------------------------------------
# The vocabulary of the world
# ------------------------------------------------------------------------------------------------

#: name -> RGB. Saturated hues spread around the colour wheel, all clearly darker or more
#: saturated than the light backgrounds (every channel of a background is >= 222).
#: Order matters: earlier colours are (mildly) more frequent, see ShapesConfig.frequency_skew.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "blue": (35, 75, 225),
    "green": (30, 150, 55),
    "yellow": (240, 200, 0),
    "purple": (125, 45, 175),
    "orange": (245, 110, 0),
    "pink": (245, 100, 190),
    "cyan": (0, 185, 205),
}

#: Shapes, most frequent first.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "hexagon")
SIZES: tuple[str, ...] = ("small", "large")
SPLITS: tuple[str, ...] = ("train", "val", "test", "holdout")
TASKS: tuple[str, ...] = (
    "caption", "detail", "vqa", "pope", "ground", "region", "ocr", "multi", "interleaved", "draw", "chat",
)
VQA_QTYPES: tuple[str, ...] = ("color", "shape", "count", "relation", "exists")
POPE_TYPES: tuple[str, ...] = ("random", "popular", "adversarial")
MULTI_QTYPES: tuple[str, ...] = ("more_shape", "more_objects", "which_has", "both_have")


def _known_task(name: str) -> bool:
    """A task of TASKS, or "vqa/TYPE" / "multi/TYPE" with the question type fixed."""
    task, slash, qtype = name.partition("/")
    if not slash:
        return task in TASKS
    return qtype in {"vqa": VQA_QTYPES, "multi": MULTI_QTYPES}.get(task, ())

#: Colour-shape pairs that only the ``holdout`` split ever shows (or mentions). Each colour is
#: held out once and every shape at least once, so train still sees every word many times.
HOLDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"), ("blue", "diamond"), ("green", "star"), ("yellow", "hexagon"),
    ("purple", "circle"), ("orange", "square"), ("pink", "hexagon"), ("cyan", "triangle"),
)

#: Characters used for OCR text: upper-case letters and digits, minus look-alikes at low
#: resolution (I/1, O/0/Q, B/8) and the widest glyphs (M, W) so 4 characters fit the image.
TEXT_ALPHABET = "ACDEFGHJKLNPRSTUVXYZ2345679"

#: The bundled font (DejaVu Sans Bold, Bitstream Vera license, see mmkit/fonts/).
FONT_PATH = Path(__file__).resolve().parent.parent / "fonts" / "DejaVuSans-Bold.ttf"

PLURALS = {s: s + "s" for s in SHAPES}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve")

# Geometry, all in units of the image's shorter side S (see module docstring).
SIZE_RADIUS = {"small": (0.09, 0.102), "large": (0.17, 0.19)}   # r range; at 64 px a circle is 2*r*64 px wide
_MARGIN = 0.02          # minimum distance from an object's box to the image border
_GAP = 0.04             # minimum gap between two objects' boxes (along x or along y)
_REL_MARGIN = 0.02      # "A left of B" needs A's box to end this far before B's box starts
_CAP_HEIGHT = 0.729     # DejaVu Sans Bold cap height in em (1493 / 2048 font units)
_CHAR_WIDTH = 0.84      # >= the widest advance in TEXT_ALPHABET (H, N: 0.837 em); placement only
_TEXT_HEIGHT = (0.11, 0.14)   # cap height of the OCR text
_TEXT_COLORS = ((20, 20, 20), (45, 45, 55), (30, 30, 80))
_TRIES = 40             # rejection-sampling attempts per object


def _unit_polygon(points: Sequence[tuple[float, float]], half_width: float) -> tuple:
    """Centre a polygon's bounding box on (0, 0) and scale it to the given half width."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    k = half_width / ((max(xs) - min(xs)) / 2)
    return tuple(((x - mx) * k, (y - my) * k) for x, y in points)


def _star_points(n: int = 5, inner: float = 0.5) -> list[tuple[float, float]]:
    pts = []
    for i in range(2 * n):                       # alternate outer and inner vertices, start at top
        a = -math.pi / 2 + i * math.pi / n
        rad = 1.0 if i % 2 == 0 else inner
        pts.append((rad * math.cos(a), rad * math.sin(a)))
    return pts


#: Unit polygons (y points down), bounding box centred on (0, 0); scaled by an object's radius r.
#: Sizes are tuned so shapes of the same r look about equally big (similar area).
SHAPE_POLYGONS: dict[str, tuple | None] = {
    "circle": None,                                                        # drawn as an ellipse
    "square": _unit_polygon([(-1, -1), (1, -1), (1, 1), (-1, 1)], 0.86),
    "triangle": _unit_polygon([(0, -math.sqrt(3)), (1, 0), (-1, 0)], 1.05),   # equilateral, up
    "star": _unit_polygon(_star_points(), 1.065),
    "diamond": _unit_polygon([(0, -1.1), (0.85, 0), (0, 1.1), (-0.85, 0)], 0.85),
    "hexagon": _unit_polygon([(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3))
                              for k in range(6)], 1.0),                     # flat top and bottom
}


def _extent(shape: str) -> tuple[float, float]:
    poly = SHAPE_POLYGONS[shape]
    if poly is None:
        return (1.0, 1.0)
    return (max(abs(p[0]) for p in poly), max(abs(p[1]) for p in poly))


#: shape -> (half width, half height) of its bounding box, in units of r.
SHAPE_EXTENT: dict[str, tuple[float, float]] = {s: _extent(s) for s in SHAPES}

Size = Union[int, tuple[int, int]]
Box = tuple[int, int, int, int]


# ------------------------------------------------------------------------------------------------
# Deterministic randomness
# ------------------------------------------------------------------------------------------------

class Rng:
    """A random stream named by a string key: ``Rng("0/train/17/scene")``.

    The key is hashed with BLAKE2b (128 bits, so different keys never collide in practice) into
    the seed of a private ``random.Random``. We only ever call its ``random()`` method, whose
    sequence Python guarantees to be stable across versions; everything else is derived here.
    """

    __slots__ = ("_random",)

    def __init__(self, key: str):
        digest = hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()
        self._random = random.Random(int.from_bytes(digest, "big")).random

    def random(self) -> float:
        return self._random()

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self._random()

    def chance(self, p: float) -> bool:
        return self._random() < p

    def randint(self, lo: int, hi: int) -> int:
        """Integer in [lo, hi], both ends included."""
        return lo + min(int(self._random() * (hi - lo + 1)), hi - lo)

    def choice(self, seq: Sequence):
        if not seq:
            raise IndexError("Rng.choice from an empty sequence")
        return seq[self.randint(0, len(seq) - 1)]

    def weighted(self, seq: Sequence, weights: Sequence[float]):
        x = self._random() * sum(weights)
        acc = 0.0
        for item, w in zip(seq, weights):
            acc += w
            if x < acc:
                return item
        return seq[-1]

    def shuffled(self, seq: Sequence) -> list:
        out = list(seq)
        for i in range(len(out) - 1, 0, -1):       # Fisher-Yates
            j = self.randint(0, i)
            out[i], out[j] = out[j], out[i]
        return out


# ------------------------------------------------------------------------------------------------
# The scene graph
# ------------------------------------------------------------------------------------------------

@dataclass
class ShapesConfig:
    """Knobs of the world. The defaults are what the tiny models are trained on."""

    image_size: Size = 64                 # int (square) or (width, height), 32..448 tested
    min_objects: int = 1
    max_objects: int = 3                  # placement may drop objects when the image is crowded
    colors: tuple[str, ...] = tuple(COLORS)
    shapes: tuple[str, ...] = SHAPES
    holdout_pairs: tuple[tuple[str, str], ...] = HOLDOUT_PAIRS
    large_prob: float = 0.5               # P(size == "large")
    text_prob: float = 0.2                # P(a scene carries OCR text); ocr samples always do
    text_len: tuple[int, int] = (2, 4)    # min/max characters of the OCR text
    texture_prob: float = 0.3             # P(background is textured rather than plain)
    color_jitter: int = 8                 # +- per RGB channel, keeps colours distinguishable
    frequency_skew: float = 1.0           # 0 = uniform; 1 = last colour/shape half as frequent
    vqa_qtypes: tuple[str, ...] = VQA_QTYPES
    shots: tuple[int, int] = (1, 3)       # interleaved: min/max in-context examples
    chat_turns: int = 4                   # chat: at most this many question turns (one per qtype)
    popular_pool: int = 500               # scenes counted to find a split's "popular" objects

    def __post_init__(self):
        bad = [c for c in self.colors if c not in COLORS]
        if bad:
            raise ValueError(f"ShapesConfig.colors: unknown colour(s) {bad}; choose from {list(COLORS)}")
        bad = [s for s in self.shapes if s not in SHAPES]
        if bad:
            raise ValueError(f"ShapesConfig.shapes: unknown shape(s) {bad}; choose from {list(SHAPES)}")
        if len(self.colors) < 2 or len(self.shapes) < 2:
            raise ValueError("ShapesConfig needs at least 2 colours and 2 shapes")
        if not 1 <= self.min_objects <= self.max_objects <= 10:
            raise ValueError(
                f"ShapesConfig: need 1 <= min_objects <= max_objects <= 10, got "
                f"min_objects={self.min_objects}, max_objects={self.max_objects}")
        if self.chat_turns < 1:
            raise ValueError(f"ShapesConfig.chat_turns must be >= 1, got {self.chat_turns}")
        lo, hi = self.text_len
        if not 1 <= lo <= hi <= 4:
            raise ValueError(f"ShapesConfig.text_len must satisfy 1 <= min <= max <= 4, got {self.text_len}")
        bad = [q for q in self.vqa_qtypes if q not in VQA_QTYPES]
        if bad or not self.vqa_qtypes:
            raise ValueError(f"ShapesConfig.vqa_qtypes: {bad or 'empty'}; choose from {VQA_QTYPES}")
        if not 1 <= self.shots[0] <= self.shots[1] <= 8:
            raise ValueError(f"ShapesConfig.shots must satisfy 1 <= min <= max <= 8, got {self.shots}")
        _parse_size(self.image_size)
        self.colors, self.shapes = tuple(self.colors), tuple(self.shapes)
        self.holdout_pairs = tuple((c, s) for c, s in self.holdout_pairs)


@dataclass
class Obj:
    """One object. Position in normalised image coords, radius in units of min(W, H)."""

    shape: str
    color: str
    size: str                             # "small" | "large"
    cx: float                             # centre x in [0, 1] of the image width
    cy: float                             # centre y in [0, 1] of the image height (0 = top)
    r: float                              # radius as a fraction of the shorter image side
    rgb: tuple[int, int, int]             # the actual (jittered) fill colour

    @property
    def name(self) -> str:                # "red circle"
        return f"{self.color} {self.shape}"

    @property
    def ref(self) -> str:                 # "the red circle" (unique inside a scene)
        return f"the {self.color} {self.shape}"

    @property
    def phrase(self) -> str:              # "a small red circle"
        return f"a {self.size} {self.color} {self.shape}"

    @property
    def pair(self) -> tuple[str, str]:
        return (self.color, self.shape)

    @property
    def hx(self) -> float:                # half width of the bounding box, units of S
        return SHAPE_EXTENT[self.shape][0] * self.r

    @property
    def hy(self) -> float:                # half height of the bounding box, units of S
        return SHAPE_EXTENT[self.shape][1] * self.r


@dataclass
class TextLabel:
    """OCR text. Centre in normalised coords; cap height ``h`` and box width ``w`` in units of S."""

    text: str
    cx: float
    cy: float
    h: float
    w: float
    rgb: tuple[int, int, int]


@dataclass
class Background:
    kind: str                             # "plain" | "stripes" | "grid" | "dots"
    rgb: tuple[int, int, int]             # light base colour
    ink: tuple[int, int, int]             # slightly darker texture colour
    spacing: float = 0.1                  # texture period, units of S
    width: float = 0.015                  # line width / dot radius, units of S
    angle: int = 0                        # stripes: 0, 45, 90 or 135 degrees
    seed: int = 0                         # dots: positions come from Rng(f"dots/{seed}")


@dataclass
class Scene:
    objects: list[Obj]
    background: Background
    text: TextLabel | None = None
    split: str = "train"
    key: str = ""                         # the Rng key it was generated from (provenance)

    def pairs(self) -> set[tuple[str, str]]:
        return {o.pair for o in self.objects}

    def has(self, color: str | None = None, shape: str | None = None) -> bool:
        return self.count(color=color, shape=shape) > 0

    def count(self, color: str | None = None, shape: str | None = None) -> int:
        return sum(1 for o in self.objects
                   if (color is None or o.color == color) and (shape is None or o.shape == shape))

    def find(self, color: str, shape: str) -> Obj | None:
        return next((o for o in self.objects if o.pair == (color, shape)), None)

    def to_dict(self) -> dict:
        """JSON-friendly dict (e.g. to save a data set next to the images)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Scene":
        t = d.get("text")
        return cls(
            objects=[Obj(**{**o, "rgb": tuple(o["rgb"])}) for o in d["objects"]],
            background=Background(**{**d["background"], "rgb": tuple(d["background"]["rgb"]),
                                     "ink": tuple(d["background"]["ink"])}),
            text=None if t is None else TextLabel(**{**t, "rgb": tuple(t["rgb"])}),
            split=d.get("split", "train"), key=d.get("key", ""),
        )


def _parse_size(size: Size) -> tuple[int, int]:
    if isinstance(size, int):
        w = h = size
    else:
        try:
            w, h = (int(v) for v in size)
        except (TypeError, ValueError):
            raise ValueError(f"image size must be an int or (width, height), got {size!r}") from None
    if not (8 <= w <= 4096 and 8 <= h <= 4096):
        raise ValueError(f"image size {(w, h)} out of range: each side must be in 8..4096 (32..448 is typical)")
    return w, h


def _separated(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    """Boxes (cx, cy, hx, hy) are apart by at least _GAP along x or along y.

    Checked in units of S; in a non-square image one axis is stretched, which only increases
    the distance, so a scene that is overlap-free when square is overlap-free at every size.
    """
    return (abs(a[0] - b[0]) >= a[2] + b[2] + _GAP) or (abs(a[1] - b[1]) >= a[3] + b[3] + _GAP)


def _place(rng: Rng, placed: list, hx: float, hy: float, tries: int = _TRIES):
    lo_x, hi_x = hx + _MARGIN, 1 - hx - _MARGIN
    lo_y, hi_y = hy + _MARGIN, 1 - hy - _MARGIN
    if lo_x > hi_x or lo_y > hi_y:
        return None
    for _ in range(tries):
        cand = (rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y), hx, hy)
        if all(_separated(cand, p) for p in placed):
            return cand[0], cand[1]
    return None


def relations(a: Obj, b: Obj) -> list[str]:
    """Unambiguous spatial relations of ``a`` with respect to ``b``: a subset of
    ["above" | "below", "left" | "right"]. A relation holds only when the two bounding boxes
    are separated along that axis (by _REL_MARGIN), i.e. centre distance > sum of half sizes."""
    out = []
    if a.cy + a.hy + _REL_MARGIN < b.cy - b.hy:
        out.append("above")
    elif b.cy + b.hy + _REL_MARGIN < a.cy - a.hy:
        out.append("below")
    if a.cx + a.hx + _REL_MARGIN < b.cx - b.hx:
        out.append("left")
    elif b.cx + b.hx + _REL_MARGIN < a.cx - a.hx:
        out.append("right")
    return out


_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
_REL_PHRASE = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}


def position_phrase(cx: float, cy: float) -> str:
    """Where in a 3x3 grid: "in the top left", "at the top", "in the center", "on the right"..."""
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    if row == "middle":
        return "in the center" if col == "center" else f"on the {col}"
    if col == "center":
        return f"at the {row}"
    return f"in the {row} {col}"


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _font(px: int) -> ImageFont.FreeTypeFont:
    """The bundled font at a pixel size (cached: loading a font file costs ~1 ms)."""
    if not FONT_PATH.is_file():
        raise FileNotFoundError(
            f"ShapesWorld font not found at {FONT_PATH}. It ships with mmkit (mmkit/fonts/); "
            f"reinstall mmkit or copy DejaVuSans-Bold.ttf (e.g. from matplotlib's mpl-data/fonts/ttf) there.")
    # BASIC layout: identical glyph placement whether or not libraqm is installed
    return ImageFont.truetype(str(FONT_PATH), px, layout_engine=ImageFont.Layout.BASIC)


def _supersample(short_side: int) -> int:
    """Draw at k x resolution then box-downsample (k*k coverage levels per edge pixel):
    anti-aliased edges at small cost. 3x at 64 px: a 192x192 canvas."""
    return 4 if short_side <= 48 else 3 if short_side <= 112 else 2


def _draw_background(d: ImageDraw.ImageDraw, bg: Background, W: int, H: int, S: int) -> None:
    if bg.kind == "plain":
        return
    lw = max(1, round(bg.width * S))
    step = max(2, bg.spacing * S)
    if bg.kind in ("stripes", "grid"):
        angles = (bg.angle,) if bg.kind == "stripes" else (0, 90)
        for ang in angles:
            if ang == 0:                                   # horizontal lines
                y = step / 2
                while y < H:
                    d.line([(0, y), (W, y)], fill=bg.ink, width=lw)
                    y += step
            elif ang == 90:                                # vertical lines
                x = step / 2
                while x < W:
                    d.line([(x, 0), (x, H)], fill=bg.ink, width=lw)
                    x += step
            else:                                          # diagonals: 45 = "/" , 135 = "\"
                diag = step * math.sqrt(2)
                x = -H + diag / 2
                while x < W + H:
                    if ang == 45:
                        d.line([(x, H), (x + H, 0)], fill=bg.ink, width=lw)
                    else:
                        d.line([(x, 0), (x + H, H)], fill=bg.ink, width=lw)
                    x += diag
    elif bg.kind == "dots":
        rng = Rng(f"dots/{bg.seed}")
        n = max(4, int(round((W * H) / (2 * step * step))))   # one dot per 2 spacing^2
        rad = max(1.0, bg.width * S)
        for _ in range(n):
            x, y = rng.random() * W, rng.random() * H
            d.ellipse((x - rad, y - rad, x + rad, y + rad), fill=bg.ink)


def render_scene(scene: Scene, size: Size) -> Image.Image:
    """Draw a scene as an RGB image of ``size`` (int or (W, H)). See ShapesWorld.render."""
    W, H = _parse_size(size)
    S = min(W, H)
    k = _supersample(S)
    Wk, Hk, Sk = W * k, H * k, S * k
    img = Image.new("RGB", (Wk, Hk), scene.background.rgb)
    d = ImageDraw.Draw(img)
    _draw_background(d, scene.background, Wk, Hk, Sk)
    for o in scene.objects:
        X, Y, R = o.cx * Wk, o.cy * Hk, o.r * Sk          # centre and radius in canvas pixels
        poly = SHAPE_POLYGONS[o.shape]
        if poly is None:
            d.ellipse((X - R, Y - R, X + R, Y + R), fill=o.rgb)
        else:
            d.polygon([(X + ux * R, Y + uy * R) for ux, uy in poly], fill=o.rgb)
    if k > 1:
        img = img.reduce(k)                                 # box filter: k*k pixels -> 1
    t = scene.text
    if t is not None:
        # FreeType anti-aliases text itself, so it is drawn at the final resolution. The font
        # size is chosen so that the cap height is t.h * S; "ms" anchors at the baseline centre.
        font = _font(max(4, round(t.h / _CAP_HEIGHT * S)))
        ImageDraw.Draw(img).text((t.cx * W, t.cy * H + t.h * S / 2), t.text, fill=t.rgb,
                                 font=font, anchor="ms")
    return img


# ------------------------------------------------------------------------------------------------
# Boxes and text helpers (used by evaluation code too)
# ------------------------------------------------------------------------------------------------

def _to_box(x1: float, y1: float, x2: float, y2: float) -> Box:
    """Normalised float box -> integer box in [0, 1000), rounded outwards so it covers the object."""
    def clamp(v: int) -> int:
        return min(999, max(0, v))
    a, b = clamp(math.floor(x1 * 1000)), clamp(math.ceil(x2 * 1000))
    c, d = clamp(math.floor(y1 * 1000)), clamp(math.ceil(y2 * 1000))
    if b <= a:                                             # degenerate (tiny object at the border)
        a, b = (a, a + 1) if a < 999 else (998, 999)
    if d <= c:
        c, d = (c, c + 1) if c < 999 else (998, 999)
    return (a, c, b, d)


def format_box(box: Sequence[int]) -> str:
    """(x1, y1, x2, y2) ints in [0, 1000) -> "<box>(x1,y1),(x2,y2)</box>" (Qwen-VL format)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    if not (0 <= x1 < x2 < 1000 and 0 <= y1 < y2 < 1000):
        raise ValueError(f"box {tuple(box)} is invalid: need integers 0 <= x1 < x2 < 1000 and 0 <= y1 < y2 < 1000")
    return f"<box>({x1},{y1}),({x2},{y2})</box>"


def format_ref_box(phrase: str, box: Sequence[int]) -> str:
    """ "<ref>the red circle</ref><box>(x1,y1),(x2,y2)</box>" """
    return f"<ref>{phrase}</ref>{format_box(box)}"


_TAG_RE = re.compile(r"<ref>(?P<ref>.*?)</ref>|<box>(?P<box>.*?)</box>|(?P<stray></?(?:box|ref)>)", re.S)
_COORDS_RE = re.compile(r"\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*")


def find_boxes(text: str) -> tuple[list[tuple[str | None, Box]], list[str]]:
    """Lenient parser: ``(boxes, malformed)``.

    ``boxes`` is a list of ``(phrase, (x1, y1, x2, y2))`` in order of appearance; ``phrase`` is the
    text of the ``<ref>...</ref>`` right before the box (a ref applies to every box that follows
    it directly, as in Qwen-VL's ``<ref>cats</ref><box>..</box><box>..</box>``), else ``None``.
    ``malformed`` lists the offending fragments: a ``<box>`` whose content is not
    ``(x1,y1),(x2,y2)``, coordinates outside [0, 1000), x1 >= x2 or y1 >= y2, or a stray/unclosed
    tag. Use this to score model outputs (a malformed box simply counts as a miss).
    """
    boxes: list[tuple[str | None, Box]] = []
    bad: list[str] = []
    phrase: str | None = None
    last = 0
    for m in _TAG_RE.finditer(text):
        if text[last:m.start()].strip():       # other text in between: the ref no longer applies
            phrase = None
        last = m.end()
        if m.group("ref") is not None:
            phrase = m.group("ref").strip()
        elif m.group("box") is not None:
            c = _COORDS_RE.fullmatch(m.group("box"))
            if c is None:
                bad.append(m.group(0))
                continue
            x1, y1, x2, y2 = (int(v) for v in c.groups())
            if not (0 <= x1 < x2 < 1000 and 0 <= y1 < y2 < 1000):
                bad.append(m.group(0))
                continue
            boxes.append((phrase, (x1, y1, x2, y2)))
        else:
            bad.append(m.group(0))
    return boxes, bad


def parse_boxes(text: str) -> list[tuple[str | None, Box]]:
    """Strict parser: like :func:`find_boxes` but raises ``ValueError`` naming the first malformed
    box and the expected format. Use it on data you wrote; use ``find_boxes`` on model output."""
    boxes, bad = find_boxes(text)
    if bad:
        raise ValueError(
            f"malformed box {bad[0]!r} in {text[:120]!r}: expected "
            f"'<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>' with integers 0 <= x1 < x2 < 1000 and "
            f"0 <= y1 < y2 < 1000 (the <ref> part is optional)")
    return boxes


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes (any units, same for both)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


_SPELLING = {
    "colour": "color", "colours": "colors", "coloured": "colored", "grey": "gray",
    "centre": "center", "big": "large", "little": "small", "tiny": "small", "huge": "large",
    "yeah": "yes", "yep": "yes", "nope": "no",
    **{w: str(i) for i, w in enumerate(NUMBER_WORDS)},
}
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """Canonical form for exact-match scoring: lower case, punctuation and articles removed,
    spelling variants mapped (colour -> color, grey -> gray, big -> large, two -> 2).

    >>> normalize_answer("  The Colour RED. ")
    'color red'
    """
    t = re.sub(r"[^\w\s]", " ", text.lower())
    words = [_SPELLING.get(w, w) for w in t.split() if w not in _ARTICLES]
    return " ".join(words)


_SIZE_WORDS = {"small": "small", "large": "large", "big": "large", "little": "small",
               "tiny": "small", "huge": "large"}
_COLOR_WORDS = {**{c: c for c in COLORS}, "grey": "gray", "violet": "purple"}
_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{p: s for s, p in PLURALS.items()}}
_QUOTED_RE = re.compile(r"\"[^\"]*\"|“[^”]*”|'[A-Z0-9]{1,8}'")


def parse_caption(text: str, unique: bool = False) -> list[tuple[str | None, str, str]]:
    """Recover the objects a caption describes: ``[(size | None, color, shape), ...]``.

    Finds every "[number] [size] colour shape[s]" mention ("a large red circle", "two blue stars"
    -> two entries, "red circles" without a number -> one entry). Quoted text (the OCR string) is
    ignored. Every mention counts, so on a ``detail`` text that repeats objects in its relation
    sentences pass ``unique=True`` to keep one entry per (colour, shape), preferring one with a size.
    """
    t = _QUOTED_RE.sub(" ", text).lower()
    toks = re.findall(r"[a-z]+|\d+", t)
    out: list[tuple[str | None, str, str]] = []
    for i in range(len(toks) - 1):
        color, shape = _COLOR_WORDS.get(toks[i]), _SHAPE_WORDS.get(toks[i + 1])
        if color is None or shape is None or color not in COLORS:
            continue
        j = i - 1
        size = _SIZE_WORDS.get(toks[j]) if j >= 0 else None
        if size is not None:
            j -= 1
        n = 1
        if toks[i + 1] != shape and j >= 0:            # plural: look for a number before it
            w = toks[j]
            if w.isdigit():
                n = int(w)
            elif w in NUMBER_WORDS:
                n = NUMBER_WORDS.index(w)
        out.extend([(size, color, shape)] * max(0, min(n, 20)))
    if unique:
        best: dict[tuple[str, str], tuple[str | None, str, str]] = {}
        for s, c, sh in out:
            if (c, sh) not in best or (best[(c, sh)][0] is None and s is not None):
                best[(c, sh)] = (s, c, sh)
        out = list(best.values())
    return out


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


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


# ------------------------------------------------------------------------------------------------
# The world
# ------------------------------------------------------------------------------------------------

class ShapesWorld:
    """Deterministic generator of scenes, images and conversation records.

    Usage::

        world = ShapesWorld()                        # default 64x64, 1-3 objects, seed 0
        scene = world.scene("train", 0)              # the scene graph (objects, background, text)
        image = world.render(scene, 224)             # the same scene at any size
        rec = world.sample("train", 0, "vqa")        # {"id", "image", "conversations", "meta"}
        rec["conversations"][1]["value"]             # 'star'
        recs = world.samples("train", {"vqa": 2, "caption": 1}, start=0, n=64)
    """

    def __init__(self, config: ShapesConfig | None = None, seed: int = 0):
        self.config = config or ShapesConfig()
        self.seed = int(seed)
        cfg = self.config
        self.size = _parse_size(cfg.image_size)
        skew = max(0.0, float(cfg.frequency_skew))

        def rank_weights(names: Sequence[str]) -> dict[str, float]:
            n = len(names)
            return {nm: 1.0 / (1.0 + skew * i / max(1, n - 1)) for i, nm in enumerate(names)}

        wc, ws = rank_weights(cfg.colors), rank_weights(cfg.shapes)
        all_pairs = [(c, s) for c in cfg.colors for s in cfg.shapes]
        held = set(cfg.holdout_pairs)
        self.holdout_pairs: tuple[tuple[str, str], ...] = tuple(p for p in cfg.holdout_pairs if p in all_pairs)
        seen = [p for p in all_pairs if p not in held]
        self._pools = {
            "seen": (seen, [wc[c] * ws[s] for c, s in seen]),
            "all": (all_pairs, [wc[c] * ws[s] for c, s in all_pairs]),
            "held": (list(self.holdout_pairs), [wc[c] * ws[s] for c, s in self.holdout_pairs]),
        }
        if len(seen) < cfg.max_objects:
            raise ValueError(f"only {len(seen)} colour-shape pairs are left outside the holdout set, "
                             f"fewer than max_objects={cfg.max_objects}; add colours/shapes or hold out fewer pairs")
        self._popular: dict[str, list[tuple[tuple[str, str], int]]] = {}

    # -- keys and splits -------------------------------------------------------------------------

    def _key(self, split: str, index: int, purpose: str) -> str:
        return f"{self.seed}/{split}/{index}/{purpose}"

    def _check(self, split: str, index: int | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        if split == "holdout" and not self.holdout_pairs:
            raise ValueError("the 'holdout' split needs ShapesConfig.holdout_pairs within the configured colours/shapes")
        if index is not None and (not isinstance(index, int) or index < 0):
            raise ValueError(f"index must be a non-negative int, got {index!r}")

    def allowed_pairs(self, split: str) -> list[tuple[str, str]]:
        """Colour-shape pairs that may appear (or be mentioned) in ``split``."""
        return list(self._pools["all" if split == "holdout" else "seen"][0])

    # -- scenes ----------------------------------------------------------------------------------

    def scene(self, split: str, index: int, *, with_text: bool = False) -> Scene:
        """The scene at ``(split, index)``. ``with_text=True`` guarantees an OCR text: the same
        scene if it already has one, otherwise the same objects plus text (an object is dropped
        only if there is no room for the text)."""
        self._check(split, index)
        return self._build_scene(split, self._key(split, index, "scene"), with_text)

    def _build_scene(self, split: str, key: str, with_text: bool = False) -> Scene:
        cfg = self.config
        rng = Rng(key)
        n = rng.randint(cfg.min_objects, cfg.max_objects)
        pool, weights = self._pools["all" if split == "holdout" else "seen"]
        pairs: list[tuple[str, str]] = []
        if split == "holdout":                            # at least one never-seen combination
            pairs.append(rng.weighted(*self._pools["held"]))
        while len(pairs) < n:
            cand = [(p, w) for p, w in zip(pool, weights) if p not in pairs]
            pairs.append(rng.weighted([p for p, _ in cand], [w for _, w in cand]))

        objects: list[Obj] = []
        placed: list[tuple[float, float, float, float]] = []   # (cx, cy, hx, hy) per object
        for color, shape in pairs:
            size = "large" if rng.chance(cfg.large_prob) else "small"
            ex, ey = SHAPE_EXTENT[shape]
            for sz in ((size, "small") if size == "large" else ("small",)):   # crowded: shrink
                r = rng.uniform(*SIZE_RADIUS[sz])
                pos = _place(rng, placed, ex * r, ey * r)
                if pos is not None:
                    break
            else:
                continue                                   # no room at all: drop the object
            j = cfg.color_jitter
            rgb = tuple(min(255, max(0, v + rng.randint(-j, j))) for v in COLORS[color])
            objects.append(Obj(shape, color, sz, pos[0], pos[1], r, rgb))  # type: ignore[arg-type]
            placed.append((pos[0], pos[1], ex * r, ey * r))

        # background: light base colour, optionally a faint texture
        base = rng.randint(232, 250)
        rgb = tuple(min(255, base + rng.randint(-6, 5)) for _ in range(3))
        kind = rng.choice(("stripes", "grid", "dots")) if rng.chance(cfg.texture_prob) else "plain"
        dark = rng.randint(10, 16)
        bg = Background(kind=kind, rgb=rgb, ink=tuple(max(0, v - dark) for v in rgb),  # type: ignore[arg-type]
                        spacing=rng.uniform(0.07, 0.13), width=rng.uniform(0.01, 0.018),
                        angle=rng.choice((0, 45, 90, 135)), seed=rng.randint(0, 2**31 - 1))

        # text: its own stream, so forcing text (ocr) keeps the objects above unchanged
        trng = Rng(key + "/text")
        wants_text = trng.chance(cfg.text_prob)
        text = None
        if wants_text or with_text:
            s = "".join(trng.choice(TEXT_ALPHABET) for _ in range(trng.randint(*cfg.text_len)))
            h = trng.uniform(*_TEXT_HEIGHT)
            w = len(s) * _CHAR_WIDTH * h / _CAP_HEIGHT
            color = trng.choice(_TEXT_COLORS)
            pad = 0.01
            while True:
                pos = _place(trng, placed, w / 2 + pad, h / 2 + pad, tries=_TRIES if objects else 200)
                if pos is not None or not with_text:
                    break
                drop = self._droppable(objects, split)
                if drop is None:                           # keep the required object; try harder
                    pos = _place(trng, placed, w / 2 + pad, h / 2 + pad, tries=2000)
                    break
                objects.pop(drop)
                placed.pop(drop)
            if pos is not None:
                text = TextLabel(s, pos[0], pos[1], h, w, color)
        return Scene(objects=objects, background=bg, text=text, split=split, key=key)

    def _droppable(self, objects: list[Obj], split: str) -> int | None:
        """Index of the object to drop to make room for text (the last one, never the only
        held-out object of a holdout scene, never the last object), or None."""
        held = set(self.holdout_pairs)
        if len(objects) <= 1:
            return None
        for i in range(len(objects) - 1, -1, -1):
            if split == "holdout":
                rest = [o for k, o in enumerate(objects) if k != i]
                if not any(o.pair in held for o in rest):
                    continue
            return i
        return None

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
        return _to_box(obj.cx - hx * S / W, obj.cy - hy * S / H, obj.cx + hx * S / W, obj.cy + hy * S / H)

    # -- language from the scene graph ----------------------------------------------------------

    @staticmethod
    def caption(scene: Scene) -> str:
        """Short caption, objects left to right: "a large red circle and a small blue star." """
        objs = sorted(scene.objects, key=lambda o: (o.cx, o.cy))
        s = _join([o.phrase for o in objs]) if objs else "an empty picture"
        if scene.text is not None:
            s += f', with the text "{scene.text.text}"'
        return s + "."

    @staticmethod
    def draw_prompt(scene: Scene) -> str:
        """What to draw, objects left to right, each with where it is:
        "a large red circle on the left and a small blue star in the top right" """
        objs = sorted(scene.objects, key=lambda o: (o.cx, o.cy))
        return _join([f"{o.phrase} {position_phrase(o.cx, o.cy)}" for o in objs])

    @staticmethod
    def detail(scene: Scene) -> str:
        """Detailed description: count, background, each object with position, relations, text."""
        objs = sorted(scene.objects, key=lambda o: (o.cx, o.cy))
        n = len(objs)
        bg = {"plain": "a plain light background", "stripes": "a light striped background",
              "grid": "a light background with a grid", "dots": "a light dotted background"}[scene.background.kind]
        parts = [f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} object{'' if n == 1 else 's'} on {bg}."]
        for o in objs:
            parts.append(f"{_cap(o.phrase)} is {position_phrase(o.cx, o.cy)}.")
        for i in range(n):
            for j in range(i + 1, n):
                rels = relations(objs[i], objs[j])
                if rels:
                    parts.append(f"The {objs[i].name} is {' and '.join(_REL_PHRASE[r] for r in rels)} the {objs[j].name}.")
        if scene.text is not None:
            t = scene.text
            parts.append(f'The text "{t.text}" is written {position_phrase(t.cx, t.cy)}.')
        return " ".join(parts)

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

    def object_frequencies(self, split: str, n: int | None = None) -> list[tuple[tuple[str, str], int]]:
        """How often each colour-shape pair occurs in the first ``n`` scenes of ``split``
        (default config.popular_pool), most frequent first. Cached. Used for POPE "popular"."""
        n = self.config.popular_pool if n is None else n
        ck = f"{split}/{n}"
        if ck not in self._popular:
            counts = {p: 0 for p in self.allowed_pairs(split)}
            for i in range(n):
                for o in self.scene(split, i).objects:
                    counts[o.pair] += 1
            self._popular[ck] = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return self._popular[ck]

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
        ``pope_type``, ``shots`` and ``fmt`` ("caption" | "vqa") for interleaved. A forced qtype that
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
        if task == "caption":
            q, a = rng.choice(_T_CAPTION), self.caption(scene)
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
        fmt = fmt or rng.choice(("caption", "caption", "vqa"))
        if fmt not in ("caption", "vqa"):
            raise ValueError(f"interleaved fmt must be 'caption' or 'vqa', got {fmt!r}")
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


if __name__ == "__main__":                                 # python -m mmkit.data.shapes
    for t in TASKS:
        print(t, benchmark(n=500, task=t))
