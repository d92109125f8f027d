"""Token budget calculators: published examples and parity with transformers' processors."""
from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest

from mmkit.viz import tokens as T

SIZES = [(1024, 768), (768, 1024), (336, 336), (448, 448), (640, 480), (1000, 200), (200, 1000), (2048, 1536),
         (3000, 1000), (50, 60), (1920, 1080), (4000, 3000)]


def test_gpt4v_published_examples():
    assert T.gpt4v_tokens(1024, 1024) == 765  # 768x768 -> 4 tiles
    assert T.gpt4v_tokens(2048, 4096) == 1105  # 1024x2048 -> 768x1536 -> 6 tiles
    assert T.gpt4v_tokens(4096, 8192, "low") == 85
    assert T.gpt4v_tokens(1024, 768) == 765  # shortest side already 768: 2 x 2 tiles
    assert T.gpt4v_tokens(300, 200) == 255  # small images are not scaled up: one tile
    with pytest.raises(ValueError, match="detail"):
        T.gpt4v_tokens(10, 10, "auto")


@pytest.mark.parametrize("w, h", SIZES)
def test_llava_next_matches_transformers(w, h):
    from transformers.models.llava_next.image_processing_llava_next import LlavaNextImageProcessor
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    ip = LlavaNextImageProcessor()  # llava-v1.6 pinpoints, 336 crops
    assert [tuple(p) for p in ip.image_grid_pinpoints] == list(T.LLAVA_NEXT_PINPOINTS)
    proc = SimpleNamespace(image_processor=ip, patch_size=14, num_additional_image_tokens=1)
    proc._get_unpadded_features = functools.partial(LlavaNextProcessor._get_unpadded_features, proc)
    # transformers counts the CLS (+1) then drops it with vision_feature_select_strategy="default"
    want = LlavaNextProcessor._get_number_of_features(proc, h, w, 336, 336) - 1
    assert T.llava_next_tokens(w, h) == want


@functools.lru_cache(maxsize=1)
def _fuyu_processor():
    """transformers' FuyuProcessor, with a word-level tokenizer that knows Fuyu's two image tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.fuyu.image_processing_fuyu import FuyuImageProcessor
    from transformers.models.fuyu.processing_fuyu import FuyuProcessor

    vocab = {"<unk>": 0, "<s>": 1, "|ENDOFTEXT|": 2, "|SPEAKER|": 3, "|NEWLINE|": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                  eos_token="|ENDOFTEXT|", pad_token="|ENDOFTEXT|")
    tok.add_special_tokens({"additional_special_tokens": ["|SPEAKER|", "|NEWLINE|"]})
    return FuyuProcessor(image_processor=FuyuImageProcessor(), tokenizer=tok)


@pytest.mark.parametrize("w, h", SIZES)
def test_fuyu_matches_transformers(w, h):
    from PIL import Image

    # The text transformers puts in place of the image: a row of patch tokens and a newline
    # token per row of patches. (Its _get_num_multimodal_tokens counted those newlines up to
    # 5.24 and leaves them out from 5.25; the sequence the LM reads has them either way.)
    proc = _fuyu_processor()
    _, (text,) = proc._process_images([Image.new("RGB", (w, h))])
    want = text.count(proc.image_token) + text.count(proc.image_newline_token)
    assert T.fuyu_tokens(w, h) == want


def test_eve_qwen_llava_and_bridges():
    assert T.eve_tokens(672, 672) == 1 + 24 * 25  # 672 / 28 = 24 rows, 24 patches + <SPL> each
    assert T.eve_tokens(1344, 672) == 1 + 12 * 25  # longer side scaled down to 672
    assert T.llava_tokens(1024, 768) == 576 and T.qwen_vl_tokens(1024, 768) == 258
    # the mmkit bridges answer through their own num_tokens
    assert T.bridge_tokens("mlp", 448, 448) == 32 * 32
    assert T.bridge_tokens("pixel_shuffle", 448, 448, scale_factor=2) == 16 * 16
    assert T.bridge_tokens("qwen_vl", 4000, 3000, num_queries=256) == 256
    assert T.bridge_tokens("mlp", 1024, 768, max_size=448) == (448 // 14) * (336 // 14)
    assert T.image_tokens("mmkit mlp", 1024, 768) == 32 * 24


def test_table_plot_and_errors():
    rows = T.token_table([(1024, 768)])
    assert rows[0]["image"] == "1024x768" and rows[0]["GPT-4o (high)"] == 765 and rows[0]["Qwen-VL"] == 258
    assert set(T.SCHEMES) <= set(rows[0])
    fig = T.plot_token_budgets(sides=(224, 448, 1024))
    ax = fig.axes[0]
    assert len(ax.lines) == len(T.SCHEMES) and ax.get_yscale() == "log"
    with pytest.raises(ValueError, match="unknown scheme"):
        T.image_tokens("GPT-5", 10, 10)
