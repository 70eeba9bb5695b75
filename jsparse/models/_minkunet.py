"""MinkUNet for LiDAR semantic segmentation, layer for layer as mmdet3d builds it on TorchSparse
(``MinkUNetBackbone`` with ``TorchSparseConvModule`` and ``TorchSparseBasicBlock``, the
MinkUNet-W32 of SPVNAS / TorchSparse's ``SparseResUNet42``), with ``MinkUNetHead``'s classifier.

TorchSparse's stride-1 convolutions keep their input sites: here they are SubM convolutions; its
k2 s2 convolutions are SparseConv3d k2 s2 (each site goes to ``floor(p / 2)``), and its
transposed k2 s2 convolutions, which return to the finer level's sites, are
``SparseInverseConv3d`` of the matching down-sampling layer. Convolutions have no bias;
BatchNorm keeps PyTorch's defaults (eps 1e-5, momentum 0.1: Flax's 0.9).
"""

from __future__ import annotations

from flax import nnx

from jsparse import nn as spnn
from jsparse.tensor import SparseConvTensor, sparse_cat

# MinkUNet-W32: the stem, four encoder stages, four decoder stages.
WIDTHS = (32, 32, 64, 128, 256, 256, 128, 96, 96)


def _norm(channels: int, rngs: nnx.Rngs) -> spnn.BatchNorm:
  return spnn.BatchNorm(channels, epsilon=1e-5, momentum=0.9, rngs=rngs)


def _conv_block(conv: spnn.SparseModule, channels: int, rngs: nnx.Rngs) -> spnn.SparseSequential:
  """``TorchSparseConvModule``: a convolution without bias, BatchNorm, ReLU."""
  return spnn.SparseSequential(conv, _norm(channels, rngs), nnx.relu)


class ResidualBlock(spnn.SparseModule):
  """``TorchSparseBasicBlock``: SubM 3x3x3, BatchNorm, ReLU, SubM 3x3x3, BatchNorm, plus the input
  (through a SubM 1x1x1 and BatchNorm where the channels change), then ReLU.

  Args:
    c_in: input channels.
    c_out: output channels.
    level: the grid level's name; the 3x3x3 convolutions share its map (``subm{level}``), the
      1x1x1 shortcut ``subm{level}_k1``.
    rngs: random state.
  """

  def __init__(self, c_in: int, c_out: int, level: str, *, rngs: nnx.Rngs):
    key = f"subm{level}"
    self.net = spnn.SparseSequential(
      spnn.SubMConv3d(c_in, c_out, 3, bias=False, indice_key=key, rngs=rngs),
      _norm(c_out, rngs),
      nnx.relu,
      spnn.SubMConv3d(c_out, c_out, 3, bias=False, indice_key=key, rngs=rngs),
      _norm(c_out, rngs),
    )
    if c_in == c_out:
      self.downsample = nnx.data(None)
    else:
      self.downsample = spnn.SparseSequential(
        spnn.SubMConv3d(c_in, c_out, 1, bias=False, indice_key=f"{key}_k1", rngs=rngs), _norm(c_out, rngs)
      )

  def __call__(self, x: SparseConvTensor) -> SparseConvTensor:
    out = self.net(x)
    out = out + (x if self.downsample is None else self.downsample(x))
    return out.replace_feature(nnx.relu(out.features))


class MinkUNet(nnx.Module):
  """MinkUNet-W32: per-voxel class scores of a 3-D voxel tensor.

  A stem of two SubM 3x3x3 convolutions; four encoder stages, each a SparseConv3d k2 s2 and two
  :class:`ResidualBlock`; four decoder stages, each a ``SparseInverseConv3d`` back to the
  matching encoder level, the channels of that level's tensor concatenated, and two residual
  blocks; then a linear classifier. Channels ``32-32-64-128-256-256-128-96-96`` times ``width``.

  Args:
    in_channels: the voxel features' channels.
    num_classes: the classes scored.
    width: multiplies every width (rounded, at least 1): 1.0 is MinkUNet-W32, 0.5 W16 ...
    rngs: random state.

  >>> import numpy as np, jsparse
  >>> from flax import nnx
  >>> net = jsparse.models.MinkUNet(4, 5, width=0.25, rngs=nnx.Rngs(0))
  >>> sites = np.array([[0, z, 20, 20] for z in range(10)], np.int32)
  >>> x = jsparse.SparseConvTensor(np.ones((10, 4), np.float32), sites, (32, 32, 32), 1)
  >>> net(x).features.shape
  (10, 5)
  """

  def __init__(self, in_channels: int, num_classes: int, *, width: float = 1.0, rngs: nnx.Rngs):
    widths = [max(1, round(width * w)) for w in WIDTHS]
    stem, encoder, decoder = widths[0], widths[1:5], widths[5:]
    self.widths = tuple(widths)
    self.conv_input = spnn.SparseSequential(
      _conv_block(
        spnn.SubMConv3d(in_channels, stem, 3, bias=False, indice_key="subm1", rngs=rngs), stem, rngs
      ),
      _conv_block(spnn.SubMConv3d(stem, stem, 3, bias=False, indice_key="subm1", rngs=rngs), stem, rngs),
    )
    levels = [2**i for i in range(5)]  # the grid's stride at each level: 1 (input) to 16
    channels = [stem, *encoder]
    encoders = []
    for i in range(4):
      down = spnn.SparseConv3d(
        channels[i], channels[i], 2, 2, bias=False, indice_key=f"down{levels[i + 1]}", rngs=rngs
      )
      encoders.append(
        spnn.SparseSequential(
          _conv_block(down, channels[i], rngs),
          ResidualBlock(channels[i], channels[i + 1], str(levels[i + 1]), rngs=rngs),
          ResidualBlock(channels[i + 1], channels[i + 1], str(levels[i + 1]), rngs=rngs),
        )
      )
    self.encoder = nnx.List(encoders)
    ups, blocks = [], []
    previous = channels[-1]
    for i, c in enumerate(decoder):
      level = levels[3 - i]  # back to the level the matching encoder stage started from
      up = spnn.SparseInverseConv3d(previous, c, 2, indice_key=f"down{levels[4 - i]}", bias=False, rngs=rngs)
      ups.append(_conv_block(up, c, rngs))
      lateral = channels[3 - i]
      blocks.append(
        spnn.SparseSequential(
          ResidualBlock(c + lateral, c, str(level), rngs=rngs), ResidualBlock(c, c, str(level), rngs=rngs)
        )
      )
      previous = c
    self.up = nnx.List(ups)
    self.decoder = nnx.List(blocks)
    self.classifier = nnx.Linear(previous, num_classes, rngs=rngs)

  def __call__(self, x: SparseConvTensor) -> SparseConvTensor:
    """Class scores: features ``[N, in_channels]`` -> ``[N, num_classes]`` at the input's sites."""
    if not isinstance(x, SparseConvTensor) or x.ndim != 3:
      raise TypeError(f"MinkUNet takes a 3-D SparseConvTensor of voxels, got {x!r}")
    x = self.conv_input(x)
    laterals = [x]
    for stage in self.encoder:
      x = stage(x)
      laterals.append(x)
    for up, block, lateral in zip(self.up, self.decoder, reversed(laterals[:-1])):
      x = block(sparse_cat(up(x), lateral))
    return x.replace_feature(self.classifier(x.features))
