"""Pre-training of the tiny world's two frozen experts, from scratch, on ShapesWorld.

    clip.py     the vision encoder: CLIP pre-training of ``TinyViT`` against a small text
                tower, with shape-swap hard negatives and patch-phrase alignment
    lm.py       the language model: the tokenizer and causal-LM pre-training on ShapesWorld text
    probes.py   measuring frozen features: linear probes, retrieval R@1
    common.py   the progress bar, optimizer step and tokenization both loops share

``mmkit zoo build`` (``mmkit.zoo``) runs them and ships the results in ``assets/tiny``.
Import the submodules directly, e.g. ``from mmkit.pretrain.clip import clip_loss``.
"""
