"""Choosing between the FFI kernels and the pure-jnp reference path, at trace time."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax import lax

from jsparse import _ffi
from jsparse.ops._varying import vary_like

BACKENDS = ("auto", "ffi", "reference")
_ENV_VAR = "JSPARSE_BACKEND"
_selected: contextvars.ContextVar[str | None] = contextvars.ContextVar("jsparse_backend", default=None)


def _checked(name: str, source: str) -> str:
  if name not in BACKENDS:
    raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
  return name


def current_backend() -> str:
  """The backend in force: the innermost :func:`backend` context, else ``$JSPARSE_BACKEND``, else
  ``"auto"`` (FFI kernels where built for the platform and verified there, today CPU; the reference
  path elsewhere)."""
  name = _selected.get()
  if name is not None:
    return name
  return _checked(os.environ.get(_ENV_VAR, "auto"), f"${_ENV_VAR}")


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
  """Selects the backend for ops traced inside the block.

  The choice is read when a function is traced, so wrap the first call of a jitted function
  (jit caches do not see it: use separate jitted functions per backend).

  >>> import jsparse
  >>> with jsparse.backend("reference"):
  ...   jsparse.ops.current_backend()
  'reference'
  """
  token = _selected.set(_checked(name, "backend"))
  try:
    yield
  finally:
    _selected.reset(token)


def dispatch(target: str, ffi_impl: Callable[..., Any], reference: Callable[..., Any], *args: Any) -> Any:
  """Runs ``ffi_impl(*args)`` on platforms where ``target`` is built (under ``"auto"``: and in
  ``_ffi.AUTO_PLATFORMS``), ``reference(*args)`` elsewhere.

  The platform is chosen when XLA lowers the computation (``lax.platform_dependent``), so one
  traced function works on CPU and GPU alike.
  """
  mode = current_backend()
  if mode == "reference":
    return reference(*args)
  platforms = _ffi.platforms_with(target)
  if mode == "ffi":
    if not platforms:
      raise RuntimeError(
        f"backend 'ffi' was requested but the FFI target {target!r} is not built; reinstall "
        "jsparse with its C++ extension (make test does) or use backend('reference')"
      )
    return ffi_impl(*args)
  platforms = tuple(p for p in platforms if p in _ffi.AUTO_PLATFORMS)
  if not platforms:
    return reference(*args)

  def varying(fn):  # every branch's outputs vary over the same shard_map axes: those of the args
    return lambda *a: jax.tree.map(lambda out: vary_like(out, *a), fn(*a))

  branches = {p: varying(ffi_impl) for p in platforms}
  return lax.platform_dependent(*args, default=varying(reference), **branches)


def jit(
  fun: Callable[..., Any], static_argnames: tuple[str, ...] = (), donate_argnames: tuple[str, ...] = ()
) -> Callable[..., Any]:
  """``jax.jit`` whose compilation cache also keys on the backend in force at call time.

  Arguments are bound to ``fun``'s signature first, so static and donated arguments may be passed
  by position or by name.
  """
  signature = inspect.signature(fun)

  @functools.partial(
    jax.jit, static_argnames=(*static_argnames, "_backend_name"), donate_argnames=donate_argnames
  )
  def jitted(_backend_name, **kwargs):
    with backend(_backend_name):
      return fun(**kwargs)

  @functools.wraps(fun)
  def wrapper(*args, **kwargs):
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return jitted(_backend_name=current_backend(), **bound.arguments)

  return wrapper
