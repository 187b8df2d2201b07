"""stablediff: Stable Diffusion built from the ground up in PyTorch."""

__version__ = "0.1.0"
