"""Tests for mmkit.vision: TinyViT, the three VisionEncoder backends, preprocess.

Everything is random-init and saved to tmp_path: nothing touches the network.
"""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mmkit import nn as mnn
from mmkit.vision import (
    OPENAI_CLIP_MEAN,
    TinyViT,
    VisionEncoder,
    ViTConfig,
    load_vision_encoder,
)

SMALL = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_heads=4)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def tiny() -> VisionEncoder:
    torch.manual_seed(0)
    return load_vision_encoder(config=ViTConfig())  # the default 64x64 / patch 8 / 4 layers


# ---------------------------------------------------------------- TinyViT
@pytest.mark.parametrize("size,grid", [((64, 64), (8, 8)), ((128, 128), (16, 16)), ((96, 64), (12, 8))])
def test_tinyvit_hidden_state_shapes(tiny, size, grid):
    out = tiny(torch.randn(2, 3, *size))
    L, D = tiny.num_layers, tiny.hidden_size
    assert len(out.hidden_states) == L + 1 == 5
    for h in out.hidden_states:
        assert h.shape == (2, 1 + grid[0] * grid[1], D)
    assert out.grid == grid == tiny.grid(size)
    assert out.last_hidden_state.shape == out.hidden_states[-1].shape
    torch.testing.assert_close(out.last_hidden_state, tiny.model.norm(out.hidden_states[-1]))
    torch.testing.assert_close(out.pooled, out.last_hidden_state[:, 0])
    assert out.num_prefix_tokens == 1


def test_tinyvit_pos_embed_resize_is_used(tiny):
    model = tiny.model
    pe = model.position_embedding((12, 8))
    assert pe.shape == (1, 1 + 96, model.config.hidden_size)
    torch.testing.assert_close(pe[:, 0], model.pos_embed[:, 0])  # CLS position untouched
    assert model.position_embedding((8, 8)) is model.pos_embed
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model(torch.randn(1, 3, 60, 64))


def test_features_layer_and_cls(tiny):
    x = torch.randn(2, 3, 64, 64)
    hs = tiny(x).hidden_states
    torch.testing.assert_close(tiny.features(x), hs[-2][:, 1:])  # default: penultimate, CLS dropped
    assert tiny.features(x).shape == (2, 64, 128) == (2, tiny.num_tokens(), tiny.hidden_size)
    torch.testing.assert_close(tiny.features(x, layer=-1), hs[4][:, 1:])
    torch.testing.assert_close(tiny.features(x, layer=0, drop_cls=False), hs[0])
    assert tiny.features(x, drop_cls=False).shape == (2, 65, 128)
    with pytest.raises(IndexError, match="5 hidden states"):
        tiny.features(x, layer=5)


def test_tinyvit_save_load_roundtrip(tmp_path, tiny):
    d = tiny.save_pretrained(tmp_path / "vit")
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((d / "config.json").read_text())["model_type"] == "mmkit-tinyvit"
    back = TinyViT.from_pretrained(d)
    assert back.config == tiny.model.config
    for k, v in tiny.model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    enc = load_vision_encoder(str(d))  # a local dir with a TinyViT config -> tiny backend
    assert enc.backend == "tiny"
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(enc.features(x), tiny.features(x))


def test_default_tiny_from_assets_dir(tmp_path, monkeypatch, tiny):
    monkeypatch.setenv("MMKIT_ASSETS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="mmkit zoo build"):
        load_vision_encoder("tiny")
    tiny.save_pretrained(tmp_path / "tiny" / "vision")
    enc = load_vision_encoder("tiny", image_size=96)
    assert enc.name == "tiny" and enc.image_size == (96, 96) and enc.grid() == (12, 12)
    assert load_vision_encoder("tiny", pretrained=False).model.config == tiny.model.config


def test_strict_loading_error(tmp_path, tiny):
    from safetensors.torch import load_file, save_file

    d = tiny.save_pretrained(tmp_path / "vit")
    sd = load_file(str(d / "model.safetensors"))
    sd.pop("blocks.0.attn.q_proj.weight")
    sd["blocks.9.mlp.fc1.weight"] = torch.zeros(2, 2)
    sd["pos_embed"] = torch.zeros(1, 17, 128)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(mnn.WeightsMismatchError) as e:
        TinyViT.from_pretrained(d)
    msg = str(e.value)
    assert "blocks.0.attn.q_proj.weight" in msg and "blocks.9.mlp.fc1.weight" in msg and "pos_embed" in msg
    assert "model.safetensors" in msg
    with pytest.raises(FileNotFoundError, match="config.json"):
        TinyViT.from_pretrained(tmp_path / "nowhere")


def test_vit_config_dict_roundtrip():
    cfg = ViTConfig(image_size=(96, 64), image_mean=(0.1, 0.2, 0.3))
    d = json.loads(json.dumps(cfg.to_dict()))
    assert ViTConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        ViTConfig.from_dict({**d, "hiden_size": 3})
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViTConfig(image_size=60)


def test_unknown_name_lists_accepted_forms():
    with pytest.raises(ValueError) as e:
        load_vision_encoder("clip-vit-base")
    msg = str(e.value)
    assert '"tiny"' in msg and "timm:NAME" in msg and "hf:NAME_OR_PATH" in msg and "hf:openai/" in msg
    with pytest.raises(ValueError, match="random-init"):
        load_vision_encoder(config=ViTConfig(), pretrained=True)


def test_inspect_tiny_attention(tiny):
    with mnn.inspect(tiny) as seen:
        tiny(torch.randn(1, 3, 64, 64))
    assert sorted(seen) == [f"model.blocks.{i}.attn.weights" for i in range(4)]
    assert seen["model.blocks.0.attn.weights"].shape == (1, 4, 65, 65)


def test_dtype_cast(tiny):
    enc = load_vision_encoder(config=ViTConfig(**SMALL), dtype=torch.bfloat16)
    f = enc.features(torch.randn(1, 3, 32, 32))  # float32 input is cast by forward
    assert f.dtype == torch.bfloat16 and f.shape == (1, 16, 32)


# ---------------------------------------------------------------- timm backend
def test_timm_backend_random_init(tmp_path):
    pytest.importorskip("timm")
    enc = load_vision_encoder("timm:vit_tiny_patch16_224", pretrained=False, image_size=32, timm_kwargs={"depth": 2})
    assert (enc.backend, enc.hidden_size, enc.patch_size, enc.num_layers, enc.num_prefix_tokens) == ("timm", 192, 16, 2, 1)
    assert enc.image_size == (32, 32) and enc.grid() == (2, 2)
    x = torch.randn(2, 3, 32, 32)
    out = enc(x)
    assert len(out.hidden_states) == 3 and all(h.shape == (2, 5, 192) for h in out.hidden_states)
    m = enc.model
    torch.testing.assert_close(out.last_hidden_state, m.forward_features(x))
    ref = m.forward_intermediates(x, indices=[0], norm=False, output_fmt="NLC", intermediates_only=True)[0]
    torch.testing.assert_close(enc.features(x), ref)  # block 1 output == layer -2 with depth 2, no prefix
    assert out.pooled.shape == (2, 192)
    # registers count as prefix tokens and are dropped with CLS
    reg = load_vision_encoder("timm:vit_tiny_patch16_224", pretrained=False, image_size=32, timm_kwargs={"depth": 2, "reg_tokens": 2})
    assert reg.num_prefix_tokens == 3 and reg.features(x).shape == (2, 4, 192)
    with pytest.raises(ValueError, match="image_size"):
        enc(torch.randn(1, 3, 48, 48))
    # save with timm's hub layout, load back from the directory
    d = enc.save_pretrained(tmp_path / "timm_vit")
    back = load_vision_encoder(str(d))
    assert back.backend == "timm"
    torch.testing.assert_close(back.features(x), enc.features(x), atol=0, rtol=0)


# ---------------------------------------------------------------- transformers backend
HF_KW = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)


def test_hf_clip_vision_by_path(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    ref = CLIPVisionModel(CLIPVisionConfig(**HF_KW)).eval()
    ref.save_pretrained(tmp_path / "clip")
    x = torch.randn(2, 3, 32, 32)
    want = ref(pixel_values=x, output_hidden_states=True)
    for name in (f"hf:{tmp_path / 'clip'}", str(tmp_path / "clip")):
        enc = load_vision_encoder(name)
        assert enc.backend == "hf" and enc.num_prefix_tokens == 1 and enc.num_layers == 3
        assert enc.image_mean == OPENAI_CLIP_MEAN
        assert torch.equal(enc.features(x), want.hidden_states[-2][:, 1:])
        out = enc(x)
        assert len(out.hidden_states) == 4 and out.grid == (4, 4)
        assert torch.equal(out.pooled, want.pooler_output)
    # another size: position embeddings are interpolated by transformers
    assert enc(torch.randn(1, 3, 48, 32)).hidden_states[-1].shape == (1, 1 + 6 * 4, 32)


def test_hf_siglip_vision_by_path(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    ref = SiglipVisionModel(SiglipVisionConfig(**HF_KW)).eval()
    ref.save_pretrained(tmp_path / "siglip")
    enc = load_vision_encoder(f"hf:{tmp_path / 'siglip'}")
    assert enc.num_prefix_tokens == 0 and enc.image_mean == (0.5, 0.5, 0.5)
    x = torch.randn(2, 3, 32, 32)
    want = ref(pixel_values=x, output_hidden_states=True)
    assert torch.equal(enc.features(x), want.hidden_states[-2])  # no CLS to drop
    assert enc.features(x).shape == (2, 16, 32)


def test_hf_full_clip_checkpoint_loads_vision_tower_only(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)
    full = CLIPModel(CLIPConfig(vision_config=HF_KW, text_config=text)).eval()
    full.save_pretrained(tmp_path / "full")
    enc = load_vision_encoder(str(tmp_path / "full"))
    assert type(enc.model).__name__ == "CLIPVisionModel"
    x = torch.randn(1, 3, 32, 32)
    want = full.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert torch.equal(enc.features(x), want)


def test_hf_missing_weights_raise(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(**HF_KW)).save_pretrained(tmp_path / "clip")
    f = tmp_path / "clip" / "model.safetensors"
    sd = load_file(str(f))
    sd = {k: v for k, v in sd.items() if "layers.0.mlp" not in k}
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(mnn.WeightsMismatchError, match="layers.0.mlp"):
        load_vision_encoder(str(tmp_path / "clip"))


def test_hf_random_init_from_config():
    from transformers import SiglipVisionConfig

    enc = load_vision_encoder("hf", config=SiglipVisionConfig(**HF_KW))
    assert enc.backend == "hf" and enc.num_prefix_tokens == 0
    assert enc.features(torch.randn(1, 3, 32, 32)).shape == (1, 16, 32)


# ---------------------------------------------------------------- preprocess
def _enc(mean=(0.25, 0.5, 0.75), std=(0.5, 0.25, 0.5)):
    return load_vision_encoder(config=ViTConfig(**{**SMALL, "image_mean": mean, "image_std": std}))


def test_preprocess_normalisation_and_shapes():
    enc = _enc()
    mean = torch.tensor(enc.image_mean).view(3, 1, 1)
    std = torch.tensor(enc.image_std).view(3, 1, 1)
    white = Image.new("RGB", (50, 50), (255, 255, 255))
    px = enc.preprocess([white, white], mode="resize")
    assert px.shape == (2, 3, 32, 32) and px.dtype == torch.float32
    torch.testing.assert_close(px[0], ((1 - mean) / std).expand(3, 32, 32))
    assert enc.preprocess(white, size=(96, 64)).shape == (1, 3, 96, 64)
    assert enc.preprocess(white, size=48).shape == (1, 3, 48, 48)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        enc.preprocess(white, size=30)
    with pytest.raises(ValueError, match="mode"):
        enc.preprocess(white, mode="crop")
    with pytest.raises(TypeError, match="PIL"):
        enc.preprocess([torch.zeros(3, 8, 8)])


def test_preprocess_pad_letterboxes_with_mean_colour():
    enc = _enc()
    red = Image.new("RGB", (64, 32), (255, 0, 0))  # wide: padded top and bottom
    pad = enc.preprocess([red], mode="pad")[0]
    res = enc.preprocess([red], mode="resize")[0]
    # mean colour is 8-bit rounded, so padding normalises to ~0
    assert pad[:, :6].abs().max() < 0.02 and pad[:, -6:].abs().max() < 0.02
    red_px = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(enc.image_mean)) / torch.tensor(enc.image_std)
    torch.testing.assert_close(pad[:, 16, 16], red_px, atol=1e-6, rtol=0)
    torch.testing.assert_close(res, red_px.view(3, 1, 1).expand(3, 32, 32), atol=1e-6, rtol=0)
    tall = Image.new("RGB", (20, 40), (255, 0, 0))  # tall: padded left and right
    pad_t = enc.preprocess(tall)[0]
    assert pad_t[:, :, :6].abs().max() < 0.02 and torch.allclose(pad_t[:, 16, 16], red_px, atol=1e-6)
    # non-square target: letterbox to its aspect ratio (a 2:3 image into 96x64 needs no padding)
    img = Image.new("RGB", (40, 60), (255, 0, 0))
    torch.testing.assert_close(enc.preprocess(img, size=(96, 64))[0], red_px.view(3, 1, 1).expand(3, 96, 64), atol=1e-6, rtol=0)


def test_preprocess_grayscale_and_rgba():
    enc = _enc(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    gray = Image.new("L", (40, 40), 255)
    g = enc.preprocess(gray)[0]
    assert g.shape == (3, 32, 32)
    torch.testing.assert_close(g, torch.ones(3, 32, 32))
    clear = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent -> mean colour
    assert enc.preprocess(clear)[0].abs().max() < 0.01
    opaque = Image.new("RGBA", (40, 40), (255, 0, 0, 255))
    torch.testing.assert_close(enc.preprocess(opaque)[0][:, 5, 5], torch.tensor([1.0, -1.0, -1.0]))
    la = Image.new("LA", (40, 40), (0, 255))
    torch.testing.assert_close(enc.preprocess(la)[0], -torch.ones(3, 32, 32))


def test_preprocess_rescales_16_bit_images_like_load_image():
    """One RGB conversion for preprocess and load_image: 16-bit gray is rescaled, not clipped to white."""
    import numpy as np

    from mmkit.data.images import load_image

    enc = _enc(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    img = Image.fromarray(np.full((32, 32), 32896, dtype=np.uint16))  # mode "I;16", half of 65535
    px = enc.preprocess(img, mode="resize")[0]
    torch.testing.assert_close(px, torch.full((3, 32, 32), 128 / 255 * 2 - 1))
    torch.testing.assert_close(px, enc.preprocess(load_image(img), mode="resize")[0])


def test_letterbox_is_public_and_pads_centred():
    from mmkit.vision import letterbox

    img = Image.new("RGB", (40, 20), (255, 0, 0))
    out = letterbox(img, 1.0, (1, 2, 3))
    assert out.size == (40, 40) and out.getpixel((0, 0)) == (1, 2, 3) and out.getpixel((20, 20)) == (255, 0, 0)
    assert letterbox(img, 2.0, (1, 2, 3)) is img  # already the right aspect ratio


def test_preprocess_then_features_end_to_end():
    enc = _enc()
    imgs = [Image.new("RGB", (70, 30), (10, 200, 30)), Image.new("L", (30, 70), 128)]
    assert enc.features(enc.preprocess(imgs)).shape == (2, 16, 32)


def test_transformers_config_without_prefix_goes_to_hf():
    from transformers import CLIPVisionConfig

    enc = load_vision_encoder(config=CLIPVisionConfig(**HF_KW))
    assert enc.backend == "hf" and enc.num_prefix_tokens == 1
    with pytest.raises(TypeError, match="ViTConfig or a transformers config"):
        load_vision_encoder(config={"hidden_size": 3})
