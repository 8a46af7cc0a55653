"""One model class for CLIP and SharedCLIP: they differ only in whether the two modalities share a trunk."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .layers import ImageStem, TextStem, Trunk, l2_normalize


class ContrastiveModel(nn.Module):
    """Image and text encoders into one embedding space, plus the learnable temperature.

    ``shared_trunk`` is False for CLIP (``image_trunk`` and ``text_trunk``) and True for SharedCLIP (one ``trunk``:
    one block stack, one final LayerNorm, one projection). Text runs with a causal mask and is pooled at the
    end-of-text token, the largest id of each row; images run unmasked and are pooled at the class token.
    """

    def __init__(self, image_stem: ImageStem, text_stem: TextStem, image_trunk: Trunk, text_trunk: Trunk | None,
                 init_temperature: float, max_logit_scale: float):
        super().__init__()
        self.image_stem = image_stem
        self.text_stem = text_stem
        self.shared_trunk = text_trunk is None
        if self.shared_trunk:
            self.trunk = image_trunk
        else:
            self.image_trunk = image_trunk
            self.text_trunk = text_trunk
        self.max_logit_scale = max_logit_scale
        # logit_scale = ln(1 / temperature); the loss uses s = exp(logit_scale), clamped in forward (see below).
        # Shape [1], not []: DeepSpeed 0.19 cannot hold a 0-dim parameter (its broadcast views every parameter as
        # bytes, ZeRO-0 gradient clipping and the universal-checkpoint converter concatenate them).
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))
        for module in (self.image_stem, self.text_stem, *self._trunks()):
            module.init_weights()

    def _trunks(self) -> tuple[Trunk, ...]:
        return (self.trunk,) if self.shared_trunk else (self.image_trunk, self.text_trunk)

    def _trunk_for(self, modality: str) -> Trunk:
        if self.shared_trunk:
            return self.trunk
        return self.image_trunk if modality == "image" else self.text_trunk

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for trunk in self._trunks():
            trunk.grad_checkpointing = enable

    def set_pooled_last_block(self, enable: bool = True) -> None:
        """Run each trunk's last block at the pooled row only (layers.pooled_block): same embeddings and gradients,
        about 1/layers x 5/6 fewer linear FLOPs per tower."""
        for trunk in self._trunks():
            trunk.pooled_last_block = enable

    # OpenCLIP's conventions: encode_* return raw projected features unless normalize=True.
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self._trunk_for("image")(self.image_stem(images), pool_index=None, causal=False)
        return l2_normalize(x) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        eot_index = tokens.argmax(dim=-1)
        x = self._trunk_for("text")(self.text_stem(tokens), pool_index=eot_index, causal=True)
        return l2_normalize(x) if normalize else x

    def clamped_logit_scale(self) -> torch.Tensor:
        """ln s, clamped: the log-space temperature parameter the loss takes (s = exp of it)."""
        # Clamping in forward (not in place on the parameter) holds under ZeRO + bf16, where an in-place clamp of
        # the module's copy would be overwritten from the optimizer's fp32 master weights at the next step.
        return self.logit_scale.clamp(max=self.max_logit_scale)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised embeddings and ``log_logit_scale`` = ln s (log space, what alignclip.losses takes).

        OpenCLIP's forward returns ``logit_scale`` already exponentiated and ``image_features`` /
        ``text_features``; ours has none of those keys, so code ported from OpenCLIP fails with a KeyError
        instead of silently using a log-space scale as the scale."""
        return {
            "image_embeds": self.encode_image(images, normalize=True),
            "text_embeds": self.encode_text(tokens, normalize=True),
            "log_logit_scale": self.clamped_logit_scale(),
        }


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
