"""The reference networks in spconv 2.3.8, for bench_models.py: the same layer lists as
``jsparse.models`` (OpenPCDet's VoxelBackBone8x and VoxelResBackBone8x, mmdet3d's MinkUNet-W32),
written with spconv's layers and torch's BatchNorm1d. Load spconv through ``_spconv._load()``
first (one OpenMP thread)."""

from __future__ import annotations

from typing import Any


def build(name: str, in_channels: int, num_classes: int = 0) -> Any:
  """A torch module for ``name`` ("VoxelBackBone8x", "VoxelResBackBone8x" or "MinkUNet") whose
  ``forward`` takes an ``spconv.SparseConvTensor`` and returns one."""
  import spconv.pytorch as spconv
  import torch
  from torch import nn

  def block(conv: nn.Module, c: int, eps: float = 1e-3, momentum: float = 0.01) -> nn.Module:
    return spconv.SparseSequential(conv, nn.BatchNorm1d(c, eps=eps, momentum=momentum), nn.ReLU())

  def subm(c_in: int, c_out: int, key: str) -> nn.Module:
    return block(spconv.SubMConv3d(c_in, c_out, 3, padding=1, bias=False, indice_key=key), c_out)

  def down(c_in: int, c_out: int, padding: Any, key: str) -> nn.Module:
    conv = spconv.SparseConv3d(c_in, c_out, 3, stride=2, padding=padding, bias=False, indice_key=key)
    return block(conv, c_out)

  class BasicBlock(spconv.SparseModule):  # OpenPCDet's SparseBasicBlock
    def __init__(self, c: int, key: str):
      super().__init__()
      self.conv1 = spconv.SubMConv3d(c, c, 3, padding=1, bias=True, indice_key=key)
      self.bn1 = nn.BatchNorm1d(c, eps=1e-3, momentum=0.01)
      self.conv2 = spconv.SubMConv3d(c, c, 3, padding=1, bias=True, indice_key=key)
      self.bn2 = nn.BatchNorm1d(c, eps=1e-3, momentum=0.01)

    def forward(self, x):
      out = self.conv1(x)
      out = out.replace_feature(torch.relu(self.bn1(out.features)))
      out = self.conv2(out)
      return out.replace_feature(torch.relu(self.bn2(out.features) + x.features))

  class Backbone(nn.Module):
    def __init__(self, residual: bool):
      super().__init__()
      c4 = 128 if residual else 64

      def pair(c: int, level: int) -> list[nn.Module]:
        if residual:
          return [BasicBlock(c, f"res{level}"), BasicBlock(c, f"res{level}")]
        return [subm(c, c, f"subm{level}"), subm(c, c, f"subm{level}")]

      self.conv_input = subm(in_channels, 16, "subm1")
      self.conv1 = spconv.SparseSequential(*(pair(16, 1) if residual else [subm(16, 16, "subm1")]))
      self.conv2 = spconv.SparseSequential(down(16, 32, 1, "spconv2"), *pair(32, 2))
      self.conv3 = spconv.SparseSequential(down(32, 64, 1, "spconv3"), *pair(64, 3))
      self.conv4 = spconv.SparseSequential(down(64, c4, (0, 1, 1), "spconv4"), *pair(c4, 4))
      out = spconv.SparseConv3d(
        c4, 128, (3, 1, 1), stride=(2, 1, 1), padding=0, bias=False, indice_key="spconv_down2"
      )
      self.conv_out = block(out, 128)

    def forward(self, x):
      return self.conv_out(self.conv4(self.conv3(self.conv2(self.conv1(self.conv_input(x))))))

  def mink_block(conv: nn.Module, c: int) -> nn.Module:
    return block(conv, c, eps=1e-5, momentum=0.1)

  class Residual(spconv.SparseModule):  # mmdet3d's TorchSparseBasicBlock
    def __init__(self, a: int, b: int, level: int):
      super().__init__()
      key = f"subm{level}"
      self.net = spconv.SparseSequential(
        spconv.SubMConv3d(a, b, 3, bias=False, indice_key=key), nn.BatchNorm1d(b), nn.ReLU(),
        spconv.SubMConv3d(b, b, 3, bias=False, indice_key=key), nn.BatchNorm1d(b),
      )  # fmt: skip
      self.downsample = None
      if a != b:
        shortcut = spconv.SubMConv3d(a, b, 1, bias=False, indice_key=f"{key}_k1")
        self.downsample = spconv.SparseSequential(shortcut, nn.BatchNorm1d(b))

    def forward(self, x):
      out = self.net(x)
      identity = x.features if self.downsample is None else self.downsample(x).features
      return out.replace_feature(torch.relu(out.features + identity))

  class MinkUNet(nn.Module):
    def __init__(self):
      super().__init__()
      enc, dec = [32, 32, 64, 128, 256], [256, 256, 128, 96, 96]
      self.conv_input = spconv.SparseSequential(
        mink_block(spconv.SubMConv3d(in_channels, 32, 3, bias=False, indice_key="subm1"), 32),
        mink_block(spconv.SubMConv3d(32, 32, 3, bias=False, indice_key="subm1"), 32),
      )
      levels = [1, 2, 4, 8, 16]
      self.encoder = nn.ModuleList(
        spconv.SparseSequential(
          mink_block(
            spconv.SparseConv3d(enc[i], enc[i], 2, 2, bias=False, indice_key=f"down{levels[i + 1]}"), enc[i]
          ),
          Residual(enc[i], enc[i + 1], levels[i + 1]),
          Residual(enc[i + 1], enc[i + 1], levels[i + 1]),
        )
        for i in range(4)
      )
      self.up = nn.ModuleList(
        mink_block(
          spconv.SparseInverseConv3d(dec[i], dec[i + 1], 2, indice_key=f"down{levels[4 - i]}", bias=False),
          dec[i + 1],
        )
        for i in range(4)
      )
      self.decoder = nn.ModuleList(
        spconv.SparseSequential(
          Residual(dec[i + 1] + enc[3 - i], dec[i + 1], levels[3 - i]),
          Residual(dec[i + 1], dec[i + 1], levels[3 - i]),
        )
        for i in range(4)
      )
      self.classifier = nn.Linear(96, num_classes)

    def forward(self, x):
      x = self.conv_input(x)
      laterals = [x]
      for stage in self.encoder:
        x = stage(x)
        laterals.append(x)
      for up, block_, lateral in zip(self.up, self.decoder, reversed(laterals[:-1])):
        y = up(x)
        x = block_(y.replace_feature(torch.cat([y.features, lateral.features], dim=1)))
      return x.replace_feature(self.classifier(x.features))

  if name == "MinkUNet":
    return MinkUNet()
  return Backbone(residual=name == "VoxelResBackBone8x")
