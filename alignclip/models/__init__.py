"""Image-text models: CLIP (two towers) and SharedCLIP (one shared trunk), built from a ModelConfig."""

from .contrastive import ContrastiveModel, count_parameters
from .factory import build_model

__all__ = ["ContrastiveModel", "build_model", "count_parameters"]
