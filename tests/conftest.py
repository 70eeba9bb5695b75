import fcntl
import importlib
import os
import pathlib
from collections.abc import Iterator
from types import ModuleType

import jax
import pytest
from hypothesis import HealthCheck, settings

import jsparse
from jsparse import _ffi
from sparse_data import platform_device

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


# The two backends: every op runs on the FFI kernels (where the C++ extension is built) and on the
# pure-jnp reference path.
BACKENDS = ("ffi", "reference") if _ffi.built("cpu") else ("reference",)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
  """Runs the test on each backend in turn (``ffi`` only where the CPU extension is built): inside
  ``with jsparse.backend(name):``, and yields ``name``.

  The backend is read when a function is traced, so a jitted function must be traced inside the
  test. A hypothesis test takes it as ``@pytest.mark.usefixtures("backend")``: the backend holds
  for all of its examples (as an argument, hypothesis flags it as a function-scoped fixture).
  """
  with jsparse.backend(request.param):
    yield request.param


@pytest.fixture(params=_ffi.PLATFORMS)
def ffi_device(request: pytest.FixtureRequest) -> jax.Device:
  """A device of each platform ("cpu", "cuda") whose FFI kernels the test checks against the reference
  path (see ``sparse_data.platform_device``, which hypothesis tests call with a parametrized platform)."""
  return platform_device(request.param)


@pytest.fixture
def large_memory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
  """For tests that hold several GB (large-scene arrays past 2**31 elements): a lock shared by the
  pytest-xdist workers, so that at most one such test runs at a time."""
  lock = tmp_path_factory.getbasetemp().parent / "jsparse-large-memory.lock"
  with open(lock, "w") as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    yield


# spconv 2.3.8, the oracle of the tests marked `spconv`. With JSPARSE_REQUIRE_SPCONV=1 (`make test-spconv`
# sets it) a missing torch or spconv fails those tests instead of skipping them, so that CI cannot pass
# without running the oracles.
REQUIRE_SPCONV_ENV = "JSPARSE_REQUIRE_SPCONV"


def _import(name: str) -> ModuleType:
  if os.environ.get(REQUIRE_SPCONV_ENV) == "1":
    try:
      return importlib.import_module(name)
    except ImportError as error:
      reason = f"{type(error).__name__}: {error}"
    # Outside the except clause: the report shows this message alone, not the ImportError's chain too.
    pytest.fail(
      f"{REQUIRE_SPCONV_ENV}=1 but {name} cannot be imported ({reason}); `make test-spconv` installs "
      "torch==2.13.0 and spconv==2.3.8",
      pytrace=False,
    )
  return pytest.importorskip(name)


@pytest.fixture(scope="session")
def spconv() -> tuple[ModuleType, ModuleType]:
  """``(torch, spconv.pytorch)`` (``spconv.pytorch.utils`` imported too), with spconv's CPU kernels on
  one OpenMP thread (their only correct setting); skips the test where torch or spconv is missing
  (fails it instead when ``JSPARSE_REQUIRE_SPCONV=1``). Tests that take it run with torch on one
  thread and autograd off (see ``_torch_for_spconv``)."""
  previous = os.environ.get("OMP_NUM_THREADS")
  os.environ["OMP_NUM_THREADS"] = "1"  # read once, when spconv's bundled OpenMP runtime loads
  try:
    torch = _import("torch")
    module = _import("spconv.pytorch")
    _import("spconv.pytorch.utils")
    return torch, module
  finally:
    if previous is None:
      del os.environ["OMP_NUM_THREADS"]
    else:
      os.environ["OMP_NUM_THREADS"] = previous


@pytest.fixture(autouse=True)
def _torch_for_spconv(request: pytest.FixtureRequest) -> Iterator[None]:
  """Around each test that takes ``spconv``: torch's own threads set to 1 (spconv's CPU build is only
  correct single-threaded) and autograd off (that build has no conv backward, and the tests copy
  weights into its layers' parameters in place). Other tests are left alone."""
  if "spconv" not in request.fixturenames:
    yield
    return
  torch, _ = request.getfixturevalue("spconv")
  previous = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    with torch.no_grad():
      yield
  finally:
    torch.set_num_threads(previous)


# The oracles compare float32 results to 1e-4: use full float32 matmuls everywhere (on GPUs the
# default would be TF32 for both the sparse path and lax.conv).
jax.config.update("jax_default_matmul_precision", "highest")
