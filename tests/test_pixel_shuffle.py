"""Pixel shuffle (Idefics3Connector): parity with transformers, token counts, clear errors."""
from __future__ import annotations

import pytest
import torch

from mmkit.convert import from_hf, load_hf

from mmkit.bridges import build_bridge
from mmkit.bridges.pixel_shuffle import PixelShuffleError, PixelShuffleProjector, check_grid, pixel_shuffle


def _hf_connector(vision_dim=32, lm_dim=48, scale=2):
    from transformers import Idefics3Config
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    cfg = Idefics3Config(vision_config={"hidden_size": vision_dim, "num_hidden_layers": 1, "num_attention_heads": 2,
                                        "intermediate_size": 64},
                         text_config={"model_type": "llama", "hidden_size": lm_dim, "num_hidden_layers": 1,
                                      "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 100},
                         scale_factor=scale)
    torch.manual_seed(0)
    return Idefics3Connector(cfg).eval()


@pytest.mark.parametrize("scale, side", [(2, 8), (3, 9), (4, 16)])
def test_parity_with_idefics3_connector(scale, side):
    hf = _hf_connector(scale=scale)
    ours = from_hf(hf).eval()
    x = torch.randn(3, side * side, 32)
    with torch.no_grad():
        want = hf(x)
        got = ours(x, (side, side))
    assert got.shape == want.shape == (3, (side // scale) ** 2, 48)
    assert (got - want).abs().max().item() <= 1e-5
    # the shuffle alone, too (the projection cannot hide a wrong channel order)
    assert torch.equal(pixel_shuffle(x, (side, side), scale), hf.pixel_shuffle(x, scale))


def test_load_hf_state_dict_from_a_whole_checkpoint_and_strictness():
    hf = _hf_connector()
    bridge = PixelShuffleProjector(32, 48, scale_factor=2)
    w = hf.modality_projection.proj.weight
    load_hf(bridge, {"model.connector.modality_projection.proj.weight": w, "model.other.weight": w})
    assert torch.equal(bridge.modality_projection.proj.weight, w)
    from mmkit.nn import WeightsMismatchError

    with pytest.raises(WeightsMismatchError, match="wrong shape"):
        load_hf(PixelShuffleProjector(32, 48, scale_factor=3), hf.state_dict())


def test_block_layout_by_hand():
    # a 4x4 grid of scalars 0..15, s=2: token (0, 0) holds patches (0,0) (0,1) (1,0) (1,1)
    x = torch.arange(16.0).view(1, 16, 1)
    out = pixel_shuffle(x, (4, 4), 2)
    assert out.shape == (1, 4, 4)
    assert out[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    # non-square grids work too (Idefics3's own code assumes square)
    y = pixel_shuffle(torch.arange(8.0).view(1, 8, 1), (2, 4), 2)
    assert y[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_token_count_and_registry():
    bridge = build_bridge("pixel_shuffle", 128, 192, scale_factor=2)
    assert bridge.num_tokens((8, 8)) == 16 and bridge.num_tokens((16, 16)) == 64
    assert bridge(torch.randn(2, 256, 128), (16, 16)).shape == (2, 64, 192)


def test_clear_errors():
    with pytest.raises(PixelShuffleError, match=r"7x7 patch grid cannot be cut into 2x2.*image size whose grid is 8x8"):
        check_grid((7, 7), 2)
    with pytest.raises(PixelShuffleError, match="CLS"):
        pixel_shuffle(torch.randn(1, 65, 4), (8, 8), 2)
    bridge = build_bridge("pixel_shuffle", 16, 16, scale_factor=3)
    with pytest.raises(PixelShuffleError, match="cannot be cut into 3x3"):
        bridge.num_tokens((8, 8))  # the processor asks this before any compute
    with pytest.raises(PixelShuffleError, match="scale_factor"):
        PixelShuffleProjector(16, 16, scale_factor=0)
