"""``mmkit bench memory``, ``speed`` and ``families``: what training costs, and what it buys.

``speed`` times each from-scratch bridge against its transformers class, and the
llava-tiny training step. ``families`` (the bake-off) trains every family on the same data
for the same compute and scores them the same way. ``resolution`` (``resolution_bench``):
what more pixels buy for reading small text, and what they cost: the tiny LLaVA at 64 px,
at 128 px with pixel shuffle, and with AnyRes tiles, on the same scenes. ``memory``: what
fine-tuning a real-size VLM costs, per method and length.

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

__all__ = ["METHODS", "SIZES", "bench_parts", "measure", "memory_table", "format_table", "SPEED_SIZES",
           "bridge_speed", "train_step_speed", "format_speed", "BAKEOFF", "stage_costs", "bake_off",
           "format_bake_off", "load_bake_off", "BAKEOFF_FILE", "RESOLUTION_VARIANTS", "resolution_recipe",
           "resolution_bench", "format_resolution"]

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



# ------------------------------------------------------------------------- speed
# ``mmkit bench speed``: is each from-scratch bridge as fast as transformers' own class?
# Each pair is built from one config, the weights copied across (``mmkit.convert.from_hf``),
# so both compute the same numbers; the bench times forward + backward of each on the same
# inputs, alternating, and reports the median. Then the llava-tiny training step, end to end.
SPEED_SIZES = {  # name -> per-pair sizes. "real": the papers' sizes; "tiny": seconds, for tests
    "real": dict(batch=8, qformer=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                        intermediate_size=3072, encoder_hidden_size=1408, queries=32, patches=257),
                 perceiver=dict(dim=1024, depth=6, heads=16, head_dim=64, latents=64, patches=257),
                 xattn=dict(hidden_size=960, heads=15, intermediate_size=2560, media_dim=768, tokens=256, latents=64),
                 projector=dict(vision=1024, lm=4096, patches=576),
                 connector=dict(vision=768, lm=960, scale=4, side=32)),
    "tiny": dict(batch=2, qformer=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, encoder_hidden_size=24, queries=4, patches=9),
                 perceiver=dict(dim=32, depth=1, heads=2, head_dim=16, latents=4, patches=9),
                 xattn=dict(hidden_size=32, heads=2, intermediate_size=64, media_dim=24, tokens=6, latents=4),
                 projector=dict(vision=24, lm=32, patches=9),
                 connector=dict(vision=24, lm=32, scale=2, side=4)),
}


def _speed_pairs(size: str):
    """(name, reference class, ours, run_ref(), run_ours()) at one size, weights shared."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel, IdeficsConfig, LlavaConfig
    from transformers.models.idefics.modeling_idefics import IdeficsGatedCrossAttentionLayer
    from transformers.models.idefics.perceiver import IdeficsPerceiverResampler
    from transformers.models.idefics3.configuration_idefics3 import Idefics3Config
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from mmkit.bridges.flamingo import media_mask
    from mmkit.convert import from_hf

    z, B = SPEED_SIZES[size], SPEED_SIZES[size]["batch"]
    torch.manual_seed(0)
    # BLIP-2's Q-Former: the queries read the ViT's patches (query-only, as in generation)
    c = dict(z["qformer"])
    Q, P = c.pop("queries"), c.pop("patches")
    hf = Blip2QFormerModel(Blip2QFormerConfig(**c)).train()
    ours = from_hf(hf).train()
    q, img = torch.randn(B, Q, c["hidden_size"]), torch.randn(B, P, c["encoder_hidden_size"])
    yield ("Q-Former", "Blip2QFormerModel", hf, ours,
           lambda: hf(query_embeds=q, encoder_hidden_states=img).last_hidden_state, lambda: ours(q, None, None, img))
    # Flamingo's Perceiver Resampler
    c = z["perceiver"]
    icfg = IdeficsConfig(hidden_size=c["dim"], num_attention_heads=c["heads"], vision_config={"embed_dim": c["dim"]},
                         perceiver_config={"use_resampler": True, "resampler_n_latents": c["latents"],
                                           "resampler_depth": c["depth"], "resampler_n_heads": c["heads"],
                                           "resampler_head_dim": c["head_dim"]})
    hf_r = IdeficsPerceiverResampler(icfg, c["dim"], c["depth"], c["heads"], c["head_dim"], c["latents"]).train()
    ours_r = from_hf(hf_r).train()
    feats = torch.randn(B, c["patches"], c["dim"])
    yield ("Perceiver Resampler", "IdeficsPerceiverResampler", hf_r, ours_r, lambda: hf_r(feats), lambda: ours_r(feats))
    # Flamingo's GATED XATTN-DENSE, gates open, every text token after the one image
    c = z["xattn"]
    icfg = IdeficsConfig(hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                         num_attention_heads=c["heads"], alpha_type="float", alpha_initializer="ones",
                         qk_layer_norms=False, vision_config={"embed_dim": c["media_dim"]})
    icfg._attn_implementation = "sdpa"
    hf_x = IdeficsGatedCrossAttentionLayer(icfg, layer_idx=0).train()
    ours_x = from_hf(hf_x).train()
    y, media = torch.randn(B, c["tokens"], c["hidden_size"]), torch.randn(B, c["latents"], c["media_dim"])
    ids = torch.ones(B, c["tokens"], dtype=torch.long)
    ids[:, 0] = 9  # the image marker first: every token sees the image
    mm = media_mask(ids, 9).repeat_interleave(c["latents"], dim=-1)  # (B, T, L)
    additive = torch.zeros(B, 1, c["tokens"], c["latents"]).masked_fill(~mm[:, None], torch.finfo(torch.float32).min)
    gate = mm.any(-1).float()
    def run_hf_x():
        out = hf_x(y, None, image_hidden_states=media, image_attention_mask=additive, cross_attention_gate=gate)
        return out[0] if isinstance(out, tuple) else out

    yield ("GATED XATTN-DENSE", "IdeficsGatedCrossAttentionLayer", hf_x, ours_x, run_hf_x,
           lambda: ours_x(y, media, mm))
    # LLaVA-1.5's MLP projector
    c = z["projector"]
    from transformers import CLIPVisionConfig, LlamaConfig

    # the projector reads only the two widths; one head keeps any width a valid config
    lcfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=c["vision"], num_attention_heads=1),
                       text_config=LlamaConfig(hidden_size=c["lm"], num_attention_heads=1, num_key_value_heads=1),
                       projector_hidden_act="gelu")
    hf_p = LlavaMultiModalProjector(lcfg).train()
    ours_p = from_hf(hf_p).train()
    pf = torch.randn(B, c["patches"], c["vision"])
    yield ("MLP projector", "LlavaMultiModalProjector", hf_p, ours_p, lambda: hf_p(pf), lambda: ours_p(pf))
    # Idefics3's pixel-shuffle connector
    c = z["connector"]
    ccfg = Idefics3Config(vision_config={"hidden_size": c["vision"]},
                          text_config={"model_type": "llama", "hidden_size": c["lm"]}, scale_factor=c["scale"])
    hf_c = Idefics3Connector(ccfg).train()
    ours_c = from_hf(hf_c).train()
    cf = torch.randn(B, c["side"] ** 2, c["vision"])
    yield ("pixel shuffle", "Idefics3Connector", hf_c, ours_c, lambda: hf_c(cf), lambda: ours_c(cf, (c["side"], c["side"])))


def _fwd_bwd(module: torch.nn.Module, run) -> float:
    """Seconds of one forward + backward (the loss: mean square of the output)."""
    module.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    out = run()
    out.float().pow(2).mean().backward()
    return time.perf_counter() - t0


def bridge_speed(size: str = "real", repeats: int = 5) -> list[dict[str, Any]]:
    """Each bridge against its transformers class: median fwd+bwd seconds, and the speed-up
    (reference time / ours; >= 1 means ours is at least as fast). Dropout off, same inputs."""
    import statistics

    rows = []
    for name, ref_name, hf, ours, run_ref, run_ours in _speed_pairs(size):
        for m in (hf, ours):  # the same arithmetic: no dropout in either
            for sub in m.modules():
                if isinstance(sub, torch.nn.Dropout):
                    sub.p = 0.0
        _fwd_bwd(hf, run_ref), _fwd_bwd(ours, run_ours)  # warm-up
        t_ref, t_ours = [], []
        for _ in range(repeats):  # alternate, so a slow moment of the machine hits both
            t_ref.append(_fwd_bwd(hf, run_ref))
            t_ours.append(_fwd_bwd(ours, run_ours))
        r, o = statistics.median(t_ref), statistics.median(t_ours)
        rows.append({"bridge": name, "reference": ref_name, "ref_s": round(r, 4), "ours_s": round(o, 4),
                     "speedup": round(r / o, 3)})
    return rows


class _StepClock:
    """Trainer callback: the time at the end of each optimizer step (wall clock, or the
    process's CPU time with ``clock=time.process_time``)."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.times: list[float] = []

    def on_stage_start(self, trainer, stage) -> None:
        self.times.append(self.clock())

    def on_step_end(self, trainer, logs) -> None:
        self.times.append(self.clock())

    def on_stage_end(self, trainer, stage) -> None: ...


def train_step_speed(recipe: str = "llava-tiny", steps: int = 20, stage: int = -1) -> dict[str, Any]:
    """Samples per second of one stage of a recipe's training (data rendered on the fly,
    forward, backward, AdamW): that stage alone for ``steps`` + 2 steps, the first two not
    timed; median seconds per step."""
    import copy
    import statistics

    from mmkit.recipes import get_recipe
    from mmkit.train import Trainer
    from mmkit.vlm import build_model

    r = copy.deepcopy(get_recipe(recipe))
    st = r.stages[stage]
    st.steps, st.warmup_steps = steps + 2, 1
    r.stages, r.save_every = [st], 0
    clock = _StepClock()
    with tempfile.TemporaryDirectory() as out:
        Trainer(build_model(r), r, out, callbacks=[clock], progress=False).train(resume=False)
    per_step = statistics.median(b - a for a, b in zip(clock.times[2:], clock.times[3:]))
    samples = st.batch_size * st.grad_accum
    return {"recipe": recipe, "stage": st.name, "batch": samples, "s_per_step": round(per_step, 4),
            "samples_per_s": round(samples / per_step, 1), "threads": torch.get_num_threads()}


def format_speed(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per bridge."""
    lines = ["| bridge | transformers class | theirs fwd+bwd | ours fwd+bwd | speed-up |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['bridge']} | `{r['reference']}` | {r['ref_s'] * 1000:.1f} ms | {r['ours_s'] * 1000:.1f} ms | "
              f"{r['speedup']:.2f}x |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------- the bake-off
# Every family's student recipe, in the order the notebooks meet them.
BAKEOFF = ("llava-tiny", "blip2-tiny", "instructblip-tiny", "minigpt4-tiny", "flamingo-tiny", "qwenvl-tiny",
           "fuyu-tiny", "eve-tiny", "kosmos-tiny", "palme-tiny", "unified-tiny")


def stage_costs(recipe, steps: int = 3) -> list[float]:
    """CPU seconds (the process's, all threads) per optimizer step of each stage of ``recipe``:
    each stage alone for ``steps`` + 1 steps on a fresh model, the first step not counted."""
    import copy
    import statistics

    from mmkit.train import Trainer
    from mmkit.vlm import build_model

    costs = []
    for k in range(len(recipe.stages)):
        r = copy.deepcopy(recipe)
        st = r.stages[k]
        st.steps, st.warmup_steps = steps + 1, 1
        r.stages, r.save_every = [st], 0
        clock = _StepClock(time.process_time)
        with tempfile.TemporaryDirectory() as out:
            Trainer(build_model(r), r, out, callbacks=[clock], progress=False).train(resume=False)
        costs.append(statistics.median(b - a for a, b in zip(clock.times[1:], clock.times[2:])))
    return costs


def _trainable_params(model, recipe) -> int:
    """Parameters trained in at least one stage of ``recipe`` (counted once)."""
    from mmkit.train import set_trainable

    names = set()
    for st in recipe.stages:
        names |= set(set_trainable(model, st.train))
    return sum(p.numel() for n, p in model.named_parameters() if n in names)


def _image_tokens(model) -> int:
    """Token positions one image takes in the LM's sequence (Flamingo: its one marker; what it
    reads through cross-attention is ``bridge_tokens``)."""
    from PIL import Image

    H, W = model.image_size
    return len(model.processor.expand(model.preprocess([Image.new("RGB", (W, H))])[0]))


def bake_off(minutes: float = 3.0, recipes: Sequence[str] = BAKEOFF, *, out: str | Path, n: int = 200,
             curve_points: int = 4, curve_n: int = 100, progress: bool = False) -> list[dict[str, Any]]:
    """Train every family's student recipe on the same ShapesWorld data for the same compute
    and score each the same way.

    The budget is ``minutes`` of *compute*: the process's CPU time divided by its torch threads
    (``mmkit.callbacks.compute_clock``), which equals wall time on an idle machine and keeps the
    comparison fair when other programs share the cores. Each recipe keeps its own stages
    and their proportions (``scale_budget``), scaled to the number of steps its measured
    per-step cost (``stage_costs``) buys. One row per family: VQA overall and per question
    type, POPE F1, caption CHAIR_i (all on the test split, ``n`` questions, captions on
    ``n // 2``), image tokens in the LM's sequence, trainable parameters, seconds per step and
    the learning curve (VQA on ``curve_n`` questions at ``curve_points`` points), kept in
    ``out/<recipe>/`` (checkpoint, ``curve.jsonl``, ``result.json``). A family whose
    ``result.json`` exists is not trained again, so a stopped bake-off resumes.
    """
    from mmkit.callbacks import CURVE, AccuracyTracker, compute_clock
    from mmkit.eval import evaluate
    from mmkit.recipes import get_recipe, scale_budget
    from mmkit.train import Trainer
    from mmkit.vlm import build_model

    if minutes <= 0:
        raise ValueError(f"bake_off: minutes must be > 0, got {minutes}")
    out = Path(out)
    threads = torch.get_num_threads()
    budget = minutes * 60 * threads
    rows = []
    for name in recipes:
        folder = out / name
        done = folder / "result.json"
        if done.is_file():
            rows.append(json.loads(done.read_text()))
            continue
        recipe = get_recipe(name)
        costs = stage_costs(recipe)
        per_original = sum(st.steps * c for st, c in zip(recipe.stages, costs))
        total = max(len(recipe.stages), round(recipe.total_steps() * budget / per_original))
        recipe = scale_budget(recipe, total)
        torch.manual_seed(recipe.seed)
        model = build_model(recipe)
        tracker = AccuracyTracker.every(max(1, total // curve_points), total, n=curve_n, filename=CURVE,
                                        clock=compute_clock())
        wall = time.perf_counter()
        Trainer(model, recipe, folder, callbacks=[tracker], progress=progress).train(resume=False)
        wall = time.perf_counter() - wall
        model.eval()
        vqa = evaluate(model, "vqa", n=n)
        pope = evaluate(model, "pope", n=n)
        cap = evaluate(model, "caption", n=max(1, n // 2))
        row = {
            "recipe": name, "family": recipe.family, "bridge": recipe.bridge, "steps": total,
            "stage_steps": [st.steps for st in recipe.stages], "vqa": vqa["accuracy"],
            "vqa_per_type": vqa["per_type"], "pope_f1": pope["f1"], "pope_accuracy": pope["accuracy"],
            "chair_i": cap["chair_i"], "image_tokens": _image_tokens(model),
            "bridge_tokens": model.num_image_tokens(), "trainable_params": _trainable_params(model, recipe),
            # compute seconds (CPU time / threads) of training alone, without the curve's evaluations
            "train_seconds": round(tracker.train_seconds, 1),
            "s_per_step": round(tracker.train_seconds / total, 3),
            "wall_seconds": round(wall, 1),  # training and the curve's evaluations, as the clock on the wall saw them
            "threads": threads, "minutes": minutes, "n": n, "curve": tracker.records,
        }
        _write_json(done, row)
        rows.append(row)
    _write_json(out / BAKEOFF_FILE, {"minutes": minutes, "n": n, "rows": rows})
    return rows


BAKEOFF_FILE = "bake-off.json"  # in the bake-off's folder, and shipped in assets/tiny/


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def load_bake_off(path: str | Path | None = None) -> dict[str, Any]:
    """The bake-off's results: ``{"minutes", "n", "rows"}`` from ``path`` (a bake-off folder or its
    ``bake-off.json``); by default the one shipped in ``assets/tiny/``."""
    from mmkit.paths import assets_dir

    path = Path(path) if path else assets_dir() / "tiny" / BAKEOFF_FILE
    if path.is_dir():
        path = path / BAKEOFF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no bake-off results here; run `mmkit bench families --out DIR` "
                                "(it writes DIR/bake-off.json)")
    return json.loads(path.read_text())


def format_bake_off(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per family, the columns of the bake-off."""
    types = sorted({t for r in rows for t in r["vqa_per_type"]})
    head = ["recipe", "VQA", *types, "POPE F1", "CHAIR_i", "image tokens", "trainable", "steps", "s/step*"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        tok = str(r["image_tokens"])  # fewer in the sequence than the bridge makes: the rest is read by cross-attention
        if r["image_tokens"] < r["bridge_tokens"]:
            tok += f" (+{r['bridge_tokens']} by cross-attention)"
        cells = [r["recipe"], f"{r['vqa']:.3f}", *(f"{r['vqa_per_type'].get(t, float('nan')):.2f}" for t in types),
                 f"{r['pope_f1']:.2f}", f"{r['chair_i']:.2f}", tok, f"{r['trainable_params'] / 1e6:.2f}M",
                 str(r["steps"]), f"{r['s_per_step']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("\n\\* compute seconds per optimizer step: CPU time / torch threads (wall time on an idle machine)")
    return "\n".join(lines)


# ------------------------------------------------------------------ resolution
#: The three ways of feeding a 128-px scene to the tiny encoder (trained at 64 px), as
#: recipe overrides on top of llava-tiny: downsize it to one 64-px view (64 tokens), run the
#: ViT at 128 px and fold 2 x 2 patches (pixel shuffle: 64 tokens), or tile it (AnyRes: a
#: 2 x 2 grid of 64-px crops + a global view + row newlines: 336 tokens).
RESOLUTION_VARIANTS: dict[str, list[str]] = {
    "64 px, one view": ["image_size=64"],
    "128 px, pixel shuffle s=2": ["image_size=128", "bridge=pixel_shuffle", 'bridge_kwargs={"scale_factor": 2}'],
    "128 px, AnyRes tiles": ["image_size=64", "image_mode=anyres", "anyres_grids=[[1,1],[1,2],[2,1],[2,2]]",
                             "max_length=512"],
}


def resolution_recipe(overrides: Sequence[str], steps: int, scene_size: int = 128, batch_size: int | None = None):
    """llava-tiny on ``scene_size``-px ShapesWorld scenes whose text is small
    (``SMALL_TEXT_HEIGHT``), with OCR in the instruction mix, scaled to ``steps``; then
    ``overrides`` (one of ``RESOLUTION_VARIANTS``)."""
    from mmkit.data.shapes import SMALL_TEXT_HEIGHT
    from mmkit.recipes import apply_overrides, get_recipe, scale_budget

    r = get_recipe("llava-tiny")
    r.shapes = {**r.shapes, "image_size": scene_size, "text_height": list(SMALL_TEXT_HEIGHT)}
    r.stages[-1].tasks = {**r.stages[-1].tasks, "ocr": 3.0}
    r = scale_budget(r, steps, batch_size)
    return apply_overrides(r, list(overrides) + ["save_every=0"])


def resolution_bench(steps: int = 900, n: int = 200, *, scene_size: int = 128, batch_size: int | None = None,
                     variants: dict[str, list[str]] | None = None, out_dir: str | Path | None = None,
                     progress: bool = False) -> dict[str, Any]:
    """Train each variant for ``steps`` steps on the same small-text world, then measure OCR
    (exact match, CER), VQA accuracy, image tokens per scene and the median seconds per
    training step. ``out_dir``: ``resolution.json`` and the figure ``resolution.png``
    (written atomically). Returns ``{"scene_size", "steps", "n", "threads", "rows"}``."""
    import statistics

    from mmkit.eval import evaluate, model_world
    from mmkit.train import Trainer
    from mmkit.vlm import build_model

    if steps < 2:
        raise ValueError(f"resolution_bench: steps must be >= 2 (one per stage), got {steps}")
    rows = []
    for name, ov in (variants or RESOLUTION_VARIANTS).items():
        recipe = resolution_recipe(ov, steps, scene_size, batch_size)
        model = build_model(recipe)
        clock = _StepClock()
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            Trainer(model, recipe, tmp, callbacks=[clock], progress=progress).train(resume=False)
            train_s = time.perf_counter() - t0
        gaps = [b - a for a, b in zip(clock.times[1:], clock.times[2:])] or [train_s]
        world = model_world(model)
        scene = world.sample("test", 0, "ocr")["image"]
        ocr, vqa = evaluate(model, "ocr", n=n, world=world), evaluate(model, "vqa", n=n, world=world)
        rows.append({"model": name, "image_tokens": len(model.expand_image(model.preprocess([scene])[0])),
                     "ocr_exact": round(ocr["accuracy"], 4), "ocr_cer": round(ocr["cer"], 4),
                     "vqa": round(vqa["accuracy"], 4), "s_per_step": round(statistics.median(gaps), 4),
                     "train_s": round(train_s, 1)})
    res = {"scene_size": scene_size, "steps": steps, "n": n, "threads": torch.get_num_threads(), "rows": rows}
    if out_dir is not None:
        from mmkit.viz.tiles import plot_resolution

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "resolution.json", res)
        fig = plot_resolution(rows, title=f"small text at {scene_size} px, {steps} steps")
        fig.savefig(out / ".resolution.tmp.png", dpi=120, bbox_inches="tight")
        os.replace(out / ".resolution.tmp.png", out / "resolution.png")
    return res


def format_resolution(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per way of seeing the scene."""
    lines = ["| model | image tokens | OCR exact | OCR CER | VQA | s / step |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['image_tokens']} | {r['ocr_exact']:.3f} | {r['ocr_cer']:.3f} | {r['vqa']:.3f} | "
              f"{r['s_per_step']:.3f} |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":  # one configuration, JSON on the last line (used by memory_table)
    spec = json.loads(sys.argv[1])
    print(json.dumps(measure(spec.pop("method"), spec.pop("seq_len"), **spec)))
