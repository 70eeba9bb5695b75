"""Point clouds: spconv's voxelizer and per-point gathering, and point-cloud files."""

from jsparse.utils._io import read_points as read_points
from jsparse.utils._io import write_points as write_points
from jsparse.utils._scenes import CLASS_COLORS as CLASS_COLORS
from jsparse.utils._scenes import CLASSES as CLASSES
from jsparse.utils._scenes import beam_elevations as beam_elevations
from jsparse.utils._scenes import simulate_scan as simulate_scan
from jsparse.utils._voxelize import PointToVoxel as PointToVoxel
from jsparse.utils._voxelize import bounding_range as bounding_range
from jsparse.utils._voxelize import gather_features_by_pc_voxel_id as gather_features_by_pc_voxel_id
from jsparse.utils._voxelize import mean_voxel_features as mean_voxel_features
from jsparse.utils._voxelize import voxelize_mean as voxelize_mean
