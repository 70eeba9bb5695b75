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

DATA_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> pathlib.Path:
  """../shared/data (real scans); tests that need it skip when it is absent."""
  if not DATA_DIR.is_dir():
    pytest.skip(f"{DATA_DIR} is absent")
  return DATA_DIR


# The oracles compare float32 results to 1e-4: use full float32 matmuls everywhere (on GPUs the
# default would be TF32 for both the sparse path and lax.conv).
jax.config.update("jax_default_matmul_precision", "highest")
