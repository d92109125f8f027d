"""mmkit: learn how multimodal LLMs work by building every bridge from scratch."""
__version__ = "0.1.0"
