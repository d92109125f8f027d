"""The scene graph of ShapesWorld: what a picture holds, before any pixel or word.

A scene is a light background, one to a few objects and perhaps a short OCR text. Here live

* the vocabulary of the world (colours, shapes, sizes, splits, tasks and question types, the
  held-out colour-shape pairs, the OCR alphabet) and its geometry (the unit polygon of every
  shape, radii, margins), all in units of the image's shorter side S;
* :class:`Rng`, a random stream named by a string, the only source of randomness;
* the dataclasses :class:`ShapesConfig`, :class:`Obj`, :class:`TextLabel`, :class:`Background`
  and :class:`Scene`;
* the spatial :func:`relations` between two objects (only the unambiguous ones);
* :class:`SceneSampler`, which draws the scene at ``(split, index)`` and keeps the held-out
  pairs out of every split but ``holdout``.

What a scene looks like is :mod:`mmkit.data.shapes.render`'s job, what it says is
:mod:`mmkit.data.shapes.text`'s, and :mod:`mmkit.data.shapes.tasks` turns it into records.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence, Union

__all__ = [
    "COLORS", "SHAPES", "SIZES", "SPLITS", "TASKS", "HOLDOUT_PAIRS", "VQA_QTYPES", "POPE_TYPES",
    "MULTI_QTYPES", "CAPTION_STYLES", "LABEL_ATTRS", "TEXT_ALPHABET", "SMALL_TEXT_HEIGHT", "SIZE_RADIUS", "SHAPE_POLYGONS", "SHAPE_EXTENT", "Size",
    "Rng", "ShapesConfig", "Obj", "TextLabel", "Background", "Scene", "relations", "SceneSampler",
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
#: How the ``caption`` task's answers are written (``ShapesConfig.caption_style``): ``web`` is
#: noisy alt-text (objects missing, colours wrong, filler words), ``brief`` the clean short
#: caption, ``detailed`` every object with its place and every relation (re-captioning).
CAPTION_STYLES: tuple[str, ...] = ("web", "brief", "detailed")
LABEL_ATTRS: tuple[str, ...] = ("color", "shape", "size")   # one-word labels of an object (few-shot formats)

#: Colour-shape pairs that only the ``holdout`` split ever shows (or mentions). Each colour is
#: held out once and every shape at least once, so train still sees every word many times.
HOLDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"), ("blue", "diamond"), ("green", "star"), ("yellow", "hexagon"),
    ("purple", "circle"), ("orange", "square"), ("pink", "hexagon"), ("cyan", "triangle"),
)

#: Characters used for OCR text: upper-case letters and digits, minus look-alikes at low
#: resolution (I/1, O/0/Q, B/8) and the widest glyphs (M, W) so 4 characters fit the image.
TEXT_ALPHABET = "ACDEFGHJKLNPRSTUVXYZ2345679"

# Geometry, all in units of the image's shorter side S (see the package docstring).
SIZE_RADIUS = {"small": (0.09, 0.102), "large": (0.17, 0.19)}   # r range; at 64 px a circle is 2*r*64 px wide
_MARGIN = 0.02          # minimum distance from an object's box to the image border
_GAP = 0.04             # minimum gap between two objects' boxes (along x or along y)
_REL_MARGIN = 0.02      # "A left of B" needs A's box to end this far before B's box starts
_CAP_HEIGHT = 0.729     # DejaVu Sans Bold cap height in em (1493 / 2048 font units)
_CHAR_WIDTH = 0.84      # >= the widest advance in TEXT_ALPHABET (H, N: 0.837 em); placement only
_TEXT_HEIGHT = (0.11, 0.14)   # cap height of the OCR text (ShapesConfig.text_height's default)
#: A cap height too small to read at 64 px (3-4 px, under half a tiny-ViT patch) that 128 px
#: and more render legibly (6-8 px at 128, 13-15 px at 256): the high-resolution OCR world,
#: ``ShapesConfig(image_size=128, text_height=SMALL_TEXT_HEIGHT)`` (notebook 10).
SMALL_TEXT_HEIGHT = (0.05, 0.06)
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
    text_height: tuple[float, float] = _TEXT_HEIGHT  # min/max cap height of the text, units of S
    texture_prob: float = 0.3             # P(background is textured rather than plain)
    color_jitter: int = 8                 # +- per RGB channel, keeps colours distinguishable
    frequency_skew: float = 1.0           # 0 = uniform; 1 = last colour/shape half as frequent
    vqa_qtypes: tuple[str, ...] = VQA_QTYPES
    shots: tuple[int, int] = (1, 3)       # interleaved: min/max in-context examples
    label_attrs: tuple[str, ...] = ()     # interleaved: one-word label documents ("red\n"), one of these
                                          # attributes of one-object scenes; () = captions and Q/A only
    chat_turns: int = 4                   # chat: at most this many question turns (one per qtype)
    popular_pool: int = 500               # scenes counted to find a split's "popular" objects
    caption_style: str = "brief"          # the caption task's answers: one of CAPTION_STYLES
    caption_noise: float = 0.3            # web style: P(an object is left out), P(its colour is wrong)

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
        lo, hi = (float(v) for v in self.text_height)
        if not 0.03 <= lo <= hi <= 0.2:
            raise ValueError(f"ShapesConfig.text_height (cap height in units of the shorter side) must satisfy "
                             f"0.03 <= min <= max <= 0.2, got {self.text_height}; e.g. SMALL_TEXT_HEIGHT "
                             f"{SMALL_TEXT_HEIGHT} for text that needs more than 64 px")
        self.text_height = (lo, hi)
        bad = [q for q in self.vqa_qtypes if q not in VQA_QTYPES]
        if bad or not self.vqa_qtypes:
            raise ValueError(f"ShapesConfig.vqa_qtypes: {bad or 'empty'}; choose from {VQA_QTYPES}")
        if not 1 <= self.shots[0] <= self.shots[1] <= 8:
            raise ValueError(f"ShapesConfig.shots must satisfy 1 <= min <= max <= 8, got {self.shots}")
        bad = [a for a in self.label_attrs if a not in LABEL_ATTRS]
        if bad:
            raise ValueError(f"ShapesConfig.label_attrs: unknown attribute(s) {bad}; choose from {LABEL_ATTRS}")
        self.label_attrs = tuple(self.label_attrs)
        if self.caption_style not in CAPTION_STYLES:
            raise ValueError(f"ShapesConfig.caption_style must be one of {CAPTION_STYLES}, got {self.caption_style!r}")
        if not 0.0 <= self.caption_noise <= 1.0:
            raise ValueError(f"ShapesConfig.caption_noise is a probability in [0, 1], got {self.caption_noise}")
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


#: The other side: a relation asked the other way round is just as unambiguous.
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


# ------------------------------------------------------------------------------------------------
# Sampling scenes
# ------------------------------------------------------------------------------------------------

class SceneSampler:
    """The scene at ``(split, index)``, deterministically: the scene half of ``ShapesWorld``.

    ``config`` fixes the vocabulary and the knobs, ``seed`` the whole world. The colour-shape
    pairs are sorted once into the pools the splits draw from: ``holdout`` scenes always hold
    at least one pair of ``config.holdout_pairs`` and the other splits never show one.
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

    def _build_scene(self, split: str, key: str, with_text: bool = False, n_objects: int | None = None) -> Scene:
        cfg = self.config
        rng = Rng(key)
        n = rng.randint(cfg.min_objects, cfg.max_objects)
        n = n if n_objects is None else n_objects
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
            h = trng.uniform(*cfg.text_height)
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

    # -- statistics of a split -------------------------------------------------------------------

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
