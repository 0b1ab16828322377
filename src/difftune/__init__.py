"""difftune: train and fine-tune diffusion image models from one small, tested core."""

__version__ = "0.1.0"
