"""The vision side: pixels -> a grid of patch features, whatever encoder is behind them.

Every multimodal LLM in this kit starts the same way: an image becomes a grid of patch
features.

    pixel_values (B, 3, H, W)
      -> patches: a (h, w) grid, h = H // patch, w = W // patch
      -> tokens (B, P + h*w, D)     P prefix tokens (CLS, registers) first, then row-major patches
      -> hidden_states: (embeddings, after block 1, ..., after block L), each (B, P + h*w, D)

    tiny_vit.py   ``TinyViT``, a plain ViT written from scratch, its ``ViTConfig`` and the
                  ``VisionOutput`` every backend returns. The tiny pre-trained weights live
                  in ``assets/tiny/vision/`` (built by ``mmkit zoo build``).
    encoder.py    ``VisionEncoder``: one interface over TinyViT, timm and transformers;
                  ``load_vision_encoder``; ``preprocess`` and ``letterbox`` (images -> pixels).

    load_vision_encoder("tiny")                                   # TinyViT from assets/
    load_vision_encoder("timm:vit_base_patch16_clip_224.openai")  # any timm ViT by name
    load_vision_encoder("hf:openai/clip-vit-large-patch14-336")   # transformers CLIP / SigLIP / ...
    load_vision_encoder("path/to/dir")                            # a saved TinyViT, timm or HF dir

and ``features(pixel_values, layer=-2)`` returns what LLaVA feeds its projector: the
penultimate block's output, without the final norm, CLS dropped (B, h*w, D).
"""
from mmkit.vision.encoder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    VisionEncoder,
    letterbox,
    load_vision_encoder,
    tiny_vision_dir,
)
from mmkit.vision.tiny_vit import TinyViT, ViTConfig, VisionOutput, conv_stem

__all__ = [
    "ViTConfig",
    "VisionOutput",
    "TinyViT",
    "conv_stem",
    "VisionEncoder",
    "load_vision_encoder",
    "tiny_vision_dir",
    "letterbox",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
