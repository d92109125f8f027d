"""``mmkit bench memory``: what fine-tuning a real-size VLM costs, per method and length.

Qwen-VL's fine-tuning guide reports, for one A100-80G (batch 1, gradient accumulation
8, one image), GPU memory and seconds per iteration at sequence lengths 384 to 2048 for
LoRA and Q-LoRA (its "Profiling of Memory and Speed"). This bench redoes that table for a pair a
student can afford, built from its *configs* with random weights (nothing downloads;
memory and speed do not depend on the values of the weights):

    vision  SigLIP-B/16-224 tower  (SiglipVisionConfig defaults: 768 wide, 12 layers, 196 patches)
    bridge  LLaVA-1.5 MLP          (768 -> 960 -> 960)
    LM      SmolLM2-360M-sized Llama (960 wide, 32 layers, 15 heads / 5 KV heads, 49,152 vocab)

and three ways to train the LM side (the vision tower is frozen, the bridge trained):

    full    every LM weight trained, fp32 master weights (bf16 autocast on a GPU), AdamW
    lora    LM weights frozen in bf16, LoRA r=16 on every projection
    qlora   LM weights frozen in 4-bit NF4 (double quantisation), LoRA r=16 on top

Each configuration runs in a fresh subprocess, so one's peak does not hide the next's.
On a GPU the figure is ``torch.cuda.max_memory_allocated`` (weights + gradients +
optimizer state + activations); on a CPU it is the process's peak resident memory,
which also counts the Python / torch runtime (reported separately as ``base_gb``).
``size="tiny"`` runs the same code on toy configs (the tests use it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["METHODS", "SIZES", "bench_parts", "measure", "memory_table", "format_table"]

METHODS = ("full", "lora", "qlora")
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}

# name -> (SigLIP vision config kwargs, Llama LM config kwargs, image size)
SIZES: dict[str, tuple[dict, dict, int]] = {
    "real": (
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
             image_size=224, patch_size=16),
        dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
             num_key_value_heads=5, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
             rms_norm_eps=1e-5, tie_word_embeddings=True),
        224,
    ),
    "tiny": (
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             image_size=32, patch_size=8),
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=4096, max_position_embeddings=4096, tie_word_embeddings=True),
        32,
    ),
}


def _cache_root() -> Path:
    return Path(os.environ.get("MMKIT_CACHE", Path.home() / ".cache" / "mmkit")) / "bench"


def bench_parts(size: str = "real", root: str | Path | None = None) -> tuple[Path, Path]:
    """Random-init vision tower and LM of the given size, saved once as model folders.

    Returns (vision_dir, lm_dir); ``recipe.vision`` / ``recipe.lm`` take them like any
    local model. The LM gets the tiny world's tokenizer (the vocabulary size of the
    embedding matrix is the real one; which ids the text uses does not change the cost).
    """
    from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    vision_kw, lm_kw, _ = SIZES[size]
    root = Path(root) if root is not None else _cache_root() / size
    vdir, ldir = root / "vision", root / "lm"
    if not (vdir / "config.json").is_file():
        torch.manual_seed(0)
        SiglipVisionModel(SiglipVisionConfig(**vision_kw)).save_pretrained(str(vdir))
    if not (ldir / "config.json").is_file():
        from mmkit.language import load_language_model

        torch.manual_seed(0)
        _, tokenizer = load_language_model("tiny")
        cfg = LlamaConfig(**lm_kw, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
        LlamaForCausalLM(cfg).save_pretrained(str(ldir))
        tokenizer.save_pretrained(str(ldir))
    return vdir, ldir


def _recipe(method: str, vdir: Path, ldir: Path, image_size: int, seq_len: int, batch: int,
            grad_accum: int, steps: int, gradient_checkpointing: bool):
    from mmkit.recipes import Recipe, Stage

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return Recipe(
        name=f"bench-{method}",
        vision=str(vdir), lm=str(ldir), bridge="mlp", image_size=image_size, image_mode="resize",
        max_length=seq_len + 8,
        quantization="4bit" if method == "qlora" else None,
        lm_dtype="bfloat16" if method == "lora" else None,
        lora=dict(LORA) if method != "full" else None,
        gradient_checkpointing=gradient_checkpointing,
        stages=[Stage("bench", train=["bridge", "lm"] if method == "full" else ["bridge", "lora"],
                      steps=steps, batch_size=batch, grad_accum=grad_accum, warmup_steps=0)],
    )


def _rss_gb() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kb / (1024 ** 3 if sys.platform == "darwin" else 1024 ** 2)


def measure(method: str, seq_len: int, *, size: str = "real", batch: int = 1, grad_accum: int = 8,
            steps: int = 3, gradient_checkpointing: bool = True, device: str | None = None,
            parts_root: str | Path | None = None) -> dict[str, Any]:
    """Train ``steps`` optimizer steps of one configuration; peak memory and s/iteration.

    One sequence = one image (its bridge tokens) + random text up to ``seq_len`` tokens,
    loss on the text. The first step warms up (allocator, kernels) and is not timed.
    """
    from mmkit.train import Trainer, set_trainable
    from mmkit.vlm import build_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = torch.device(device).type == "cuda"
    base_gb = _rss_gb()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    vdir, ldir = bench_parts(size, parts_root)
    image_size = SIZES[size][2]
    recipe = _recipe(method, vdir, ldir, image_size, seq_len, batch, grad_accum, steps, gradient_checkpointing)
    recipe.mixed_precision = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "no"
    model = build_model(recipe)
    stage = recipe.stages[0]
    names = set_trainable(model, stage.train)
    trainable = sum(p.numel() for n, p in model.named_parameters() if n in set(names))
    total = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, recipe, tmp, progress=False)
        acc = trainer.accelerator
        model.to(acc.device)
        optimizer = trainer._optimizer(stage)
        model.train()

        T_img = model.num_image_tokens()
        if seq_len <= T_img:
            raise ValueError(f"seq_len {seq_len} leaves no room for text after {T_img} image tokens")
        g = torch.Generator().manual_seed(0)
        vocab = len(model.tokenizer)
        text = torch.randint(10, vocab, (batch, seq_len - T_img), generator=g)
        text[text == model.image_token_id] = 10
        input_ids = torch.cat([torch.full((batch, T_img), model.image_token_id), text], dim=1).to(acc.device)
        labels = input_ids.clone()
        labels[:, :T_img] = -100
        attention_mask = torch.ones_like(input_ids)
        dtype = next(model.vision.parameters()).dtype
        pixel_values = torch.randn(batch, 3, image_size, image_size, generator=g).to(acc.device, dtype)

        times = []
        for step in range(steps):
            if on_gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(grad_accum):
                with acc.autocast():
                    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                                pixel_values=pixel_values)
                acc.backward(out["loss"] / grad_accum)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if on_gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    timed = times[1:] or times
    res = {
        "method": method, "seq_len": seq_len, "size": size, "batch": batch, "grad_accum": grad_accum,
        "gradient_checkpointing": gradient_checkpointing, "device": device,
        "trainable_params": trainable, "total_params": total, "image_tokens": T_img,
        "s_per_iter": sum(timed) / len(timed), "loss": float(out["loss"].detach()),
    }
    if on_gpu:
        res["peak_gb"] = torch.cuda.max_memory_allocated() / 1024 ** 3
        res["gpu"] = torch.cuda.get_device_name()
        res["memory"] = "torch.cuda.max_memory_allocated"
    else:
        res["peak_gb"] = _rss_gb()
        res["base_gb"] = base_gb
        res["memory"] = "peak RSS of the process (CPU)"
    return res


def memory_table(methods: Sequence[str] = METHODS, seq_lens: Sequence[int] = (384, 512, 1024, 2048), *,
                 isolate: bool = True, progress: bool = True, **kwargs: Any) -> list[dict[str, Any]]:
    """``measure`` every (method, seq_len); each in its own subprocess when ``isolate``.

    A configuration that fails (out of memory, say) becomes a row with ``error``.
    """
    rows = []
    for method in methods:
        for seq_len in seq_lens:
            if progress:
                print(f"  {method:>6} @ {seq_len:>5} tokens ...", file=sys.stderr, flush=True)
            if not isolate:
                rows.append(measure(method, seq_len, **kwargs))
                continue
            spec = json.dumps({"method": method, "seq_len": seq_len, **kwargs}, default=str)
            proc = subprocess.run([sys.executable, "-m", "mmkit.bench", spec], capture_output=True, text=True)
            last = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
            if proc.returncode == 0 and last:
                rows.append(json.loads(last[0]))
            else:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                rows.append({"method": method, "seq_len": seq_len, "error": err[:300]})
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per method, one column per sequence length, "GB / s" cells."""
    seqs = sorted({r["seq_len"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| method | trainable params | " + " | ".join(f"{s} tokens" for s in seqs) + " |",
             "|---|---:|" + "---:|" * len(seqs)]
    for m in methods:
        cells, trainable = [], ""
        for s in seqs:
            r = next((r for r in rows if r["method"] == m and r["seq_len"] == s), None)
            if r is None:
                cells.append("")
            elif "error" in r:
                cells.append("failed: " + r["error"][:60])
            else:
                cells.append(f"{r['peak_gb']:.2f} GB / {r['s_per_iter']:.2f} s")
                trainable = f"{r['trainable_params'] / 1e6:.1f}M"
        lines.append(f"| {m} | {trainable} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # one configuration, JSON on the last line (used by memory_table)
    spec = json.loads(sys.argv[1])
    print(json.dumps(measure(spec.pop("method"), spec.pop("seq_len"), **spec)))
