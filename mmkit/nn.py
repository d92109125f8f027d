"""Shared building blocks: written once, reused by every bridge.

Everything in mmkit that attends, projects or embeds positions comes from this file:

    Attention      multi-head self- or cross-attention that can return its weights
    MLP            Linear -> activation -> Linear
    RMSNorm        root-mean-square norm (Llama style)
    sincos_2d      MAE-style fixed 2D sin-cos position embedding, (h*w, D)
    resize_pos_embed   bicubic 2D resize of a grid of position embeddings
    Inspectable / inspect   the one hook every bridge uses to show its insides

Shapes: B batch, H heads, Tq query length, Tk key/value length, D model width,
hd = D // H head width.

The inspection hook (see inside a model)
----------------------------------------
A module that mixes in ``Inspectable`` calls ``self.record("gate", value)`` at the
places a teacher wants to show. Outside ``inspect(...)`` this is one attribute check
and nothing is stored. Inside::

    with inspect(model) as seen:
        model(batch)
    seen["bridge.layers.0.xattn.weights"]   # (B, H, Tq, Tk), detached, on CPU

Every ``Attention`` is Inspectable and records its weights (``"<path>.weights"``)
while inspection is on, so attention maps of every bridge come for free.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Inspectable",
    "inspect",
    "Attention",
    "MLP",
    "RMSNorm",
    "ACTIVATIONS",
    "sincos_2d",
    "resize_pos_embed",
    "load_state_dict_strict",
    "WeightsMismatchError",
]


# --------------------------------------------------------------------------------------
# Inspection hook
# --------------------------------------------------------------------------------------
class Inspectable:
    """Mixin for nn.Modules that can show intermediate values to a teacher.

    Call ``self.record(name, tensor)`` anywhere in ``forward``. It costs one attribute
    check unless an ``inspect(...)`` context is active on a parent module, in which
    case a detached CPU copy is stored under ``"<module path>.<name>"``.
    """

    # Class-level defaults: recording is off until inspect() sets instance attributes.
    _inspect_store: dict | None = None
    _inspect_path: str = ""

    @property
    def recording(self) -> bool:
        """True inside an ``inspect(...)`` context (use it to skip costly extras)."""
        return self._inspect_store is not None

    def record(self, name: str, value: Tensor) -> None:
        store = self._inspect_store
        if store is None:  # the fast path: recording is off
            return
        key = f"{self._inspect_path}.{name}" if self._inspect_path else name
        if isinstance(value, Tensor):
            value = value.detach().to("cpu", copy=True)
        if key not in store:
            store[key] = value
        elif isinstance(store[key], list):  # third and later recordings
            store[key].append(value)
        else:  # second recording under the same key (e.g. generation steps) -> a list
            store[key] = [store[key], value]


@contextlib.contextmanager
def inspect(module: nn.Module) -> Iterator[dict]:
    """Record what every ``Inspectable`` submodule of ``module`` shows, while inside.

    Yields a dict ``{"<module path>.<name>": Tensor}``; a key recorded more than once
    (one value per generation step, say) holds a list of tensors in call order.
    Values are detached CPU copies. Nested or repeated ``inspect`` calls are fine: the
    previous state is restored on exit. Paths are relative to ``module`` (the module
    itself, if Inspectable, records under its bare names).
    """
    store: dict = {}
    saved: list[tuple[nn.Module, dict | None, str]] = []
    for path, sub in module.named_modules():
        if isinstance(sub, Inspectable):
            saved.append((sub, sub.__dict__.get("_inspect_store"), sub.__dict__.get("_inspect_path", "")))
            # object.__setattr__ keeps nn.Module's __setattr__ bookkeeping out of it
            object.__setattr__(sub, "_inspect_store", store)
            object.__setattr__(sub, "_inspect_path", path)
    try:
        yield store
    finally:
        for sub, old_store, old_path in saved:
            object.__setattr__(sub, "_inspect_store", old_store)
            object.__setattr__(sub, "_inspect_path", old_path)


# --------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------
class Attention(Inspectable, nn.Module):
    """Multi-head scaled dot-product attention, as self- or cross-attention.

        q = Wq x,  k = Wk c,  v = Wv c     (c = context, or x itself for self-attention)
        weights = softmax(q k^T / sqrt(hd) + mask)          # (B, H, Tq, Tk)
        out = Wo concat_heads(weights v)                     # (B, Tq, D)

    Args:
        dim: query width D (also the output width).
        num_heads: H; ``dim`` must be divisible by it.
        kv_dim: width of the context for cross-attention (default ``dim``).
        qkv_bias / out_bias: biases of the input projections / the output projection.
        dropout: dropout on the attention weights (training only).

    ``forward(x, context=None, mask=None, return_weights=False, is_causal=False, value=None)``:
        x: (B, Tq, D); context: (B, Tk, kv_dim) or None for self-attention.
        value: (B, Tk, kv_dim) input of the value projection when it differs from the
            keys' (Qwen-VL adds positions to the keys but not to the values); default
            ``context``.
        mask: boolean, True = "may attend", or an additive float mask (0 / -inf);
            anything broadcastable to (B, H, Tq, Tk). A key-padding mask (B, Tk) must be
            given as ``mask[:, None, None, :]`` (a 2-D mask means (Tq, Tk), as in torch).
        is_causal: also forbid attending to later positions (bottom-right aligned, so
            it works with Tq < Tk as in cached decoding).
        Returns out (B, Tq, D), or (out, weights (B, H, Tq, Tk)) with return_weights.

    Rows that may attend to nothing (all False, or all -inf) get all-zero weights and
    an all-zero output (also after ``out_proj``, bias included), never NaN. Flamingo
    relies on this: text before the first image must receive nothing from
    cross-attention.

    Two code paths compute the same thing: ``F.scaled_dot_product_attention`` (fast,
    fused) when the weights are not needed, and an explicit softmax when they are
    (``return_weights=True`` or inside ``inspect``, which records ``"weights"``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kv_dim: int | None = None,
        qkv_bias: bool = True,
        out_bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Attention: dim={dim} is not divisible by num_heads={num_heads}.")
        kv_dim = dim if kv_dim is None else kv_dim
        self.dim, self.num_heads, self.kv_dim = dim, num_heads, kv_dim
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(kv_dim, dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim, bias=out_bias)

    def _heads(self, t: Tensor) -> Tensor:
        B, T, _ = t.shape
        return t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        return_weights: bool = False,
        is_causal: bool = False,
        value: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        context = x if context is None else context
        value = context if value is None else value
        B, Tq, _ = x.shape
        Tk = context.shape[1]
        q = self._heads(self.q_proj(x))  # (B, H, Tq, hd)
        k = self._heads(self.k_proj(context))  # (B, H, Tk, hd)
        v = self._heads(self.v_proj(value))  # (B, H, Tk, hd)

        if is_causal:  # query i sees keys j <= i + (Tk - Tq)
            causal = torch.ones(Tq, Tk, dtype=torch.bool, device=x.device).tril(Tk - Tq)
            if mask is None:
                mask = causal
            elif mask.dtype == torch.bool:
                mask = mask & causal
            else:
                mask = mask.masked_fill(~causal, float("-inf"))

        # Rows with nothing to attend to: make them attend everywhere (no NaN from an
        # all -inf softmax), then zero them below. empty: broadcastable to (B, H, Tq, 1)
        empty = None
        if mask is not None:
            if mask.dtype == torch.bool:
                empty = ~mask.any(dim=-1, keepdim=True)
                mask = mask | empty
            else:
                mask = mask.to(q.dtype)
                empty = torch.isneginf(mask).all(dim=-1, keepdim=True)
                mask = mask.masked_fill(empty, 0.0)
            # (no `if empty.any()` shortcut: it would force a GPU->CPU sync every call)

        want_weights = return_weights or self.recording
        drop = self.dropout if self.training else 0.0
        if want_weights:  # explicit path: softmax(q k^T / sqrt(hd) + mask) v
            scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, Tq, Tk)
            if mask is not None:
                if mask.dtype == torch.bool:
                    scores = scores.masked_fill(~mask, float("-inf"))
                else:
                    scores = scores + mask
            weights = scores.float().softmax(dim=-1).to(q.dtype)  # softmax in fp32, as SDPA does
            if empty is not None:
                weights = weights.masked_fill(empty, 0.0)
            out = F.dropout(weights, drop, self.training) @ v  # (B, H, Tq, hd)
            self.record("weights", weights)
        else:  # fused path, same maths
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
            if empty is not None:
                out = out.masked_fill(empty, 0.0)
            weights = None

        out = self.out_proj(out.transpose(1, 2).reshape(B, Tq, self.dim))  # (B, Tq, D)
        if empty is not None:
            # a row is empty for the whole layer when it is empty in every head
            while empty.dim() < 4:
                empty = empty[None]
            out = out.masked_fill(empty.all(dim=1), 0.0)  # (B|1, Tq|1, 1) over (B, Tq, D)
        return (out, weights) if return_weights else out


# --------------------------------------------------------------------------------------
# MLP and norms
# --------------------------------------------------------------------------------------
def _quick_gelu(x: Tensor) -> Tensor:  # OpenAI CLIP's approximation
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,  # exact (erf) GELU, as in LLaVA-1.5's projector and BERT
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # SigLIP, GPT-2
    "quick_gelu": _quick_gelu,  # OpenAI CLIP
    "relu": F.relu,  # Idefics perceiver
    "silu": F.silu,
}


class _Act(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in ACTIVATIONS:
            raise ValueError(f"Unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}.")
        self.name, self.fn = name, ACTIVATIONS[name]

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


class MLP(nn.Module):
    """``fc2(act(fc1(x)))``: (..., dim) -> (..., hidden) -> (..., out or dim).

    ``act`` is a name from ``ACTIVATIONS`` ("gelu" = exact GELU) or an nn.Module.
    """

    def __init__(self, dim: int, hidden: int, out: int | None = None, act: str | nn.Module = "gelu", bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = _Act(act) if isinstance(act, str) else act
        self.fc2 = nn.Linear(hidden, dim if out is None else out, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim (Llama's norm).

    Computed in float32 and cast back, like transformers' LlamaRMSNorm.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# --------------------------------------------------------------------------------------
# Position embeddings on a 2D grid
# --------------------------------------------------------------------------------------
def _sincos_1d(embed_dim: int, pos: Tensor) -> Tensor:
    """(M,) positions -> (M, embed_dim): [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-2k/d)."""
    if embed_dim % 2:
        raise ValueError(f"sincos: embed_dim must be even, got {embed_dim}.")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # (d/2,)
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]  # (M, d/2)
    return torch.cat([out.sin(), out.cos()], dim=1)  # (M, d)


def sincos_2d(embed_dim: int, grid_h: int, grid_w: int | None = None, cls_token: bool = False) -> Tensor:
    """Fixed 2D sin-cos position embedding, exactly MAE's ``get_2d_sincos_pos_embed``.

    Returns a float32 tensor (grid_h * grid_w, embed_dim), rows in row-major token order
    (token t = row * grid_w + col), with one all-zero row prepended if ``cls_token``.

    Which half encodes what (MAE's convention, kept so weights/tests match it): MAE
    builds ``np.meshgrid(grid_w, grid_h)``, so its ``grid[0]`` - which it passes to the
    half it calls ``emb_h`` - is really the *column* (x) index. Hence:

        dims [0, D/2)   encode the column index  (x, along the width)
        dims [D/2, D)   encode the row index     (y, along the height)

    and within each half: first D/4 are sin, last D/4 are cos. Qwen-VL's resampler uses
    this same function (with a non-square ``(grid_h, grid_w)`` allowed).
    """
    grid_w = grid_h if grid_w is None else grid_w
    if embed_dim % 4:
        raise ValueError(f"sincos_2d: embed_dim must be divisible by 4, got {embed_dim}.")
    rows = torch.arange(grid_h, dtype=torch.float64)
    cols = torch.arange(grid_w, dtype=torch.float64)
    row_idx, col_idx = torch.meshgrid(rows, cols, indexing="ij")  # each (grid_h, grid_w)
    emb = torch.cat([_sincos_1d(embed_dim // 2, col_idx), _sincos_1d(embed_dim // 2, row_idx)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()  # (grid_h * grid_w [+1], D)


def _as_grid(g: int | tuple[int, int]) -> tuple[int, int]:
    return (g, g) if isinstance(g, int) else (int(g[0]), int(g[1]))


def resize_pos_embed(
    pos: Tensor,
    old_grid: int | tuple[int, int],
    new_grid: int | tuple[int, int],
    mode: str = "bicubic",
    num_prefix_tokens: int = 0,
    antialias: bool = False,
) -> Tensor:
    """Resize position embeddings laid out on a 2D grid to another grid by interpolation.

    pos: (P + h*w, D) or (1, P + h*w, D), where the first ``num_prefix_tokens`` = P rows
    (CLS, registers) are not spatial and are passed through unchanged. Grids are
    (rows, cols) or an int for square. The spatial part is viewed as an image
    (1, D, h, w), resized with ``F.interpolate(mode, align_corners=False)`` - the same
    recipe as transformers' CLIP ``interpolate_pos_encoding`` and Qwen-VL's
    ``get_abs_pos`` - and flattened back in row-major order. Computed in float32,
    returned in the input dtype and rank. Equal grids return ``pos`` unchanged.
    """
    (oh, ow), (nh, nw) = _as_grid(old_grid), _as_grid(new_grid)
    if (oh, ow) == (nh, nw):
        return pos
    squeeze = pos.dim() == 2
    p = pos[None] if squeeze else pos  # (1, P + h*w, D)
    if p.dim() != 3 or p.shape[0] != 1:
        raise ValueError(f"resize_pos_embed: expected (N, D) or (1, N, D), got {tuple(pos.shape)}.")
    prefix, grid = p[:, :num_prefix_tokens], p[:, num_prefix_tokens:]
    if grid.shape[1] != oh * ow:
        raise ValueError(
            f"resize_pos_embed: {grid.shape[1]} spatial positions do not form the old grid "
            f"{oh}x{ow} (= {oh * ow}); check old_grid and num_prefix_tokens={num_prefix_tokens}."
        )
    D = grid.shape[-1]
    img = grid.float().reshape(1, oh, ow, D).permute(0, 3, 1, 2)  # (1, D, oh, ow)
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    if antialias:
        kw["antialias"] = True
    img = F.interpolate(img, size=(nh, nw), mode=mode, **kw)  # (1, D, nh, nw)
    grid = img.permute(0, 2, 3, 1).reshape(1, nh * nw, D).to(pos.dtype)
    out = torch.cat([prefix, grid], dim=1)
    return out[0] if squeeze else out


# --------------------------------------------------------------------------------------
# Strict weight loading (never "strict=False that silently loaded nothing")
# --------------------------------------------------------------------------------------
class WeightsMismatchError(ValueError):
    """A state dict does not fit a module: names the missing, unexpected and mis-shaped keys."""


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, Tensor], source: str = "state dict") -> None:
    """``module.load_state_dict(state_dict, strict=True)`` with an error a student can act on.

    Checks names *and* shapes before touching any weight and raises
    ``WeightsMismatchError`` listing missing keys (in the module, not in the file),
    unexpected keys (in the file, not in the module) and shape mismatches, naming
    ``source`` (a path, usually) so the message says where the weights came from.
    """
    expected = module.state_dict()
    missing = sorted(k for k in expected if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in expected)
    mismatched = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        lines = [f"Weights from {source} do not fit {type(module).__name__} ({len(expected)} tensors expected, {len(state_dict)} found)."]
        if missing:
            lines.append(f"  missing ({len(missing)}): {_listing(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {_listing(unexpected)}")
        if mismatched:
            lines.append(f"  wrong shape ({len(mismatched)}): {_listing(mismatched, 6)}")
        lines.append("  Fix: load weights saved from the same architecture and config (check config.json next to the weights).")
        raise WeightsMismatchError("\n".join(lines))
    module.load_state_dict(state_dict, strict=True)
