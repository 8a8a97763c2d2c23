"""trimode: engine builder and runtime for tri-mode (AR / block diffusion / self-speculation) LMs."""

__version__ = "0.1.0"
