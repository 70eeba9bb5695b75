"""HashTable: spconv's fixed-size hash table as a functional, jittable pytree.

Open addressing with linear probing: key ``k`` starts probing at ``MixKey32(uint32(k)) % capacity``
(``MixKey64(uint64(k))`` for int64 keys, the MurmurHash3 finalizers of ``xla_ffi/common/hash.h``)
and walks to the next slot until it meets ``k`` or an empty slot. An empty slot holds the key
``iinfo(key_dtype).max`` and the value 0. Inserts run one key after the other in input order, on
the C++ FFI kernel and on the reference path below alike, so both produce the same table bits.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jsparse import _ffi
from jsparse._capacity import CapacityError, is_concrete, round_capacity
from jsparse.ops import _backend
from jsparse.ops._varying import vary_like

_KEY_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
_VALUE_DTYPES = (np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.float32), np.dtype(np.float64))
_MAX_CAPACITY = int(np.iinfo(np.int32).max)
_X64_HINT = (
  "enable jax's 64-bit mode first: jax.config.update('jax_enable_x64', True) at startup, or "
  "`with jax.enable_x64(True):` around the code that creates and uses the table"
)


def _checked_dtype(dtype: Any, allowed: tuple[np.dtype, ...], what: str) -> np.dtype:
  dtype = np.dtype(dtype)
  if dtype not in allowed:
    raise ValueError(f"{what} must be one of {[d.name for d in allowed]}, got {dtype.name}")
  if dtype.itemsize == 8 and jax.dtypes.canonicalize_dtype(dtype) != dtype:
    raise ValueError(f"{what}={dtype.name} needs 64-bit types; {_X64_HINT}")
  return dtype


def empty_key(key_dtype: Any) -> int:
  """The key that marks an empty slot, ``iinfo(key_dtype).max``; it can never be stored."""
  return int(np.iinfo(key_dtype).max)


def _dtype_of(x: Any) -> np.dtype:
  """``x``'s dtype, read before ``jnp.asarray`` would narrow a numpy int64 array without x64."""
  dtype = getattr(x, "dtype", None)
  return np.dtype(jnp.asarray(x).dtype if dtype is None else dtype)


# ---- hashing and probing, mirroring xla_ffi/common/hash.h and xla_ffi/cpu/hash_table.cc ------


def _first_slot(keys: jax.Array, capacity: int) -> jax.Array:
  """int32 ``[N]``: where the probe for each key starts (MixKey32 / MixKey64 mod capacity)."""
  if keys.dtype == np.int32:
    unsigned, c1, c2, shifts = np.uint32, 0x85EBCA6B, 0xC2B2AE35, (16, 13, 16)
  else:
    unsigned, c1, c2, shifts = np.uint64, 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, (33, 33, 33)
  k = lax.bitcast_convert_type(keys, unsigned)
  k = k ^ (k >> unsigned(shifts[0]))
  k = k * unsigned(c1)
  k = k ^ (k >> unsigned(shifts[1]))
  k = k * unsigned(c2)
  k = k ^ (k >> unsigned(shifts[2]))
  return (k % unsigned(capacity)).astype(jnp.int32)


def _probe(table_keys: jax.Array, key: jax.Array, start: jax.Array) -> jax.Array:
  """The slot holding ``key``, else the first empty slot on its probe path, else -1 (full)."""
  capacity = table_keys.shape[0]
  empty = empty_key(table_keys.dtype)

  def searching(state):
    slot, step = state
    k = table_keys[slot]
    return (step < capacity) & (k != key) & (k != empty)

  def next_slot(state):
    slot, step = state
    return jnp.where(slot + 1 == capacity, 0, slot + 1), step + 1

  slot, step = lax.while_loop(searching, next_slot, (start, jnp.int32(0)))
  return jnp.where(step < capacity, slot, -1)


def _find(table_keys: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """For each key: whether it is stored (bool ``[N]``) and its slot (int32 ``[N]``, 0 if not)."""
  starts = _first_slot(keys, table_keys.shape[0])
  slots = jax.vmap(_probe, in_axes=(None, 0, 0))(table_keys, keys, starts)
  slots = jnp.maximum(slots, 0)
  found = (table_keys[slots] == keys) & (keys != empty_key(keys.dtype))
  return found, jnp.where(found, slots, 0)


# ---- the reference path -------------------------------------------------------------------


def _insert_reference(table_keys, table_values, dropped, keys, values):
  if keys.shape[0] == 0:
    return table_keys, table_values, dropped
  empty = empty_key(keys.dtype)
  starts = _first_slot(keys, table_keys.shape[0])
  table = tuple(
    vary_like(x, table_keys, table_values, dropped, keys, values) for x in (table_keys, table_values, dropped)
  )

  def insert_one(i, table):
    tk, tv, d = table
    slot = _probe(tk, keys[i], starts[i])
    stored = (slot >= 0) & (keys[i] != empty)
    slot = jnp.where(stored, slot, 0)
    tk = tk.at[slot].set(jnp.where(stored, keys[i], tk[slot]))
    tv = tv.at[slot].set(jnp.where(stored, values[i], tv[slot]))
    return tk, tv, d + (~stored).astype(jnp.int32)

  return lax.fori_loop(0, keys.shape[0], insert_one, table)


def _query_reference(table_keys, table_values, keys):
  found, slots = _find(table_keys, keys)
  return jnp.where(found, table_values[slots], 0).astype(table_values.dtype), found


def _insert_exist_keys_reference(table_keys, table_values, keys, values):
  capacity, n = table_keys.shape[0], keys.shape[0]
  if n == 0:
    return table_values, jnp.zeros((0,), bool)
  found, slots = _find(table_keys, keys)
  # Of repeated keys the last one wins, as in the sequential kernel: each slot takes the value
  # of the largest input index that targets it (a max-scatter is deterministic).
  last = jnp.full((capacity,), -1, jnp.int32)
  last = last.at[jnp.where(found, slots, capacity)].max(jnp.arange(n, dtype=jnp.int32), mode="drop")
  return jnp.where(last >= 0, values[jnp.maximum(last, 0)], table_values), found


# ---- the FFI kernels (xla_ffi/cpu/hash_table.cc, xla_ffi/cuda/hash_table.cu) ----------------


def _like(x, dtype=None):
  return jax.ShapeDtypeStruct(x.shape, x.dtype if dtype is None else dtype)


def _insert_ffi(table_keys, table_values, dropped, keys, values):
  results = (_like(table_keys), _like(table_values), _like(dropped))
  operands = (table_keys, table_values, dropped, keys, values)
  aliases = {0: 0, 1: 1, 2: 2}
  return _ffi.call("jsparse_hash_table_insert", results, *operands, input_output_aliases=aliases)


def _query_ffi(table_keys, table_values, keys):
  results = (_like(keys, table_values.dtype), _like(keys, jnp.bool_))
  return _ffi.call("jsparse_hash_table_query", results, table_keys, table_values, keys)


def _insert_exist_keys_ffi(table_keys, table_values, keys, values):
  results = (_like(table_values), _like(keys, jnp.bool_))
  operands = (table_keys, table_values, keys, values)
  return _ffi.call("jsparse_hash_table_insert_exist_keys", results, *operands, input_output_aliases={1: 0})


# ---- dispatch, jitted so that eager (spconv-style) calls compile once per shape and backend ---


@_backend.jit
def _insert(table_keys, table_values, dropped, keys, values):
  return _backend.dispatch(
    "jsparse_hash_table_insert",
    _insert_ffi,
    _insert_reference,
    table_keys,
    table_values,
    dropped,
    keys,
    values,
  )


@_backend.jit
def _query(table_keys, table_values, keys):
  return _backend.dispatch(
    "jsparse_hash_table_query", _query_ffi, _query_reference, table_keys, table_values, keys
  )


@_backend.jit
def _insert_exist_keys(table_keys, table_values, keys, values):
  return _backend.dispatch(
    "jsparse_hash_table_insert_exist_keys",
    _insert_exist_keys_ffi,
    _insert_exist_keys_reference,
    table_keys,
    table_values,
    keys,
    values,
  )


# ---- the public pytree --------------------------------------------------------------------


@functools.partial(
  jax.tree_util.register_dataclass, data_fields=("keys", "values", "dropped"), meta_fields=()
)
@dataclasses.dataclass(frozen=True)
class HashTable:
  """A fixed-capacity hash table from int keys to values, as a pytree (spconv's ``HashTable``).

  Functional: ``insert``, ``insert_exist_keys`` and ``assign_arange`` return a new table (the FFI
  kernels alias it to the old one, so under ``jax.jit`` XLA can update the arrays in place).
  Everything is jittable and deterministic, and works under ``jax.vmap`` (a batch of tables).
  Build tables with :meth:`create`. Keys that cannot be stored (the table is full, or the key is
  the empty-slot marker ``iinfo(key_dtype).max``) are counted in ``dropped``, never lost
  silently: call :meth:`check` on the host after a step. Size tables about twice the number of
  distinct keys (as spconv recommends) to keep probes short.

  Attributes:
    keys: ``[capacity]`` int32 (or int64 under jax's x64 mode): the key of each slot,
      ``iinfo(key_dtype).max`` where the slot is empty.
    values: ``[capacity]`` int32, int64, float32 or float64: the value of each slot, 0 where empty.
    dropped: int32 ``[]``: how many inserted keys could not be stored since :meth:`create`.

  >>> import jax.numpy as jnp
  >>> from jsparse.ops import HashTable
  >>> table = HashTable.create(8, jnp.int32, jnp.float32)
  >>> table = table.insert(jnp.array([3, 7, 3], jnp.int32), jnp.array([1.0, 2.0, 5.0], jnp.float32))
  >>> values, found = table.query(jnp.array([3, 4], jnp.int32))
  >>> values.tolist(), found.tolist()
  ([5.0, 0.0], [True, False])
  >>> table.keys.shape, int(table.dropped)
  ((8,), 0)
  """

  keys: jax.Array
  values: jax.Array
  dropped: jax.Array

  @classmethod
  def create(cls, capacity: int, key_dtype: Any = jnp.int32, value_dtype: Any = jnp.int32) -> HashTable:
    """An empty table with ``capacity`` slots.

    Args:
      capacity: number of slots, ``1 <= capacity <= 2**31 - 1``; at most this many distinct keys
        fit. Every distinct capacity compiles anew: :func:`jsparse.round_capacity` buckets them.
      key_dtype: int32, or int64 when jax's x64 mode is enabled.
      value_dtype: int32, float32, or int64 / float64 when jax's x64 mode is enabled.

    Returns:
      A table whose keys ``[capacity]`` are all ``iinfo(key_dtype).max`` (empty), values
      ``[capacity]`` all 0, and ``dropped`` 0.

    Raises:
      ValueError: for a capacity out of range, an unsupported dtype, or a 64-bit dtype without
        x64 mode (saying how to enable it).

    >>> import jax.numpy as jnp
    >>> table = HashTable.create(4, jnp.int32, jnp.int32)
    >>> table.keys.tolist(), table.values.tolist(), table.capacity
    ([2147483647, 2147483647, 2147483647, 2147483647], [0, 0, 0, 0], 4)
    """
    try:
      capacity = operator.index(capacity)
    except TypeError:
      raise ValueError(f"capacity must be an int, got {capacity!r}") from None
    if not 1 <= capacity <= _MAX_CAPACITY:
      raise ValueError(f"capacity must be in [1, {_MAX_CAPACITY}], got {capacity}")
    key_dtype = _checked_dtype(key_dtype, _KEY_DTYPES, "key_dtype")
    value_dtype = _checked_dtype(value_dtype, _VALUE_DTYPES, "value_dtype")
    return cls(
      keys=jnp.full((capacity,), empty_key(key_dtype), key_dtype),
      values=jnp.zeros((capacity,), value_dtype),
      dropped=jnp.zeros((), jnp.int32),
    )

  @property
  def capacity(self) -> int:
    """The number of slots (static)."""
    return self.keys.shape[-1]

  @property
  def key_dtype(self) -> np.dtype:
    return np.dtype(self.keys.dtype)

  @property
  def value_dtype(self) -> np.dtype:
    return np.dtype(self.values.dtype)

  def insert(self, keys: jax.Array, values: jax.Array | None = None) -> HashTable:
    """Stores ``keys[i] -> values[i]`` for each ``i`` in order.

    A key already in the table gets the new value; of keys repeated in ``keys`` the last value
    wins. With ``values=None`` only the keys are inserted: keys already present keep their value,
    new keys get 0 (spconv leaves them undefined). Keys that do not fit, or equal the empty-slot
    marker ``iinfo(key_dtype).max``, are not stored and are counted in ``dropped``.

    Args:
      keys: ``[N]`` of the table's key dtype.
      values: ``[N]`` of the table's value dtype, or None.

    Returns:
      The new table.

    >>> import jax.numpy as jnp
    >>> table = HashTable.create(2).insert(jnp.array([5, 6, 7], jnp.int32), jnp.array([1, 2, 3], jnp.int32))
    >>> int(table.dropped)  # two slots, three keys
    1
    """
    keys = self._checked_keys(keys, "insert")
    if values is None:
      values, _ = self.query(keys)
    else:
      values = self._checked_values(values, keys, "insert")
    return HashTable(*_insert(self.keys, self.values, self.dropped, keys, values))

  def query(self, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Looks up ``keys``.

    Args:
      keys: ``[N]`` of the table's key dtype.

    Returns:
      ``(values, found)``: ``values [N]`` of the table's value dtype (0 where not found) and bool
      ``found [N]``. (spconv returns ``is_empty``, the negation of ``found``.)

    >>> import jax.numpy as jnp
    >>> table = HashTable.create(8).insert(jnp.array([1, 2], jnp.int32), jnp.array([10, 20], jnp.int32))
    >>> [a.tolist() for a in table.query(jnp.array([2, 3], jnp.int32))]
    [[20, 0], [True, False]]
    """
    keys = self._checked_keys(keys, "query")
    return _query(self.keys, self.values, keys)

  def insert_exist_keys(self, keys: jax.Array, values: jax.Array) -> tuple[HashTable, jax.Array]:
    """Sets the values of keys that are already stored; never adds a key.

    Of keys repeated in ``keys`` the last value wins.

    Args:
      keys: ``[N]`` of the table's key dtype.
      values: ``[N]`` of the table's value dtype.

    Returns:
      ``(table, found)``: the new table and bool ``found [N]``, whether ``keys[i]`` was stored
      (and so updated). spconv returns ``is_empty``, the negation of ``found``.

    >>> import jax.numpy as jnp
    >>> table = HashTable.create(8).insert(jnp.array([1, 2], jnp.int32), jnp.array([10, 20], jnp.int32))
    >>> table, found = table.insert_exist_keys(jnp.array([2, 3], jnp.int32), jnp.array([7, 8], jnp.int32))
    >>> found.tolist(), table.query(jnp.array([1, 2, 3], jnp.int32))[0].tolist()
    ([True, False], [10, 7, 0])
    """
    keys = self._checked_keys(keys, "insert_exist_keys")
    values = self._checked_values(values, keys, "insert_exist_keys")
    table_values, found = _insert_exist_keys(self.keys, self.values, keys, values)
    return dataclasses.replace(self, values=table_values), found

  def assign_arange(self) -> tuple[HashTable, jax.Array]:
    """Numbers the stored keys 0, 1, ..., count - 1 in slot order, as their values.

    spconv's ``assign_arange_``: the value of each stored key becomes its position in
    :meth:`items` (in spconv's CUDA version the numbering depends on thread timing; here it is
    deterministic). Useful for unique-like operations: insert keys, number them, query.

    Returns:
      ``(table, count)``: the new table and int32 ``count []``, the number of stored keys.

    Raises:
      ValueError: when the table's values are floats (as in spconv, integer values only).

    >>> import jax.numpy as jnp
    >>> table = HashTable.create(8).insert(jnp.array([40, 10, 40, 30], jnp.int32))
    >>> table, count = table.assign_arange()
    >>> values, _ = table.query(jnp.array([10, 30, 40], jnp.int32))
    >>> int(count), sorted(values.tolist())
    (3, [0, 1, 2])
    """
    if not jnp.issubdtype(self.value_dtype, jnp.integer):
      raise ValueError(
        f"assign_arange numbers keys with integers but the table's values are {self.value_dtype.name}; "
        "create the table with value_dtype=jnp.int32 (or int64)"
      )
    occupied = self._occupied()
    rank = jnp.cumsum(occupied, dtype=self.value_dtype) - 1
    values = jnp.where(occupied, rank, 0).astype(self.value_dtype)
    return dataclasses.replace(self, values=values), occupied.sum(dtype=jnp.int32)

  def items(self, max_size: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The stored ``(key, value)`` pairs, packed to the front in slot order.

    Args:
      max_size: static length of the outputs (default: the capacity). When fewer than ``count``,
        only the first ``max_size`` pairs are returned and ``count`` still says how many exist.

    Returns:
      ``(keys, values, count)``: ``keys [max_size]`` and ``values [max_size]`` whose first
      ``count`` entries are the stored pairs (the rest are ``iinfo(key_dtype).max`` and 0), and
      int32 ``count []``, the number of stored keys.

    >>> import jax.numpy as jnp
    >>> table = HashTable.create(8).insert(jnp.array([5, 6], jnp.int32), jnp.array([50, 60], jnp.int32))
    >>> keys, values, count = table.items()
    >>> keys.shape, int(count), sorted(zip(keys[:2].tolist(), values[:2].tolist()))
    ((8,), 2, [(5, 50), (6, 60)])
    """
    size = self.capacity if max_size is None else operator.index(max_size)
    if size < 0:
      raise ValueError(f"max_size must be >= 0, got {size}")
    occupied = self._occupied()
    position = jnp.where(occupied, jnp.cumsum(occupied, dtype=jnp.int32) - 1, size)
    keys = jnp.full((size,), empty_key(self.key_dtype), self.key_dtype)
    keys = keys.at[position].set(self.keys, mode="drop", unique_indices=True)
    values = jnp.zeros((size,), self.value_dtype)
    values = values.at[position].set(self.values, mode="drop", unique_indices=True)
    return keys, values, occupied.sum(dtype=jnp.int32)

  def check(self) -> None:
    """Host-side check that every inserted key was stored; call it outside ``jax.jit``.

    Raises:
      CapacityError: when ``dropped > 0``, with the counts and how to size the table.
      ValueError: when called on traced values (inside ``jax.jit``): return the table from the
        jitted function and check it there.

    >>> import jax.numpy as jnp
    >>> HashTable.create(4).insert(jnp.array([1, 2], jnp.int32)).check()  # fits: returns None
    """
    if not is_concrete(self.keys, self.dropped):
      raise ValueError(
        "HashTable.check() reads the table on the host; call it outside jax.jit, on a table "
        "returned from the jitted function"
      )
    dropped = int(np.sum(np.asarray(self.dropped)))
    if dropped == 0:
      return
    stored = int(np.sum(np.asarray(self._occupied())))
    empty = empty_key(self.key_dtype)
    raise CapacityError(
      f"HashTable: {dropped} inserted key(s) were not stored; {stored} key(s) fill "
      f"{np.asarray(self.keys).size} slot(s). Keys that find every slot taken are dropped: create "
      f"the table with a larger capacity, about twice the number of distinct keys (e.g. "
      f"HashTable.create(jsparse.round_capacity(2 * num_keys), ...); round_capacity({2 * stored}) = "
      f"{round_capacity(2 * stored)}). The key {empty} (iinfo({self.key_dtype.name}).max) marks empty "
      f"slots and is always dropped: remap it before inserting."
    )

  # -- helpers ---------------------------------------------------------------------------------
  def _occupied(self) -> jax.Array:
    return self.keys != empty_key(self.key_dtype)

  def _checked_keys(self, keys: Any, method: str) -> jax.Array:
    if self.keys.ndim != 1:
      raise ValueError(
        f"HashTable.{method}: the table's keys have shape {self.keys.shape}; a batch of tables "
        "works under jax.vmap, one table at a time"
      )
    for what, dtype in (("key", self.key_dtype), ("value", self.value_dtype)):
      if jax.dtypes.canonicalize_dtype(dtype) != dtype:
        raise ValueError(f"HashTable.{method}: the table has {dtype.name} {what}s; {_X64_HINT}")
    dtype = _dtype_of(keys)
    if dtype != self.key_dtype:
      raise ValueError(
        f"HashTable.{method}: keys must have the table's key dtype {self.key_dtype.name}, got "
        f"{dtype.name}; cast them with keys.astype(jnp.{self.key_dtype.name})"
      )
    keys = jnp.asarray(keys)
    if keys.ndim != 1:
      raise ValueError(f"HashTable.{method}: keys must be one-dimensional [N], got shape {keys.shape}")
    if keys.shape[0] > _MAX_CAPACITY:
      raise ValueError(
        f"HashTable.{method}: {keys.shape[0]} keys in one call; keys are numbered with int32 (at most "
        f"{_MAX_CAPACITY} per call): pass them in chunks"
      )
    return keys

  def _checked_values(self, values: Any, keys: jax.Array, method: str) -> jax.Array:
    dtype = _dtype_of(values)
    if dtype != self.value_dtype:
      raise ValueError(
        f"HashTable.{method}: values must have the table's value dtype {self.value_dtype.name}, "
        f"got {dtype.name}; cast them with values.astype(jnp.{self.value_dtype.name})"
      )
    values = jnp.asarray(values)
    if values.shape != keys.shape:
      raise ValueError(
        f"HashTable.{method}: values must have the shape of keys {keys.shape} (one value per "
        f"key), got {values.shape}"
      )
    return values
