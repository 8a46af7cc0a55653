"""The non-linear aligner of Vu, Balashova & Tran (2024): an MLP from image embeddings into the text embedding
space, saved as one safetensors file (weights + its shape as metadata), and a wrapper that puts it behind a
model's image encoder."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignclip.analysis.metrics import as_numpy

_METADATA_KEY = "alignclip_aligner"


@dataclass
class AlignerShape:
    dim: int  # embedding size in and out
    hidden: int = 1024  # width of every hidden layer
    depth: int = 2  # number of hidden layers (>= 1)
    residual: bool = True  # out = x + mlp(x); the last layer starts at zero, so training starts at the identity
    dropout: float = 0.0


class MLPAligner(nn.Module):
    """f(x) = [x +] W_L GELU(... GELU(W_1 x)); embeddings in, embeddings out (normalise downstream)."""

    def __init__(self, shape: AlignerShape):
        super().__init__()
        if shape.depth < 1 or shape.hidden < 1:
            raise ValueError(f"aligner depth and hidden must be >= 1, found depth={shape.depth}, hidden={shape.hidden}")
        self.shape = shape
        layers: list[nn.Module] = []
        width_in = shape.dim
        for _ in range(shape.depth):
            layers += [nn.Linear(width_in, shape.hidden), nn.GELU()]
            if shape.dropout > 0:
                layers.append(nn.Dropout(shape.dropout))
            width_in = shape.hidden
        self.out = nn.Linear(width_in, shape.dim)
        self.body = nn.Sequential(*layers)
        if shape.residual:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = self.out(self.body(x))
        return x + y if self.shape.residual else y

    @torch.no_grad()
    def map_image(self, img, batch_size: int = 4096) -> np.ndarray:
        """numpy in, numpy out (the interface the post-hoc baselines share)."""
        self.eval()
        x = torch.from_numpy(as_numpy(img)).float()
        return torch.cat([self(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).double().numpy()

    def map_text(self, txt) -> np.ndarray:
        return as_numpy(txt)  # the aligner moves images only


def save_aligner(aligner: MLPAligner, path: str | Path, extra: dict | None = None) -> Path:
    """One safetensors file; the shape (and e.g. the training settings) ride along as JSON metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {_METADATA_KEY: json.dumps({"shape": asdict(aligner.shape), **(extra or {})})}
    save_file({k: v.detach().contiguous().cpu() for k, v in aligner.state_dict().items()}, str(path), metadata=meta)
    return path


def load_aligner(path: str | Path) -> MLPAligner:
    """Rebuild an aligner from ``save_aligner``'s file (no pickle involved)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such aligner file (expected a .safetensors written by distill_aligner)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if _METADATA_KEY not in meta:
        raise ValueError(f"{path} is not an aligner file: its safetensors metadata has no {_METADATA_KEY!r} entry")
    aligner = MLPAligner(AlignerShape(**json.loads(meta[_METADATA_KEY])["shape"]))
    aligner.load_state_dict(load_file(str(path)))
    return aligner.eval()


class AlignedModel(nn.Module):
    """A contrastive model whose image encoder is followed by the aligner; the text side is unchanged.

    Honours the model interface (encode_image, encode_text, forward), so every tool takes it like a model."""

    def __init__(self, model: nn.Module, aligner: MLPAligner):
        super().__init__()
        self.model, self.aligner = model, aligner

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        x = self.aligner(self.model.encode_image(images, normalize=True))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        return self.model.encode_text(tokens, normalize=normalize)

    def forward(self, images: Tensor, tokens: Tensor) -> dict:
        out = self.model(images, tokens)
        out["image_embeds"] = self.encode_image(images, normalize=True)
        return out

    @property
    def logit_scale(self):
        return self.model.logit_scale


def load_aligned(model_path: str | Path, aligner_path: str | Path, device: str = "cpu"):
    """(AlignedModel, tokenizer, image transform): an exported model with a distilled aligner after its image
    encoder, used like ``alignclip.load``'s model."""
    from alignclip.interop import load

    model, tokenizer, transform = load(model_path, device)
    return AlignedModel(model, load_aligner(aligner_path).to(device)).eval(), tokenizer, transform
