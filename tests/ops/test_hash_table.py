"""HashTable: against a Python dict, the C++ FFI kernels against the reference path, errors."""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jsparse
from jsparse.ops import HashTable, _backend
from jsparse.ops import _hash_table as ht
from sparse_data import both_backends

INT32_MAX = int(np.iinfo(np.int32).max)


def _leaves_equal(a, b):
  """Bitwise equality of two pytrees of arrays (layouts included, not just contents)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _stored(table: HashTable) -> dict:
  """The table's contents as a dict, read through items()."""
  keys, values, count = table.items()
  count = int(count)
  return dict(zip(keys[:count].tolist(), values[:count].tolist()))


class DictModel:
  """What a table of `capacity` slots must hold: a dict that refuses new keys when full."""

  def __init__(self, capacity):
    self.capacity, self.items, self.dropped = capacity, {}, 0

  def insert(self, keys, values):
    for k, v in zip(keys, values):
      if k == INT32_MAX or (k not in self.items and len(self.items) == self.capacity):
        self.dropped += 1
      else:
        self.items[k] = v

  def insert_keys_only(self, keys):
    self.insert(keys, [self.items.get(k, 0) for k in keys])

  def insert_exist_keys(self, keys, values):
    found = [k in self.items for k in keys]
    for k, v in zip(keys, values):
      if k in self.items:
        self.items[k] = v
    return found


# One compilation per backend and shape: the step functions key their jit cache on the backend.
_insert = _backend.jit(lambda t, k, v: t.insert(k, v))
_insert_keys_only = _backend.jit(lambda t, k: t.insert(k))
_insert_exist_keys = _backend.jit(lambda t, k, v: t.insert_exist_keys(k, v))
_query = _backend.jit(lambda t, k: t.query(k))

N = 12  # keys per operation (fixed, so that hypothesis examples reuse the compiled steps)
key_values = st.one_of(st.integers(-20, 20), st.sampled_from([INT32_MAX, -(2**31), 2**30]))
operations = st.lists(
  st.tuples(
    st.sampled_from(["insert", "insert_keys_only", "insert_exist_keys"]),
    st.lists(key_values, min_size=N, max_size=N),
    st.lists(st.integers(-1000, 1000), min_size=N, max_size=N),
  ),
  min_size=1,
  max_size=4,
)


@pytest.mark.usefixtures("backend")
@given(capacity=st.sampled_from([8, 32]), ops=operations)
def test_matches_a_dict(capacity, ops):
  model = DictModel(capacity)
  probe = jnp.asarray(list(range(-21, 22)) + [INT32_MAX, -(2**31), 2**30], jnp.int32)
  table = HashTable.create(capacity, jnp.int32, jnp.int32)
  for op, keys, values in ops:
    k, v = jnp.asarray(keys, jnp.int32), jnp.asarray(values, jnp.int32)
    if op == "insert":
      table = _insert(table, k, v)
      model.insert(keys, values)
    elif op == "insert_keys_only":
      table = _insert_keys_only(table, k)
      model.insert_keys_only(keys)
    else:
      table, found = _insert_exist_keys(table, k, v)
      assert found.tolist() == model.insert_exist_keys(keys, values)
  values, found = _query(table, probe)
  assert _stored(table) == model.items
  assert int(table.dropped) == model.dropped
  assert found.tolist() == [k in model.items for k in probe.tolist()]
  assert values.tolist() == [model.items.get(k, 0) for k in probe.tolist()]


def _exercise_inputs(key_dtype, value_dtype, n=200, seed=0):
  """Colliding keys (duplicates, the reserved key and iinfo.min) and values for _exercise."""
  rng = np.random.default_rng(seed)
  info = np.iinfo(key_dtype)
  keys = rng.integers(-100, 100, n).astype(key_dtype)
  if info.bits == 64:  # keys equal modulo 2**32 must stay distinct
    keys[1::5] += np.int64(2**32)
  keys[::17] = info.max  # the reserved key
  keys[::23] = info.min
  values = (rng.normal(size=n) * 100).astype(value_dtype)
  return keys, values


def _exercise(keys, values, capacity=64):
  """Every operation on `keys` [n] and `values` [n] (overflowing a table of `capacity` slots) and
  its results."""
  n = keys.shape[0]
  table = HashTable.create(capacity, keys.dtype, values.dtype)
  full = table.insert(keys, values)
  half = table.insert(keys[: n // 4], values[: n // 4]).insert(keys[n // 4 : n // 2])
  updated, found = half.insert_exist_keys(keys[::-1], values * 2)
  numbered, count = full.assign_arange() if jnp.issubdtype(values.dtype, jnp.integer) else (full, 0)
  return full, half, updated, found, half.query(keys), numbered, count, full.items(), full.items(7)


def _on(device, tree):
  """Asserts that every array of `tree` lives on `device` (the kernels ran there)."""
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array):
      assert leaf.devices() == {device}


@pytest.mark.parametrize(
  "key_dtype,value_dtype", [(np.int32, np.int32), (np.int32, np.float32)], ids=["i32-i32", "i32-f32"]
)
def test_ffi_and_reference_build_identical_tables(ffi_device, key_dtype, value_dtype):
  ffi, reference = both_backends(_exercise, *_exercise_inputs(key_dtype, value_dtype), device=ffi_device)
  _on(ffi_device, ffi)
  _leaves_equal(ffi, reference)
  full = ffi[0]
  assert int(full.dropped) > 0 and int(full.items()[2]) == 64  # the cases include a full table


def test_int64_keys_and_values_under_x64(backend):
  with jax.enable_x64(True):
    keys = np.array([1, 1 + 2**32, -(2**40), 2**62, 7, 1], np.int64)
    values = np.array([10, 20, 30, 40, 50, 60], np.float64)
    table = HashTable.create(16, jnp.int64, jnp.float64).insert(keys, values)
    got, found = table.query(np.array([1, 2**32 + 1, -(2**40), 2**62, 7, 2], np.int64))
    assert found.tolist() == [True, True, True, True, True, False]
    assert got.tolist() == [60.0, 20.0, 30.0, 40.0, 50.0, 0.0]
    assert _stored(table) == {1: 60.0, 1 + 2**32: 20.0, -(2**40): 30.0, 2**62: 40.0, 7: 50.0}
    reserved = HashTable.create(4, jnp.int64, jnp.int64).insert(np.array([2**63 - 1], np.int64))
    assert int(reserved.dropped) == 1


def test_int64_ffi_and_reference_identical_under_x64(ffi_device):
  with jax.enable_x64(True):
    ffi, reference = both_backends(_exercise, *_exercise_inputs(np.int64, np.int64), device=ffi_device)
    _on(ffi_device, ffi)
    _leaves_equal(ffi, reference)
    assert ffi[0].keys.dtype == np.int64 and int(ffi[0].dropped) > 0


def test_large_batched_query_matches_reference(ffi_device):
  """Large enough for the CPU kernel to split the query over threads, with tiles that straddle
  the tables of a vmapped batch (and for several CUDA blocks)."""
  rng = np.random.default_rng(2)
  stored = rng.integers(0, 4000, (3, 500)).astype(np.int32)
  probes = rng.integers(0, 4000, (3, 20000)).astype(np.int32)

  def build_and_query(k, q):
    return HashTable.create(1024).insert(k, k * 7).query(q)

  ffi, reference = both_backends(jax.vmap(build_and_query), stored, probes, device=ffi_device)
  _on(ffi_device, ffi)
  _leaves_equal(ffi, reference)
  values, found = ffi
  assert 0 < int(found.sum()) < found.size
  np.testing.assert_array_equal(values, np.where(found, probes * 7, 0))


def test_batched_inserts_match_reference(ffi_device):
  """A vmapped batch of tables, each filled with its own colliding keys by every operation: the
  tables must not share a slot, a dropped count or a last-writer."""
  keys, values = _exercise_inputs(np.int32, np.int32)
  keys = np.stack([keys, keys[::-1], np.roll(keys, 7)])
  values = np.stack([values, -values, values + 1])
  ffi, reference = both_backends(jax.vmap(_exercise), keys, values, device=ffi_device)
  _on(ffi_device, ffi)
  _leaves_equal(ffi, reference)
  layouts = np.asarray(ffi[0].keys)
  assert not np.array_equal(layouts[0], layouts[1]) and not np.array_equal(layouts[0], layouts[2])


def test_overflow_is_counted_and_check_raises(backend):
  table = HashTable.create(4, jnp.int32, jnp.int32)
  table.check()  # empty: fine
  table = table.insert(jnp.arange(6, dtype=jnp.int32), jnp.arange(6, dtype=jnp.int32) * 10)
  assert int(table.dropped) == 2 and int(table.items()[2]) == 4
  assert _stored(table) == {0: 0, 1: 10, 2: 20, 3: 30}  # first come, first stored
  # A full table still updates stored keys and answers misses (the probe ends after 4 slots).
  table = table.insert(jnp.array([2, 9], jnp.int32), jnp.array([-2, -9], jnp.int32))
  assert int(table.dropped) == 3
  values, found = table.query(jnp.array([2, 9], jnp.int32))
  assert values.tolist() == [-2, 0] and found.tolist() == [True, False]
  with pytest.raises(jsparse.CapacityError, match=r"3 inserted key\(s\) were not stored; 4 key\(s\) fill 4"):
    table.check()


def test_the_empty_marker_is_never_stored_nor_found(backend):
  table = HashTable.create(8).insert(jnp.array([INT32_MAX, 5], jnp.int32), jnp.array([1, 2], jnp.int32))
  assert int(table.dropped) == 1 and _stored(table) == {5: 2}
  values, found = table.query(jnp.array([INT32_MAX, 5], jnp.int32))
  assert found.tolist() == [False, True] and values.tolist() == [0, 2]
  table, found = table.insert_exist_keys(jnp.array([INT32_MAX], jnp.int32), jnp.array([7], jnp.int32))
  assert found.tolist() == [False] and _stored(table) == {5: 2}
  with pytest.raises(jsparse.CapacityError, match="2147483647 .iinfo.int32..max. marks empty slots"):
    table.check()


def test_jit_vmap_and_empty_inputs(backend):
  keys = jnp.asarray(np.random.default_rng(1).integers(0, 50, (3, 20)), jnp.int32)

  def build(k):
    table = HashTable.create(32, jnp.int32, jnp.float32).insert(k, k.astype(jnp.float32) / 2)
    table, _ = table.insert_exist_keys(k[:5], jnp.zeros(5, jnp.float32))
    return table, table.query(k)

  batched = jax.jit(jax.vmap(build))(keys)
  for i in range(3):
    _leaves_equal(jax.tree.map(operator.itemgetter(i), batched), build(keys[i]))
  none = jnp.zeros((0,), jnp.int32)
  table = HashTable.create(4).insert(none, none)
  table, found = table.insert_exist_keys(none, none)
  values, found2 = table.query(none)
  assert found.shape == found2.shape == values.shape == (0,) and int(table.dropped) == 0


def test_inside_shard_map(backend):
  """A table created inside shard_map and filled with per-shard keys (the loop carry and the
  FFI results must take the keys' varying-axes type); a one-device mesh tracks the types too."""
  mesh = jax.make_mesh((1,), ("shards",))
  spec = jax.sharding.PartitionSpec("shards")
  keys = jax.device_put(jnp.arange(8, dtype=jnp.int32), jax.sharding.NamedSharding(mesh, spec))

  def per_shard(k):
    table = HashTable.create(16).insert(k, k * 2)
    table, _ = table.insert_exist_keys(k[:2], -k[:2])
    return table.query(k)[0]

  got = jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=spec, out_specs=spec))(keys)
  assert got.tolist() == [0, -1, 4, 6, 8, 10, 12, 14]


def test_assign_arange_and_items_follow_spconv(backend):
  keys = jnp.array([40, 10, 40, 30, -3], jnp.int32)
  table = HashTable.create(16).insert(keys, jnp.array([1, 2, 3, 4, 5], jnp.int32))
  assert _stored(table) == {40: 3, 10: 2, 30: 4, -3: 5}  # an existing key is overwritten
  numbered, count = table.assign_arange()
  # spconv: equivalent to inserting items()'s keys with arange(count) as values.
  item_keys, _, _ = table.items()
  assert int(count) == 4
  assert _stored(numbered) == {k: i for i, k in enumerate(item_keys[:4].tolist())}
  _leaves_equal(numbered.keys, table.keys)
  short_keys, short_values, short_count = table.items(max_size=2)
  assert short_keys.tolist() == item_keys[:2].tolist() and int(short_count) == 4
  assert table.items(max_size=0)[0].shape == (0,)
  # Empty slots hold the marker and 0 in items() and in the table itself.
  padded_keys, padded_values, _ = table.items()
  assert padded_keys[4:].tolist() == [INT32_MAX] * 12 and padded_values[4:].tolist() == [0] * 12
  assert np.asarray(numbered.values)[np.asarray(numbered.keys) == INT32_MAX].tolist() == [0] * 12


def test_create_rejects_bad_arguments():
  for capacity in (0, -1, 2**31):
    with pytest.raises(ValueError, match=r"capacity must be in \[1, 2147483647\]"):
      HashTable.create(capacity)
  with pytest.raises(ValueError, match="capacity must be an int"):
    HashTable.create(8.0)
  with pytest.raises(ValueError, match=r"key_dtype must be one of \['int32', 'int64'\], got float32"):
    HashTable.create(8, jnp.float32)
  with pytest.raises(ValueError, match="value_dtype must be one of .* got int8"):
    HashTable.create(8, jnp.int32, jnp.int8)
  with pytest.raises(ValueError, match=r"key_dtype=int64 needs 64-bit types; enable jax's 64-bit mode"):
    HashTable.create(8, jnp.int64)
  with pytest.raises(ValueError, match=r"jax.config.update\('jax_enable_x64', True\)"):
    HashTable.create(8, jnp.int32, jnp.float64)
  with jax.enable_x64(True):
    table = HashTable.create(8, jnp.int64)
  with pytest.raises(ValueError, match="the table has int64 keys; enable jax's 64-bit mode"):
    table.query(np.zeros(2, np.int64))


def test_methods_reject_bad_arguments():
  table = HashTable.create(8, jnp.int32, jnp.float32)
  with pytest.raises(ValueError, match=r"keys must have the table's key dtype int32, got int64; cast"):
    table.insert(np.array([1, 2]), np.array([1.0, 2.0], np.float32))  # numpy's int64, before narrowing
  with pytest.raises(ValueError, match=r"query: keys must have the table's key dtype int32, got float32"):
    table.query(jnp.array([1.0]))
  with pytest.raises(ValueError, match=r"keys must be one-dimensional \[N\], got shape \(2, 2\)"):
    table.query(jnp.zeros((2, 2), jnp.int32))
  with pytest.raises(ValueError, match="values must have the table's value dtype float32, got int32"):
    table.insert(jnp.array([1], jnp.int32), jnp.array([1], jnp.int32))
  with pytest.raises(ValueError, match=r"values must have the shape of keys \(2,\) .* got \(3,\)"):
    table.insert_exist_keys(jnp.array([1, 2], jnp.int32), jnp.zeros(3, jnp.float32))
  with pytest.raises(ValueError, match="assign_arange numbers keys with integers .* value_dtype=jnp.int32"):
    table.assign_arange()
  with pytest.raises(ValueError, match="a batch of tables works under jax.vmap"):
    jax.vmap(lambda _: HashTable.create(4))(jnp.arange(2)).query(jnp.zeros(1, jnp.int32))
  with pytest.raises(ValueError, match="call it outside jax.jit"):
    jax.jit(lambda t: t.check())(table)
  # Keys are numbered with int32: more than 2**31 - 1 in one call are refused at trace time.
  many = jax.ShapeDtypeStruct((2**31,), jnp.int32)
  with pytest.raises(ValueError, match=r"query: 2147483648 keys in one call; .* pass them in chunks"):
    jax.eval_shape(table.query, many)
  with pytest.raises(ValueError, match="insert_exist_keys: 2147483648 keys in one call"):
    jax.eval_shape(lambda k: table.insert_exist_keys(k, jnp.zeros(k.shape, jnp.float32)), many)


def test_ffi_handlers_reject_bad_operands(ffi_device):
  tk, tv, dropped, keys = jax.device_put(
    (jnp.full((8,), INT32_MAX, jnp.int32), jnp.zeros((8,), jnp.float32), jnp.zeros((), jnp.int32),
     jnp.array([1, 2], jnp.int32)),
    ffi_device,
  )  # fmt: skip
  with jsparse.backend("ffi"):
    HashTable.create(2).query(keys)  # registers the targets

  def raises(match, fn, *args):
    with pytest.raises(Exception, match=match):
      jax.block_until_ready(fn(*args))

  raises(
    "insert: keys must have the table's key dtype \\(int32\\)",
    ht._insert_ffi,
    tk,
    tv,
    dropped,
    keys.astype(jnp.float32),
    tv[:2],
  )
  raises("insert: values must have the table's value dtype", ht._insert_ffi, tk, tv, dropped, keys, keys)
  raises(
    "insert: values must have the shape of keys \\[2\\], got \\[3\\]",
    ht._insert_ffi,
    tk,
    tv,
    dropped,
    keys,
    tv[:3],
  )
  raises(
    "insert: dropped must be an int32 scalar",
    ht._insert_ffi,
    tk,
    tv,
    dropped.astype(jnp.float32),
    keys,
    tv[:2],
  )
  raises(
    "query: the table's keys \\[8\\] and values \\[4\\] must have the same shape",
    ht._query_ffi,
    tk,
    tv[:4],
    keys,
  )
  raises("query: the table's keys must be int32 or int64", ht._query_ffi, tv, tv, keys)
  raises(
    "insert_exist_keys: the table's values must be int32, int64, float32 or float64",
    ht._insert_exist_keys_ffi,
    tk,
    tv.astype(jnp.int8),
    keys,
    keys.astype(jnp.int8),
  )
