"""The processor: one conversation record -> the tensors a VLM trains on.

Every family in mmkit goes through this one file. It does three things:

1. **Images -> tensors** with the vision side's own resize / pad / normalisation
   (a callable the model hands over, e.g. ``VisionEncoder.preprocess``).
2. **Text -> token ids** through the language model's *chat template*, and each
   ``<image>`` placeholder in the text replaced by the token ids *the model asks for*:

   ========================  =================================================
   family                    one ``<image>`` placeholder becomes
   ========================  =================================================
   prefix (LLaVA, BLIP-2)    N copies of the image token (N = bridge outputs)
   Qwen-VL                   ``<img>`` + N image tokens + ``</img>``
   Flamingo                  one image marker (cross-attention does the rest)
   Fuyu                      rows x (cols image tokens + one ``|NEWLINE|``)
   ========================  =================================================

   The model states its expansion as a function ``expand(pixel_values) -> list[int]``
   so the processor never needs to know which family it serves.
3. **Labels**: the loss is computed only on what the assistant says. Every other
   position (system prompt, user turns, the template's role markers, image tokens,
   padding) gets ``IGNORE_INDEX = -100``, which ``F.cross_entropy`` skips.

Two switches serve the native models (``mmkit/native``):

* ``text_format="document"`` writes a record as one plain document instead of a chat:
  ``<bos> turn1 turn2 ... <eos>`` (KOSMOS-1: ``<s> <image> [embeddings] </image> text
  </s>``). ``loss_on="text"`` then labels *every* text token of the document (KOSMOS-1
  pre-training); the default ``loss_on="assistant"`` labels only what follows the
  prefix (PaLM-E).
* ``label_images=True``: an image placed in an assistant turn is something the model
  *writes*, so its expansion (discrete image codes) is labelled like text (Chameleon:
  one softmax over text and image tokens).

``collate`` pads a list of encoded samples: on the right for training (labels pad
with -100), on the left for generation (so every prompt ends at the same column and
the first generated token of every row is produced at the same step).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from mmkit.data.images import load_image
from mmkit.language import IMAGE_TOKEN, to_chat_messages

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "Processor", "ProcessorError", "Encoded", "collate", "images_of", "inline_images",
           "pad_rows", "answer_ids", "image_turns"]


class ProcessorError(ValueError):
    """A sample that cannot be turned into tensors; the message names it and says why."""


@dataclass
class Encoded:
    """One processed sample."""

    input_ids: list[int]
    labels: list[int]
    pixel_values: list[torch.Tensor] = field(default_factory=list)  # each (3, H, W)
    id: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)


def images_of(record: dict) -> list:
    """The images of a record, whether it has one ("image") or several ("images")."""
    if "images" in record and record["images"] is not None:
        return list(record["images"])
    if record.get("image") is not None:
        return [record["image"]]
    return []


def inline_images(record: dict, where: str = "sample") -> dict:
    """Qwen-VL's inline images -> ``<image>`` placeholders, so every prefix model reads them.

    ``"Picture 1: <img>a.jpg</img>\\nPicture 2: <img>b.jpg</img>\\nWhich has more stars?"``:
    each ``<img>PATH</img>`` becomes one ``<image>`` and PATH joins the record's images in
    order; an empty ``<img></img>`` stands for the record's next image. The model then
    expands each placeholder its own way: LLaVA's projector to bare image tokens, Qwen-VL
    (``image_wrap``) back to ``<img>`` + tokens + ``</img>``. Records without ``<img>`` are
    returned unchanged (the LLaVA convention).
    """
    from mmkit.data.conversations import convert_inline_images

    turns = record.get("conversations") or []
    if not any("<img>" in str(t.get("value", t.get("content", ""))) for t in turns):
        return record
    conv, paths = [], []
    for t in turns:
        key = "value" if "value" in t else "content"
        text, found = convert_inline_images(str(t[key]))
        conv.append({**t, key: text})
        paths += found
    given = images_of(record)
    named = [p for p in paths if p]
    if named and (given or len(named) != len(paths)):
        raise ProcessorError(
            f"{where}: images are given both inline (<img>{named[0]}</img>) and "
            f"{'in the record' if given else 'as empty <img></img> tags'}; the order would be ambiguous. "
            "Either put every path inside <img>...</img>, or pass the images and write empty <img></img> tags."
        )
    out = {k: v for k, v in record.items() if k not in ("image", "images")}
    out["conversations"] = conv
    out["images"] = named if named else given
    return out


class Processor:
    """Turns LLaVA-format records into token ids, labels and pixel tensors.

    Args:
        tokenizer: a transformers tokenizer with a chat template and ``<image>`` token.
        image_transform: ``list[PIL.Image] -> (N, 3, H, W)`` tensor (the encoder's own).
        expand: ``(3, H, W) pixel tensor -> list[int]``: the ids one image becomes.
        max_length: longest sequence; longer text is cut from the end, never inside images.
        system_prompt: optional system message put in front of every conversation.
        text_format: "chat" (the tokenizer's chat template) or "document" (plain text).
        loss_on: "assistant" (answers only) or "text" (every text token; documents).
        label_images: label the image ids of images inside assistant turns.
    """

    def __init__(
        self,
        tokenizer,
        image_transform: Callable[[list], torch.Tensor] | None,
        expand: Callable[[torch.Tensor], list[int]] | None,
        *,
        max_length: int = 512,
        system_prompt: str | None = None,
        text_format: str = "chat",
        loss_on: str = "assistant",
        label_images: bool = False,
    ):
        if text_format not in ("chat", "document"):
            raise ValueError(f"text_format must be 'chat' or 'document', got {text_format!r}")
        if loss_on not in ("assistant", "text"):
            raise ValueError(f"loss_on must be 'assistant' or 'text', got {loss_on!r}")
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.expand = expand
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.text_format = text_format
        self.loss_on = loss_on
        self.label_images = label_images
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            raise ProcessorError(
                f"the tokenizer has no {IMAGE_TOKEN!r} token; load the LM with "
                "mmkit.language.load_language_model, which adds it"
            )

    # ------------------------------------------------------------------ text
    def _messages(self, record: dict) -> list[dict]:
        messages = to_chat_messages(record["conversations"])
        if self.system_prompt and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        return messages

    def _template(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _render(self, messages: list[dict], for_generation: bool, sid: str) -> tuple[str, list[tuple[int, int]]]:
        """The conversation as one string, plus the character spans the assistant wrote.

        The spans come from rendering growing prefixes of the conversation: the text an
        assistant turn adds is everything between "prompt up to here + generation prompt"
        and "prompt including this turn". That works for any chat template in which a
        conversation's rendering starts with the rendering of its first turns.
        """
        if for_generation and messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # the model writes the last answer itself
        if self.text_format == "document":
            return self._render_document(messages, for_generation)
        text = self._template(messages, generation_prompt=for_generation)
        spans: list[tuple[int, int]] = []
        if not for_generation:
            for i, m in enumerate(messages):
                if m["role"] != "assistant":
                    continue
                before = self._template(messages[:i], generation_prompt=True) if i else ""
                upto = self._template(messages[: i + 1], generation_prompt=False)
                if not text.startswith(upto) or not upto.startswith(before):
                    raise ProcessorError(
                        f"sample {sid!r}: the tokenizer's chat template does not render a "
                        "conversation as a prefix of its continuation, so assistant turns "
                        "cannot be located for the label mask; use a ChatML-style template"
                    )
                spans.append((len(before), len(upto)))
        return text, spans

    def _render_document(self, messages: list[dict], for_generation: bool) -> tuple[str, list[tuple[int, int]]]:
        """The turns as one plain document: ``<bos>`` + the turns + ``<eos>`` (no role markers).

        An answer follows its prompt after a space when the prompt ends with ":" ("Answer:
        red"), directly when it ends with whitespace, else on a new line. A new line belongs
        to the prompt; a space belongs to the answer, because BPE writes it inside the
        answer's first token (" red"): it is labelled, and left out of a generation prompt.
        """
        tok = self.tokenizer
        text = tok.bos_token or ""
        spans: list[tuple[int, int]] = []

        def sep(t: str) -> str:
            if not t or t == tok.bos_token or t[-1].isspace():
                return ""
            return " " if t.endswith(":") else "\n"

        for m in messages:
            gap = sep(text)
            if m["role"] == "assistant":
                text += gap.replace(" ", "")  # a new line is the prompt's, a space the answer's
                start = len(text)
                text += gap.replace("\n", "") + m["content"]
                spans.append((start, len(text)))
            else:
                text += gap + m["content"]
        if for_generation:
            text += sep(text).replace(" ", "")  # the model writes the space with its answer
        elif tok.eos_token:
            text += tok.eos_token  # the document's end is predicted too: generation stops there
            if spans and spans[-1][1] == len(text) - len(tok.eos_token):
                spans[-1] = (spans[-1][0], len(text))
        return text, spans

    # ---------------------------------------------------------------- encode
    def encode(self, record: dict, *, for_generation: bool = False) -> Encoded:
        """One record -> ``Encoded`` (ids, labels, pixel tensors).

        ``for_generation=True`` drops a trailing assistant turn and appends the
        generation prompt, so the model continues as the assistant.
        """
        sid = str(record.get("id", "?"))
        record = inline_images(record, where=f"sample {sid!r}")  # Qwen-VL "Picture 1: <img>...</img>"
        images = images_of(record)
        messages = self._messages(record)
        n_placeholders = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
        if n_placeholders != len(images):
            raise ProcessorError(
                f"sample {sid!r}: the text has {n_placeholders} {IMAGE_TOKEN} placeholder(s) "
                f"but {len(images)} image(s) were given; put exactly one {IMAGE_TOKEN} in a "
                "user turn where each image belongs, in the order of the images"
            )
        if images and (self.image_transform is None or self.expand is None):
            raise ProcessorError(f"sample {sid!r} has images but this model takes text only")

        pixel_values: list[torch.Tensor] = []
        if images:
            pil = [load_image(im, where=f"sample {sid!r}") for im in images]
            batch = self.image_transform(pil)
            pixel_values = list(batch) if isinstance(batch, torch.Tensor) else list(batch)

        text, spans = self._render(messages, for_generation, sid)
        pieces = text.split(IMAGE_TOKEN)  # len(pieces) == len(images) + 1
        ids: list[int] = []
        labels: list[int] = []
        images_end = 0  # one past the last image token: truncation must not cut before it
        offset = 0
        for k, piece in enumerate(pieces):
            enc = self.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
            for tok, (a, _b) in zip(enc["input_ids"], enc["offset_mapping"]):
                ids.append(tok)
                pos = offset + a
                in_answer = self.loss_on == "text" or any(s <= pos < e for s, e in spans)
                labels.append(tok if in_answer else IGNORE_INDEX)
            offset += len(piece) + len(IMAGE_TOKEN)
            if k < len(images):
                image_ids = list(self.expand(pixel_values[k]))
                ids.extend(image_ids)
                written = self.label_images and any(s <= offset - len(IMAGE_TOKEN) < e for s, e in spans)
                labels.extend(image_ids if written else [IGNORE_INDEX] * len(image_ids))
                images_end = len(ids)

        if len(ids) > self.max_length:
            if images_end > self.max_length or for_generation:
                raise ProcessorError(
                    f"sample {sid!r}: {len(ids)} tokens do not fit max_length={self.max_length}"
                    + (" without cutting an image" if images_end > self.max_length else "")
                    + "; raise max_length (recipe key max_length) or shorten the conversation"
                )
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return Encoded(ids, labels, pixel_values, sid)

    def __call__(self, records: Sequence[dict], *, for_generation: bool = False) -> dict[str, Any]:
        """Encode and collate a batch of records."""
        encoded = [self.encode(r, for_generation=for_generation) for r in records]
        return collate(encoded, pad_id=self.tokenizer.pad_token_id,
                       padding_side="left" if for_generation else "right")


def collate(samples: Sequence[Encoded], *, pad_id: int, padding_side: str = "right") -> dict[str, Any]:
    """Pad to the longest sample.

    Returns ``input_ids`` / ``attention_mask`` / ``labels`` of shape (B, T) and
    ``pixel_values``: all images of the batch in order, stacked to (N_img, 3, H, W)
    when they share a size, else a list (encoder-free models take any size; tiled images).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    T = max(len(s) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s)
        sl = slice(T - n, T) if padding_side == "left" else slice(0, n)
        input_ids[i, sl] = torch.tensor(s.input_ids, dtype=torch.long)
        labels[i, sl] = torch.tensor(s.labels, dtype=torch.long)
        attention_mask[i, sl] = 1
    images = [p for s in samples for p in s.pixel_values]
    pixel_values: torch.Tensor | list[torch.Tensor] | None = None
    if images:
        # tensors that share a size are stacked; other sizes, or other image objects (tiled
        # images, ``mmkit.data.tiling.Tiles``), stay a list the model reads one by one
        same = all(torch.is_tensor(p) and p.shape == images[0].shape for p in images)
        pixel_values = torch.stack(images) if same else images
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": pixel_values,
        "ids": [s.id for s in samples],
    }


# ------------------------------------------------------------------ spans of a batch
# The processor lays out every sample; these read its layout back from a batch, for a
# model that needs one part of the text on its own (BLIP-2's Q-Former reads the caption,
# InstructBLIP's reads the instruction).
def pad_rows(rows: Sequence[Sequence[int]], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths -> (N, L) ids right-padded with 0 and their (N, L) mask."""
    L = max((len(r) for r in rows), default=0)
    ids = torch.zeros(len(rows), L, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def answer_ids(input_ids: torch.Tensor, labels: torch.Tensor, end_id: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The assistant's text of each row: (B, T) -> (B, L) ids + mask.

    The labels mark exactly the assistant's tokens (everything else is ``IGNORE_INDEX``);
    each row keeps them up to and including the first ``end_id`` (``<|im_end|>``, the end of
    the turn) and drops what the template adds after it; cut to ``max_len``.
    """
    rows = []
    for ids, lab in zip(input_ids, labels):
        tok = ids[lab != IGNORE_INDEX]
        ends = (tok == end_id).nonzero()
        if len(ends):
            tok = tok[: int(ends[0]) + 1]
        rows.append(tok[:max_len].tolist())
    if any(len(r) == 0 for r in rows):
        raise ProcessorError("a sample has no assistant turn: this needs a caption (an assistant answer) "
                             "in every sample; train it on the 'caption' task")
    return pad_rows(rows, device=input_ids.device)


def image_turns(input_ids: torch.Tensor, tokenizer, image_token_id: int, tokens_per_image: int,
                skip_ids: Sequence[int] = ()) -> list[list[int]]:
    """For each image of a ChatML batch, in order, the ids of the turn that holds it: the
    text between its ``<|im_start|>`` role header and ``<|im_end|>``, without the image's
    tokens (and ``skip_ids``, e.g. ``<img>`` wrappers)."""
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    header = tokenizer("user\n", add_special_tokens=False)["input_ids"]
    skip = {image_token_id, *skip_ids}
    out = []
    for ids in input_ids.tolist():
        slots = [i for i, t in enumerate(ids) if t == image_token_id]
        for first in slots[::tokens_per_image]:  # each image's first token
            a = max((i for i in range(first) if ids[i] == start), default=-1) + 1
            b = next((i for i in range(first, len(ids)) if ids[i] == end), len(ids))
            turn = [t for t in ids[a:b] if t not in skip]
            out.append(turn[len(header):] if turn[: len(header)] == header else turn)
    return out
