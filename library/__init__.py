"""sdtune: kohya-compatible training of Stable Diffusion adapters and models."""

__version__ = "0.1.0"
