"""sparse_max_pool and sparse_avg_pool: the FFI kernels equal the reference path bitwise, values and
gradients, ties included; the handlers' errors. (tests/nn/test_pool.py checks the pool layers
against lax.reduce_window.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsparse import _ffi, ops
from sparse_data import both_backends, needs_ffi, random_sites


@needs_ffi
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("pool", ["max", "avg"])
def test_pools_and_gradients_are_identical(dtype, pool):
  rng = np.random.default_rng(11)
  shape, batch = (7, 6, 5), 2
  indices = np.concatenate([random_sites(rng, batch, shape, 120), np.full((5, 4), -1, np.int32)])
  spec = ops.make_spec("pool", shape, (3, 2, 3), 2, 1)
  # Coarse values make ties common, so the tie rule is exercised as well.
  features = jnp.asarray(rng.integers(-3, 4, (indices.shape[0], 6)), dtype)
  pairs = ops.build_map(jnp.asarray(indices), spec, batch, indices.shape[0])
  cotangent = jnp.asarray(rng.standard_normal((pairs.out_capacity, 6)), dtype)
  op = ops.sparse_max_pool if pool == "max" else ops.sparse_avg_pool

  def run(f):
    out, vjp = jax.vjp(lambda f: op(f, pairs), f)
    return out, *vjp(cotangent)

  for a, b in zip(*both_backends(run, features)):
    assert a.dtype == b.dtype == dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@needs_ffi
def test_handlers_reject_bad_arguments():
  _ffi.targets("cpu")
  features = jnp.ones((4, 3), jnp.float32)
  nbr = jnp.zeros((4, 9), jnp.int32)
  pool_max = jax.ffi.ffi_call(
    "jsparse_pool_max",
    (jax.ShapeDtypeStruct((4, 3), jnp.float32), jax.ShapeDtypeStruct((4, 3), jnp.int32)),
    vmap_method="sequential",
  )
  with pytest.raises(Exception, match=r"nbr must be an int32 kernel map"):
    pool_max(features, nbr.astype(jnp.float32))
  avg_grad = jax.ffi.ffi_call(
    "jsparse_pool_avg_grad", jax.ShapeDtypeStruct((4, 3), jnp.float32), vmap_method="sequential"
  )
  with pytest.raises(Exception, match=r"must be float32"):
    avg_grad(features.astype(jnp.bfloat16), nbr)
