"""mmkit: learn how multimodal LLMs work by building every bridge from scratch."""
__version__ = "0.1.0"

from mmkit.paths import run_mode as mode  # noqa: E402  MODE = mmkit.mode("classroom") in a notebook

__all__ = ["__version__", "mode"]
