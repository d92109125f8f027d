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

``image_mode="anyres"`` (LLaVA-NeXT) tiles each image into encoder-size crops plus a global
view (``mmkit.data.tiling``); every crop goes through the same encoder and bridge, and
``AnyRes.pack`` lays the crops' tokens back on one grid with a learned ``image_newline``
after each row.

``generate`` hands the merged embeddings to the LM's own ``generate`` (KV cache,
sampling, stopping), so every family gets the same decoding for free.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mmkit.bridges import Bridge
from mmkit.data.processor import Processor
from mmkit.language import IMAGE_TOKEN

__all__ = ["VLM", "VLMOutput", "MergeError", "AnyRes", "build_model", "build_prefix", "register_family", "FAMILIES",
           "family_builder", "load_parts", "vlm_options"]


class MergeError(ValueError):
    """Image tokens in the text and image embeddings from the bridge do not match."""


class AnyRes(nn.Module):
    """LLaVA-NeXT's AnyRes on the model side: the learned ``image_newline`` and the packing.

    ``pack(tokens, tiles)``: (1 + rows*cols, th*tw, D) bridge outputs of one tiled image ->
    (T, D): the global view's th*tw tokens, then the crops' token grids side by side as one
    (rows*th, cols*tw) grid, cut to the rows / columns that saw the image (not the padding),
    with ``image_newline`` after each row (transformers' ``LlavaNextModel.pack_image_features``).
    """

    def __init__(self, grids, dim: int):
        super().__init__()
        from mmkit.data.tiling import parse_grids

        self.grids = parse_grids(grids)
        self.image_newline = nn.Parameter(torch.randn(dim) * dim ** -0.5)  # as LLaVA-NeXT: N(0, 1/D)

    @staticmethod
    def token_grid(bridge: Bridge, grid: tuple[int, int]) -> tuple[int, int]:
        """Where one crop's bridge tokens lie: (h, w) for a per-patch projector, (h/s, w/s)
        after pixel shuffle; a bridge whose tokens are not a grid (queries) cannot be tiled."""
        h, w = grid
        n = bridge.num_tokens(grid)
        s = getattr(bridge, "scale_factor", 1)
        if n == (h // s) * (w // s):
            return h // s, w // s
        raise ValueError(f"image_mode='anyres' needs a bridge whose tokens lie on the patch grid (linear, mlp, "
                         f"mlp_norm, pixel_shuffle); {type(bridge).__name__} gives {n} tokens for a {h}x{w} grid. "
                         "Use one of those bridges, or image_mode='pad'.")

    def num_tokens(self, size: tuple[int, int], token_grid: tuple[int, int], crop: tuple[int, int]) -> int:
        """LM tokens of an image of ``size`` (height, width)."""
        from mmkit.data.tiling import anyres_tokens

        return anyres_tokens(*size, crop, self.grids, token_grid)

    def pack(self, tokens: Tensor, tiles, token_grid: tuple[int, int]) -> Tensor:
        from mmkit.data.tiling import unpadded_extent

        (R, C), (th, tw) = tiles.grid, token_grid
        D = tokens.shape[-1]
        base = tokens[0]  # (th*tw, D): the global view
        g = tokens[1:].reshape(R, C, th, tw, D).permute(0, 2, 1, 3, 4).reshape(R * th, C * tw, D)
        top, bottom, left, right = unpadded_extent(*tiles.size, R * th, C * tw)
        g = g[top:bottom, left:right]  # (h, w, D): only what saw the image
        nl = self.image_newline.to(g.dtype).expand(g.shape[0], 1, D)
        return torch.cat([base, torch.cat([g, nl], dim=1).reshape(-1, D)])  # (th*tw + h*(w+1), D)

    def extra_repr(self) -> str:
        return f"grids={[list(g) for g in self.grids]}"


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
        image_mode: "pad" (letterbox to square, LLaVA-1.5), "resize", or "anyres"
            (LLaVA-NeXT: a grid of ``image_size`` crops chosen from ``anyres_grids`` plus
            a global view, see ``mmkit.data.tiling``).
        anyres_grids: the (rows, cols) grids "anyres" may choose from.
        image_wrap: optional (open, close) tokens around each image, e.g. Qwen-VL's
            ("<img>", "</img>").
        max_length: longest token sequence the processor builds.
        text_format / loss_on: how the processor writes a record ("chat" or "document")
            and which tokens it labels ("assistant" or every "text" token); see
            ``mmkit.data.processor``. KOSMOS-1 / PaLM-E use documents.
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
        text_format: str = "chat",
        loss_on: str = "assistant",
        anyres_grids=None,
    ):
        super().__init__()
        self.vision = vision
        self.bridge = bridge
        self.lm = lm
        self.tokenizer = tokenizer
        self.feature_layer = feature_layer
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.image_mode = image_mode
        self.tiling: AnyRes | None = None
        if image_mode == "anyres":
            from mmkit.data.tiling import DEFAULT_GRIDS

            self.tiling = AnyRes(DEFAULT_GRIDS if anyres_grids is None else anyres_grids,
                                 lm.get_input_embeddings().embedding_dim)
        elif anyres_grids is not None:
            raise ValueError(f"anyres_grids is set but image_mode is {image_mode!r}; set image_mode='anyres' "
                             "to tile images, or remove anyres_grids")
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
            text_format=text_format,
            loss_on=loss_on,
        )

    # ------------------------------------------------------------------ images
    def preprocess(self, images: list) -> Tensor | list:
        """PIL images -> (N, 3, H, W) with the encoder's own normalisation; in "anyres"
        mode a list of ``mmkit.data.tiling.Tiles`` (crops + global view each)."""
        if self.tiling is not None:
            from mmkit.data.tiling import tile_image

            return [tile_image(self.vision.preprocess, im, self.image_size, self.tiling.grids) for im in images]
        return self.vision.preprocess(images, size=self.image_size, mode=self.image_mode)

    def image_grid(self, pixel_values) -> tuple[int, int]:
        """The patch grid of one crop (the encoder always runs at ``image_size`` when tiling)."""
        if self.tiling is not None:
            return self.vision.grid(self.image_size)
        return self.vision.grid(tuple(pixel_values.shape[-2:]))

    def pixel_dtype(self) -> torch.dtype:
        """The dtype pixels are cast to: the vision encoder's, or the bridge's when the image
        side has no weights of its own (encoder-free Fuyu / EVE: the "vision" is a patchifier)."""
        for m in (self.vision, self.bridge):
            p = next(m.parameters(), None)
            if p is not None:
                return p.dtype
        return torch.float32

    def num_image_tokens(self, pixel_values: Tensor | None = None) -> int:
        """How many LM tokens one image costs (the bridge decides)."""
        if pixel_values is None:
            grid = self.vision.grid(self.image_size)
        else:
            grid = self.image_grid(pixel_values)
        if self.tiling is not None:  # tiled: an image of image_size is one crop + the global view
            size = pixel_values.size if pixel_values is not None else self.image_size
            return self.tiling.num_tokens(size, AnyRes.token_grid(self.bridge, grid), self.image_size)
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
        per_image = self.image_embeds(pixel_values)  # N_img tensors (T_i, D)
        n_out = sum(e.shape[0] for e in per_image)
        if n_out != n_slots:
            raise MergeError(
                f"the text has {n_slots} image-token positions but the {len(per_image)} image(s) give "
                f"{' + '.join(str(e.shape[0]) for e in per_image) or 0} = {n_out} image tokens; build the "
                "text with this model's processor so each <image> expands to the right number of tokens"
            )
        # masked_scatter fills the True positions in row-major order: image 0's tokens
        # first, exactly the order in which the processor laid them out.
        flat = torch.cat(list(per_image)).to(embeds.dtype)  # (sum T_i, D)
        return embeds.masked_scatter(is_image.unsqueeze(-1), flat)

    def image_embeds(self, pixel_values) -> list[Tensor] | Tensor:
        """What ``embed`` writes at the image positions: per image, (T_i, D_lm), in order.

        Every image has the same size here, so this is ``encode_images`` (N_img, T_img, D);
        families whose images differ in size (Fuyu) return a list. Tiled images ("anyres"):
        every crop of every image in one encoder pass, then ``AnyRes.pack`` per image.
        """
        if self.tiling is not None:
            tiles = list(pixel_values)
            if not tiles:
                return []
            tokens = self.encode_images(torch.cat([t.pixels for t in tiles]))  # (sum crops, th*tw, D)
            tg = AnyRes.token_grid(self.bridge, self.image_grid(None))
            parts = tokens.split([1 + t.num_crops for t in tiles])
            return [self.tiling.pack(p, t, tg) for p, t in zip(parts, tiles)]
        return self.encode_images(pixel_values)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        pixel_values: Tensor | None = None,
        **lm_kwargs: Any,
    ) -> VLMOutput:
        """Teacher-forced pass: returns ``loss`` (if labels are given) and ``logits``."""
        with self.lm_inputs(input_ids, pixel_values) as inputs:
            out = self.lm(**inputs, attention_mask=attention_mask, labels=labels, **lm_kwargs)
        return VLMOutput(loss=out.loss, logits=out.logits)

    @contextmanager
    def lm_inputs(self, input_ids: Tensor, pixel_values: Tensor | None) -> Iterator[dict[str, Tensor]]:
        """What the LM is called with, in ``forward`` and ``generate`` alike: here the merged
        ``inputs_embeds`` (the prefix path). A family whose images reach the LM another way
        overrides this (Flamingo: the token ids, with the images attended to from inside)."""
        yield {"inputs_embeds": self.embed(input_ids, pixel_values)}

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
            if images and IMAGE_TOKEN not in text and "<img>" not in text:  # <img></img>: Qwen-VL inline, see processor
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
        input_ids, attention_mask, pv = self.prompt_batch(images, messages, records)
        was_training = self.training
        self.eval()
        try:
            with self.lm_inputs(input_ids, pv) as inputs:
                sample = temperature > 0
                out = self.lm.generate(
                    **inputs,
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
        if "input_ids" in inputs:  # from ids, generate returns prompt + answer; from embeddings, the answer
            out = out[:, input_ids.shape[1]:]
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]

    def prompt_batch(self, images: Sequence | None = None, messages: str | list[dict] | None = None,
                     records: Sequence[dict] | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """One prompt (``images``, ``messages``) or a batch of ``records`` -> left-padded
        ``input_ids`` (B, T), ``attention_mask`` (B, T) and pixel values, on the model's device."""
        if records is None:
            records = [self.prompt_record(images, messages or "")]
        batch = self.processor(records, for_generation=True)
        device = next(self.lm.parameters()).device
        pv = batch["pixel_values"]
        if isinstance(pv, Tensor):
            pv = pv.to(device=device, dtype=self.pixel_dtype())
        return batch["input_ids"].to(device), batch["attention_mask"].to(device), pv

    # ------------------------------------------------------------------ groups
    def module_groups(self) -> dict[str, nn.Module]:
        """Names a training stage uses to say what is trained and what is frozen."""
        if self.tiling is not None:  # the learned image_newline trains with the bridge
            return {"vision": self.vision, "bridge": nn.ModuleList([self.bridge, self.tiling]), "lm": self.lm}
        return {"vision": self.vision, "bridge": self.bridge, "lm": self.lm}

    def param_group(self, name: str) -> str | None:
        """A finer optimizer group for one parameter, so a stage can give it its own learning
        rate (``Stage.lr_groups``); None keeps it in its module group. Flamingo names its
        gates this way."""
        return None

    # ----------------------------------------------------------------- inspect
    @torch.no_grad()
    def explain(self, images: Sequence, messages: str | list[dict], answer: str) -> dict[str, Any]:
        """What the model looked at while it wrote ``answer``: the demo's "Inspect" panel.

        One teacher-forced pass over prompt + answer, inside ``mmkit.nn.inspect``:

        * a bridge that attends (Q-Former queries, resampler latents, adapter queries)
          returns ``bridge.attention_maps(seen)`` (N_img, T_img, h*w): the maps are the
          mean over its outputs plus the most focused individual outputs;
        * a bridge that maps patch i to token i (LLaVA's projector) has no attention of
          its own, so the maps are the LM's attention *from the positions that predict
          the answer tokens* to each image's token positions, averaged over heads and
          then over all layers ("all layers") or taken from the last layer alone. The
          LM runs with eager attention for this one pass (SDPA does not return
          weights); its previous implementation is restored afterwards.

        Tiled images (``image_mode="anyres"``) take the second path; each image's tokens are
        read back onto its crops (``mmkit.data.tiling.unpack_tokens``): the crops' maps
        stitched into one map over the whole image, as the crops tile it, and the global
        view's map apart. The newline tokens saw no patch and are left out of both.

        Returns a dict (families that override ``explain`` keep this format):

            image_tokens  [int]  LM tokens each image cost (wrap tokens included; for a
                          tiled image the global view, the crops and the newlines)
            grid          (h, w) the vision encoder's patch grid (of one crop when tiled)
            maps          [{label: (h', w') float array}] per image; each sums to 1.
                          (h', w') == grid when every patch has its own token; a
                          bridge that merges s x s patches into one token gives
                          (h/s, w/s). Empty when the tokens cannot be put on a grid.
                          Tiled: the crops' maps stitched, (rows*h', cols*w'), zero
                          where the tokens that only saw padding were cut
            views         [PIL.Image] each image as the model framed it (letterboxed in
                          "pad" mode; tiled: padded to its crop grid's proportions) at its
                          own resolution: draw the maps over these and the heat lands on
                          the right pixels
            gates         {name: value} for recorded scalar gates (Flamingo's
                          tanh(alpha)), or None
            image_share   [float] share of the answer's attention that went to each
                          image's tokens (LM-attention case only, else None)
            source        one line: what the maps show

        and, for tiled images only (None otherwise; absent in families that never tile):

            tiles         [{"grid": (rows, cols), "crop": (S_h, S_w), "token_grid":
                          (h', w')}] per image: the crops AnyRes cut it into
            global_maps   [{label: (h', w') float array}] per image: the global view's maps,
                          each summing to 1
            global_views  [PIL.Image] each image as the global view framed it
                          (letterboxed to one crop): draw ``global_maps`` over these
        """
        from mmkit.nn import inspect

        record, ids, mask, pv, labels = self.explain_batch(images, messages, answer)
        tiles = list(pv) if self.tiling is not None else None
        n_img = len(pv)
        grid = tuple(self.image_grid(pv))
        image_tokens = [len(self.processor.expand(p)) for p in (tiles if tiles is not None else pv.cpu())]
        predicts = answer_rows(labels)  # (T,): the positions that predict the last answer

        was_training = self.training
        self.eval()
        try:
            with inspect(self) as seen:
                embeds = self.embed(ids, pv)  # (1, T, D); the bridge records its attention here
                bridge_maps = None if tiles is not None else self.bridge.attention_maps(seen)
                want_lm = bridge_maps is None
                with eager_attention(self.lm) if want_lm else nullcontext():
                    out = self.lm(inputs_embeds=embeds, attention_mask=mask, output_attentions=want_lm)
        finally:
            self.train(was_training)

        def normalised(m: Tensor) -> Any:  # (h', w') -> numpy, sums to 1
            m = m.float().clamp_min(0)
            return (m / m.sum().clamp_min(1e-12)).cpu().numpy()

        def on_grid(flat: Tensor) -> Any:  # (T_img,) -> (h', w') numpy, sums to 1
            t, (h, w) = flat.numel(), grid
            if t == h * w:
                g = (h, w)
            else:  # s x s patches merged per token (pixel shuffle); else no grid
                s = round((h * w / t) ** 0.5) if t else 0
                if not s or h % s or w % s or (h // s) * (w // s) != t:
                    return None
                g = (h // s, w // s)
            return normalised(flat.reshape(g))

        maps: list[dict] = [{} for _ in range(n_img)]
        global_maps = [{} for _ in range(n_img)] if tiles is not None else None
        share = None
        if bridge_maps is not None:  # (N_img, T_img, h*w)
            bm = bridge_maps.float()
            source = (f"what the bridge's {bm.shape[1]} outputs attend to over the {grid[0]}x{grid[1]} "
                      "patch grid (mean over outputs, and the most focused outputs)")
            for i in range(n_img):
                maps[i]["mean over outputs"] = on_grid(bm[i].mean(0))
                for q in bm[i].amax(-1).topk(min(3, bm.shape[1])).indices.tolist():
                    maps[i][f"output {q}"] = on_grid(bm[i, q])
        else:
            att = out.attentions  # L x (1, H, T, T)
            if not att:
                raise RuntimeError("the language model returned no attention weights even with eager attention")
            is_img = (ids[0] == self.image_token_id).nonzero().flatten().cpu()  # (sum T_img,)
            if tiles is not None:  # tiled images differ in size, and so in tokens
                from mmkit.data.tiling import unpack_tokens

                counts = [self.num_image_tokens(t) for t in tiles]
                token_grid = AnyRes.token_grid(self.bridge, grid)
            else:
                counts = [is_img.numel() // n_img] * n_img
            starts = [sum(counts[:i]) for i in range(n_img)]
            rows = predicts.nonzero().flatten()
            # (L, |rows|, T): mean over heads, answer-predicting rows only
            a = torch.stack([x[0].float().mean(0)[rows.to(x.device)].cpu() for x in att])
            share = []
            for i in range(n_img):
                cols = is_img[starts[i]:starts[i] + counts[i]]
                per_layer = a[:, :, cols].mean(1)  # (L, T_img)
                share.append(float(a[:, :, cols].sum(-1).mean()))
                for label, flat in (("all layers", per_layer.mean(0)), ("last layer", per_layer[-1])):
                    if tiles is None:
                        maps[i][label] = on_grid(flat)
                    else:  # (global view (h', w'), crops (rows*h', cols*w')), newlines left out
                        view, crops = unpack_tokens(flat, tiles[i], token_grid)
                        maps[i][label], global_maps[i][label] = normalised(crops), normalised(view)
            if tiles is None:
                source = (f"the LM's attention from the {int(rows.numel())} positions that wrote the answer to "
                          f"each image's {counts[0]} tokens, mean over heads (all {len(att)} layers, and the last)")
            else:
                source = (f"the LM's attention from the {int(rows.numel())} positions that wrote the answer to "
                          f"each image's tokens, mean over heads (all {len(att)} layers, and the last): the "
                          "crops' maps stitched over the whole image, the global view's apart, newlines left out")
        maps = [{k: v for k, v in m.items() if v is not None} for m in maps]

        gates = {k: float(v) for k, v in seen.items()
                 if "gate" in k.lower() and isinstance(v, Tensor) and v.numel() == 1} or None

        result = {"image_tokens": image_tokens, "grid": grid, "maps": maps,
                  "views": self.framed_views(record["images"]), "gates": gates, "image_share": share, "source": source,
                  "tiles": None, "global_maps": None, "global_views": None}
        if tiles is not None:  # the crops' maps lie on the image as the crops tile it
            from mmkit.data.images import load_image
            from mmkit.data.tiling import canvas_view

            result.update(
                tiles=[{"grid": t.grid, "crop": t.crop, "token_grid": token_grid} for t in tiles],
                global_maps=global_maps, global_views=result["views"],
                views=[canvas_view(load_image(im), t, self.pad_fill()) for im, t in zip(record["images"], tiles)])
        return result

    def explain_batch(self, images: Sequence, messages: str | list[dict], answer: str):
        """The one teacher-forced sample ``explain`` runs: ``(record, ids (1, T), mask (1, T),
        pixel values, labels (T,))``, with the answer as the last assistant turn. Pixel values
        are a tensor, or a list (tiled images: ``mmkit.data.tiling.Tiles``)."""
        record = self.prompt_record(images, messages)
        record["conversations"].append({"from": "gpt", "value": answer})
        batch = self.processor([record])  # right padding, labels on the assistant turns
        device = next(self.lm.parameters()).device
        pv = batch["pixel_values"]
        if isinstance(pv, Tensor):
            pv = pv.to(device=device, dtype=self.pixel_dtype())
        elif not pv:
            raise ValueError("explain needs at least one image (maps are drawn over the image)")
        return record, batch["input_ids"].to(device), batch["attention_mask"].to(device), pv, batch["labels"][0]

    def pad_fill(self) -> tuple[int, ...]:
        """The colour images are padded with when framed: the encoder's mean, as ``preprocess`` pads."""
        return tuple(int(round(c * 255)) for c in getattr(self.vision, "image_mean", (0.5, 0.5, 0.5)))

    def framed_views(self, images: Sequence) -> list:
        """Each image as the model framed it (letterboxed in "pad" mode), at its own resolution:
        ``explain``'s maps drawn over these land on the right pixels. In "anyres" mode this is
        the global view's framing (``explain``'s ``global_views``); the crops' is
        ``mmkit.data.tiling.canvas_view``."""
        from mmkit.data.images import load_image
        from mmkit.vision import letterbox

        H, W = self.image_size
        views = [load_image(im) for im in images]  # the processor's own loading: transparency on white
        if self.image_mode in ("pad", "anyres"):
            return [letterbox(im, W / H, self.pad_fill()) for im in views]
        return views


def answer_rows(labels: Tensor) -> Tensor:
    """(T,) labels -> (T,) bool: the positions whose next-token prediction is a token of the
    last answer (the last run of labelled tokens; earlier turns' answers are context)."""
    from mmkit.data.processor import IGNORE_INDEX

    labelled = (labels != IGNORE_INDEX).long()  # (T,)
    starts = (labelled.diff(prepend=labelled.new_zeros(1)) == 1).nonzero().flatten()
    predicts = torch.zeros_like(labelled, dtype=torch.bool)
    if starts.numel():
        last = labelled.clone()
        last[: int(starts[-1])] = 0
        predicts[:-1] = last[1:].bool()  # position t predicts token t+1
    return predicts


@contextmanager
def eager_attention(lm: nn.Module) -> Iterator[None]:
    """Run ``lm`` with eager attention inside the block (SDPA returns no weights), then
    restore its implementation, also when the block raises."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    old = base.config._attn_implementation
    if old != "eager":
        base.set_attn_implementation("eager")
    try:
        yield
    finally:
        if base.config._attn_implementation != old:
            base.set_attn_implementation(old)


# -------------------------------------------------------------------------- builder
# recipe.family -> its builder(recipe, pretrained) -> model: the one registry of families.
# "prefix" (LLaVA, BLIP-2's stage 2, Qwen-VL: bridge tokens written into the LM's input) is
# built here; a family whose image features reach the LM another way (Flamingo's
# cross-attention, Fuyu's raw patches, native models) has its builder in its own module,
# named here as "module:function" and imported on first use. ``register_family`` adds one.
FAMILIES: dict[str, Any] = {
    "prefix": "mmkit.vlm:build_prefix",
    "blip2": "mmkit.bridges.blip2:build_blip2",
    "instructblip": "mmkit.bridges.blip2:build_instructblip",
    "flamingo": "mmkit.bridges.flamingo:build_flamingo",
    "fuyu": "mmkit.encoder_free.fuyu:build_fuyu",
    "eve": "mmkit.encoder_free.eve:build_eve",
    "interleaved": "mmkit.native.interleaved:build_interleaved",
    "unified": "mmkit.native.unified:build_unified",
}


def register_family(name: str):
    """Decorator: ``builder(recipe, pretrained=True) -> model`` for ``recipe.family == name``."""

    def deco(fn):
        FAMILIES[name] = fn
        return fn

    return deco


def family_builder(name: str):
    """The builder registered for a family (imported from its module on first use)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    fn = FAMILIES[name]
    if isinstance(fn, str):
        import importlib

        module, attr = fn.split(":")
        fn = FAMILIES[name] = getattr(importlib.import_module(module), attr)
    return fn


def build_model(recipe, *, pretrained: bool = True, device: str | torch.device | None = None) -> "VLM":
    """Assemble the model a ``Recipe`` describes (base weights loaded, bridge fresh).

    The vision encoder and LM come from ``recipe.vision`` / ``recipe.lm`` (the shipped
    tiny ones by default, or hub names); the bridge is new. Trained weights are put
    on top by ``mmkit.train.load_model``.
    """
    builder = family_builder(recipe.family)
    torch.manual_seed(recipe.seed)
    model = builder(recipe, pretrained=pretrained)
    model.recipe = recipe  # evaluate() builds its ShapesWorld from it (image size, shapes config, seed)
    lm = getattr(model, "lm", None)
    if recipe.gradient_checkpointing and hasattr(lm, "gradient_checkpointing_enable"):
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if device is not None:
        model.to(device)
    return model


def load_parts(recipe, *, pretrained: bool = True, vision: bool = True):
    """What every family starts from: ``(vision encoder or None, lm, tokenizer)``.

    The LM gets every LM option of the recipe (``quantization``, ``lora``, ``lm_dtype``,
    ``split_digits``, ``gradient_checkpointing``); ``vision=False`` for families without
    a pre-trained encoder in front of the LM.
    """
    from mmkit.language import load_language_model
    from mmkit.vision import load_vision_encoder

    encoder = load_vision_encoder(recipe.vision, pretrained=pretrained) if vision else None
    lm, tokenizer = load_language_model(recipe.lm, quantization=recipe.quantization, lora=recipe.lora,
                                        split_digits=recipe.split_digits, dtype=recipe.lm_dtype,
                                        gradient_checkpointing=recipe.gradient_checkpointing)
    return encoder, lm, tokenizer


def vlm_options(recipe, *, encoder: bool = True) -> dict[str, Any]:
    """The ``VLM`` constructor's options a recipe sets. ``encoder=False`` leaves out the
    vision encoder's (``feature_layer``, ``image_mode``): encoder-free models keep their own."""
    opts = dict(image_size=recipe.image_size, image_wrap=tuple(recipe.image_wrap) if recipe.image_wrap else None,
                max_length=recipe.max_length, system_prompt=recipe.system_prompt,
                text_format=recipe.text_format, loss_on=recipe.loss_on)
    if encoder:
        opts.update(feature_layer=recipe.feature_layer, image_mode=recipe.image_mode)
        if recipe.image_mode == "anyres" or recipe.anyres_grids is not None:  # LLaVA-NeXT tiling (mmkit.data.tiling)
            opts["anyres_grids"] = recipe.anyres_grids
    return opts


def build_prefix(recipe, *, pretrained: bool = True, bridge_kwargs: dict | None = None, lm_hook=None) -> VLM:
    """The prefix-path ``VLM`` a recipe describes: vision encoder, LM, a fresh bridge.

    ``bridge_kwargs`` replaces ``recipe.bridge_kwargs`` (a family that keeps its own keys
    there removes them first); ``lm_hook(lm) -> lm`` may change the LM before the bridge
    is sized for it (KOSMOS-1: fresh weights).
    """
    from mmkit.bridges import build_bridge

    vision, lm, tokenizer = load_parts(recipe, pretrained=pretrained)
    if lm_hook is not None:
        lm = lm_hook(lm)
    bridge = build_bridge(recipe.bridge, vision.hidden_size, lm.config.get_text_config().hidden_size,
                          **(recipe.bridge_kwargs if bridge_kwargs is None else bridge_kwargs))
    return VLM(vision, bridge, lm, tokenizer, **vlm_options(recipe))
