"""wlora_dist: WeightLoRA fine-tuning of Llama models, distributed."""

__version__ = "0.1.0"
