"""jsparse: sparse convolution for JAX (spconv's API as Flax NNX layers, with XLA FFI kernels)."""

from jsparse import export as export
from jsparse import interop as interop
from jsparse import models as models
from jsparse import nn as nn
from jsparse import ops as ops
from jsparse import utils as utils
from jsparse._build_info import build_info as build_info
from jsparse._capacity import CapacityError as CapacityError
from jsparse._capacity import check_capacity as check_capacity
from jsparse._capacity import round_capacity as round_capacity
from jsparse.ops import IndicePairs as IndicePairs
from jsparse.ops import backend as backend
from jsparse.tensor import SparseConvTensor as SparseConvTensor
from jsparse.tensor import sparse_add as sparse_add
from jsparse.tensor import sparse_cat as sparse_cat

__version__ = "0.1.0"
