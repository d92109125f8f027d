"""native multimodal models: vq (VQ-VAE tokenizer), checker, interleaved, unified."""
