"""diffaudit: audit image diffusion models for regurgitation and self-consuming collapse."""

__version__ = "0.1.0"
