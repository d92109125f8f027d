"""Exercises of notebook 07 (QLoRA): LoRA's parameter count, its forward pass, NF4 storage.

    from mmkit.exercises import check, solution
    check("lora_param_count", lora_param_count)
    check("lora_forward", lora_forward)
    check("nf4_bytes", nf4_bytes)
"""
from __future__ import annotations

from typing import Callable

import torch

from mmkit.exercises.core import Exercise, _call, _guard, _say, register

_COUNT = '''\
def lora_param_count(d_in, d_out, r):
    """Trainable weights LoRA of rank r adds to one Linear(d_in, d_out): A is (r, d_in), B is (d_out, r)."""
    return r * (d_in + d_out)
'''

_FORWARD = '''\
def lora_forward(x, W, A, B, alpha, r):
    """x: (..., d_in); W: (d_out, d_in) frozen; A: (r, d_in); B: (d_out, r).
    y = x W^T + (alpha / r) x A^T B^T   (B starts at zero, so training starts from the base model)."""
    return x @ W.T + (alpha / r) * (x @ A.T) @ B.T
'''

_BYTES = '''\
def nf4_bytes(n_params, blocksize=64, double_quant=True):
    """Bytes to store n_params weights in NF4: 4-bit codes plus the per-block scales.
    Without double quantisation: one fp32 scale per block. With it: 8-bit scales, plus one
    fp32 scale per 256 scales."""
    bits = 4 * n_params
    n_blocks = n_params / blocksize
    if double_quant:
        bits += 8 * n_blocks + 32 * n_blocks / 256
    else:
        bits += 32 * n_blocks
    return bits / 8
'''


@_guard
def check_lora_param_count(fn: Callable) -> bool:
    """Checks ``lora_param_count(d_in, d_out, r)`` on square, wide and real-size layers, and
    against the adapters peft builds."""
    cases = [(192, 192, 8, "the tiny LM's q_proj"), (192, 512, 4, "the tiny LM's up_proj"),
             (960, 2560, 16, "SmolLM2-360M's up_proj"), (4096, 4096, 64, "a 7B model's q_proj")]
    for d_in, d_out, r, what in cases:
        want = r * (d_in + d_out)
        got = _call(fn, d_in, d_out, r, what=f"({d_in}, {d_out}, {r})")
        if int(got) == want:
            continue
        if int(got) == d_in * d_out:
            hint = "that is the frozen weight W itself; LoRA trains two thin matrices instead"
        elif int(got) == r * d_in * d_out:
            hint = "A and B are (r x d_in) and (d_out x r): add their sizes, do not multiply"
        elif int(got) in (r * d_in, r * d_out):
            hint = "count both matrices: A (r x d_in) and B (d_out x r)"
        else:
            hint = "A is (r x d_in), B is (d_out x r)"
        return _say(False, f"{what}: lora_param_count({d_in}, {d_out}, {r}) = {got}, expected {want}: {hint}.")
    from peft import LoraConfig, get_peft_model

    net = torch.nn.Sequential()
    net.add_module("proj", torch.nn.Linear(48, 80))
    peft_net = get_peft_model(net, LoraConfig(r=6, target_modules=["proj"]))
    n = sum(p.numel() for p in peft_net.parameters() if p.requires_grad)
    got = int(_call(fn, 48, 80, 6))
    if got != n:
        return _say(False, f"peft's LoRA on Linear(48, 80) with r=6 trains {n} weights; you say {got}.")
    return _say(True, f"{len(cases)} layers right, and peft agrees ({n} weights for Linear(48, 80), r=6).")


@_guard
def check_lora_forward(fn: Callable) -> bool:
    """Checks ``lora_forward(x, W, A, B, alpha, r)`` against peft's LoRA Linear."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    d_in, d_out, r, alpha = 12, 10, 4, 8
    net = torch.nn.Sequential()
    net.add_module("proj", torch.nn.Linear(d_in, d_out, bias=False))
    peft_net = get_peft_model(net, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"]))
    layer = peft_net.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # B = 0 at init: make the update visible
    W = layer.base_layer.weight.detach()
    A = layer.lora_A["default"].weight.detach()
    B = layer.lora_B["default"].weight.detach()
    x = torch.randn(3, 5, d_in)
    with torch.no_grad():
        want = peft_net(x)
    got = _call(fn, x, W, A, B, alpha, r)
    if not torch.is_tensor(got) or got.shape != want.shape:
        return _say(False, f"expected a tensor of shape {tuple(want.shape)}, got "
                           f"{tuple(got.shape) if torch.is_tensor(got) else type(got).__name__}.")
    if torch.allclose(got, want, atol=1e-5):
        zero = _call(fn, x, W, A, torch.zeros_like(B), alpha, r)
        if not torch.allclose(zero, x @ W.T, atol=1e-5):
            return _say(False, "with B = 0 the output must be exactly the base layer's x W^T.")
        return _say(True, "same output as peft's LoRA Linear (and B = 0 gives back the frozen layer).")
    base = x @ W.T
    if torch.allclose(got, base, atol=1e-5):
        return _say(False, "you returned x W^T alone: add the low-rank update (alpha / r) x A^T B^T.")
    if torch.allclose(got, base + (x @ A.T) @ B.T, atol=1e-5):
        return _say(False, f"the update is scaled by alpha / r = {alpha}/{r}: multiply it in.")
    if torch.allclose(got, base + (r / alpha) * (x @ A.T) @ B.T, atol=1e-5):
        return _say(False, "the scale is alpha / r, not r / alpha.")
    return _say(False, f"max difference to peft's output is {float((got - want).abs().max()):.3g}; "
                       "y = x W^T + (alpha / r) * (x A^T) B^T.")


@_guard
def check_nf4_bytes(fn: Callable) -> bool:
    """Checks ``nf4_bytes(n_params, blocksize, double_quant)`` against QLoRA's arithmetic
    and against the bytes bitsandbytes really stores."""
    from mmkit.quant import bits_per_param

    for n, bs, dq in [(360_000_000, 64, True), (360_000_000, 64, False), (7_000_000_000, 64, True),
                      (1_000_000, 128, False)]:
        want = n * bits_per_param(bs, dq) / 8
        got = float(_call(fn, n, bs, dq, what=f"({n}, {bs}, {dq})"))
        if abs(got - want) <= 1e-6 * want:
            continue
        if abs(got - n / 2) < 1e-6 * n:
            hint = "4 bits per weight is right for the codes, but each block also stores its scale"
        elif abs(got - n * 4) < 1e-6 * n or abs(got - n * 4 / 8 * 8) < 1e-6 * n:
            hint = "bits, not bytes? divide by 8"
        else:
            hint = ("per block of `blocksize` weights: one fp32 scale; with double_quant, 8-bit scales plus "
                    "one fp32 scale per 256 scales")
        return _say(False, f"nf4_bytes({n:,}, {bs}, {dq}) = {got:,.0f}, expected {want:,.0f}: {hint}.")
    # the codes bitsandbytes packs: two weights per byte
    import bitsandbytes.functional as F

    w = torch.randn(256, 64)
    q, _ = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    codes = q.numel() * q.element_size()
    if codes != w.numel() // 2:
        return _say(False, f"unexpected: bitsandbytes stored {codes} bytes of codes")  # pragma: no cover
    return _say(True, f"QLoRA's arithmetic ({bits_per_param(64, True):.3f} bits/weight with double quantisation); "
                      f"bitsandbytes packs the codes two per byte ({codes} bytes for {w.numel()} weights).")


register(Exercise("lora_param_count", "07_qlora",
                  "lora_param_count(d_in, d_out, r) -> trainable weights LoRA adds to one Linear", check_lora_param_count),
         _COUNT)
register(Exercise("lora_forward", "07_qlora",
                  "lora_forward(x, W, A, B, alpha, r) -> the LoRA layer's output", check_lora_forward), _FORWARD)
register(Exercise("nf4_bytes", "07_qlora",
                  "nf4_bytes(n_params, blocksize, double_quant) -> storage of NF4 weights", check_nf4_bytes), _BYTES)


# ---------------------------------------------------------------- build-up: a LoRA linear layer
_LORA_LINEAR = '''\
from torch import nn

class LoRALinear(nn.Module):
    """LoRA (Hu et al. 2021) around a frozen linear layer W0:
        h = W0 x + (alpha / r) * B A x,    A (r, in) small random, B (out, r) zeros
    Only A and B train; B = 0 makes the layer exactly W0 at step 0."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)                                     # W0 stays frozen
        self.lora_A = nn.Linear(base.in_features, r, bias=False)        # (r, in), random (Kaiming)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)       # (out, r)
        nn.init.zeros_(self.lora_B.weight)                              # B = 0: no change at start
        self.scaling = alpha / r

    def forward(self, x):
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(x))
'''


@_guard
def check_LoRALinear(cls: Callable) -> bool:
    """cls(base: nn.Linear, r, alpha) -> module; checked at step 0 (the base layer, only A and B
    trainable), then with peft's LoRA weights copied in (A, and B set non-zero) against peft's
    ``LoraLayer`` on the same base layer."""
    import warnings

    from torch import nn

    torch.manual_seed(0)
    IN, OUT, R, ALPHA = 10, 6, 2, 8
    base = nn.Linear(IN, OUT)
    x = torch.randn(3, IN)
    mod = _call(cls, base, R, ALPHA, what=f"(nn.Linear({IN}, {OUT}), r={R}, alpha={ALPHA})")
    if not isinstance(mod, nn.Module):
        return _say(False, f"LoRALinear(...) built a {type(mod).__name__}; write an nn.Module subclass.")
    for part, shape in (("lora_A", (R, IN)), ("lora_B", (OUT, R))):
        layer = getattr(mod, part, None)
        if not isinstance(layer, nn.Linear) or tuple(layer.weight.shape) != shape:
            return _say(False, f"self.{part} should be an nn.Linear without bias with weight {shape} "
                               f"({'in -> r' if part == 'lora_A' else 'r -> out'}).")
    trainable = sorted(n for n, p in mod.named_parameters() if p.requires_grad)
    if trainable != ["lora_A.weight", "lora_B.weight"]:
        return _say(False, f"trainable parameters are {trainable}; only lora_A.weight and lora_B.weight "
                           "should train: freeze the base layer (requires_grad_(False)).")
    with torch.no_grad():
        out0 = _call(mod, x, what=" on a (3, 10) input")
        if not torch.allclose(out0, base(x), atol=1e-6):
            return _say(False, "at step 0 the layer must equal the base layer: initialise lora_B to zeros "
                               "(A random, B zero, so B A = 0).")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from peft import LoraConfig, get_peft_model
    holder = nn.Sequential()
    holder.add_module("proj", nn.Linear(IN, OUT))
    holder.proj.load_state_dict(base.state_dict())
    peft_model = get_peft_model(holder, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], lora_dropout=0.0))
    layer = peft_model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        mod.lora_A.weight.copy_(layer.lora_A["default"].weight)
        mod.lora_B.weight.copy_(layer.lora_B["default"].weight)
        want = peft_model(x)
        got = _call(mod, x, what=" on a (3, 10) input")
        if not torch.allclose(got, want, atol=1e-5):
            delta = layer.lora_B["default"](layer.lora_A["default"](x))
            if torch.allclose(got, base(x) + ALPHA * delta, atol=1e-5):
                return _say(False, f"the update is scaled by alpha = {ALPHA}; LoRA scales it by alpha / r = "
                                   f"{ALPHA / R:g}, so changing r does not change the update's size.")
            if torch.allclose(got, base(x) + delta, atol=1e-5):
                return _say(False, f"the update B A x is not scaled; multiply it by alpha / r = {ALPHA / R:g}.")
            return _say(False, "with peft's A and B copied in, your output differs from peft's LoRA layer: "
                               "h = W0 x + (alpha / r) * B (A x).")
    return _say(True, "frozen base, B = 0 at the start, and the same output as peft's LoRA layer.")


register(Exercise("LoRALinear", "07_qlora",
                  "class LoRALinear(nn.Module): W0 x + (alpha / r) B A x, W0 frozen, B = 0 at the start",
                  check_LoRALinear), _LORA_LINEAR)
