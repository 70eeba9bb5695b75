"""Pure functions on sites, kernel maps and features (jittable, differentiable)."""

from jsparse.ops._backend import BACKENDS as BACKENDS
from jsparse.ops._backend import backend as backend
from jsparse.ops._backend import current_backend as current_backend
from jsparse.ops._combine import sparse_add as sparse_add
from jsparse.ops._combine import sparse_cat as sparse_cat
from jsparse.ops._conv import sparse_conv as sparse_conv
from jsparse.ops._hash_table import HashTable as HashTable
from jsparse.ops._indices import check_indices as check_indices
from jsparse.ops._kmap import IndicePairs as IndicePairs
from jsparse.ops._kmap import MapSpec as MapSpec
from jsparse.ops._kmap import build_map as build_map
from jsparse.ops._kmap import default_capacity as default_capacity
from jsparse.ops._kmap import inverse_kernel_map as inverse_kernel_map
from jsparse.ops._kmap import invert_map as invert_map
from jsparse.ops._kmap import kernel_map as kernel_map
from jsparse.ops._kmap import make_spec as make_spec
from jsparse.ops._kmap import map_for_outputs as map_for_outputs
from jsparse.ops._kmap import ntuple as ntuple
from jsparse.ops._kmap import output_sites as output_sites
from jsparse.ops._pool import global_avg_pool as global_avg_pool
from jsparse.ops._pool import global_max_pool as global_max_pool
from jsparse.ops._pool import sparse_avg_pool as sparse_avg_pool
from jsparse.ops._pool import sparse_max_pool as sparse_max_pool
from jsparse.ops._voxelize import points_in_range as points_in_range
from jsparse.ops._voxelize import voxelize as voxelize
