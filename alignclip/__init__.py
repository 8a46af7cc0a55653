"""alignclip: distributed pretraining of CLIP, SharedCLIP and AlignCLIP (contrastive image-text models that
close the modality gap)."""

__version__ = "0.1.0"


def load(path, device="cpu"):
    """(model, tokenizer, image transform) of an exported safetensors file or an OpenCLIP / Hugging Face CLIP
    folder; see alignclip.export (lazy import)."""
    from alignclip import export

    return export.load(path, device)
