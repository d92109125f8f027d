"""Tests for mmkit.nn: attention paths agree, masks, sin-cos embeddings, resizing, inspect()."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mmkit import nn as mnn


# ---------------------------------------------------------------- Attention
def _attn(dim=32, heads=4, kv_dim=None, seed=0):
    torch.manual_seed(seed)
    return mnn.Attention(dim, heads, kv_dim=kv_dim).eval()


@pytest.mark.parametrize("kind", ["none", "bool", "float", "causal", "bool+causal"])
@pytest.mark.parametrize("cross", [False, True])
def test_attention_sdpa_equals_explicit(kind, cross):
    attn = _attn(kv_dim=24 if cross else None)
    B, Tq = 2, 5
    x = torch.randn(B, Tq, 32)
    ctx = torch.randn(B, 7, 24) if cross else None
    Tk = 7 if cross else Tq
    mask, causal = None, False
    if kind in ("bool", "bool+causal"):
        mask = torch.rand(B, 1, Tq, Tk) > 0.3
        mask[..., 0] = True  # keep every row non-empty here (empty rows: next test)
    elif kind == "float":
        mask = torch.randn(B, 4, Tq, Tk)
    if "causal" in kind:
        causal = True
    fast = attn(x, ctx, mask=mask, is_causal=causal)
    slow, w = attn(x, ctx, mask=mask, return_weights=True, is_causal=causal)
    assert fast.shape == (B, Tq, 32) and w.shape == (B, 4, Tq, Tk)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.sum(-1), torch.ones(B, 4, Tq))
    if causal and not cross:
        assert torch.all(w.triu(1) == 0)


def test_attention_matches_manual_formula():
    attn = _attn()
    x = torch.randn(1, 3, 32)
    q = attn.q_proj(x).view(1, 3, 4, 8).transpose(1, 2)
    k = attn.k_proj(x).view(1, 3, 4, 8).transpose(1, 2)
    v = attn.v_proj(x).view(1, 3, 4, 8).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1)
    ref = attn.out_proj((w @ v).transpose(1, 2).reshape(1, 3, 32))
    torch.testing.assert_close(attn(x), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_give_zeros_not_nan(kind):
    attn = _attn(kv_dim=16)
    x, ctx = torch.randn(2, 4, 32, requires_grad=True), torch.randn(2, 6, 16)
    allowed = torch.ones(2, 1, 4, 6, dtype=torch.bool)
    allowed[0, :, 0] = False  # query 0 of sample 0 sees nothing (text before any image)
    allowed[1, :, 2] = False
    mask = allowed if kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    fast = attn(x, ctx, mask=mask)
    slow, w = attn(x, ctx, mask=mask, return_weights=True)
    for out in (fast, slow):
        assert torch.isfinite(out).all()
        assert torch.all(out[0, 0] == 0) and torch.all(out[1, 2] == 0)  # bias included
        assert out[0, 1].abs().sum() > 0
    assert torch.all(w[0, :, 0] == 0) and torch.all(w[1, :, 2] == 0)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    fast.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_row_empty_in_one_head_only_is_not_zeroed():
    attn = _attn()
    x = torch.randn(1, 3, 32)
    mask = torch.ones(1, 4, 3, 3, dtype=torch.bool)
    mask[0, 1, 0] = False  # head 1 of query 0 sees nothing; other heads still do
    out, w = attn(x, mask=mask, return_weights=True)
    assert torch.all(w[0, 1, 0] == 0) and w[0, 0, 0].sum() > 0.99
    assert out[0, 0].abs().sum() > 0
    torch.testing.assert_close(attn(x, mask=mask), out, atol=1e-5, rtol=1e-5)


def test_attention_bad_dims():
    with pytest.raises(ValueError, match="divisible"):
        mnn.Attention(30, 4)


# ---------------------------------------------------------------- MLP / RMSNorm
def test_mlp_and_activations():
    mlp = mnn.MLP(8, 16, out=4, act="gelu")
    assert mlp(torch.randn(2, 3, 8)).shape == (2, 3, 4)
    x = torch.randn(10)
    torch.testing.assert_close(mnn.ACTIVATIONS["gelu"](x), 0.5 * x * (1 + torch.erf(x / math.sqrt(2))))
    assert mnn.MLP(8, 16, act=nn.ReLU())(torch.randn(1, 8)).shape == (1, 8)
    with pytest.raises(ValueError, match="Unknown activation"):
        mnn.MLP(8, 16, act="swish-ish")


def test_rmsnorm_matches_llama():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    ours, ref = mnn.RMSNorm(16, eps=1e-5), LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(ours(x), ref(x))
    xb = x.bfloat16()
    assert ours.to(torch.bfloat16)(xb).dtype == torch.bfloat16


# ---------------------------------------------------------------- sin-cos 2D
def _mae_1d(embed_dim, pos):  # MAE util/pos_embed.py, verbatim in numpy
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    pos = pos.reshape(-1)
    out = np.einsum("m,d->md", pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _mae_2d(embed_dim, grid_h, grid_w, cls_token=False):  # MAE, generalised to h != w (as Qwen-VL does)
    gh = np.arange(grid_h, dtype=np.float32)
    gw = np.arange(grid_w, dtype=np.float32)
    grid = np.meshgrid(gw, gh)  # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_h, grid_w])
    emb_h = _mae_1d(embed_dim // 2, grid[0])
    emb_w = _mae_1d(embed_dim // 2, grid[1])
    emb = np.concatenate([emb_h, emb_w], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


@pytest.mark.parametrize("D,h,w,cls", [(64, 4, 4, False), (32, 3, 5, False), (16, 2, 2, True), (256, 16, 16, False)])
def test_sincos_2d_matches_mae(D, h, w, cls):
    ours = mnn.sincos_2d(D, h, w, cls_token=cls)
    assert ours.shape == (h * w + cls, D) and ours.dtype == torch.float32
    ref = torch.from_numpy(_mae_2d(D, h, w, cls)).float()
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_sincos_2d_halves_encode_columns_then_rows():
    h, w, D = 3, 5, 32
    emb = mnn.sincos_2d(D, h, w).view(h, w, D)
    first, second = emb[..., : D // 2], emb[..., D // 2 :]
    assert torch.allclose(first[0], first[2])  # first half: same for every row -> column code
    assert torch.allclose(second[:, 0], second[:, 4])  # second half: same for every column -> row code
    assert mnn.sincos_2d(D, 4).shape == (16, D)  # square default


# ---------------------------------------------------------------- resize_pos_embed
def test_resize_pos_embed():
    pos = torch.randn(1, 1 + 16, 8)
    assert mnn.resize_pos_embed(pos, (4, 4), 4) is pos  # identity when grids equal
    out = mnn.resize_pos_embed(pos, 4, (6, 2), num_prefix_tokens=1)
    assert out.shape == (1, 1 + 12, 8)
    torch.testing.assert_close(out[:, :1], pos[:, :1])  # CLS passes through
    p2 = torch.randn(16, 8)
    assert mnn.resize_pos_embed(p2, 4, 8).shape == (64, 8)
    const = torch.ones(9, 4) * 3.0
    torch.testing.assert_close(mnn.resize_pos_embed(const, 3, (5, 7), mode="bilinear"), torch.full((35, 4), 3.0))
    # up then sampling back at the original centres is close for a smooth field
    smooth = mnn.sincos_2d(8, 4, 4) * 0.1
    assert mnn.resize_pos_embed(smooth, 4, 8).shape == (64, 8)
    with pytest.raises(ValueError, match="old grid"):
        mnn.resize_pos_embed(torch.randn(10, 4), 3, 4)


# ---------------------------------------------------------------- inspect()
class _Gate(mnn.Inspectable, nn.Module):
    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        self.record("gate", torch.tanh(self.alpha))
        return x * torch.tanh(self.alpha)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = _Gate()
        self.layers = nn.ModuleList([mnn.Attention(8, 2)])

    def forward(self, x):
        return self.layers[0](self.gate(x))


def test_inspect_records_only_inside():
    net = _Net()
    x = torch.randn(2, 3, 8)
    net(x)
    assert net.gate._inspect_store is None
    with mnn.inspect(net) as seen:
        assert seen == {}
        net(x)
    assert set(seen) == {"gate.gate", "layers.0.weights"}
    assert seen["layers.0.weights"].shape == (2, 2, 3, 3) and not seen["layers.0.weights"].requires_grad
    assert seen["gate.gate"].device.type == "cpu"
    torch.testing.assert_close(seen["layers.0.weights"].sum(-1), torch.ones(2, 2, 3))
    net(x)  # after the context: nothing more is recorded
    assert isinstance(seen["gate.gate"], torch.Tensor)
    assert net.gate._inspect_store is None and not net.layers[0].recording


def test_inspect_lists_repeated_records_and_restores_on_error():
    net = _Net()
    with mnn.inspect(net.gate) as seen:  # the module itself records under bare names
        for _ in range(3):
            net.gate(torch.ones(1))
    assert isinstance(seen["gate"], list) and len(seen["gate"]) == 3
    with pytest.raises(RuntimeError):
        with mnn.inspect(net):
            raise RuntimeError("boom")
    assert net.gate._inspect_store is None


def test_inspect_does_not_change_outputs():
    net = _Net().eval()
    x = torch.randn(2, 3, 8)
    with mnn.inspect(net):
        inside = net(x)
    torch.testing.assert_close(net(x), inside, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- strict loading
def test_load_state_dict_strict_names_keys():
    mlp = mnn.MLP(4, 8)
    sd = mlp.state_dict()
    sd.pop("fc1.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["fc2.weight"] = torch.zeros(3, 3)
    with pytest.raises(mnn.WeightsMismatchError) as e:
        mnn.load_state_dict_strict(mlp, sd, source="somewhere.safetensors")
    msg = str(e.value)
    assert "fc1.bias" in msg and "extra.weight" in msg and "fc2.weight" in msg and "somewhere.safetensors" in msg
    mnn.load_state_dict_strict(mlp, mnn.MLP(4, 8).state_dict())
