"""Block diagrams of every bridge family: what is frozen, what is trained, and the shapes.

    plot_bridge_diagram("llava")     -> Figure   (one per family: BRIDGE_FAMILIES)
    save_bridge_diagrams(out_dir)    -> [paths]  every family as PNG (``mmkit course diagrams``)

Shapes are the tiny world's (64 px images, an 8 x 8 patch grid, a 192-wide LM); the
paper's sizes are in each notebook. Colours: grey = data, blue = frozen, green = trained,
purple = what the LM reads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from mmkit.viz.core import COLORS, _finish, _plt

__all__ = ["BRIDGE_FAMILIES", "plot_bridge_diagram", "save_bridge_diagrams"]

_KIND = {"data": "#eeeeee", "frozen": "#cfe0fb", "trained": "#cdeed6", "lm": "#e6dcf4"}
_EDGE = {"data": "#888888", "frozen": COLORS["accent"], "trained": COLORS["trained"], "lm": COLORS["image"]}

# family -> (title, boxes, arrows). A box: (key, x, y, text, kind); x, y the centre on a
# 10 x 6 canvas. An arrow: (from key, to key[, label]).
_Box = tuple[str, float, float, str, str]
_DIAGRAMS: dict[str, tuple[str, list[_Box], list[tuple[str, ...]]]] = {
    "llava": ("LLaVA-1.5: a projector per patch, the LM reads image tokens as words", [
        ("img", 1.2, 4.8, "image\n(3, 64, 64)", "data"),
        ("vit", 1.2, 3.2, "ViT (CLIP)\nlayer -2, CLS dropped", "frozen"),
        ("proj", 4.2, 3.2, "MLP projector\nLinear-GELU-Linear\n(64, 128) -> (64, 192)", "trained"),
        ("txt", 4.2, 4.8, "text ids with 64 <image> slots", "data"),
        ("merge", 7.0, 4.0, "merge: image tokens\nwritten into the slots\n(T, 192)", "lm"),
        ("lm", 7.0, 2.2, "LM (stage 1 frozen,\nstage 2 trained)", "frozen"),
        ("out", 7.0, 0.8, "answer tokens", "data"),
    ], [("img", "vit"), ("vit", "proj", "patches (64, 128)"), ("proj", "merge"), ("txt", "merge"),
        ("merge", "lm"), ("lm", "out")]),
    "blip2": ("BLIP-2: 32 learned queries read the image through a Q-Former", [
        ("img", 1.2, 4.8, "image\n(3, 64, 64)", "data"),
        ("vit", 1.2, 3.2, "ViT (CLIP)", "frozen"),
        ("q", 4.2, 5.0, "32 learned queries\n(32, 128)", "trained"),
        ("qf", 4.2, 3.2, "Q-Former layer x 4\nself-attn (queries + text, a mask)\n"
                         "cross-attn: queries -> image\nFFN queries | FFN text", "trained"),
        ("obj", 4.2, 1.1, "stage 1: ITC / ITM / ITG\n(three masks)", "data"),
        ("lin", 7.2, 3.2, "Linear -> LM width\n(32, 192)", "trained"),
        ("lm", 7.2, 1.6, "LM, frozen\n(32 image tokens as a prefix)", "frozen"),
    ], [("img", "vit"), ("vit", "qf", "patches (64, 128)"), ("q", "qf"), ("qf", "obj"), ("qf", "lin", "stage 2"),
        ("lin", "lm")]),
    "flamingo": ("Flamingo: a Perceiver Resampler and tanh-gated cross-attention inside the LM", [
        ("img", 1.2, 4.8, "image / video frames", "data"),
        ("vit", 1.2, 3.2, "ViT (CLIP)", "frozen"),
        ("res", 1.2, 1.4, "Perceiver Resampler\nlatents attend to\ncat[features, latents]\n-> 16 latents", "trained"),
        ("txt", 5.0, 5.0, "text with one <image> marker per picture", "data"),
        ("gx", 5.0, 3.3, "GATED XATTN-DENSE\ny += tanh(a) XAttn(y, latents | media mask)\n"
                         "y += tanh(b) FFW(y)   (a = b = 0 at start)", "trained"),
        ("lmb", 5.0, 1.6, "frozen LM layer", "frozen"),
        ("rep", 8.3, 2.5, "repeat before every\nk-th LM layer", "lm"),
        ("out", 5.0, 0.3, "next-token logits", "data"),
    ], [("img", "vit"), ("vit", "res", "patches"), ("res", "gx", "media"), ("txt", "gx"), ("gx", "lmb"),
        ("lmb", "rep"), ("lmb", "out")]),
    "qwen_vl": ("Qwen-VL: one cross-attention with 2D sin-cos positions on queries and keys", [
        ("img", 1.2, 4.8, "image (3, 128, 128)", "data"),
        ("vit", 1.2, 3.2, "ViT (CLIP)\n(256, 128) patches", "frozen"),
        ("pos", 4.2, 5.0, "2D sin-cos positions\nqueries: 8 x 8 grid; keys:\nresized to the 16 x 16 patches", "data"),
        ("ad", 4.2, 3.2, "position-aware adapter\n64 learned queries (+pos)\ncross-attend keys (+pos), values\n"
                         "-> (64, 192)", "trained"),
        ("lm", 7.9, 3.2, "LM\n<img> 64 tokens </img>\nwrites <box>(x1,y1),(x2,y2)</box>", "lm"),
        ("out", 7.9, 1.4, "answers and boxes\nas text", "data"),
    ], [("img", "vit"), ("vit", "ad"), ("pos", "ad"), ("ad", "lm"), ("lm", "out")]),
    "encoder_free": ("Encoder-free: Fuyu (one linear layer) and EVE (a Patch Embedding Layer)", [
        ("img", 1.2, 4.8, "image, any aspect ratio\n(3, H, W)", "data"),
        ("fuyu", 4.2, 4.8, "Fuyu: flatten each patch\nLinear -> LM width\n|NEWLINE| after every row", "trained"),
        ("pel", 4.2, 2.8, "EVE PEL: conv patches + 2D sin-cos\nCA1 (s x s windows), <CLS> + CA2\n"
                          "[CLS, row, SPL, row, SPL ...]", "trained"),
        ("lm", 7.4, 3.8, "LM (learns to see)\n1 + h(w+1) image tokens", "trained"),
        ("pal", 7.4, 1.6, "EVE PAL (training only):\nLM image states -> CLIP patch\nfeatures, cosine loss", "trained"),
        ("clip", 4.2, 0.8, "frozen CLIP: a teacher,\nthrown away after training", "frozen"),
    ], [("img", "fuyu"), ("img", "pel"), ("fuyu", "lm"), ("pel", "lm"), ("lm", "pal"), ("clip", "pal")]),
    "native": ("Native: interleaved documents, VQ image codes, one decoder that reads and draws", [
        ("img", 1.2, 4.8, "image (3, 64, 64)", "data"),
        ("vq", 1.2, 3.0, "VQ-VAE tokenizer\nencoder -> nearest code\n(EMA codebook)\n-> 64 codes", "frozen"),
        ("doc", 4.6, 4.8, "document: text ids, <boi> codes <eoi>, text ...", "data"),
        ("dec", 4.6, 3.0, "one decoder, one softmax\nover text ids + image codes", "trained"),
        ("read", 8.0, 4.0, "reads: answers\nquestions", "data"),
        ("draw", 8.0, 2.0, "draws: writes 64 codes\n(a logits processor keeps\nthe picture well formed)", "data"),
        ("dvq", 4.6, 0.9, "VQ-VAE decoder: codes -> pixels", "frozen"),
    ], [("img", "vq"), ("vq", "doc", "codes"), ("doc", "dec"), ("dec", "read"), ("dec", "draw"), ("draw", "dvq")]),
    "qlora": ("QLoRA: a frozen 4-bit NF4 weight and a trained low-rank update", [
        ("x", 1.2, 3.0, "x (.., d_in)", "data"),
        ("w", 4.4, 4.4, "W0 in NF4 (4 bits, frozen)\nde-quantised block by block", "frozen"),
        ("a", 3.6, 1.6, "A (r, d_in)\nrandom", "trained"),
        ("b", 5.6, 1.6, "B (d_out, r)\nzeros at start", "trained"),
        ("sum", 8.0, 3.0, "h = W0 x + (alpha / r) B A x", "lm"),
    ], [("x", "w"), ("x", "a"), ("a", "b"), ("w", "sum"), ("b", "sum")]),
}
BRIDGE_FAMILIES: tuple[str, ...] = tuple(_DIAGRAMS)


def plot_bridge_diagram(family: str):
    """A block diagram of one family's bridge (``BRIDGE_FAMILIES``): boxes coloured frozen /
    trained / data, arrows labelled with the shapes that flow along them. Returns a Figure."""
    if family not in _DIAGRAMS:
        raise ValueError(f"no diagram for {family!r}; there are: {', '.join(BRIDGE_FAMILIES)}")
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch

    plt = _plt()
    title, boxes, arrows = _DIAGRAMS[family]
    fig, ax = plt.subplots(figsize=(10, 6))
    ax.set_xlim(-0.2, 9.8), ax.set_ylim(-0.3, 5.8), ax.axis("off")
    where: dict[str, tuple[float, float, float, float]] = {}
    for key, x, y, text, kind in boxes:
        lines = text.split("\n")
        w = max(len(s) for s in lines) * 0.085 + 0.3
        h = len(lines) * 0.22 + 0.2
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.04",
                                    facecolor=_KIND[kind], edgecolor=_EDGE[kind], linewidth=1.4))
        ax.text(x, y, text, ha="center", va="center", fontsize=8.5)
        where[key] = (x, y, w, h)
    for a, b, *label in arrows:
        (x0, y0, w0, h0), (x1, y1, w1, h1) = where[a], where[b]
        start, end = _edge_point(x0, y0, w0, h0, x1, y1), _edge_point(x1, y1, w1, h1, x0, y0)
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color="#444444", lw=1.1))
        if label:
            ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12, label[0], ha="center",
                    fontsize=7.5, color="#444444", style="italic")
    ax.legend(handles=[Patch(facecolor=_KIND[k], edgecolor=_EDGE[k], label=n) for k, n in
                       (("data", "data"), ("frozen", "frozen"), ("trained", "trained"), ("lm", "what the LM reads"))],
              loc="lower left", fontsize=7.5, ncol=4, frameon=False)
    ax.set_title(title, fontsize=11)
    return _finish(fig)


def _edge_point(x: float, y: float, w: float, h: float, tx: float, ty: float) -> tuple[float, float]:
    """Where the line from the box centre (x, y) towards (tx, ty) leaves the box."""
    dx, dy = tx - x, ty - y
    if dx == 0 and dy == 0:
        return x, y
    s = min((w / 2) / abs(dx) if dx else float("inf"), (h / 2) / abs(dy) if dy else float("inf"))
    return x + dx * s, y + dy * s


def save_bridge_diagrams(out_dir: str | Path, families: Sequence[str] = BRIDGE_FAMILIES) -> list[Path]:
    """Write ``<out_dir>/bridge_<family>.png`` for each family (atomic: written, then renamed)."""
    import os

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for family in families:
        fig = plot_bridge_diagram(family)
        path = out / f"bridge_{family}.png"
        tmp = path.with_name(f".{path.stem}.tmp.png")
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
        paths.append(path)
    return paths
