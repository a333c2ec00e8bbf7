"""sftlab: supervised fine-tuning of language models, exact from the chat template to the exported adapter."""

__version__ = "0.1.0"
