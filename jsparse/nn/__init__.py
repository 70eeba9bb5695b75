"""Flax NNX layers with spconv's names: convolutions, and SparseSequential to chain them."""

from jsparse.nn._conv import SparseConv as SparseConv
from jsparse.nn._conv import SparseConv1d as SparseConv1d
from jsparse.nn._conv import SparseConv2d as SparseConv2d
from jsparse.nn._conv import SparseConv3d as SparseConv3d
from jsparse.nn._conv import SparseConv4d as SparseConv4d
from jsparse.nn._conv import SparseConvTranspose as SparseConvTranspose
from jsparse.nn._conv import SparseConvTranspose1d as SparseConvTranspose1d
from jsparse.nn._conv import SparseConvTranspose2d as SparseConvTranspose2d
from jsparse.nn._conv import SparseConvTranspose3d as SparseConvTranspose3d
from jsparse.nn._conv import SparseConvTranspose4d as SparseConvTranspose4d
from jsparse.nn._conv import SparseInverseConv as SparseInverseConv
from jsparse.nn._conv import SparseInverseConv1d as SparseInverseConv1d
from jsparse.nn._conv import SparseInverseConv2d as SparseInverseConv2d
from jsparse.nn._conv import SparseInverseConv3d as SparseInverseConv3d
from jsparse.nn._conv import SparseInverseConv4d as SparseInverseConv4d
from jsparse.nn._conv import SparseModule as SparseModule
from jsparse.nn._conv import SubMConv as SubMConv
from jsparse.nn._conv import SubMConv1d as SubMConv1d
from jsparse.nn._conv import SubMConv2d as SubMConv2d
from jsparse.nn._conv import SubMConv3d as SubMConv3d
from jsparse.nn._conv import SubMConv4d as SubMConv4d
from jsparse.nn._sequential import SparseSequential as SparseSequential
from jsparse.nn._sequential import ToDense as ToDense
from jsparse.nn._sequential import apply_to_features as apply_to_features
