"""ipo-lightning: IPO preference fine-tuning of Hugging Face causal LMs on PyTorch Lightning."""

__version__ = "0.1.0"
