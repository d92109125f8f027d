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

__all__ = ["Stage", "Recipe", "RECIPES", "get_recipe", "register_recipe", "apply_overrides"]

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
    data: str | None = None  # LLaVA-format JSON/JSONL file instead of ShapesWorld
    image_folder: str | None = None
    # What the model's forward optimises: "lm" (next-token loss on the answers) or a
    # family's own objective, passed as ``model(**batch, objective=...)`` (BLIP-2
    # stage 1: "itc+itm+itg"; EVE: "lm+align").
    objective: str = "lm"

    def __post_init__(self):
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
    lm: str = "tiny"  # "tiny" | "hf:NAME" | a local folder
    bridge: str = "mlp"
    bridge_kwargs: dict[str, Any] = field(default_factory=dict)
    feature_layer: int = -2
    image_size: int = 64
    image_mode: str = "pad"
    image_wrap: list[str] | None = None
    max_length: int = 256
    system_prompt: str | None = None
    shapes: dict[str, Any] = field(default_factory=dict)  # ShapesConfig overrides
    stages: list[Stage] = field(default_factory=list)
    lora: dict[str, Any] | None = None  # {"r": 8, "alpha": 16, "dropout": 0.05}
    quantization: str | None = None  # None | "4bit"
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


@register_recipe("llava-tiny")
def llava_tiny() -> Recipe:
    """LLaVA-1.5 on the tiny world: tiny CLIP ViT + MLP projector + tiny Llama.

    Stage 1 aligns on short captions (projector only); stage 2 tunes projector + LM on
    questions. Sized for a laptop CPU; docs/benchmarks.md has what it reaches.
    """
    return Recipe(
        name="llava-tiny",
        bridge="mlp",
        stages=[
            Stage("align", train=["bridge"], tasks={"caption": 1.0},
                  steps=100, lr=2e-3, batch_size=32, warmup_steps=10),
            Stage("instruct", train=["bridge", "lm"], tasks=dict(INSTRUCT_MIX),
                  steps=800, lr=1e-3, lr_groups={"lm": 5e-4}, batch_size=16, warmup_steps=30),
        ],
    )


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
