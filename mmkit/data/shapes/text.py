"""Words from a scene graph, and answers read back into a form that can be compared.

The world's language in one place: plural and number words, where an object is
(:func:`position_phrase`: "in the top left"), the short :func:`caption`, the :func:`detail`
description (objects, positions, relations, the text) and the :func:`draw_prompt` (what to draw,
for text -> image). Then the two readers that evaluation needs: :func:`normalize_answer`
(exact match that forgives "Two" for "2" and "colour" for "color") and :func:`parse_caption`
(which objects does a caption name?). Every sentence is a pure function of the scene graph.
"""
from __future__ import annotations

import re
from typing import Sequence

from mmkit.data.shapes.scene import CAPTION_STYLES, COLORS, SHAPES, Rng, Scene, relations

__all__ = [
    "PLURALS", "NUMBER_WORDS", "position_phrase", "caption", "draw_prompt", "detail", "web_caption",
    "styled_caption",
    "normalize_answer", "parse_caption",
]

# ------------------------------------------------------------------------------------------------
# Words: plurals, numbers, relations and positions
# ------------------------------------------------------------------------------------------------

PLURALS = {s: s + "s" for s in SHAPES}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve")

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


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


# ------------------------------------------------------------------------------------------------
# Descriptions: a scene -> text
# ------------------------------------------------------------------------------------------------

def caption(scene: Scene) -> str:
    """Short caption, objects left to right: "a large red circle and a small blue star." """
    objs = sorted(scene.objects, key=lambda o: (o.cx, o.cy))
    s = _join([o.phrase for o in objs]) if objs else "an empty picture"
    if scene.text is not None:
        s += f', with the text "{scene.text.text}"'
    return s + "."


def draw_prompt(scene: Scene) -> str:
    """What to draw, objects left to right, each with where it is:
    "a large red circle on the left and a small blue star in the top right" """
    objs = sorted(scene.objects, key=lambda o: (o.cx, o.cy))
    return _join([f"{o.phrase} {position_phrase(o.cx, o.cy)}" for o in objs])


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


_WEB_BEFORE = ("", "", "image of", "stock photo:", "picture of", "free", "cute", "download")
_WEB_AFTER = ("", "", "hd wallpaper", "clipart", "vector illustration", "for kids", "png", "art print")


def web_caption(scene: Scene, noise: float = 0.3) -> str:
    """Noisy alt-text, as scraped from the web: "stock photo: blue circle and star clipart".

    Each object is left out with probability ``noise`` (one always stays), named with the
    wrong colour with probability ``noise``, its size said only half the time, filler words
    around it, the OCR text never. The noise is a pure function of the scene (its own random
    stream), so the same scene always gets the same bad caption.
    """
    rng = Rng(scene.key + "/web")
    objs = sorted(scene.objects, key=lambda o: (o.cx, o.cy))
    kept = [o for o in objs if not rng.chance(noise)] or objs[:1]
    phrases = []
    for o in kept:
        color = o.color
        if rng.chance(noise):
            color = rng.choice([c for c in COLORS if c != o.color])
        size = f"{o.size} " if rng.chance(0.5) else ""
        phrases.append(f"{size}{color} {o.shape}")
    before, after = rng.choice(_WEB_BEFORE), rng.choice(_WEB_AFTER)
    return " ".join(w for w in (before, _join(phrases), after) if w)


def styled_caption(scene: Scene, style: str = "brief", noise: float = 0.3) -> str:
    """The caption of ``scene`` in one of ``CAPTION_STYLES``: ``web`` (:func:`web_caption`),
    ``brief`` (:func:`caption`) or ``detailed`` (:func:`detail`: every object, place and relation)."""
    if style == "brief":
        return caption(scene)
    if style == "detailed":
        return detail(scene)
    if style == "web":
        return web_caption(scene, noise)
    raise ValueError(f"caption style must be one of {CAPTION_STYLES}, got {style!r}")


# ------------------------------------------------------------------------------------------------
# Readers: text -> something comparable (used by evaluation code too)
# ------------------------------------------------------------------------------------------------

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

