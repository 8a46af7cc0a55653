"""alignclip: distributed pretraining of CLIP, SharedCLIP and AlignCLIP (contrastive image-text models that
close the modality gap)."""

__version__ = "0.1.0"


def load(path, device="cpu"):
    """(model, tokenizer, image transform) of an exported safetensors file or an OpenCLIP / Hugging Face CLIP
    folder; see alignclip.interop (lazy import: ``import alignclip`` stays free of torch)."""
    from alignclip import interop

    return interop.load(path, device)
