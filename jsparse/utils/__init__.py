"""Point-cloud utilities with spconv's names: voxelization and per-point gathering."""

from jsparse.utils._voxelize import PointToVoxel as PointToVoxel
from jsparse.utils._voxelize import gather_features_by_pc_voxel_id as gather_features_by_pc_voxel_id
from jsparse.utils._voxelize import mean_voxel_features as mean_voxel_features
