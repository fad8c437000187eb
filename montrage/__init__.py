"""montrage: attributable LoRA fine-tuning of diffusion models (watch the training, attribute generations)."""
try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("montrage")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0+source"
