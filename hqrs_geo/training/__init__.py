"""Training and fine-tuning of open_clip CLIP/CoCa models on image-caption data."""
from .trainer import FinetuneConfig, finetune

__all__ = ["FinetuneConfig", "finetune"]
