"""The chat demo: talk to a trained model about your images, then look inside it.

    mmkit demo [--checkpoint DIR ...] [--port N] [--share]

One chat, three front ends. Everything a turn needs is a plain function here, so the
Gradio app (``build_app``), the notebook widget (``mmkit.viz.chat``) and the tests all
run the same code:

    uploaded files --load_images--> RGB images          (ImageError -> a message, not a crash)
    text + images  --ChatSession.check--> refused early with what to do instead
    history        --ChatSession.record--> one LLaVA-format record:
                        {"images": [all images, in order],
                         "conversations": [human "<image>\\n...question", gpt answer, ...]}
    record         --model.generate(streamer=TextIteratorStreamer) in a thread-->
                        partial answers, one per decoded word (``ChatSession.stream``)
    last answer    --model.explain--> heatmaps over the image, gates, token costs
                        (``inspect_last``: the "Inspect" panel, with one sentence per family)

A newcomer starts from **New scene** (``new_scene``): a seeded ShapesWorld *test-split*
scene in the chat and one example question per question type, from ShapesWorld's own
generator. Every answer about that scene is judged against the scene graph
(``ShapesWorld.answer``, ``mmkit.eval.vqa_match``: VQA scoring's rule) with a ✓ / ✗ and a
running score (``ChatSession.judge``). An uploaded photo gets an honest note
(``photo_note``): the tiny models only know ShapesWorld.

Every model the picker lists is a training checkpoint (``recipe.json`` +
``model.safetensors``): the shipped tiny models in ``assets/tiny/models/<recipe>/``
(one per family, written by ``mmkit zoo build``) and every ``--checkpoint DIR``. They
load on first use and stay cached; nothing is trained when the demo starts.

Bad input never takes the server down: a file that is not an image, a corrupt,
truncated, tiny or huge image, an empty or overlong message, too many images, a
conversation longer than the model reads, a checkpoint that is missing or does not
load. Each becomes a ``ChatError`` whose text is shown in the chat, and the next
request works as before.

Offline by default: Gradio's analytics are switched off before it is imported, the
server binds to 127.0.0.1, and a public link is made only with ``--share``.
"""
from __future__ import annotations

import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from mmkit.language import IMAGE_TOKEN

__all__ = [
    "ChatError", "ModelEntry", "ModelStore", "ChatSession", "DemoScene", "discover_models", "load_images",
    "inspect_last", "build_app", "launch", "no_model_message", "model_card", "new_scene", "photo_note",
    "FAMILY_CARDS", "MAX_MESSAGE_CHARS", "MAX_IMAGES_PER_MESSAGE", "PHOTO_NOTE",
]

# Longer than any question a person types; the tiny models read 256 tokens in all.
MAX_MESSAGE_CHARS = 2000
# Images per message, whatever the model could read: a family whose images do not sit
# in the context (Flamingo: one marker token each) would otherwise allow hundreds.
MAX_IMAGES_PER_MESSAGE = 8
# Tokens kept free for the question and the chat template when counting how many
# images fit in the model's context.
TEXT_RESERVE_TOKENS = 32


# The note under an answer about an image that does not look like ShapesWorld.
PHOTO_NOTE = ("ℹ️ This does not look like a ShapesWorld scene: these tiny models only know ShapesWorld, "
              "so take the answer with a pinch of salt; for photos train `llava-hf` on a GPU "
              "(`mmkit train --recipe llava-hf`).")

# What each family is, its papers, and what its Inspect picture means. Keyed by family, or by
# "family/bridge" where a bridge changes the story (the prefix family's Qwen-VL adapter).
FAMILY_CARDS: dict[str, tuple[str, str, str]] = {
    "prefix": ("projector (prefix)", "LLaVA, LLaVA-1.5",
               "Each heatmap is the LM's attention from the words of its answer to the image's patch "
               "tokens: the brightest patches are what the answer was read from."),
    "prefix/qwen_vl": ("position-aware adapter", "Qwen-VL",
                       "Each heatmap is what one of the adapter's queries read from the patches (it keeps "
                       "their 2D positions); when the answer holds a box, it is drawn on the image."),
    "prefix/pixel_shuffle": ("pixel shuffle", "Idefics3",
                             "Each token stands for a block of merged patches; the heatmap is the LM's "
                             "attention from the answer onto those blocks."),
    "blip2": ("query transformer", "BLIP-2, MiniGPT-4",
              "Each heatmap is one Q-Former query's cross-attention over the patches: these few queries "
              "are all the LM ever sees of the image."),
    "instructblip": ("query transformer", "InstructBLIP",
                     "Each heatmap is one Q-Former query's cross-attention over the patches; the queries "
                     "read the question too, so they change with what you ask."),
    "flamingo": ("cross-attention", "Flamingo",
                 "The first map follows the answer through the gated cross-attention and the resampler's "
                 "latents onto the patches; the bars are each layer's tanh gate (0: that layer ignores the "
                 "image); the mask shows which text token may look at which image."),
    "fuyu": ("encoder-free", "Fuyu",
             "No vision encoder: the image is rows of raw patches, each row ended by a newline token; the "
             "map is the LM's attention from the answer onto those patch rows."),
    "eve": ("encoder-free", "EVE",
            "No vision encoder: EVE's patch embedding pools raw patches into rows of tokens (one separator "
            "per row) written straight into the LM; each map is what one of its outputs read from the patches."),
    "interleaved": ("native multimodal", "KOSMOS-1, PaLM-E",
                    "The image sits in a document as a prefix of tokens; each map is what one of the "
                    "resampler's latents read from the patches (KOSMOS-1)."),
    "interleaved/mlp": ("projector into documents", "PaLM-E",
                        "The image sits in a document as a prefix, one token per patch; the map is the "
                        "decoder's attention from the answer onto those tokens."),
    "unified": ("native multimodal (reads and draws)", "Chameleon, LVM",
                "The image is 8x8 VQ codes in the decoder's own vocabulary; the map is its attention from "
                "the answer onto those codes, and anything it drew is shown beside it."),
}


class ChatError(ValueError):
    """A request the demo refuses; the message says what happened and what to do."""


def no_model_message() -> str:
    return (
        "No model to chat with yet. Either build the shipped tiny model:\n\n"
        "    mmkit zoo models --only llava-tiny\n\n"
        "or train one and point the demo at it:\n\n"
        "    mmkit train --recipe llava-tiny --out runs/llava-tiny\n"
        "    mmkit demo --checkpoint runs/llava-tiny"
    )


# ---------------------------------------------------------------------------- models
@dataclass
class ModelEntry:
    """One line of the model picker: a checkpoint folder, or why it cannot be used."""

    label: str
    path: Path
    recipe: str = "?"
    family: str = "?"
    shipped: bool = False
    error: str | None = None


def _entry(path: Path, shipped: bool) -> ModelEntry:
    from mmkit.recipes import Recipe
    from mmkit.train import RECIPE, CheckpointError, find_checkpoint

    try:
        ckpt = find_checkpoint(path)
        recipe = Recipe.from_json((ckpt / RECIPE).read_text())
    except CheckpointError as e:
        return ModelEntry(f"{path}", path, shipped=shipped, error=str(e))
    except (ValueError, TypeError, KeyError) as e:  # recipe.json unreadable
        return ModelEntry(f"{path}", path, shipped=shipped,
                          error=f"{path}: recipe.json cannot be read ({e}); retrain into this folder")
    where = "shipped" if shipped else str(path)
    return ModelEntry(f"{recipe.name} ({where})", path, recipe.name, recipe.family, shipped)


def discover_models(checkpoints: Sequence[str | Path] = (), *, shipped: bool = True) -> list[ModelEntry]:
    """The shipped tiny models (``assets/tiny/models/*``, in ``zoo.SHIPPED_MODELS`` order: the
    first is the demo's default) then each ``checkpoints`` folder.

    A folder that is missing or incomplete still gets an entry, with ``error`` saying
    why (the app shows it and starts anyway). Labels are unique.
    """
    from mmkit.paths import assets_dir

    entries: list[ModelEntry] = []
    root = assets_dir() / "tiny" / "models"
    if shipped and root.is_dir():
        from mmkit.zoo import SHIPPED_MODELS

        order = {name: i for i, name in enumerate(SHIPPED_MODELS)}  # the reference llava first
        dirs = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: (order.get(d.name, len(order)), d.name))
        entries += [_entry(d, True) for d in dirs]
    entries += [_entry(Path(c).expanduser(), False) for c in checkpoints]
    seen: dict[str, int] = {}
    for e in entries:
        n = seen[e.label] = seen.get(e.label, 0) + 1
        if n > 1:
            e.label = f"{e.label} #{n}"
    return entries


def _family_card(family: str, bridge: str | None = None) -> tuple[str, str, str]:
    return FAMILY_CARDS.get(f"{family}/{bridge}") or FAMILY_CARDS.get(family) or (family, "", "")


def _model_reports() -> dict[str, dict]:
    """``assets/tiny/report.json``'s "models" section ({} when the file is missing or unreadable)."""
    import json

    from mmkit.paths import assets_dir
    from mmkit.zoo import REPORT

    try:
        return json.loads((assets_dir() / REPORT).read_text()).get("models", {})
    except (OSError, ValueError, AttributeError):
        return {}


def model_card(entry: ModelEntry, reports: dict[str, dict] | None = None) -> str:
    """One line about a picker entry: family, papers, training time and test-split VQA
    (from report.json's "models" section for a shipped model), or why it cannot be used."""
    if entry.error:
        return f"**{entry.label}**: cannot be used ({entry.error.splitlines()[0]})"
    from mmkit.recipes import Recipe
    from mmkit.train import RECIPE, find_checkpoint

    bridge = None
    try:
        bridge = Recipe.from_json((find_checkpoint(entry.path) / RECIPE).read_text()).bridge
    except Exception:  # noqa: BLE001 - the card goes without the bridge
        pass
    kind, papers, _ = _family_card(entry.family, bridge)
    parts = [f"**{entry.recipe}**: {kind}" + (f" ({papers})" if papers else "")]
    # a shipped model's folder is named as zoo.SHIPPED_MODELS and report.json's "models" name it
    rep = (_model_reports() if reports is None else reports).get(entry.path.name) if entry.shipped else None
    if rep:
        if rep.get("train_seconds"):
            threads = f" on {rep['torch_threads']} CPU threads" if rep.get("torch_threads") else ""
            parts.append(f"trained {rep['train_seconds'] / 60:.1f} min{threads}")
        if rep.get("vqa") is not None:
            parts.append(f"VQA {rep['vqa']:.2f} on the test split (n = {rep.get('vqa_n', '?')})")
    elif not entry.shipped:
        parts.append(f"your checkpoint in {entry.path}")
    return " · ".join(parts)


@dataclass
class DemoScene:
    """A ShapesWorld test-split scene for the demo: its seed (the test-split index), the
    image as the models saw such scenes in training and evaluation, and one example
    question per feasible question type with its true answer."""

    seed: int
    image: Any
    scene: Any
    examples: list[dict]

    def truth(self, question: str) -> str | None:
        """The true answer to ``question`` when the scene graph decides it, else None."""
        return _world().answer(self.scene, question)


_WORLD: list = []


def _world():
    if not _WORLD:
        from mmkit.data.shapes import ShapesWorld

        _WORLD.append(ShapesWorld())
    return _WORLD[0]


def new_scene(seed: int | None = None, *, tries: int = 200) -> DemoScene:
    """The first test-split scene at or after index ``seed`` (random when None) that every
    question type can be asked about, with ShapesWorld's own example questions."""
    import random

    from mmkit.data.shapes import VQA_QTYPES

    if seed is None:
        seed = random.randrange(1_000_000)
    if not isinstance(seed, int) or seed < 0:
        raise ChatError(f"The scene seed must be a whole number >= 0, got {seed!r}.")
    world = _world()
    for index in range(seed, seed + tries):
        scene = world.scene("test", index)
        examples = world.examples(scene, key=f"demo/{index}")
        if len(examples) == len(VQA_QTYPES):
            return DemoScene(index, world.render(scene), scene, examples)
    raise ChatError(f"No test scene from seed {seed} to {seed + tries - 1} can be asked every question type.")


def photo_note(images: Sequence, model=None) -> str | None:
    """``PHOTO_NOTE`` when a tiny (ShapesWorld-trained) model is shown an image that does not
    look like ShapesWorld (``looks_like_shapesworld``), else None."""
    from mmkit.data.shapes import looks_like_shapesworld

    recipe = getattr(model, "recipe", None)
    if recipe is not None and "tiny" not in (getattr(recipe, "lm", "tiny"), getattr(recipe, "vision", "tiny")):
        return None  # a hub model: photos are what it is for
    return PHOTO_NOTE if any(not looks_like_shapesworld(im) for im in images) else None


def _place(model) -> Any:
    """On a GPU, move everything but a quantised LM (bitsandbytes placed that itself)."""
    import torch

    if not torch.cuda.is_available():
        return model
    quantized = getattr(getattr(model, "recipe", None), "quantization", None)
    for name, child in model.named_children():
        if not (name == "lm" and quantized):
            child.to("cuda")
    return model


class ModelStore:
    """The picker's models, each loaded on first use and then cached (thread-safe)."""

    def __init__(self, entries: Sequence[ModelEntry]):
        self.entries = list(entries)
        self._models: dict[str, Any] = {}
        self._lock = threading.Lock()

    @property
    def labels(self) -> list[str]:
        """Labels of the usable entries, shipped ones first."""
        return [e.label for e in self.entries if e.error is None]

    @property
    def problems(self) -> list[str]:
        return [e.error for e in self.entries if e.error is not None]

    def entry(self, label: str | None) -> ModelEntry:
        if not label:
            if not self.labels:
                raise ChatError(no_model_message())
            raise ChatError("Pick a model in the list first.")
        for e in self.entries:
            if e.label == label:
                if e.error:
                    raise ChatError(f"This checkpoint cannot be used: {e.error}")
                return e
        raise ChatError(f"Unknown model {label!r}; pick one of: {', '.join(self.labels) or '(none)'}")

    def get(self, label: str | None):
        """The model behind ``label``, loading it the first time (ChatError if it cannot)."""
        entry = self.entry(label)
        with self._lock:
            if entry.label not in self._models:
                from mmkit.train import load_model

                try:
                    model = _place(load_model(entry.path))
                except Exception as e:  # noqa: BLE001 - any load failure becomes a message
                    raise ChatError(
                        f"Could not load {entry.label}: {type(e).__name__}: {e}\n"
                        "Check the folder (retrain with `mmkit train --out DIR`), or for a hub "
                        "model that the weights are cached (the demo runs offline)."
                    ) from e
                model.eval()
                model._demo_lock = threading.Lock()  # one generate / explain at a time per model
                self._models[entry.label] = model
            return self._models[entry.label]


# ---------------------------------------------------------------------------- images
def _name(src: Any, i: int) -> str:
    if isinstance(src, (str, Path)):
        return Path(src).name
    return getattr(src, "name", None) or f"image {i + 1}"


def load_images(files: Sequence[Any] | None) -> list:
    """Uploaded files (paths, bytes, PIL images, or (name, data) pairs) -> RGB images.

    ``mmkit.data.images.load_image`` does the checking; its ``ImageError`` becomes a
    ``ChatError`` naming the file by its base name (not Gradio's temp path).
    """
    from mmkit.data.images import ImageError, load_image

    out = []
    for i, f in enumerate(files or []):
        name, src = (f if isinstance(f, tuple) and len(f) == 2 else (_name(f, i), f))
        if isinstance(src, dict) and "path" in src:  # a Gradio FileData dict
            src = src["path"]
        try:
            out.append(load_image(src))
        except ImageError as e:
            raise ChatError(f"**{name}** cannot be used: {e.problem}\nHow to fix: {e.fix}") from e
    return out


# ------------------------------------------------------------------------------ chat
@dataclass
class Turn:
    role: str  # "user" | "assistant"
    text: str
    images: list = field(default_factory=list)
    n_tokens: int = 0  # prompt length up to and including this turn (user turns)


class ChatSession:
    """One conversation with one model: history, limits, streaming, inspection.

    ``stream(text, files)`` checks the request (``ChatError`` before any compute),
    yields the answer as it grows, and only then adds both turns to the history, so a
    refused or failed request leaves the conversation as it was.
    """

    def __init__(self, model, label: str = ""):
        self.model = model
        self.label = label or getattr(getattr(model, "recipe", None), "name", "model")
        self.turns: list[Turn] = []
        self.last_request: dict | None = None  # what explain() needs about the last answer
        self.scene: DemoScene | None = None  # a generated scene the conversation is about
        self.score = [0, 0]  # [right, judged] answers about generated scenes, this conversation

    # ----------------------------------------------------------------- limits
    @property
    def max_length(self) -> int:
        return int(self.model.processor.max_length)

    @property
    def tokens_per_image(self) -> int:
        """Tokens one image costs this model (asked of the model, as the processor does)."""
        from PIL import Image

        if not hasattr(self, "_tpi"):
            H, W = getattr(self.model, "image_size", (64, 64))
            pv = self.model.preprocess([Image.new("RGB", (W, H))])[0]
            self._tpi = len(self.model.processor.expand(pv))
        return self._tpi

    @property
    def max_images(self) -> int:
        """Images per message: what fits in the context next to a short question (at
        most ``MAX_IMAGES_PER_MESSAGE``), unless the model states its own ``max_images``."""
        return self._image_limit()[0]

    def _image_limit(self) -> tuple[int, str]:
        own = getattr(self.model, "max_images", None)
        if own:
            return int(own), f"{self.label} was built for at most {int(own)}"
        fit = max(1, (self.max_length - TEXT_RESERVE_TOKENS) // max(1, self.tokens_per_image))
        if fit > MAX_IMAGES_PER_MESSAGE:
            return MAX_IMAGES_PER_MESSAGE, f"the demo takes at most {MAX_IMAGES_PER_MESSAGE} per message"
        return fit, (f"each image costs {self.tokens_per_image} tokens and {self.label} reads at most "
                     f"{self.max_length}")

    def describe(self) -> str:
        return (f"**{self.label}**: each image costs {self.tokens_per_image} tokens; "
                f"up to {self.max_images} image(s) per message; the model reads at most "
                f"{self.max_length} tokens per conversation.")

    # ---------------------------------------------------------------- records
    def record(self, extra: Sequence[Turn] = ()) -> dict:
        """The history (+ ``extra`` turns) as one LLaVA-format record, images in order."""
        conv, images = [], []
        for t in [*self.turns, *extra]:
            text = t.text
            if t.images and t.role == "user":  # LLaVA convention: the placeholders open the turn that brought them
                text = "\n".join([IMAGE_TOKEN] * len(t.images)) + "\n" + text
            images += t.images  # a native model's drawings: its answer holds their placeholders
            conv.append({"from": "human" if t.role == "user" else "gpt", "value": text})
        return {"id": "chat", "images": images, "conversations": conv}

    def check(self, text: str | None, files: Sequence[Any] | None = None) -> Turn:
        """Validate one user message; returns the turn to add, or raises ``ChatError``."""
        from mmkit.data.processor import ProcessorError

        text = (text or "").strip()
        n_files = len(files or [])
        if not text:
            raise ChatError("The message is empty: type a question"
                            + (" about the image." if n_files else ", e.g. 'What colour is the circle?'."))
        if len(text) > MAX_MESSAGE_CHARS:
            raise ChatError(
                f"The message is {len(text):,} characters; the demo takes at most "
                f"{MAX_MESSAGE_CHARS:,} ({self.label} reads {self.max_length} tokens in all, "
                "images included). Ask a shorter question.")
        limit, why = self._image_limit()
        if n_files > limit:
            raise ChatError(f"{n_files} images in one message, but {self.label} takes at most {limit}: "
                            f"{why}. Send fewer images.")
        # Typed "<image>" would become a real placeholder and break the image count.
        text = text.replace(IMAGE_TOKEN, "image")
        turn = Turn("user", text, load_images(files))
        if turn.images:  # your own image: the conversation is no longer about the generated scene
            self.scene = None
        elif self.scene is not None and not any(t.images for t in self.turns):
            turn.images = [self.scene.image]  # the scene opens the conversation's first turn
        try:  # does the whole conversation still fit? (the processor says exactly)
            n = len(self.model.processor.encode(self.record([turn]), for_generation=True))
        except ProcessorError as e:
            if "max_length" in str(e):
                raise ChatError(
                    f"The conversation no longer fits: {self.label} reads at most {self.max_length} "
                    "tokens and this message would go past that. Press Clear to start a new "
                    "conversation.") from e
            raise ChatError(str(e)) from e
        turn.n_tokens = n
        return turn

    # ----------------------------------------------------------------- stream
    def stream(self, text: str | None = None, files: Sequence[Any] | None = None, *, turn: Turn | None = None,
               max_new_tokens: int = 48, temperature: float = 0.0, **gen_kwargs: Any) -> Iterator[str]:
        """Yield the answer as it grows (each item is the whole answer so far).

        Generation runs in a thread and feeds a ``TextIteratorStreamer``; the last
        item is the full answer, which is also what ``model.generate`` would return.
        ``turn``: an already checked ``Turn`` (from ``check``), used instead of text/files.
        """
        from transformers import TextIteratorStreamer

        if turn is None:
            turn = self.check(text, files)
        model = self.model
        if getattr(model, "writes_images", False):
            yield from self._draw_or_answer(turn, max_new_tokens, temperature, **gen_kwargs)
            return
        streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=600.0)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["answers"] = model.generate(
                    records=[self.record([turn])], streamer=streamer,
                    max_new_tokens=int(max_new_tokens), temperature=float(temperature), **gen_kwargs)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                result["error"] = e
                streamer.end()  # unblock the consumer

        lock = getattr(model, "_demo_lock", None) or threading.Lock()
        with lock:
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            partial = ""
            for piece in streamer:
                if piece:
                    partial += piece
                    yield partial.strip()
            worker.join()
        if "error" in result:
            e = result["error"]
            raise ChatError(f"Generation failed: {type(e).__name__}: {e}") from e
        answer = result["answers"][0]
        self.turns += [turn, Turn("assistant", answer)]
        self.last_request = {"record": self.record(), "answer": answer}
        yield answer

    def _draw_or_answer(self, turn: Turn, max_new_tokens: int, temperature: float, **gen_kwargs: Any) -> Iterator[str]:
        """A model that may answer with a picture (``writes_images``): no token streaming
        (image codes are not text); the answer comes whole, its pictures in the turn."""
        model = self.model
        lock = getattr(model, "_demo_lock", None) or threading.Lock()
        with lock:
            try:
                reply = model.generate(records=[self.record([turn])], max_new_tokens=int(max_new_tokens),
                                       temperature=float(temperature), return_images=True, **gen_kwargs)[0]
            except Exception as e:  # noqa: BLE001
                raise ChatError(f"Generation failed: {type(e).__name__}: {e}") from e
        answer = reply["text"]
        self.turns += [turn, Turn("assistant", answer, list(reply["images"]))]
        self.last_request = {"record": self.record(), "answer": answer}
        yield answer

    @property
    def last_drawings(self) -> list:
        """Pictures the model drew in its last answer (native models), else []."""
        if self.turns and self.turns[-1].role == "assistant":
            return list(self.turns[-1].images)
        return []

    def reply(self, text: str | None, files: Sequence[Any] | None = None, **kwargs: Any) -> str:
        """``stream`` consumed: the full answer."""
        answer = ""
        for answer in self.stream(text, files, **kwargs):
            pass
        return answer

    def clear(self) -> None:
        self.turns.clear()
        self.last_request = None
        self.scene = None
        self.score = [0, 0]

    # ----------------------------------------------------------------- scenes
    def set_scene(self, scene: DemoScene) -> None:
        """Start a new conversation about a generated scene (its image goes with the next question)."""
        self.clear()
        self.scene = scene

    def judge(self, question: str, answer: str) -> dict | None:
        """The last answer against the scene graph: ``{"truth", "ok", "score"}``, and the
        running score updated; None when the conversation is not about a generated scene or
        the scene graph cannot decide the question. Matching is VQA scoring's
        (``mmkit.eval.vqa_match``)."""
        from mmkit.eval import vqa_match

        truth = self.scene.truth(question) if self.scene is not None else None
        if truth is None:
            return None
        ok = vqa_match(answer, truth)
        self.score = [self.score[0] + ok, self.score[1] + 1]
        return {"truth": truth, "ok": ok, "score": tuple(self.score)}

    # ---------------------------------------------------------------- inspect
    def explain(self) -> dict:
        """``model.explain`` for the last answer (the whole conversation as the prompt)."""
        if self.last_request is None:
            raise ChatError("Nothing to inspect yet: ask a question first.")
        rec = self.last_request["record"]
        if not rec["images"]:
            raise ChatError("The conversation has no image, so there is nothing to show over one. "
                            "Upload an image with your question.")
        conv = rec["conversations"][:-1]  # explain appends the answer itself
        messages = [{"role": "user" if c["from"] == "human" else "assistant", "content": c["value"]}
                    for c in conv]
        lock = getattr(self.model, "_demo_lock", None) or threading.Lock()
        with lock:
            return self.model.explain(rec["images"], messages, self.last_request["answer"])


def inspect_last(conversation: ChatSession | None, max_maps: int = 4) -> tuple[list, str]:
    """The "Inspect" panel: ([(heatmap PIL image, caption)], markdown summary).

    Heatmaps are drawn over each image as the model framed it (``explain``'s views),
    so in "pad" mode the letterbox bands are part of the picture and the heat sits
    on the patches the model actually saw. A tiled image (``image_mode="anyres"``) gets
    its crops' maps stitched over the whole image, its global view's maps, the crop grid
    (``mmkit.viz.tiles.draw_tiles``) and one sentence on what the crops cost.
    """
    from mmkit.viz.overlay import heatmap_image

    if conversation is None:
        raise ChatError("Nothing to inspect yet: pick a model and ask a question first.")
    info = conversation.explain()
    views = info.get("views") or conversation.last_request["record"]["images"]
    tiles = info.get("tiles")
    gallery = []
    for i, (view, maps) in enumerate(zip(views, info["maps"])):
        for label, m in list(maps.items())[:max_maps]:
            gallery.append((heatmap_image(view, m), f"image {i + 1}: {'crops, ' if tiles else ''}{label}"))
        if tiles:
            for label, m in list(info["global_maps"][i].items())[:max_maps]:
                gallery.append((heatmap_image(info["global_views"][i], m), f"image {i + 1}: global view, {label}"))
    h, w = info["grid"]
    lines = [f"**What the maps show:** {info['source']}.",
             f"**Patch grid:** {h} x {w} = {h * w} patches per {'crop' if tiles else 'image'}."]
    for i, t in enumerate(tiles or []):
        (rows, cols), (sh, sw), (th, tw) = t["grid"], t["crop"], t["token_grid"]
        px = f"{sh} px" if sh == sw else f"{sw} x {sh} px"
        lines.append(f"**Tiles:** image {i + 1} was cut into {rows} x {cols} crops of {px} plus a global view; "
                     f"each crop costs {th * tw} tokens, as does the global view (tokens that only saw padding "
                     "are dropped, and a newline token ends each row).")
    costs = ", ".join(f"image {i + 1}: {n}" for i, n in enumerate(info["image_tokens"]))
    lines.append(f"**Tokens each image cost:** {costs} (total {sum(info['image_tokens'])}).")
    if info.get("image_share"):
        share = ", ".join(f"image {i + 1}: {s:.0%}" for i, s in enumerate(info["image_share"]))
        lines.append(f"**Share of the answer's attention on the image tokens:** {share}.")
    if info.get("gates"):
        lines.append("**Gates (tanh alpha):** " + ", ".join(f"`{k}` = {v:+.3f}" for k, v in info["gates"].items()))
    else:
        lines.append("**Gates:** none (this family has no gated layers; Flamingo does).")
    if not gallery:
        lines.append("No heatmap: this bridge's tokens do not sit on the patch grid.")
    gallery += _family_pictures(conversation, info, views)
    recipe = getattr(conversation.model, "recipe", None)
    meaning = _family_card(getattr(recipe, "family", ""), getattr(recipe, "bridge", None))[2]
    if meaning:
        lines.insert(0, f"**What this picture means:** {meaning}")
    return gallery, "\n\n".join(lines)


def _figure_image(fig):
    """A matplotlib figure as a PIL image (for the gallery)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _family_pictures(conversation: ChatSession, info: dict, views: Sequence) -> list[tuple[Any, str]]:
    """What a family shows besides heatmaps, drawn with ``mmkit.viz``: Flamingo's gates per
    layer and media mask, the boxes an answer holds (Qwen-VL), the crop grid of a tiled
    image (LLaVA-NeXT's AnyRes), a native model's drawings."""
    from mmkit.data.grounding import find_boxes

    out: list[tuple[Any, str]] = []
    model, answer = conversation.model, conversation.last_request["answer"]
    if info.get("gates"):
        from mmkit.viz.core import plot_bars

        out.append((_figure_image(plot_bars(info["gates"], title="gates per LM layer", ylabel="|tanh alpha|")),
                    "gates: how much each layer lets the image in"))
    marker = getattr(model, "image_token_id", None)
    if getattr(getattr(model, "recipe", None), "family", "") == "flamingo" and marker is not None:
        from mmkit.bridges.flamingo import media_mask
        from mmkit.viz.core import plot_matrix

        ids = model.processor([conversation.last_request["record"]])["input_ids"]
        mask = media_mask(ids, marker)[0, -48:].T.float().numpy()  # (N_img, T): the last 48 tokens
        words = [model.processor.tokenizer.decode([int(t)]).strip() or "␣" for t in ids[0, -48:]]
        fig = plot_matrix(mask, [f"image {i + 1}" for i in range(mask.shape[0])], words,
                          "media mask: the image each token may see (yellow)", colorbar=False,
                          annotate=False, cell=0.25)
        out.append((_figure_image(fig), "media mask"))
    boxes = [b for _, b in find_boxes(answer)[0]]
    if boxes and views:
        from mmkit.viz.boxes import draw_boxes

        out.append((draw_boxes(views[0], boxes, colors=["#ff00ff", "#1f77b4", "#d62728"], scale=4),
                    "the box(es) in the answer"))
    if info.get("tiles"):
        from mmkit.data.images import load_image
        from mmkit.viz.tiles import draw_tiles

        for i, t in enumerate(info["tiles"]):
            image = load_image(conversation.last_request["record"]["images"][i])
            rows, cols = t["grid"]
            out.append((draw_tiles(image, t["grid"], crop=max(t["crop"][0], 128)),  # >= 128 px a crop, to read
                        f"image {i + 1}: how AnyRes cut it, {rows} x {cols} crops in reading order"))
    out += [(im, "drawn by the model") for im in conversation.last_drawings]
    return out


# ----------------------------------------------------------------------------- gradio
def _save_drawing(image, min_size: int = 0) -> str:
    """A picture as a PNG in Gradio's temporary folder (the chat shows files by path),
    upscaled (nearest, so its pixels stay visible) to at least ``min_size`` px."""
    import tempfile

    from PIL import Image

    scale = max(1, -(-min_size // max(image.size)))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    folder = Path(os.environ.get("GRADIO_TEMP_DIR") or tempfile.gettempdir()) / "mmkit_drawings"
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".png", delete=False) as f:
        image.save(f, format="PNG")
        return f.name


def _user_message(turn_text: str, files: Sequence[Any], images_ok: bool) -> list[dict]:
    msgs = []
    for f in files or []:
        path = f["path"] if isinstance(f, dict) else f
        if images_ok:
            msgs.append({"role": "user", "content": {"path": str(path)}})
        else:  # a rejected file is named, not displayed (it may not be an image at all)
            msgs.append({"role": "user", "content": f"[{Path(str(path)).name}]"})
    if turn_text:
        shown = turn_text if len(turn_text) <= 300 else turn_text[:300] + f"... ({len(turn_text):,} characters)"
        msgs.append({"role": "user", "content": shown})
    return msgs


def build_app(store: ModelStore | Sequence[str | Path] = (), *, title: str = "mmkit chat"):
    """The Gradio Blocks app over a ``ModelStore`` (or a list of checkpoint folders).

    API names (for ``gradio_client``): ``/chat`` (model, {"text", "files"}, max new
    tokens, temperature) streams the chat; ``/inspect``; ``/clear``; ``/select``.
    """
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    import gradio as gr

    if not isinstance(store, ModelStore):
        store = ModelStore(discover_models(store))
    labels = store.labels
    notes = [f"Could not use a checkpoint: {p}" for p in store.problems]
    if not labels:
        notes.append(no_model_message())
    intro = [{"role": "assistant", "content": n} for n in notes]

    from mmkit.data.shapes import VQA_QTYPES

    n_examples = len(VQA_QTYPES)
    cards = {e.label: model_card(e) for e in store.entries}

    def new_state(label):
        return {"label": label, "conversation": None, "display": list(intro)}

    def score_text(state) -> str:
        c = (state or {}).get("conversation")
        right, asked = c.score if c is not None else (0, 0)
        return f"**Score in this conversation:** {right} / {asked}" if asked else ""

    def conversation_for(state, label) -> ChatSession:
        if state["conversation"] is None or state["label"] != label:
            model = store.get(label)
            state["conversation"], state["label"] = ChatSession(model, label), label
        return state["conversation"]

    def respond(label, message, max_new_tokens, temperature, state):
        state = state or new_state(label)
        if state["label"] != label:  # picking another model starts a new conversation
            state = new_state(label)
        message = message or {}
        text, files = message.get("text") or "", list(message.get("files") or [])
        display = state["display"]
        cleared = gr.MultimodalTextbox(value=None)
        shown = False
        try:
            conversation = conversation_for(state, label)
            if state.get("scene") is not None and conversation.scene is None and not conversation.turns:
                conversation.set_scene(state.pop("scene"))  # the model was picked after New scene
            turn = conversation.check(text, files)  # refuse before showing anything as sent
            display += _user_message(turn.text, files, True)
            display.append({"role": "assistant", "content": "…"})
            shown = True
            yield display, cleared, state, score_text(state)
            for partial in conversation.stream(turn=turn, max_new_tokens=max_new_tokens,
                                          temperature=temperature):
                display[-1] = {"role": "assistant", "content": partial or "…"}
                yield display, cleared, state, score_text(state)
            drawn = conversation.last_drawings
            if drawn:  # a native model drew: show the pictures under its words
                words = display[-1]["content"].replace(IMAGE_TOKEN, "").strip()
                display.pop()
                if words and words != "…":
                    display.append({"role": "assistant", "content": words})
                display += [{"role": "assistant", "content": {"path": _save_drawing(im)}} for im in drawn]
                yield display, cleared, state, score_text(state)
            if display[-1]["content"] in ("", "…"):
                display[-1] = {"role": "assistant", "content": "(the model answered with nothing)"}
                yield display, cleared, state, score_text(state)
            # the truth beside the answer (a generated scene), or the note under it (a photo)
            verdict = conversation.judge(turn.text, conversation.turns[-1].text)
            if verdict:
                mark = "**✓ right**" if verdict["ok"] else "**✗ wrong**"
                display.append({"role": "assistant", "content": f"{mark}: the true answer is **{verdict['truth']}** "
                                f"(score {verdict['score'][0]} / {verdict['score'][1]})"})
            note = photo_note(turn.images, conversation.model) if files else None
            if note:
                display.append({"role": "assistant", "content": note})
            if verdict or note:
                yield display, cleared, state, score_text(state)
        except Exception as e:  # noqa: BLE001 - the server stays up whatever happens
            if not isinstance(e, ChatError):  # not an input problem: a bug, show it plainly
                traceback.print_exc()
                e = f"Something went wrong inside mmkit ({type(e).__name__}: {e}); the details are on the console."
            if shown:
                display.pop()  # the unfinished answer
            else:
                display += _user_message(text.strip(), files, False)
            display.append({"role": "assistant", "content": f"⚠️ {e}"})
            yield display, cleared, state, score_text(state)

    def ask_example(label, question, max_new_tokens, temperature, state):
        yield from respond(label, {"text": question, "files": []}, max_new_tokens, temperature, state)

    def hidden_examples():
        return [gr.Button(visible=False) for _ in range(n_examples)]

    def clear(label, state):
        state = new_state(label)
        return state["display"], state, [], "", "", "", *hidden_examples()

    def show_scene(state, scene: DemoScene, words: str) -> None:
        state["display"] += [{"role": "assistant", "content": {"path": _save_drawing(scene.image, 192)}},
                             {"role": "assistant", "content": words}]

    def select(label, state):
        """Another model: a new conversation, about the same generated scene if there was one
        (its example questions stay), so models can be compared on one picture."""
        old = state or {}
        scene = old["conversation"].scene if old.get("conversation") is not None else old.get("scene")
        state = new_state(label)
        try:
            status = ChatSession(store.get(label), label).describe() if label else no_model_message()
        except ChatError as e:
            status = f"⚠️ {e}"
        if scene is None:
            return (state["display"], state, [], "", status, cards.get(label, ""), "", "", *hidden_examples())
        state["scene"] = scene  # given to the conversation with its first question
        show_scene(state, scene, f"The same scene (seed {scene.seed}) for {label}: click a question below.")
        return (state["display"], state, [], "", status, cards.get(label, ""), gr.update(), "",
                *[gr.update() for _ in range(n_examples)])

    def make_scene(label, seed, state):
        """A new conversation about a new test scene: its image in the chat, its example questions."""
        state = new_state(label)
        try:
            seed = str(seed or "").strip()
            if seed and not seed.isdigit():
                raise ChatError(f"The seed {seed!r} is not a whole number >= 0; type one, or leave it empty.")
            scene = new_scene(int(seed) if seed else None)
        except ChatError as e:
            state["display"].append({"role": "assistant", "content": f"⚠️ {e}"})
            return state["display"], state, "", "", *hidden_examples()
        show_scene(state, scene, f"A new ShapesWorld test scene (seed {scene.seed}), never seen in training. "
                                 "Click a question below, or type your own.")
        try:
            conversation_for(state, label).set_scene(scene)
        except ChatError as e:  # no usable model: keep the scene for when one is picked
            state["scene"] = scene
            state["display"].append({"role": "assistant", "content": f"⚠️ {e}"})
        buttons = [gr.Button(value=e["question"], visible=True) for e in scene.examples]
        buttons += [gr.Button(visible=False) for _ in range(n_examples - len(buttons))]
        return (state["display"], state, f"**Scene seed {scene.seed}** (ShapesWorld test split)", "", *buttons)

    def inspect(state):
        conversation = (state or {}).get("conversation")
        try:
            return inspect_last(conversation)
        except ChatError as e:
            return [], f"⚠️ {e}"
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            return [], f"⚠️ Something went wrong inside mmkit ({type(e).__name__}: {e}); see the console."

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"# {title}\nPress **New scene** for a ShapesWorld picture the models never saw, "
                    "click a question and see the answer stream in next to the truth; or upload your own "
                    "image(s). **Inspect** shows what the model looked at for its last answer.")
        state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                picker = gr.Dropdown(choices=labels, value=labels[0] if labels else None,
                                     label="Model", allow_custom_value=False, elem_id="model-picker")
                card = gr.Markdown(cards.get(labels[0], "") if labels else "", elem_id="model-card")
                status = gr.Markdown("The model loads on first use (a few seconds for a tiny one)."
                                     if labels else "No model available yet: see the chat.")
                with gr.Row(equal_height=True):
                    scene_btn = gr.Button("New scene", variant="primary", elem_id="new-scene", scale=2)
                    seed_box = gr.Textbox(value="", label="Seed (empty: random)", max_lines=1, scale=1,
                                          elem_id="seed")
                chatbot = gr.Chatbot(value=intro, label="Chat", height=500, elem_id="chat")
                scene_info = gr.Markdown("", elem_id="scene-info")
                with gr.Row():
                    example_btns = [gr.Button(visible=False, size="sm", elem_classes=["example-question"])
                                    for _ in range(n_examples)]
                score = gr.Markdown("", elem_id="score")
                box = gr.MultimodalTextbox(file_count="multiple", sources=["upload"],
                                           placeholder="Ask about the image(s)… (attach with the clip)",
                                           show_label=False, elem_id="message")
                with gr.Row():
                    clear_btn = gr.Button("Clear")
                with gr.Accordion("Generation settings", open=False):
                    max_tokens = gr.Slider(1, 256, value=48, step=1, label="Max new tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05,
                                            label="Temperature (0 = greedy)")
            with gr.Column(scale=2):
                gr.Markdown("## Inspect")
                inspect_btn = gr.Button("Inspect the last answer", elem_id="inspect")
                gallery = gr.Gallery(label="Where the model looked", columns=2, height=360, format="png",
                                     elem_id="inspect-gallery")
                info = gr.Markdown("", elem_id="inspect-info")
                with gr.Accordion("The models", open=False):
                    gr.Markdown("\n".join(f"- {c}" for c in cards.values()) or "(none)")
        box.submit(respond, [picker, box, max_tokens, temperature, state], [chatbot, box, state, score],
                   api_name="chat")
        for btn in example_btns:
            btn.click(ask_example, [picker, btn, max_tokens, temperature, state], [chatbot, box, state, score],
                      api_name=False)
        scene_btn.click(make_scene, [picker, seed_box, state], [chatbot, state, scene_info, score, *example_btns],
                        api_name="new_scene")
        clear_btn.click(clear, [picker, state], [chatbot, state, gallery, info, scene_info, score, *example_btns],
                        api_name="clear")
        picker.change(select, [picker, state],
                      [chatbot, state, gallery, info, status, card, scene_info, score, *example_btns],
                      api_name="select")
        inspect_btn.click(inspect, [state], [gallery, info], api_name="inspect")
    app.mmkit_store = store
    return app


def launch(checkpoints: Sequence[str | Path] = (), *, port: int | None = None, share: bool = False,
           block: bool = True, warm: bool = True):
    """Start the demo on 127.0.0.1 (public link only with ``share``); returns the app.

    Prints every checkpoint that cannot be used, and the local URL. ``warm`` loads the
    first model in a background thread after the page is served, so the first
    question does not wait for it.
    """
    t0 = time.perf_counter()
    store = ModelStore(discover_models(checkpoints))
    for p in store.problems:
        print(f"mmkit demo: cannot use a checkpoint: {p}", flush=True)
    if not store.labels:
        print("mmkit demo: " + no_model_message().replace("\n\n", "\n"), flush=True)
    app = build_app(store)
    app.launch(server_name="127.0.0.1", server_port=port, share=share, prevent_thread_lock=True,
               quiet=True, footer_links=["api"])
    print(f"mmkit demo: running on {app.local_url} (started in {time.perf_counter() - t0:.1f} s; "
          "Ctrl+C to stop)", flush=True)
    if share and getattr(app, "share_url", None):
        print(f"mmkit demo: public link {app.share_url}", flush=True)
    if warm and store.labels:
        threading.Thread(target=lambda: _quiet_get(store, store.labels[0]), daemon=True).start()
    if block:
        try:
            app.block_thread()
        except KeyboardInterrupt:  # pragma: no cover - interactive
            pass
    return app


def _quiet_get(store: ModelStore, label: str) -> None:
    try:
        store.get(label)
    except ChatError as e:
        print(f"mmkit demo: {e}", flush=True)
