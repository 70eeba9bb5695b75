import os
import pathlib

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
  "ci",
  max_examples=int(os.environ.get("JSPARSE_HYPOTHESIS_EXAMPLES", "12")),
  deadline=None,
  derandomize=True,
  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")

# Real scans. data/ holds the two scans the repository may redistribute (KITTI and nuScenes, CC BY-NC-SA;
# see data/README.md). ScanNet and SUN RGB-D may not be redistributed: tests read them from the folder
# named by $JSPARSE_EXTRA_DATA and skip without it.
DATA_DIR = pathlib.Path(__file__).resolve().parents[1] / "data"
EXTRA_DATA_ENV = "JSPARSE_EXTRA_DATA"
EXTRA_SCANS = ("scannet_scene0000_00.bin", "sunrgbd_000017.bin")


@pytest.fixture
def scans() -> pathlib.Path:
  """The repository's data/ folder: kitti_000008.bin and nuscenes_lidar_top.bin (always present)."""
  return DATA_DIR


@pytest.fixture
def extra_scans(request: pytest.FixtureRequest) -> pathlib.Path:
  """The folder named by $JSPARSE_EXTRA_DATA, holding the scans that are not redistributed (EXTRA_SCANS).

  Skips when the variable is unset or the folder lacks the scan the test is parametrized with (any
  parameter whose value is one of EXTRA_SCANS; all of them for a test with no such parameter).
  """
  folder = os.environ.get(EXTRA_DATA_ENV)
  if not folder:
    pytest.skip(f"${EXTRA_DATA_ENV} is unset: set it to a folder holding {', '.join(EXTRA_SCANS)}")
  params = getattr(request.node, "callspec", None)
  wanted = [v for v in params.params.values() if isinstance(v, str) and v in EXTRA_SCANS] if params else []
  missing = [name for name in wanted or EXTRA_SCANS if not (pathlib.Path(folder) / name).is_file()]
  if missing:
    pytest.skip(f"${EXTRA_DATA_ENV}={folder} lacks {', '.join(missing)}")
  return pathlib.Path(folder)


# The oracles compare float32 results to 1e-4: use full float32 matmuls everywhere (on GPUs the
# default would be TF32 for both the sparse path and lax.conv).
jax.config.update("jax_default_matmul_precision", "highest")
