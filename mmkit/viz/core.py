"""Figures for the notebooks: each function takes plain data and returns a matplotlib ``Figure``.

Nothing here trains or runs a model; the notebooks compute, these functions draw. Every
function works headless (``MPLBACKEND=Agg``) and returns its ``Figure`` (already closed
for pyplot, so a notebook shows it exactly once: as the value of the cell).

    show_samples(records, ncols)          ShapesWorld / LLaVA records: image(s) + question + answer
    show_patch_grid(image, patch_size)    the ViT's patch grid drawn over an image
    plot_matrix(matrix, rows, cols)       any labelled heatmap (similarities, attention, masks)
    plot_similarity(matrix, labels)       CLIP's image x text similarity matrix, argmax boxed
    plot_label_mask(tokenizer, encoded)   a training sequence as tokens, coloured by what carries loss
    plot_training(metrics)                loss curve per stage from metrics.jsonl or Trainer.history
    plot_bars(values)                     results: {name: value} or {series: {name: value}}
    plot_vqa(results)                     VQA accuracy, overall + per question type, for several models
    plot_curves(series)                   lines: {name: {x: y}} (probe accuracy per layer, gates, ...)
    plot_learning_curves(runs)            accuracy vs training minutes, overall + per question type
    md_table(rows)                        a list of dicts as a Markdown table (renders in Jupyter)
"""
from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "show_samples", "show_patch_grid", "plot_matrix", "plot_similarity", "plot_label_mask",
    "plot_training", "plot_bars", "plot_vqa", "plot_curves", "plot_learning_curves", "md_table", "MarkdownTable", "COLORS",
]

#: The palette every figure uses, so "trained" is the same green in every notebook.
COLORS = {
    "trained": "#2e9e4f",      # tokens that carry loss
    "ignored": "#d9d9d9",      # tokens masked with IGNORE_INDEX
    "image": "#7b4fb8",        # image-token runs
    "pad": "#f2f2f2",
    "correct": "#2e9e4f",
    "wrong": "#c8372d",
    "accent": "#2a6fdb",
    "grid": "#ff3b30",
}
_SERIES = ["#2a6fdb", "#e8871e", "#2e9e4f", "#c8372d", "#7b4fb8", "#8c564b", "#17becf", "#7f7f7f"]


def _plt():
    import matplotlib.pyplot as plt

    return plt


def _finish(fig):
    """Close the pyplot handle (no double display in notebooks) and return the Figure."""
    _plt().close(fig)
    return fig


# ------------------------------------------------------------------------------ images
def _to_array(image: Any) -> np.ndarray:
    """PIL image, (3, H, W) / (H, W, 3) tensor or array -> (H, W, 3) floats in [0, 1]."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if hasattr(image, "detach"):  # torch tensor
        image = image.detach().float().cpu().numpy()
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.min() < 0 or a.max() > 1:  # normalised pixels: min-max to [0, 1] for display
        a = (a - a.min()) / max(1e-8, float(a.max() - a.min()))
    return a


def _hstack(arrays: list[np.ndarray], gap: int = 3) -> np.ndarray:
    """Images side by side (resized to the first one's height), white gaps between."""
    if not arrays:
        return np.ones((8, 8, 3), dtype=np.float32)
    H = arrays[0].shape[0]
    out = []
    for i, a in enumerate(arrays):
        if a.shape[0] != H:  # nearest-neighbour resize to height H
            ys = (np.arange(H) * a.shape[0] / H).astype(int)
            xs = (np.arange(round(a.shape[1] * H / a.shape[0])) * a.shape[0] / H).astype(int)
            a = a[ys][:, xs]
        if i:
            out.append(np.ones((H, gap, 3), dtype=np.float32))
        out.append(a)
    return np.concatenate(out, axis=1)


def _clip(text: str, width: int, lines: int) -> str:
    wrapped: list[str] = []
    for para in text.split("\n"):
        wrapped += textwrap.wrap(para, width) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: max(0, width - 1)] + "…"
    return "\n".join(wrapped)


def show_samples(
    records: Sequence[Mapping],
    ncols: int = 4,
    *,
    predictions: Sequence[str] | None = None,
    title: str | None = None,
    panel_size: float = 2.4,
    width: int = 30,
    max_lines: int = 4,
):
    """A grid of conversation records: the image(s), the question and the answer.

    records: LLaVA-format dicts (``image`` or ``images``, ``conversations``; ShapesWorld's
        ``meta["task"]`` is shown when present). Multi-image records are drawn side by side;
        ``<image>`` placeholders in the text show as ``[img]``.
    predictions: optional model answers, one per record, drawn in green when they match
        the reference answer (after ``normalize_answer``) and red when not.
    """
    from mmkit.data.processor import images_of

    from mmkit.data.shapes import normalize_answer

    records = list(records)
    if not records:
        raise ValueError("show_samples: no records to show")
    if predictions is not None and len(predictions) != len(records):
        raise ValueError(f"show_samples: {len(predictions)} predictions for {len(records)} records")
    ncols = max(1, min(ncols, len(records)))
    nrows = math.ceil(len(records) / ncols)
    n_text = max_lines + 2 + (1 if predictions is not None else 0)
    text_h = 0.115 * n_text                               # inches of text under each image
    plt = _plt()
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * panel_size, nrows * (panel_size + text_h)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, rec in enumerate(records):
        ax = axes.flat[i]
        ims = [_to_array(im) for im in images_of(rec)]  # one record, one or several images
        ax.imshow(_hstack(ims), interpolation="nearest")
        conv = rec.get("conversations", [])
        q = next((t["value"] for t in conv if t.get("from", t.get("role")) in ("human", "user")), "")
        a = next((t["value"] for t in reversed(conv) if t.get("from", t.get("role")) in ("gpt", "assistant")), "")
        q = q.replace("<image>\n", "[img] ").replace("<image>", "[img]").strip()
        task = rec.get("meta", {}).get("task") or rec.get("id", "")
        qtype = rec.get("meta", {}).get("qtype")
        ax.set_title(f"{task}" + (f" · {qtype}" if qtype else ""), fontsize=9, color="#444444")
        body = "Q: " + _clip(q, width, max_lines) + "\nA: " + _clip(a, width, 2)
        t = ax.text(0.5, -0.03, body, transform=ax.transAxes, ha="center", va="top", fontsize=7.5,
                    linespacing=1.15)
        if predictions is not None:
            p = str(predictions[i])
            ok = normalize_answer(p) == normalize_answer(a)
            ax.annotate("model: " + _clip(p, width - 9, 1) + ("  ✓" if ok else "  ✗"), xy=(0.5, 0), xycoords=t,
                        xytext=(0, -2), textcoords="offset points", ha="center", va="top", fontsize=8,
                        color=COLORS["correct" if ok else "wrong"])
    if title:
        fig.suptitle(title, fontsize=11)
    fig.subplots_adjust(hspace=text_h / panel_size + 0.2, wspace=0.08,
                        top=1 - 0.55 / (nrows * (panel_size + text_h)) if title else 1 - 0.3 / (nrows * (panel_size + text_h)),
                        bottom=(text_h + 0.05) / (nrows * (panel_size + text_h)))
    return _finish(fig)


def show_patch_grid(
    image: Any,
    patch_size: int,
    *,
    size: int | tuple[int, int] | None = None,
    numbers: bool | None = None,
    cls_token: bool = True,
    title: str | None = None,
    figsize: float = 4.0,
):
    """Draw the ViT's patch grid over ``image``: one cell = one patch = one token.

    image: PIL image, or a (3, H, W) tensor (normalised pixels are rescaled for display).
    size: resize a PIL image to this (int: square; (H, W)) first, as the encoder would.
    numbers: write each patch's index (row-major, the order of the token sequence);
        default: when the grid has at most 100 cells.
    """
    if size is not None and hasattr(image, "resize"):
        H, W = (size, size) if isinstance(size, int) else size
        from PIL import Image

        image = image.convert("RGB").resize((W, H), Image.BICUBIC)
    a = _to_array(image)
    H, W = a.shape[:2]
    gh, gw = H // patch_size, W // patch_size
    if gh == 0 or gw == 0:
        raise ValueError(f"show_patch_grid: a {H}x{W} image has no full {patch_size}x{patch_size} patch")
    numbers = (gh * gw <= 100) if numbers is None else numbers
    plt = _plt()
    fig, ax = plt.subplots(figsize=(figsize, figsize * H / W))
    ax.imshow(a, interpolation="nearest", extent=(0, W, H, 0))
    for k in range(gw + 1):
        ax.axvline(k * patch_size, color=COLORS["grid"], lw=0.8, alpha=0.8)
    for k in range(gh + 1):
        ax.axhline(k * patch_size, color=COLORS["grid"], lw=0.8, alpha=0.8)
    if numbers:
        fs = max(4.0, min(9.0, 60.0 / max(gh, gw)))
        for r in range(gh):
            for c in range(gw):
                ax.text((c + 0.5) * patch_size, (r + 0.5) * patch_size, str(r * gw + c), ha="center",
                        va="center", fontsize=fs, color="white",
                        bbox=dict(boxstyle="round,pad=0.1", fc="black", alpha=0.35, lw=0))
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    n = gh * gw
    extra = " (+1 CLS)" if cls_token else ""
    ax.set_title(title or f"{W}x{H} px, {patch_size}x{patch_size} patches: {gh}x{gw} = {n} tokens{extra}",
                 fontsize=10)
    if H % patch_size or W % patch_size:
        ax.set_xlabel(f"{H % patch_size} rows / {W % patch_size} cols of pixels do not fill a patch",
                      fontsize=8, color=COLORS["wrong"])
    fig.tight_layout()
    return _finish(fig)


# ------------------------------------------------------------------------------ matrices
def _labels_are_images(labels: Sequence | None) -> bool:
    return bool(labels) and all(hasattr(x, "size") and hasattr(x, "convert") or
                                (hasattr(x, "shape") and len(getattr(x, "shape", ())) == 3) for x in labels)


def plot_matrix(
    matrix: Any,
    row_labels: Sequence | None = None,
    col_labels: Sequence | None = None,
    title: str = "",
    *,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
    annotate: bool | None = None,
    fmt: str = "{:.2f}",
    xlabel: str = "",
    ylabel: str = "",
    colorbar: bool = True,
    highlight: Sequence[tuple[int, int]] = (),
    cell: float = 0.45,
    ax=None,
):
    """A labelled heatmap: similarity matrices, attention weights, attention masks.

    matrix: (R, C) array or tensor (bool masks are drawn as 0/1).
    row_labels / col_labels: strings, or PIL images (drawn as thumbnails).
    annotate: write each value in its cell (default: when the matrix is at most 12 x 12).
    highlight: (row, col) cells to outline.
    ax: draw into an existing Axes (its figure is returned) instead of a new figure.
    """
    if hasattr(matrix, "detach"):
        matrix = matrix.detach().float().cpu().numpy()
    m = np.asarray(matrix, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"plot_matrix: expected a 2-D matrix, got shape {m.shape}")
    R, C = m.shape
    annotate = (R <= 12 and C <= 12) if annotate is None else annotate
    img_rows, img_cols = _labels_are_images(row_labels), _labels_are_images(col_labels)
    plt = _plt()
    if ax is None:
        w = max(3.0, C * cell + (1.2 if img_rows else 2.2) + (1.0 if colorbar else 0))
        h = max(2.5, R * cell + (1.2 if img_cols else 1.8) + (0.4 if title else 0))
        fig, ax = plt.subplots(figsize=(w, h))
    else:
        fig = ax.figure
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    if annotate:
        lo, hi = im.get_clim()
        mid = (lo + hi) / 2
        for r in range(R):
            for c in range(C):
                v = m[r, c]
                ax.text(c, r, fmt.format(v), ha="center", va="center", fontsize=7,
                        color="black" if (v > mid) == (cmap in ("viridis", "magma", "inferno", "cividis")) else "white")
    for r, c in highlight:
        ax.add_patch(_plt().Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec=COLORS["wrong"], lw=2))
    ax.set_xticks(range(C))
    ax.set_yticks(range(R))
    if col_labels is not None and not img_cols:
        ax.set_xticklabels([str(x) for x in col_labels], rotation=45 if C > 3 else 0, ha="right" if C > 3 else "center",
                           fontsize=8)
    else:
        ax.set_xticklabels([] if img_cols else range(C), fontsize=8)
    if row_labels is not None and not img_rows:
        ax.set_yticklabels([str(x) for x in row_labels], fontsize=8)
    else:
        ax.set_yticklabels([] if img_rows else range(R), fontsize=8)
    if img_rows or img_cols:
        from matplotlib.offsetbox import AnnotationBbox, OffsetImage

        def thumb(x):
            a = _to_array(x)
            return OffsetImage(a, zoom=min(1.0, 28.0 / max(a.shape[:2])) * 0.9 * cell / 0.45)

        if img_rows:
            for r, lab in enumerate(row_labels):
                ax.add_artist(AnnotationBbox(thumb(lab), (-0.5, r), xybox=(-18, 0), xycoords="data",
                                             boxcoords="offset points", frameon=False, annotation_clip=False))
        if img_cols:
            for c, lab in enumerate(col_labels):
                ax.add_artist(AnnotationBbox(thumb(lab), (c, R - 0.5), xybox=(0, -18), xycoords="data",
                                             boxcoords="offset points", frameon=False, annotation_clip=False))
    ax.set_xlabel(xlabel, labelpad=26 if img_cols else 4)
    ax.set_ylabel(ylabel, labelpad=30 if img_rows else 4)
    if title:
        ax.set_title(title, fontsize=10)
    if colorbar:
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    try:
        fig.tight_layout()
    except Exception:  # thumbnails outside the axes can upset tight_layout; the figure is fine
        pass
    return _finish(fig)


def plot_similarity(
    matrix: Any,
    labels: Sequence[str],
    *,
    images: Sequence | None = None,
    title: str = "image x text similarity",
    cmap: str = "viridis",
    **kwargs: Any,
):
    """CLIP's similarity matrix: row i = image i, column j = text j, the true pairs on the
    diagonal. Each row's best-scoring text is outlined (red when it is not the diagonal).

    labels: the texts (column labels; also the row labels when ``images`` is None).
    images: optional row thumbnails.
    """
    if hasattr(matrix, "detach"):
        matrix = matrix.detach().float().cpu().numpy()
    m = np.asarray(matrix, dtype=np.float32)
    best = [(r, int(np.argmax(m[r]))) for r in range(m.shape[0])]
    col_labels = [textwrap.shorten(str(t), 34, placeholder="…") for t in labels]
    rows = list(images) if images is not None else [f"img {i}" for i in range(m.shape[0])]
    fig = plot_matrix(m, rows, col_labels, title, cmap=cmap, xlabel="text j", ylabel="image i", **kwargs)
    ax = fig.axes[0]
    for r, c in best:
        ax.add_patch(_plt().Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, lw=2,
                                      ec=COLORS["correct"] if r == c else COLORS["wrong"]))
    hits = sum(r == c for r, c in best)
    ax.set_title(f"{title}\nrow argmax on the diagonal: {hits}/{len(best)}", fontsize=10)
    return fig


# ------------------------------------------------------------------------------ tokens
def _token_text(tokenizer, tid: int) -> str:
    s = tokenizer.decode([int(tid)], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return s.replace(" ", "·").replace("\t", "→")


def _row_of(encoded: Any, row: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one sequence from an ``Encoded`` or a collated batch dict."""
    if hasattr(encoded, "input_ids") and hasattr(encoded, "labels"):
        return list(map(int, encoded.input_ids)), list(map(int, encoded.labels))
    if isinstance(encoded, Mapping):
        ids, labels = encoded["input_ids"], encoded.get("labels")
        mask = encoded.get("attention_mask")

        def pick(x):
            if x is None:
                return None
            if hasattr(x, "tolist"):
                x = x.tolist()
            x = list(x)
            return x[row] if x and isinstance(x[0], (list, tuple)) else x

        ids, labels, mask = pick(ids), pick(labels), pick(mask)
        if labels is None:
            labels = [-100] * len(ids)
        if mask is not None:
            keep = [i for i, v in enumerate(mask) if v]
            ids, labels = [ids[i] for i in keep], [labels[i] for i in keep]
        return list(map(int, ids)), list(map(int, labels))
    raise TypeError("plot_label_mask: pass an mmkit Encoded (processor.encode) or a batch dict "
                    "with input_ids and labels")


def plot_label_mask(
    tokenizer,
    encoded: Any,
    *,
    row: int = 0,
    width: int = 72,
    image_token: str = "<image>",
    title: str | None = None,
    ignore_index: int = -100,
):
    """A training sequence as a row of token boxes, coloured by whether they carry loss.

    green   the label is the token itself: the model is trained to predict it
    grey    the label is ``IGNORE_INDEX``: the token is context only (prompt, template, pad)
    purple  a run of image tokens, collapsed into one box "<image> x N" (never trained)

    encoded: ``processor.encode(record)`` (an ``Encoded``) or a collated batch dict
        (``row`` picks the sequence; padding is dropped via ``attention_mask``).
    A newline token is shown as ``↵`` and starts a new line, so the figure reads like the
    chat template; spaces show as ``·``.
    """
    ids, labels = _row_of(encoded, row)
    if len(ids) != len(labels):
        raise ValueError(f"plot_label_mask: {len(ids)} input_ids but {len(labels)} labels")
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    # 1. runs: (kind, text, start, n)
    items: list[tuple[str, str, int, int]] = []
    i = 0
    while i < len(ids):
        tid = ids[i]
        if tid == image_id or (tid == pad_id and labels[i] == ignore_index):
            j = i
            while j < len(ids) and ids[j] == tid and labels[j] == labels[i]:
                j += 1
            kind = "image" if tid == image_id else "pad"
            name = image_token if kind == "image" else "<pad>"
            items.append((kind, f"{name} ×{j - i}", i, j - i))
            i = j
            continue
        kind = "ignored" if labels[i] == ignore_index else "trained"
        if labels[i] not in (ignore_index, tid):
            kind = "shifted"  # a label that is neither the token nor ignored: show it loudly
        items.append((kind, _token_text(tokenizer, tid), i, 1))
        i += 1
    # 2. flow layout in character cells
    lines: list[list[tuple[str, str, int, float, int]]] = [[]]
    x = 0.0
    for kind, text, start, n in items:
        newline = text.endswith("\n")
        shown = text.replace("\n", "↵")
        w = len(shown) + 1.0
        if x + w > width and lines[-1]:
            lines.append([])
            x = 0.0
        lines[-1].append((kind, shown, start, x, n))
        x += w + 0.4
        if newline:
            lines.append([])
            x = 0.0
    if not lines[-1]:
        lines.pop()
    plt = _plt()
    cw, lh = 0.085, 0.34  # inches per character cell / per line (monospace, 8.5 pt)
    fig, ax = plt.subplots(figsize=(width * cw + 0.4, max(1.2, (len(lines) + 1.6) * lh)))
    fill = {"trained": COLORS["trained"], "ignored": COLORS["ignored"], "image": COLORS["image"],
            "pad": COLORS["pad"], "shifted": COLORS["wrong"]}
    ink = {"trained": "white", "ignored": "#333333", "image": "white", "pad": "#999999", "shifted": "white"}
    for ln, line in enumerate(lines):
        for kind, shown, start, x0, n in line:
            w = len(shown) + 1.0
            ax.add_patch(plt.Rectangle((x0, ln + 0.12), w, 0.76, fc=fill[kind], ec="white", lw=0.8))
            ax.text(x0 + w / 2, ln + 0.52, shown, ha="center", va="center", fontsize=8.5,
                    family="monospace", color=ink[kind])
    ax.set_xlim(0, width)
    ax.set_ylim(len(lines) + 0.1, -0.1)
    ax.axis("off")
    counts = {k: sum(n for kd, _, _, n in items if kd == k) for k in fill}
    legend = [plt.Rectangle((0, 0), 1, 1, fc=fill[k]) for k in ("trained", "ignored", "image")]
    names = [f"trained ({counts['trained']})", f"ignored = {ignore_index} ({counts['ignored'] + counts['pad']})",
             f"image tokens ({counts['image']})"]
    if counts["shifted"]:
        legend.append(plt.Rectangle((0, 0), 1, 1, fc=fill["shifted"]))
        names.append(f"label != token ({counts['shifted']})")
    ax.legend(legend, names, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(names), fontsize=8,
              frameon=False, handlelength=1.2)
    if title:
        ax.set_title(title, fontsize=10, pad=22)
    fig.tight_layout()
    return _finish(fig)


# ------------------------------------------------------------------------------ curves
def plot_qformer_masks(num_queries: int = 4, text: list[str] | None = None, *, cell: float = 0.32):
    """BLIP-2's three stage-1 masks side by side, rows/columns labelled q0.. and the words.

    Drawn from the same functions the objectives use (``mmkit.bridges.blip2.MASKS``);
    True = may attend.
    """
    import torch

    from mmkit.bridges.blip2 import MASKS

    text = text or ["[CLS]", "a", "red", "circle"]
    labels = [f"q{i}" for i in range(num_queries)] + list(text)
    plt = _plt()
    T = len(labels)
    fig, axes = plt.subplots(1, 3, figsize=(3 * (T * cell + 1.2), T * cell + 1.6))
    titles = {"itc": "ITC: uni-modal", "itm": "ITM: bidirectional", "itg": "ITG: multimodal causal"}
    for ax, (name, fn) in zip(axes, MASKS.items()):
        m = fn(num_queries, torch.ones(1, len(text)))[0]
        plot_matrix(m, labels, labels, titles[name], ax=ax, colorbar=False, annotate=False, cmap="Greens",
                    xlabel="key (attended to)", ylabel="query (attending)" if name == "itc" else "")
    fig.tight_layout()
    return _finish(fig)


def _load_history(source: Any) -> list[dict]:
    if hasattr(source, "history"):  # a Trainer
        source = source.history
    if isinstance(source, (str, Path)):
        p = Path(source)
        if p.is_dir():
            p = p / "metrics.jsonl"
        if not p.is_file():
            raise FileNotFoundError(f"plot_training: {p} not found; pass a Trainer, its history, "
                                    "its out_dir or the metrics.jsonl it wrote")
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return list(source)


def plot_training(source: Any, *, key: str = "loss", title: str | None = None, logy: bool = False):
    """The training curve of a run, one colour per stage, from ``metrics.jsonl`` (a path or
    the run folder), ``Trainer.history`` (a list of dicts) or the Trainer itself."""
    hist = [h for h in _load_history(source) if key in h]
    if not hist:
        raise ValueError(f"plot_training: no {key!r} values to plot")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    stages: list[str] = []
    for h in hist:
        if h.get("stage") not in stages:
            stages.append(h.get("stage"))
    style = "-o" if len(hist) <= 40 else "-"
    for k, st in enumerate(stages):
        pts = [(h.get("global_step", i), h[key]) for i, h in enumerate(hist) if h.get("stage") == st]
        xs, ys = zip(*pts)
        ax.plot(xs, ys, style, ms=3, color=_SERIES[k % len(_SERIES)],
                label=f"stage {k + 1}: {st}")
        if k:
            ax.axvline(xs[0] - 0.5, color="#999999", ls=":", lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(key)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    ax.set_title(title or f"{key} per step", fontsize=10)
    fig.tight_layout()
    return _finish(fig)


def plot_bars(
    values: Mapping[str, Any],
    *,
    title: str = "",
    ylabel: str = "",
    ylim: tuple[float, float] | None = None,
    baseline: float | Mapping[str, float] | None = None,
    baseline_label: str = "chance",
    fmt: str = "{:.2f}",
    figsize: tuple[float, float] | None = None,
):
    """Bars for results: ``{name: value}``, or grouped ``{series: {name: value}}``
    (e.g. ``{"with image": per_type, "blind": per_type}``). Values are written on the bars.

    baseline: a dashed line at one value, or one short line per name (a chance level
        that differs per question type).
    """
    if not values:
        raise ValueError("plot_bars: nothing to plot")
    grouped = all(isinstance(v, Mapping) for v in values.values())
    series = dict(values) if grouped else {"": dict(values)}
    names: list[str] = []
    for s in series.values():
        names += [n for n in s if n not in names]
    k = len(series)
    width = 0.8 / k
    plt = _plt()
    fig, ax = plt.subplots(figsize=figsize or (max(3.5, 0.65 * len(names) * max(1, k) * 0.8 + 1.5), 3.2))
    x = np.arange(len(names))
    for j, (sname, s) in enumerate(series.items()):
        ys = [float(s[n]) if n in s and s[n] is not None else np.nan for n in names]
        pos = x + (j - (k - 1) / 2) * width
        bars = ax.bar(pos, ys, width * 0.92, label=sname or None, color=_SERIES[j % len(_SERIES)])
        for b, y in zip(bars, ys):
            if not np.isnan(y):
                ax.text(b.get_x() + b.get_width() / 2, y, fmt.format(y), ha="center", va="bottom", fontsize=7)
    if isinstance(baseline, Mapping):
        for i, n in enumerate(names):
            if n in baseline:
                ax.hlines(baseline[n], i - 0.45, i + 0.45, colors="#555555", linestyles="--", lw=1.2,
                          label=baseline_label if i == 0 else None)
    elif baseline is not None:
        ax.axhline(float(baseline), color="#555555", ls="--", lw=1.2, label=baseline_label)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30 if len(names) > 5 else 0, ha="right" if len(names) > 5 else "center",
                       fontsize=8)
    if ylim:
        ax.set_ylim(*ylim)
    else:
        top = np.nanmax([float(v) for s in series.values() for v in s.values() if v is not None] + [0.0])
        ax.set_ylim(0, top * 1.15 if top > 0 else 1)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    if grouped or baseline is not None:
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return _finish(fig)


def plot_vqa(results: Mapping[str, Mapping[str, Any]], *, title: str = "", ylabel: str = "exact-match accuracy"):
    """VQA side by side: ``{label: evaluate(model, "vqa") result}`` (each with ``accuracy`` and
    ``per_type``) as grouped bars, "all" first, then one group per question type. The picture
    every family notebook draws for a student's run, its reference and the blind baseline."""
    if not results:
        raise ValueError("plot_vqa: nothing to plot")
    for label, r in results.items():
        if "accuracy" not in r or "per_type" not in r:
            raise ValueError(f"plot_vqa: {label!r} is not a VQA result (expected the dict evaluate(model, 'vqa') "
                             f"returns, with 'accuracy' and 'per_type'; got keys {sorted(r)})")
    n = {r.get("n") for r in results.values()} - {None}
    default = f"VQA on the same {n.pop()} test questions" if len(n) == 1 else "VQA"
    return plot_bars({label: {"all": r["accuracy"], **r["per_type"]} for label, r in results.items()},
                     ylim=(0, 1.05), ylabel=ylabel, title=title or default)


def plot_curves(
    series: Mapping[str, Any],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    baseline: float | Mapping[str, float] | None = None,
    baseline_label: str = "chance",
    ylim: tuple[float, float] | None = None,
    figsize: tuple[float, float] = (5.2, 3.2),
):
    """Lines: ``{name: {x: y}}`` or ``{name: [y0, y1, ...]}`` (x = 0, 1, ...).

    baseline: a dashed grey line at one value (named ``baseline_label``), or one dashed line
        per series, in its colour.
    """
    if not series:
        raise ValueError("plot_curves: nothing to plot")
    plt = _plt()
    fig, ax = plt.subplots(figsize=figsize)
    xticks: list = []
    for j, (name, s) in enumerate(series.items()):
        pts = list(s.items()) if isinstance(s, Mapping) else list(enumerate(s))
        xs, ys = [p[0] for p in pts], [float(p[1]) for p in pts]
        color = _SERIES[j % len(_SERIES)]
        ax.plot(range(len(xs)) if any(isinstance(v, str) for v in xs) else xs, ys, "-o", ms=4, color=color,
                label=name)
        if any(isinstance(v, str) for v in xs):
            xticks = xs
        if isinstance(baseline, Mapping) and name in baseline:
            ax.axhline(baseline[name], color=color, ls="--", lw=1, alpha=0.7)
    if xticks:
        ax.set_xticks(range(len(xticks)))
        ax.set_xticklabels(xticks, fontsize=8)
    if baseline is not None and not isinstance(baseline, Mapping):
        ax.axhline(float(baseline), color="#555555", ls="--", lw=1, label=baseline_label)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _finish(fig)


def plot_learning_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    metric: str = "accuracy",
    baseline: float | None = None,
    baseline_label: str = "blind",
    title: str = "",
    figsize: tuple[float, float] | None = None,
):
    """Accuracy against training minutes, overall and per question type, several runs on one figure.

    ``runs``: ``{label: records}``, the records an ``AccuracyTracker`` writes (``curve.jsonl``
    of ``mmkit train --curve``): each ``{"train_seconds", metric, "per_type": {type: acc}}``.
    One panel for the overall ``metric``, then one per question type; a run keeps its colour in
    every panel, so a student's 5-minute run and a reference's hour read side by side.
    ``baseline``: a dashed line in the overall panel (e.g. the blind LM's accuracy).
    """
    if not runs or not any(runs.values()):
        raise ValueError("plot_learning_curves: no records (train with `mmkit train --curve N`)")
    types = sorted({t for recs in runs.values() for r in recs for t in r.get("per_type", {})})
    panels = ["all"] + types
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    plt = _plt()
    fig, axes = plt.subplots(rows, cols, figsize=figsize or (3.2 * cols, 2.5 * rows), sharey=True, squeeze=False)
    for k, panel in enumerate(panels):
        ax = axes[k // cols][k % cols]
        for j, (label, recs) in enumerate(runs.items()):
            pts = [(r["train_seconds"] / 60.0, r[metric] if panel == "all" else r.get("per_type", {}).get(panel))
                   for r in recs]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                style = "-o" if j < len(_SERIES) else "--s"   # past the palette: dashed, square markers
                ax.plot([x for x, _ in pts], [y for _, y in pts], style, ms=3, color=_SERIES[j % len(_SERIES)],
                        label=label)
        if panel == "all" and baseline is not None:
            ax.axhline(float(baseline), color="#555555", ls="--", lw=1, label=baseline_label)
        ax.set_title(metric if panel == "all" else panel, fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if k % cols == 0:
            ax.set_ylabel(metric)
        if k // cols == rows - 1:
            ax.set_xlabel("training minutes")
    for k in range(len(panels), rows * cols):
        axes[k // cols][k % cols].axis("off")
    if len(runs) > 4:  # many runs: one legend beside the panels, not over the first one
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    else:
        axes[0][0].legend(fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _finish(fig)


def plot_histograms(
    values: Mapping[str, Any],
    *,
    bins: int = 60,
    title: str = "",
    xlabel: str = "",
    marks: Sequence[float] | None = None,
    marks_label: str = "",
    figsize: tuple[float, float] = (5.2, 3.2),
):
    """Overlaid histograms: ``{name: values}`` (tensors or arrays, flattened), shared bins.

    marks: vertical lines at these x values (e.g. quantisation levels), named ``marks_label``.
    """
    if not values:
        raise ValueError("plot_histograms: nothing to plot")
    arrays = {k: (v.detach().float().cpu().numpy() if hasattr(v, "detach") else np.asarray(v, dtype=float)).ravel()
              for k, v in values.items()}
    lo = min(float(a.min()) for a in arrays.values())
    hi = max(float(a.max()) for a in arrays.values())
    edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    plt = _plt()
    fig, ax = plt.subplots(figsize=figsize)
    for j, (name, a) in enumerate(arrays.items()):
        ax.hist(a, bins=edges, alpha=0.55, color=_SERIES[j % len(_SERIES)], label=name)
    for i, m in enumerate(marks or []):
        ax.axvline(float(m), color="#555555", lw=0.8, ls=":", label=marks_label if i == 0 and marks_label else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _finish(fig)


# ------------------------------------------------------------------------------ tables
class MarkdownTable(str):
    """A str that Jupyter renders as Markdown (and prints as plain Markdown elsewhere)."""

    def _repr_markdown_(self) -> str:
        return str(self)


def md_table(rows: Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]], columns: Sequence[str] | None = None,
             *, floatfmt: str = "{:.3f}", index: str = "") -> MarkdownTable:
    """A list of dicts (one per row), or ``{row_name: {col: value}}``, as a Markdown table."""
    if isinstance(rows, Mapping):
        rows = [{index or " ": k, **dict(v)} for k, v in rows.items()]
    rows = list(rows)
    if columns is None:
        columns = []
        for r in rows:
            columns += [c for c in r if c not in columns]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return floatfmt.format(v)
        return str(v).replace("|", "\\|").replace("\n", " ") if v is not None else ""

    out = ["| " + " | ".join(map(str, columns)) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    out += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return MarkdownTable("\n".join(out))
