"""alignclip: distributed pretraining of CLIP, SharedCLIP and AlignCLIP (contrastive image-text models that
close the modality gap)."""

__version__ = "0.1.0"
