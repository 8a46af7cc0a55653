"""The image stems beside CLIP's one patch conv, in plain torch and nothing else.

Every Hugging Face export of a model with one of these stems carries this file beside ``modeling_alignclip.py``
(alignclip.models.hf_remote), which ``AutoModel.from_pretrained(folder, trust_remote_code=True)`` runs; so it
imports torch only, and alignclip.models.layers builds its stems from it (one implementation).

- ``conv``: Xiao et al. (2021, "Early convolutions help transformers see better", arXiv:2106.14881), 3x3 stride-2
  convolutions, each followed by a per-channel GroupNorm (per image: no batch statistics) and a GELU, then a 1x1
  projection to the width.
- ``hybrid``: the ResNet-v2 root of the hybrid ViT (Dosovitskiy et al. 2021, arXiv:2010.11929, section 3.1;
  Kolesnikov et al. 2020, BiT, arXiv:1912.11370): a weight-standardised 7x7 stride-2 conv to 64 channels, a
  32-group GroupNorm and ReLU, a 3x3 stride-2 max pool (both with TensorFlow's input-size "same" padding), then a
  (patch/4)-px patch conv without bias (CLIP's pre-norm follows) to the width. Module names and numerics are
  timm's ``vit_*_r_*`` hybrid ViT's, which is how OpenCLIP's timm tower runs it.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

HYBRID_CHANNELS = 64  # the ResNet-v2 root's width (timm's hybrid ViT has no argument for it)
HYBRID_GROUPS = 32
HYBRID_REDUCTION = 4  # the root's conv and pool each halve the image


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's 'SAME' padding (before, after) of one side: output ceil(size / stride), the odd pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    top, bottom = same_padding(x.shape[-2], kernel, stride)
    left, right = same_padding(x.shape[-1], kernel, stride)
    return F.pad(x, (left, right, top, bottom), value=value)


class StdConvSame(nn.Conv2d):
    """A conv whose weight is standardised per output channel (zero mean, unit variance, eps 1e-8) at every call,
    on "same"-padded input (BiT's StdConv)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, eps: float = 1e-8):
        super().__init__(c_in, c_out, kernel, stride=stride, padding=0, bias=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                              momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return F.conv2d(pad_same(x, self.kernel_size[0], self.stride[0]), weight, None, self.stride)


class GroupNormReLU(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps))


class MaxPoolSame(nn.Module):
    def __init__(self, kernel: int = 3, stride: int = 2):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(pad_same(x, self.kernel, self.stride, value=-math.inf), self.kernel, self.stride)


class Stem(nn.Sequential):
    """An image stem: images [b, 3, s, s] -> a token grid [b, width, s / patch, s / patch]. ``weight`` is its first
    conv's, which is what transformers' CLIP reads its input dtype from."""

    @property
    def weight(self) -> torch.Tensor:
        return next(m for m in self.modules() if isinstance(m, nn.Conv2d)).weight


def conv_stem(channels: list[int], width: int) -> Stem:
    """``channels`` from the image's 3 up, one 3x3 stride-2 conv (no bias) + GroupNorm + GELU per step, then a 1x1
    conv with bias to ``width``."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels, channels[1:]):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.GroupNorm(c_out, c_out), nn.GELU()]
    layers.append(nn.Conv2d(channels[-1], width, 1))
    return Stem(*layers)


def hybrid_stem(patch_size: int, width: int) -> Stem:
    """The ResNet-v2 root, then a bias-free (patch_size / 4)-px patch conv (``patch_size`` a multiple of 4): timm's
    hybrid ViT drops that bias when a pre-norm follows, as in CLIP."""
    if patch_size % HYBRID_REDUCTION:
        raise ValueError(f"the hybrid stem needs a patch size that is a multiple of {HYBRID_REDUCTION}, "
                         f"got {patch_size}")
    root = nn.Sequential(OrderedDict(conv=StdConvSame(3, HYBRID_CHANNELS, 7, 2),
                                     norm=GroupNormReLU(HYBRID_GROUPS, HYBRID_CHANNELS),
                                     pool=MaxPoolSame(3, 2)))
    patch = patch_size // HYBRID_REDUCTION
    return Stem(OrderedDict(backbone=root, proj=nn.Conv2d(HYBRID_CHANNELS, width, patch, stride=patch, bias=False)))


def build_stem(kind: str, patch_size: int, width: int, conv_channels: list[int] | None = None) -> Stem:
    if kind == "conv":
        return conv_stem(list(conv_channels or []), width)
    if kind == "hybrid":
        return hybrid_stem(patch_size, width)
    raise ValueError(f"no image stem {kind!r} here (conv, hybrid)")
