"""orchestrator: full fine-tuning of language models with Ray Train and DeepSpeed ZeRO-3."""

__version__ = "0.1.0"
