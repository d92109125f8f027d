"""Every figure helper returns a matplotlib Figure on tiny inputs, headless, and draws
what it is given (the patch grid, the token boxes, ...)."""
from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from mmkit import viz  # noqa: E402


def test_show_samples(world):
    recs = [world.sample("train", i, t) for i, t in enumerate(["vqa", "caption", "multi", "interleaved", "ground"])]
    assert isinstance(viz.show_samples(recs, ncols=3), Figure)
    fig = viz.show_samples(recs[:2], predictions=[recs[0]["conversations"][1]["value"], "nope"], title="t")
    assert isinstance(fig, Figure)
    with pytest.raises(ValueError):
        viz.show_samples(recs[:2], predictions=["x"])


def _patch_grid(fig):
    """(image array, title, {patch number: its (x, y) centre}, #vertical, #horizontal grid lines)."""
    (ax,) = fig.axes
    (im,) = ax.images
    numbers = {int(t.get_text()): t.get_position() for t in ax.texts}
    vertical = sum(1 for ln in ax.lines if len(set(ln.get_xdata())) == 1)
    return np.asarray(im.get_array()), ax.get_title(), numbers, vertical, len(ax.lines) - vertical


def test_show_patch_grid(world):
    img = world.sample("train", 0)["image"]  # 64 x 64 px
    fig = viz.show_patch_grid(img, 8)
    assert isinstance(fig, Figure)
    a, title, numbers, nv, nh = _patch_grid(fig)
    assert a.shape == (64, 64, 3) and np.allclose(a, np.asarray(img, dtype=np.float32) / 255)
    assert title == "64x64 px, 8x8 patches: 8x8 = 64 tokens (+1 CLS)"
    assert (nv, nh) == (9, 9)  # the 8 x 8 grid's borders
    assert sorted(numbers) == list(range(64))  # one number per patch, in token order (row-major):
    assert tuple(numbers[1]) == (12, 4) and tuple(numbers[8]) == (4, 12) and tuple(numbers[63]) == (60, 60)
    # resized first, as the encoder would
    a, title, numbers, nv, nh = _patch_grid(viz.show_patch_grid(img, 16, size=128))
    assert a.shape == (128, 128, 3) and title.startswith("128x128 px, 16x16 patches: 8x8 = 64 tokens")
    assert tuple(numbers[9]) == (24, 24)
    # a normalised (3, H, W) tensor: rescaled to [0, 1] for display, W x H in the title
    x = torch.randn(3, 32, 48)
    a, title, numbers, nv, nh = _patch_grid(viz.show_patch_grid(x, 8, cls_token=False))
    assert a.shape == (32, 48, 3) and a.min() == 0 and a.max() == 1
    assert np.allclose(a, ((x - x.min()) / (x.max() - x.min())).permute(1, 2, 0).numpy(), atol=1e-6)
    assert title == "48x32 px, 8x8 patches: 4x6 = 24 tokens"
    assert (nv, nh) == (7, 5) and sorted(numbers) == list(range(24)) and tuple(numbers[7]) == (12, 12)
    # pixels that do not fill a patch are named; many patches: no numbers
    fig = viz.show_patch_grid(torch.rand(3, 36, 48), 8)
    assert "4 rows / 0 cols of pixels do not fill a patch" in fig.axes[0].get_xlabel()
    assert not viz.show_patch_grid(img, 4).axes[0].texts  # 16 x 16 = 256 patches


def test_matrices(world):
    m = np.random.rand(4, 5)
    assert isinstance(viz.plot_matrix(m, list("abcd"), list("vwxyz"), "m", highlight=[(0, 0)]), Figure)
    assert isinstance(viz.plot_matrix(torch.ones(3, 3, dtype=torch.bool).tril()), Figure)
    ims = [world.sample("train", i)["image"] for i in range(3)]
    assert isinstance(viz.plot_similarity(torch.randn(3, 3), ["a red circle.", "b", "c"], images=ims), Figure)
    assert isinstance(viz.plot_similarity(np.eye(3), ["a", "b", "c"]), Figure)
    with pytest.raises(ValueError):
        viz.plot_matrix(np.zeros(3))


class _Tok:
    """Just enough tokenizer for plot_label_mask."""

    vocab = {"<image>": 4, "<|pad|>": 3}
    pad_token_id = 3

    def convert_tokens_to_ids(self, t):
        return self.vocab[t]

    def decode(self, ids, **kw):
        return {1: "<|im_start|>", 2: "<|im_end|>", 3: "<|pad|>", 4: "<image>", 10: "user", 11: "\n",
                12: " red", 13: "assistant"}[ids[0]]


def _boxes(fig):
    """[(text, colour name)] of the token boxes, in reading order, and the legend's entries."""
    from matplotlib.colors import to_hex

    (ax,) = fig.axes
    name = {v: k for k, v in viz.COLORS.items() if k in ("trained", "ignored", "image", "pad", "wrong")}
    boxes = [(t.get_text(), name[to_hex(p.get_facecolor())]) for t, p in zip(ax.texts, ax.patches)]
    assert len(ax.texts) == len(ax.patches)
    return boxes, [t.get_text() for t in ax.get_legend().get_texts()]


def test_plot_label_mask():
    from mmkit.data.processor import Encoded

    ids = [1, 10, 11, 4, 4, 4, 11, 12, 2, 11, 1, 13, 11, 12, 2, 11]
    labels = [-100] * 13 + [12, 2, 11]
    fig = viz.plot_label_mask(_Tok(), Encoded(ids, labels), title="mask")
    assert isinstance(fig, Figure) and fig.axes[0].get_title() == "mask"
    boxes, legend = _boxes(fig)
    prompt = [("<|im_start|>", "ignored"), ("user", "ignored"), ("↵", "ignored"), ("<image> ×3", "image"),
              ("↵", "ignored"), ("·red", "ignored"), ("<|im_end|>", "ignored"), ("↵", "ignored"),
              ("<|im_start|>", "ignored"), ("assistant", "ignored"), ("↵", "ignored")]
    assert boxes == prompt + [("·red", "trained"), ("<|im_end|>", "trained"), ("↵", "trained")]
    assert legend == ["trained (3)", "ignored = -100 (10)", "image tokens (3)"]
    # a padded batch row: the padding (attention_mask 0) is dropped, the same boxes remain
    batch = {"input_ids": torch.tensor([ids + [3, 3]]), "labels": torch.tensor([labels + [-100, -100]]),
             "attention_mask": torch.tensor([[1] * 16 + [0, 0]])}
    assert _boxes(viz.plot_label_mask(_Tok(), batch)) == (boxes, legend)
    bad = list(labels)
    bad[13] = 2  # a shifted label is drawn, not hidden
    boxes, legend = _boxes(viz.plot_label_mask(_Tok(), Encoded(ids, bad)))
    assert boxes == prompt + [("·red", "wrong"), ("<|im_end|>", "trained"), ("↵", "trained")]
    assert legend == ["trained (2)", "ignored = -100 (10)", "image tokens (3)", "label != token (1)"]


def test_curves_bars_training_table(tmp_path):
    hist = [{"stage": "align", "global_step": 1, "loss": 3.0}, {"stage": "align", "global_step": 2, "loss": 2.5},
            {"stage": "instruct", "global_step": 3, "loss": 2.0}]
    assert isinstance(viz.plot_training(hist), Figure)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hist))
    assert isinstance(viz.plot_training(tmp_path), Figure)
    assert isinstance(viz.plot_training(tmp_path / "metrics.jsonl", logy=True), Figure)
    assert isinstance(viz.plot_bars({"a": 0.5, "b": 0.7}, baseline=0.25), Figure)
    assert isinstance(viz.plot_bars({"img": {"color": 0.9, "shape": 0.8}, "blind": {"color": 0.2}},
                                    baseline={"color": 0.125}), Figure)
    assert isinstance(viz.plot_curves({"color": {0: 0.5, 1: 0.9}, "shape": [0.3, 0.6]}, baseline=0.2), Figure)
    assert isinstance(viz.plot_curves({"x": {"emb": 0.1, "L1": 0.2}}, baseline={"x": 0.1}), Figure)
    t = viz.md_table([{"model": "llava", "acc": 0.5}, {"model": "blind", "acc": 0.25, "n": 3}])
    assert t.startswith("| model | acc | n |") and "0.500" in t and t._repr_markdown_() == str(t)
    assert "| r |" in viz.md_table({"r": {"a": 1}}, index="name")


def test_heatmap_overlay_marks_the_hot_patch():
    from PIL import Image

    from mmkit.viz import heatmap_array, heatmap_image, show_heatmaps

    img = Image.new("RGB", (64, 32), (128, 128, 128))
    m = np.zeros((2, 4))
    m[1, 3] = 1.0  # bottom-right patch
    a = heatmap_array(img, m, alpha=1.0, cmap="gray")
    assert a.shape == (32, 64, 3)
    assert a[24, 56].mean() > 0.99 and a[4, 4].mean() < 0.01  # only that patch lights up
    assert heatmap_image(img, m.reshape(-1), grid=(2, 4)).size[0] >= 256
    with pytest.raises(ValueError, match="does not fill"):
        heatmap_array(img, np.zeros(7), grid=(2, 4))
    fig = show_heatmaps(img, {"a": m, "b": 1 - m})
    assert len([ax for ax in fig.axes if ax.images]) == 2
