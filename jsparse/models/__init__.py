"""Reference networks with their reference implementations' layers: SECOND's and CenterPoint's
voxel backbones (OpenPCDet) and MinkUNet (TorchSparse / mmdet3d)."""

from jsparse.models._minkunet import MinkUNet as MinkUNet
from jsparse.models._minkunet import ResidualBlock as ResidualBlock
from jsparse.models._second import SparseBasicBlock as SparseBasicBlock
from jsparse.models._second import VoxelBackBone8x as VoxelBackBone8x
from jsparse.models._second import VoxelResBackBone8x as VoxelResBackBone8x
