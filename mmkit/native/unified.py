"""One decoder that reads and draws: discrete image tokens in one vocabulary.

Papers: Chameleon Team, 2024, "Chameleon: Mixed-Modal Early-Fusion Foundation Models"
(Sec. 2: image tokenizer, one vocabulary, Fig. 1); Gemini Team, 2023 (Sec. 2: "natively
multimodal", images out as discrete tokens); Bai et al., 2023, "Sequential Modeling
Enables Scalable Learning for Large Vision Models" (LVM: VQGAN tokens, one decoder).

The stitched models of mmkit (LLaVA ... Flamingo) turn a picture into *continuous*
vectors that only go one way, into the LM. Here a picture becomes *token ids*, so the
same decoder can read it and write it::

    image (3, 64, 64) --VQ-VAE encoder + nearest code--> codes (8, 8) in [0, K)
    ids: text tokens [0, V_text) | image codes [V_text, V_text + K)

    read   <|im_start|>user\\n <boi> c_1 .. c_64 <eoi> \\nWhat colour is the star?<|im_end|>
           <|im_start|>assistant\\n red <|im_end|>                 loss on "red"
    draw   <|im_start|>user\\nDraw a large red circle on the left.<|im_end|>
           <|im_start|>assistant\\n <boi> c_1 .. c_64 <eoi> <|im_end|>   loss on the codes

One embedding table and one softmax for both modalities (Chameleon Sec. 2.1): the LM's
vocabulary grows by K rows (``resize_token_embeddings``); nothing else changes. The shared
``Processor`` builds both directions: each ``<image>`` placeholder becomes
``<boi> + codes + <eoi>`` (``expand_image``), and with ``label_images=True`` an image in an
*assistant* turn is labelled like text.

Generation (``generate``) uses the LM's own ``generate`` with a ``ModalityMask`` logits
processor: outside an image only text ids (and ``<boi>``) may follow; after ``<boi>``
exactly ``h*w`` image codes, then ``<eoi>`` (Chameleon: "after a begin-of-image token,
sample only image ids"). The codes are decoded by the VQ-VAE into a picture.

The loss is the mean next-token loss over text targets plus ``image_weight`` times the
mean over image-code targets, reported apart (``losses = {"text", "image"}``): a drawn
image has 64 code targets (plus ``<eoi>`` and the end of the turn in the text mean), an
answer two or three, and one pooled mean would let the pictures drown the answers out.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkit.data.processor import IGNORE_INDEX, Processor
from mmkit.language import IMAGE_TOKEN
from mmkit.vlm import VLM, VLMOutput, eager_attention, load_parts

__all__ = ["UnifiedLM", "ModalityMask", "build_unified", "BOI", "EOI"]

BOI, EOI = "<boi>", "<eoi>"


class ModalityMask:
    """A transformers logits processor that keeps each position in its modality.

    For each row it finds the last ``<boi>`` / ``<eoi>`` among the ids so far:

    * inside an image with ``n < h*w`` codes written: only image codes are allowed;
    * inside an image with all ``h*w`` codes written: only ``<eoi>``;
    * outside an image: anything but image codes and ``<eoi>``.

    So every picture the model starts is complete and well formed, whatever it samples.
    With ``max_text`` (and ``prompt_len``), once that many text tokens were written
    outside pictures only ``stop_ids`` may follow: the text budget does not count pictures.
    ``temperatures=(text, image)`` divides the logits of each modality (used with
    sampling): e.g. ``(1e-4, 1.0)`` answers greedily in words but samples the picture.
    """

    def __init__(self, code_start: int, num_codes: int, codes_per_image: int, boi_id: int, eoi_id: int,
                 *, prompt_len: int = 0, max_text: int | None = None, stop_ids: Sequence[int] = (),
                 temperatures: tuple[float, float] | None = None):
        self.code_start, self.code_end = code_start, code_start + num_codes
        self.per_image, self.boi_id, self.eoi_id = codes_per_image, boi_id, eoi_id
        self.prompt_len, self.max_text, self.stop_ids = prompt_len, max_text, list(stop_ids)
        self.temperatures = temperatures

    def state(self, ids: Tensor) -> Tensor:
        """(B, T) ids -> (B,) codes written in the open image, or -1 outside an image."""
        T = ids.shape[1]
        pos = torch.arange(T, device=ids.device).expand_as(ids)
        last_boi = torch.where(ids == self.boi_id, pos, -1).max(dim=1).values  # (B,)
        last_eoi = torch.where(ids == self.eoi_id, pos, -1).max(dim=1).values
        inside = last_boi > last_eoi
        return torch.where(inside, T - 1 - last_boi, torch.full_like(last_boi, -1))

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        n = self.state(input_ids)  # (B,)
        allowed = torch.zeros_like(scores, dtype=torch.bool)  # (B, V)
        is_code = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        is_code[self.code_start:self.code_end] = True
        text_ok = ~is_code
        text_ok[self.eoi_id] = False
        writing = (n >= 0) & (n < self.per_image)
        closing = n >= self.per_image
        allowed[writing] = is_code
        allowed[closing, self.eoi_id] = True
        allowed[n < 0] = text_ok
        if self.max_text is not None and self.stop_ids:
            new = input_ids[:, self.prompt_len:]  # (B, t) written so far
            image_part = ((new >= self.code_start) & (new < self.code_end)) | (new == self.boi_id) | (new == self.eoi_id)
            spent = (~image_part).sum(1) >= self.max_text  # (B,)
            stop = spent & (n < 0)
            allowed[stop] = False
            allowed[stop.nonzero().flatten()[:, None], torch.tensor(self.stop_ids, device=scores.device)] = True
        if self.temperatures is not None:
            t_text, t_image = self.temperatures
            t = torch.where(writing, t_image, t_text).to(scores.dtype).clamp_min(1e-6)[:, None]  # (B, 1)
            scores = scores / t
        return scores.masked_fill(~allowed, float("-inf"))


class UnifiedLM(nn.Module):
    """A decoder-only LM over text tokens + VQ image codes: reads and draws pictures.

    Args:
        lm: a transformers causal LM whose vocabulary already holds the image codes at
            ``[code_start, code_start + vq.num_codes)`` (``build_unified`` resizes it).
        tokenizer: the text tokenizer (with ``<image>``, ``<boi>``, ``<eoi>``).
        vq: a ``mmkit.native.vq.VQVAE`` (frozen): pictures <-> code grids.
        code_start: id of image code 0 (the text vocabulary's size).
        image_weight: weight of the image-code loss against the text loss.
    """

    writes_images = True  # chat / demo: answers may hold pictures (generate(return_images=True))

    def __init__(self, lm: nn.Module, tokenizer, vq: nn.Module, *, code_start: int, image_weight: float = 1.0,
                 max_length: int = 512, system_prompt: str | None = None):
        super().__init__()
        self.lm, self.tokenizer, self.vq = lm, tokenizer, vq
        self.code_start = int(code_start)
        self.num_codes = int(vq.num_codes)
        self.image_weight = float(image_weight)
        self.boi_id = tokenizer.convert_tokens_to_ids(BOI)
        self.eoi_id = tokenizer.convert_tokens_to_ids(EOI)
        for tok, i in ((BOI, self.boi_id), (EOI, self.eoi_id)):
            if i is None or i == tokenizer.unk_token_id:
                raise ValueError(f"the tokenizer has no {tok} token; load the LM with "
                                 "mmkit.language.load_language_model, which adds it")
        vocab = lm.get_input_embeddings().num_embeddings
        if vocab < self.code_start + self.num_codes:
            raise ValueError(f"the LM's vocabulary ({vocab}) has no room for {self.num_codes} image codes "
                             f"from id {self.code_start}; build the model with build_unified")
        h, w = vq.grid
        self.codes_per_image = h * w
        self.image_size = (vq.config.image_size, vq.config.image_size)
        self.processor = Processor(tokenizer, self.preprocess, self.expand_image, max_length=max_length,
                                   system_prompt=system_prompt, label_images=True)
        self.vq.requires_grad_(False)

    # ------------------------------------------------------------------ images
    def preprocess(self, images: list) -> Tensor:
        """PIL images -> (N, 3, H, W) in [-1, 1], the VQ-VAE's input."""
        return self.vq.preprocess(images)

    def pixel_dtype(self) -> torch.dtype:
        return next(self.vq.parameters()).dtype

    def num_image_tokens(self, pixel_values: Tensor | None = None) -> int:
        return self.codes_per_image + 2  # <boi> + h*w codes + <eoi>

    @torch.no_grad()
    def image_ids(self, pixel_values: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N, h*w) LM ids of the images' codes, row-major."""
        device = next(self.vq.parameters()).device
        codes = self.vq.encode(pixel_values.to(device=device, dtype=self.pixel_dtype()))  # (N, h, w)
        return codes.flatten(1).cpu() + self.code_start  # (N, h*w)

    def expand_image(self, pixel_values: Tensor) -> list[int]:
        """The ids one image becomes: ``<boi>``, its h*w codes, ``<eoi>`` (the processor asks)."""
        return [self.boi_id, *self.image_ids(pixel_values[None])[0].tolist(), self.eoi_id]

    @torch.no_grad()
    def draw(self, ids: Sequence[int] | Tensor) -> "Any":
        """h*w LM ids of image codes -> a PIL image (the VQ-VAE decoder)."""
        codes = torch.as_tensor(list(ids) if not torch.is_tensor(ids) else ids, dtype=torch.long)
        codes = (codes - self.code_start).clamp(0, self.num_codes - 1)
        h, w = self.vq.grid
        device = next(self.vq.parameters()).device
        pixels = self.vq.decode(codes.reshape(1, h, w).to(device))
        return self.vq.to_images(pixels)[0]

    # ------------------------------------------------------------------- train
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                pixel_values: Any = None, **lm_kwargs: Any) -> VLMOutput:
        """Teacher-forced pass. The pictures are already in ``input_ids`` as codes, so
        ``pixel_values`` (what the processor also returns) is not needed."""
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, **lm_kwargs)
        logits = out.logits  # (B, T, V)
        if labels is None:
            return VLMOutput(loss=None, logits=logits)
        target = labels[:, 1:]  # (B, T-1): position t predicts token t+1
        pred = logits[:, :-1].float()
        is_image = (target >= self.code_start) & (target < self.code_start + self.num_codes)
        is_text = (target != IGNORE_INDEX) & ~is_image
        nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1),
                              ignore_index=IGNORE_INDEX, reduction="none").view_as(target)  # (B, T-1)
        zero = nll.sum() * 0  # keeps the graph when a batch has no target of one kind
        text = nll[is_text].mean() if is_text.any() else zero
        image = nll[is_image].mean() if is_image.any() else zero
        loss = text + self.image_weight * image
        return VLMOutput(loss=loss, logits=logits, losses={"text": text.detach(), "image": image.detach()})

    def module_groups(self) -> dict[str, nn.Module]:
        return {"lm": self.lm, "vq": self.vq}

    # ---------------------------------------------------------------- generate
    def stop_token_ids(self) -> list[int]:
        tok = self.tokenizer
        ids = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
        return sorted(i for i in ids if isinstance(i, int) and i != tok.unk_token_id)

    # a user message (str) or a message list -> a record: the same convention as every VLM
    prompt_record = VLM.prompt_record
    prompt_batch = VLM.prompt_batch

    def split_reply(self, ids: Sequence[int]) -> dict[str, Any]:
        """Generated ids -> ``{"text", "images"}``; the text has ``<image>`` where a picture is."""
        text_ids: list[int] = []
        pieces: list[str] = []
        images = []
        codes: list[int] | None = None
        for t in list(ids):
            if codes is not None:
                if self.code_start <= t < self.code_start + self.num_codes:
                    codes.append(t)
                    continue
                if len(codes) == self.codes_per_image:  # <eoi> (or anything): the picture is complete
                    images.append(self.draw(codes))
                    pieces.append(IMAGE_TOKEN)
                codes = None
                if t == self.eoi_id:
                    continue
            if t == self.boi_id:
                pieces.append(self.tokenizer.decode(text_ids, skip_special_tokens=True))
                text_ids, codes = [], []
                continue
            text_ids.append(t)
        if codes is not None and len(codes) == self.codes_per_image:
            images.append(self.draw(codes))
            pieces.append(IMAGE_TOKEN)
        pieces.append(self.tokenizer.decode(text_ids, skip_special_tokens=True))
        return {"text": "".join(pieces).strip(), "images": images}

    @torch.no_grad()
    def generate(self, images: Sequence | None = None, messages: str | list[dict] | None = None, *,
                 records: Sequence[dict] | None = None, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, streamer: Any = None, return_images: bool = False,
                 image_temperature: float = 1.0, **gen_kwargs: Any) -> list[Any]:
        """Answer (or draw) for one prompt or a batch of ``records``.

        ``max_new_tokens`` is the *text* budget; a picture's ``h*w + 2`` tokens come on
        top, so one picture always fits. ``temperature`` is for words (0: greedy),
        ``image_temperature`` for image codes (0: greedy). Pictures are sampled by
        default: the most likely code of almost every cell is background, so a greedy
        picture is an empty canvas (docs/benchmarks.md shows it). Returns the texts
        (``<image>`` where a picture was drawn) or, with ``return_images=True``, dicts
        ``{"text", "images"}``.
        """
        from transformers import LogitsProcessorList

        ids, mask, _ = self.prompt_batch(images, messages, records)
        # the guard scales each modality by its own temperature (0 -> ~greedy), so generate
        # samples at temperature 1 whenever either modality samples
        sample = temperature > 0 or image_temperature > 0
        temps = (max(temperature, 1e-4), max(image_temperature, 1e-4)) if sample else None
        guard = ModalityMask(self.code_start, self.num_codes, self.codes_per_image, self.boi_id, self.eoi_id,
                             prompt_len=ids.shape[1], max_text=max_new_tokens, stop_ids=self.stop_token_ids(),
                             temperatures=temps)
        was_training = self.training
        self.eval()
        try:
            out = self.lm.generate(
                input_ids=ids, attention_mask=mask,
                max_new_tokens=max_new_tokens + self.codes_per_image + 2,
                do_sample=sample, temperature=1.0 if sample else None,
                top_p=top_p if sample else None, top_k=None,
                logits_processor=LogitsProcessorList([guard]),
                eos_token_id=self.stop_token_ids(), pad_token_id=self.tokenizer.pad_token_id,
                streamer=streamer, **gen_kwargs)
        finally:
            self.train(was_training)
        replies = [self.split_reply(row.tolist()) for row in out[:, ids.shape[1]:]]
        return replies if return_images else [r["text"] for r in replies]

    @torch.no_grad()
    def explain(self, images: Sequence, messages: str | list[dict], answer: str) -> dict[str, Any]:
        """Where the decoder looked while it wrote ``answer``: the LM's attention from the
        positions that predict the answer to each image's code positions, mean over heads,
        on the VQ grid (all layers, and the last). The format of ``VLM.explain``."""
        from mmkit.data.images import load_image

        record = self.prompt_record(images, messages)
        record["conversations"].append({"from": "gpt", "value": answer})
        batch = self.processor([record])
        device = next(self.lm.parameters()).device
        ids = batch["input_ids"].to(device)  # (1, T)
        labels = batch["labels"][0]
        is_code = (ids[0] >= self.code_start) & (ids[0] < self.code_start + self.num_codes)  # (T,)
        if not bool(is_code.any()):
            raise ValueError("explain needs at least one image in the prompt (maps are drawn over it)")
        # rows that predict a labelled text token of the answer (image codes in it excluded)
        target = labels[1:]
        rows = ((target != IGNORE_INDEX) & ((target < self.code_start) |
                                            (target >= self.code_start + self.num_codes))).nonzero().flatten()
        was_training = self.training
        self.eval()
        try:
            with eager_attention(self.lm):
                out = self.lm(input_ids=ids, attention_mask=batch["attention_mask"].to(device), output_attentions=True)
        finally:
            self.train(was_training)
        a = torch.stack([x[0].float().mean(0)[rows.to(x.device)].cpu() for x in out.attentions])  # (L, R, T)
        h, w = self.vq.grid
        cols = is_code.nonzero().flatten().cpu().split(self.codes_per_image)  # per image
        maps, share = [], []
        for c in cols:
            per_layer = a[:, :, c].mean(1)  # (L, h*w)
            share.append(float(a[:, :, c].sum(-1).mean()) if rows.numel() else 0.0)
            m = {}
            for name, flat in (("all layers", per_layer.mean(0)), ("last layer", per_layer[-1])):
                g = flat.clamp_min(0).reshape(h, w)
                m[name] = (g / g.sum().clamp_min(1e-12)).numpy()
            maps.append(m)
        views = [load_image(im).convert("RGB").resize(self.image_size[::-1]) for im in record["images"]]
        return {"image_tokens": [self.codes_per_image + 2] * len(cols), "grid": (h, w), "maps": maps,
                "views": views, "gates": None, "image_share": share,
                "source": (f"the decoder's attention from the {int(rows.numel())} positions that wrote the answer "
                           f"to each image's {h}x{w} VQ codes, mean over heads (all layers, and the last)")}


def build_unified(recipe, pretrained: bool = True) -> UnifiedLM:
    """A ``UnifiedLM`` from a recipe.

    ``recipe.vision``: the VQ-VAE ("tiny": ``assets/tiny/vq``, or a folder saved with
    ``VQVAE.save_pretrained``). ``recipe.lm``: the decoder's config and tokenizer.
    ``bridge_kwargs``: ``lm_init`` ("scratch": Chameleon, fresh weights; "pretrained": the
    LM's weights), ``lm_config`` (config overrides for a scratch decoder, e.g.
    ``{"num_hidden_layers": 6}``), ``image_weight`` (loss weight of the image codes).
    """
    from transformers import AutoModelForCausalLM

    from mmkit.native.vq import load_vqvae

    kwargs = dict(recipe.bridge_kwargs)
    lm_init = kwargs.pop("lm_init", "scratch")
    lm_config = kwargs.pop("lm_config", {}) or {}
    image_weight = float(kwargs.pop("image_weight", 1.0))
    if kwargs:
        raise ValueError(f"recipe {recipe.name!r}: unknown unified bridge_kwargs {sorted(kwargs)}; "
                         "known: lm_init, lm_config, image_weight")
    if lm_init not in ("scratch", "pretrained"):
        raise ValueError(f"recipe {recipe.name!r}: lm_init must be 'scratch' or 'pretrained', got {lm_init!r}")
    if lm_config and lm_init != "scratch":
        raise ValueError(f"recipe {recipe.name!r}: lm_config changes the architecture, so it needs lm_init='scratch'")
    if recipe.quantization or recipe.lora:
        raise ValueError(f"recipe {recipe.name!r}: the unified decoder is trained in full (no 4-bit, no LoRA)")
    vq = load_vqvae(recipe.vision)
    _, lm, tokenizer = load_parts(recipe, pretrained=pretrained, vision=False)
    code_start = len(tokenizer)
    if lm_init == "scratch":
        config = lm.config
        for k, v in lm_config.items():
            if not hasattr(config, k):
                raise ValueError(f"recipe {recipe.name!r}: lm_config key {k!r} is not a field of {type(config).__name__}")
            setattr(config, k, v)
        config.vocab_size = code_start + vq.num_codes
        lm = AutoModelForCausalLM.from_config(config)
    else:
        # new rows for the image codes; mean-initialised like every added token
        lm.resize_token_embeddings(code_start + vq.num_codes, mean_resizing=True)
    lm.config.vocab_size = code_start + vq.num_codes
    return UnifiedLM(lm, tokenizer, vq, code_start=code_start, image_weight=image_weight,
                     max_length=recipe.max_length, system_prompt=recipe.system_prompt)
