"""QLoRA's arithmetic, made visible: NF4 levels, quantisation error, bits and bytes, LoRA sizes.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", Sec. 3)
stores the frozen LM in **4-bit NormalFloat (NF4)** and trains **LoRA** adapters (Hu et
al. 2021) in 16/32 bit on top:

    y = x W_nf4^T  +  (alpha / r) * x A^T B^T        W: (out, in) frozen, 4 bits/weight
                                                     A: (r, in), B: (out, r) trained

* NF4: weights are cut into blocks of 64; each block is scaled by its absolute maximum
  to [-1, 1] and every value is replaced by the nearest of 16 levels placed at the
  quantiles of a standard normal (trained weights are roughly normal, so each level is
  used about equally often). Storage: 4 bits + one fp32 scale per 64 weights
  (0.5 bit/weight).
* Double quantisation: the fp32 scales are themselves quantised to 8 bits in blocks of
  256 (one fp32 scale per 256 scales): 8/64 + 32/(64*256) = 0.127 bit/weight instead
  of 0.5.
* The matmul de-quantises each block to the compute dtype (bf16 on a GPU) on the fly:
  4-bit is a *storage* format, the arithmetic is 16-bit.

The quantisation itself is bitsandbytes' (``bitsandbytes.functional.quantize_4bit``);
this module only measures it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["nf4_levels", "quantize_roundtrip", "bits_per_param", "weight_memory_gb", "lora_params",
           "nf4_unavailable_reason"]


def nf4_unavailable_reason(device: str = "cpu") -> str | None:
    """None if bitsandbytes' NF4 round trip works on ``device``; else why not.

    bitsandbytes has CPU kernels in recent versions; older builds (or odd machines) do
    not. ``mmkit env`` and the tests ask this before using 4-bit models.
    """
    try:
        import bitsandbytes.functional as F

        w = torch.randn(64, 64, device=device)
        q, state = F.quantize_4bit(w, quant_type="nf4")
        if (F.dequantize_4bit(q, state) - w).abs().mean() > 0.2:
            return f"bitsandbytes' 4-bit round trip on {device} is inaccurate"
    except Exception as e:  # noqa: BLE001 - any failure means "not usable here"
        return f"bitsandbytes 4-bit does not work on {device} here: {type(e).__name__}: {e}"
    return None


def nf4_levels() -> Tensor:
    """The 16 NF4 code values in [-1, 1] (bitsandbytes' table)."""
    import bitsandbytes.functional as F

    return F.get_4bit_type("nf4", device="cpu").float()


def quantize_roundtrip(w: Tensor, quant_type: str = "nf4", blocksize: int = 64,
                       double_quant: bool = True) -> tuple[Tensor, dict[str, Any]]:
    """Quantise ``w`` to 4 bits and back; returns (w_hat, error statistics).

    quant_type: "nf4" (QLoRA) or "fp4" (a 4-bit float with evenly spread exponents).
    """
    import bitsandbytes.functional as F

    w32 = w.detach().float().cpu().contiguous()
    q, state = F.quantize_4bit(w32, blocksize=blocksize, quant_type=quant_type,
                               compress_statistics=double_quant)
    w_hat = F.dequantize_4bit(q, state).reshape(w32.shape)
    err = w_hat - w32
    stats = {
        "quant_type": quant_type, "blocksize": blocksize, "double_quant": double_quant,
        "mean_abs_error": float(err.abs().mean()),
        "relative_error": float(err.norm() / w32.norm()),  # ||W - W_hat|| / ||W||
        "bits_per_param": bits_per_param(blocksize, double_quant),
        "stored_bytes": q.numel() * q.element_size(),  # the packed 4-bit codes alone
    }
    return w_hat, stats


def bits_per_param(blocksize: int = 64, double_quant: bool = True, blocksize2: int = 256,
                   bits: int = 4) -> float:
    """Storage per weight: the code plus its share of the block scales (QLoRA Sec. 3)."""
    if double_quant:  # 8-bit scales, plus one fp32 scale per `blocksize2` of them
        return bits + 8 / blocksize + 32 / (blocksize * blocksize2)
    return bits + 32 / blocksize


def weight_memory_gb(n_params: int, blocksize: int = 64) -> dict[str, float]:
    """Memory of ``n_params`` weights in each format (GB = 1e9 bytes)."""
    return {
        "fp32": n_params * 4 / 1e9,
        "bf16": n_params * 2 / 1e9,
        "int8": n_params * 1 / 1e9,
        "nf4": n_params * bits_per_param(blocksize, False) / 8 / 1e9,
        "nf4 + double quant": n_params * bits_per_param(blocksize, True) / 8 / 1e9,
    }


def lora_params(model: nn.Module, r: int, target_modules: list[str] | None = None) -> dict[str, int]:
    """How many weights LoRA of rank ``r`` trains on ``model``: r * (in + out) per target.

    Counts without building the adapters; ``target_modules`` defaults to
    ``mmkit.language.find_lora_targets(model)``.
    """
    from mmkit.language import find_lora_targets

    targets = set(target_modules or find_lora_targets(model))
    lora = base = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            lora += r * (m.in_features + m.out_features)
            base += m.in_features * m.out_features
    total = sum(p.numel() for p in model.parameters())
    return {"lora": lora, "adapted_weights": base, "model": total}
