"""The assembled vision-language model: vision encoder -> bridge -> language model.

This is the "prefix" path that LLaVA, BLIP-2, InstructBLIP, MiniGPT-4 and Qwen-VL share
(LLaVA paper Fig. 1; BLIP-2 paper Fig. 3):

    pixel_values (N_img, 3, H, W)
      -> VisionEncoder.features(layer=-2, CLS dropped)    (N_img, h*w, D_v)
      -> bridge                                           (N_img, T_img, D_lm)
      -> written into the LM's input embeddings at the image-token positions
         (row-major: first image's tokens first, in reading order)   (B, T, D_lm)
      -> the LM runs on ``inputs_embeds``                  logits (B, T, V)

The processor has already put ``T_img`` copies of the image token where each
``<image>`` placeholder stood, so the merge is one ``masked_scatter``; a count
mismatch between image-token positions and bridge outputs is an error, not a silent
shift.

``generate`` hands the merged embeddings to the LM's own ``generate`` (KV cache,
sampling, stopping), so every family gets the same decoding for free.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mmkit.bridges import Bridge
from mmkit.data.processor import Processor
from mmkit.language import IMAGE_TOKEN

__all__ = ["VLM", "VLMOutput", "MergeError", "build_model", "register_family", "FAMILIES"]


class MergeError(ValueError):
    """Image tokens in the text and image embeddings from the bridge do not match."""


class VLMOutput(dict):
    """``loss`` (scalar or None) and ``logits`` (B, T, V); attribute access for both."""

    __getattr__ = dict.get


class VLM(nn.Module):
    """Vision encoder + bridge + causal LM, with one processor for its inputs.

    Args:
        vision: a ``mmkit.vision.VisionEncoder``.
        bridge: a ``mmkit.bridges.Bridge`` from ``vision.hidden_size`` to the LM width.
        lm: a transformers causal LM (``LlamaForCausalLM`` in the tiny world).
        tokenizer: its tokenizer, with the ``<image>`` token and a chat template.
        feature_layer: which vision hidden state the bridge reads (LLaVA: -2).
        image_size: (H, W) or int; images are brought to this size by the processor.
        image_mode: "pad" (letterbox to square, LLaVA-1.5) or "resize".
        image_wrap: optional (open, close) tokens around each image, e.g. Qwen-VL's
            ("<img>", "</img>").
        max_length: longest token sequence the processor builds.
    """

    def __init__(
        self,
        vision: nn.Module,
        bridge: Bridge,
        lm: nn.Module,
        tokenizer,
        *,
        feature_layer: int = -2,
        image_size: int | tuple[int, int] = 64,
        image_mode: str = "pad",
        image_wrap: tuple[str, str] | None = None,
        max_length: int = 512,
        system_prompt: str | None = None,
    ):
        super().__init__()
        self.vision = vision
        self.bridge = bridge
        self.lm = lm
        self.tokenizer = tokenizer
        self.feature_layer = feature_layer
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.image_mode = image_mode
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.image_wrap_ids = (
            [tokenizer.convert_tokens_to_ids(t) for t in image_wrap] if image_wrap else None
        )
        self.processor = Processor(
            tokenizer,
            self.preprocess,
            self.expand_image,
            max_length=max_length,
            system_prompt=system_prompt,
        )

    # ------------------------------------------------------------------ images
    def preprocess(self, images: list) -> Tensor:
        """PIL images -> (N, 3, H, W) with the encoder's own normalisation."""
        return self.vision.preprocess(images, size=self.image_size, mode=self.image_mode)

    def image_grid(self, pixel_values: Tensor) -> tuple[int, int]:
        return self.vision.grid(tuple(pixel_values.shape[-2:]))

    def num_image_tokens(self, pixel_values: Tensor | None = None) -> int:
        """How many LM tokens one image costs (the bridge decides)."""
        if pixel_values is None:
            grid = self.vision.grid(self.image_size)
        else:
            grid = self.image_grid(pixel_values)
        return self.bridge.num_tokens(grid)

    def expand_image(self, pixel_values: Tensor) -> list[int]:
        """The token ids one image becomes in the text (the processor asks for this)."""
        ids = [self.image_token_id] * self.num_image_tokens(pixel_values)
        if self.image_wrap_ids:
            ids = [self.image_wrap_ids[0], *ids, self.image_wrap_ids[1]]
        return ids

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """(N_img, 3, H, W) -> bridge outputs (N_img, T_img, D_lm)."""
        frozen = not any(p.requires_grad for p in self.vision.parameters())
        with torch.no_grad() if frozen else nullcontext():
            feats = self.vision.features(pixel_values, layer=self.feature_layer, drop_cls=True)  # (N, h*w, D_v)
        return self.bridge(feats, self.image_grid(pixel_values))  # (N, T_img, D_lm)

    # ------------------------------------------------------------------- merge
    def embed(self, input_ids: Tensor, pixel_values: Tensor | None = None) -> Tensor:
        """Token embeddings with the bridge outputs written at the image positions.

        (B, T) ids + (N_img, 3, H, W) pixels -> (B, T, D_lm) ``inputs_embeds``.
        """
        embeds = self.lm.get_input_embeddings()(input_ids)  # (B, T, D)
        is_image = input_ids == self.image_token_id  # (B, T)
        n_slots = int(is_image.sum())
        if pixel_values is None or (isinstance(pixel_values, (list, tuple)) and not pixel_values):
            if n_slots:
                raise MergeError(f"the text has {n_slots} image tokens but no image was given")
            return embeds
        image_embeds = self.encode_images(pixel_values).to(embeds.dtype)  # (N, T_img, D)
        if image_embeds.shape[0] * image_embeds.shape[1] != n_slots:
            raise MergeError(
                f"the text has {n_slots} image-token positions but the bridge produced "
                f"{image_embeds.shape[0]} image(s) x {image_embeds.shape[1]} tokens = "
                f"{image_embeds.shape[0] * image_embeds.shape[1]}; build the text with this "
                "model's processor so each <image> expands to the right number of tokens"
            )
        # masked_scatter fills the True positions in row-major order: image 0's tokens
        # first, exactly the order in which the processor laid them out.
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.reshape(-1, embeds.shape[-1]))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        pixel_values: Tensor | None = None,
        **lm_kwargs: Any,
    ) -> VLMOutput:
        """Teacher-forced pass: returns ``loss`` (if labels are given) and ``logits``."""
        embeds = self.embed(input_ids, pixel_values)
        out = self.lm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **lm_kwargs)
        return VLMOutput(loss=out.loss, logits=out.logits)

    # ---------------------------------------------------------------- generate
    def stop_token_ids(self) -> list[int]:
        tok = self.tokenizer
        ids = {tok.eos_token_id}
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != tok.unk_token_id:
            ids.add(im_end)
        return sorted(i for i in ids if i is not None)

    def prompt_record(self, images: Sequence | None, messages: str | list[dict]) -> dict:
        """A user question (str) or a message list -> a record the processor takes.

        A plain question with images gets one ``<image>`` per image in front of it
        (the LLaVA convention), unless the question already holds the placeholders.
        """
        images = list(images or [])
        if isinstance(messages, str):
            text = messages
            if images and IMAGE_TOKEN not in text:
                text = "\n".join([IMAGE_TOKEN] * len(images)) + "\n" + text
            conv = [{"from": "human", "value": text}]
        else:
            conv = [{"from": m.get("role", m.get("from")), "value": m.get("content", m.get("value"))}
                    for m in messages]
        return {"id": "prompt", "images": images, "conversations": conv}

    @torch.no_grad()
    def generate(
        self,
        images: Sequence | None = None,
        messages: str | list[dict] | None = None,
        *,
        records: Sequence[dict] | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        streamer: Any = None,
        **gen_kwargs: Any,
    ) -> list[str]:
        """Answer one prompt (``images``, ``messages``) or a batch (``records``).

        Returns the decoded answers. Batched prompts are left-padded, so greedy answers
        are the same as one-by-one.
        """
        if records is None:
            records = [self.prompt_record(images, messages or "")]
        batch = self.processor(records, for_generation=True)
        device = next(self.lm.parameters()).device
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch["attention_mask"].to(device)
        pv = batch["pixel_values"]
        if isinstance(pv, Tensor):
            pv = pv.to(device=device, dtype=next(self.vision.parameters()).dtype)
        was_training = self.training
        self.eval()
        try:
            embeds = self.embed(input_ids, pv)
            sample = temperature > 0
            out = self.lm.generate(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=sample,
                temperature=temperature if sample else None,
                top_p=top_p if sample else None,
                top_k=None,
                eos_token_id=self.stop_token_ids(),
                pad_token_id=self.tokenizer.pad_token_id,
                streamer=streamer,
                **gen_kwargs,
            )
        finally:
            self.train(was_training)
        # With only inputs_embeds, generate returns just the new tokens.
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]

    # ------------------------------------------------------------------ groups
    def module_groups(self) -> dict[str, nn.Module]:
        """Names a training stage uses to say what is trained and what is frozen."""
        return {"vision": self.vision, "bridge": self.bridge, "lm": self.lm}


# -------------------------------------------------------------------------- builder
# recipe.family -> builder(recipe, pretrained) -> model. "prefix" (LLaVA, BLIP-2, Qwen-VL:
# bridge tokens written into the LM's input) is built below; families whose image
# features reach the LM another way (Flamingo's cross-attention, Fuyu's raw patches,
# native models) register their own builder in their module.
FAMILIES: dict[str, Any] = {}

# family name -> module that registers it (imported on first use)
_FAMILY_MODULES = {
    "flamingo": "mmkit.bridges.flamingo",
    "fuyu": "mmkit.encoder_free.fuyu",
    "eve": "mmkit.encoder_free.eve",
    "native": "mmkit.native.unified",
}


def register_family(name: str):
    """Decorator: ``builder(recipe, pretrained=True) -> model`` for ``recipe.family == name``."""

    def deco(fn):
        FAMILIES[name] = fn
        return fn

    return deco


def build_model(recipe, *, pretrained: bool = True, device: str | torch.device | None = None) -> "VLM":
    """Assemble the model a ``Recipe`` describes (base weights loaded, bridge fresh).

    The vision encoder and LM come from ``recipe.vision`` / ``recipe.lm`` (the shipped
    tiny ones by default, or hub names); the bridge is new. Trained weights are put
    on top by ``mmkit.train.load_model``.
    """
    if recipe.family != "prefix":
        if recipe.family not in FAMILIES and recipe.family in _FAMILY_MODULES:
            import importlib

            importlib.import_module(_FAMILY_MODULES[recipe.family])
        if recipe.family not in FAMILIES:
            raise ValueError(f"unknown model family {recipe.family!r}; known: prefix, {', '.join(sorted(FAMILIES))}")
        torch.manual_seed(recipe.seed)
        model = FAMILIES[recipe.family](recipe, pretrained=pretrained)
        model.recipe = recipe
        if device is not None:
            model.to(device)
        return model
    from mmkit.bridges import build_bridge
    from mmkit.language import load_language_model
    from mmkit.vision import load_vision_encoder

    torch.manual_seed(recipe.seed)
    vision = load_vision_encoder(recipe.vision, pretrained=pretrained)
    lm, tokenizer = load_language_model(recipe.lm, quantization=recipe.quantization, lora=recipe.lora)
    bridge = build_bridge(recipe.bridge, vision.hidden_size, lm.config.get_text_config().hidden_size,
                          **recipe.bridge_kwargs)
    model = VLM(
        vision, bridge, lm, tokenizer,
        feature_layer=recipe.feature_layer,
        image_size=recipe.image_size,
        image_mode=recipe.image_mode,
        image_wrap=tuple(recipe.image_wrap) if recipe.image_wrap else None,
        max_length=recipe.max_length,
        system_prompt=recipe.system_prompt,
    )
    model.recipe = recipe  # evaluate() builds its ShapesWorld from it (image size, shapes config, seed)
    if recipe.gradient_checkpointing and hasattr(lm, "gradient_checkpointing_enable"):
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if device is not None:
        model.to(device)
    return model
