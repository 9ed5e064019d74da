"""The one command-line entry of the experiment binaries.

Every binary (``experiments.run``, ``experiments.sweep``, ``experiments.demo``)
does the same things around its own work, here and only here:

1. before JAX is imported, restart once with huge-page malloc and the
   XLA:CPU vector width (:func:`prepare`, :mod:`fedjax_sparse.hugepages`);
2. quiet absl logging, split the CPU into one JAX device per core
   (:func:`fedjax_sparse.simulation.devices.use_cpu_devices`), refuse stray
   positional arguments;
3. keep compiled programs in JAX's persistent compilation cache
   (``--compilation_cache_dir``, default ``~/.cache/fedjax_sparse/jax``;
   ``''`` turns it off), so reruns and sweep cells of a compiled shape skip
   compiling;
4. turn a user error (``ValueError``, ``FileNotFoundError``: a bad flag, a
   missing dataset, an output directory held by another run, a run that
   cannot be resumed) into one ``error: ...`` line on stderr and exit status
   2, with no traceback (:func:`run`).

The installed entry points (``[project.scripts]`` in ``pyproject.toml``)
call :func:`run_main`, :func:`sweep_main` and :func:`demo_main`; ``python -m
experiments.run`` and the others do the same through :func:`run`. The
multi-host initialisation (``--distributed``) belongs to ``experiments.run``,
the one binary that takes it.

This module imports nothing heavy at import time, so that :func:`prepare`
runs before JAX starts.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, Optional

USER_ERRORS = (ValueError, FileNotFoundError)


def prepare() -> None:
  """Restarts this process once with huge pages, when that helps (call it
  before JAX is imported; see :func:`fedjax_sparse.hugepages.restart_with_huge_pages`)."""
  from fedjax_sparse.hugepages import restart_with_huge_pages
  restart_with_huge_pages()


def error(message: object) -> int:
  """Prints ``error: message`` to stderr; returns the exit status 2."""
  print(f"error: {message}", file=sys.stderr)
  return 2


DEFAULT_CACHE_DIR = os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
    "fedjax_sparse", "jax")


def use_compilation_cache(directory: str) -> None:
  """Keeps compiled XLA programs in ``directory`` across processes (JAX's
  persistent compilation cache), so a rerun, a resumed run and every sweep
  cell of an already compiled shape skip compilation; "" turns it off.
  Every program is cached, however fast it compiled."""
  if not directory:
    return
  import jax
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  # Least recently used programs go beyond 2 GiB.
  jax.config.update("jax_compilation_cache_max_size", 2 << 30)


def _define_flags() -> None:
  from absl import flags
  if "compilation_cache_dir" not in flags.FLAGS:
    flags.DEFINE_string(
        "compilation_cache_dir", DEFAULT_CACHE_DIR,
        "JAX's persistent compilation cache, shared by runs and sweep cells "
        "(a rerun of a compiled shape skips compiling); '' turns it off.")


def _main(main: Callable[[], Optional[int]], argv: list[str]) -> int:
  from absl import app
  from absl import flags
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from fedjax_sparse.simulation.devices import use_cpu_devices
  use_cpu_devices()  # one host device per core, before any JAX operation
  use_compilation_cache(flags.FLAGS.compilation_cache_dir
                        if "compilation_cache_dir" in flags.FLAGS else "")
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    return main() or 0
  except USER_ERRORS as e:
    return error(e)


def run(main: Callable[[], Optional[int]]) -> None:
  """Runs ``main()`` (which reads its absl flags) as a binary: parses the
  flags, does the shared steps above and exits with ``main``'s status (2
  and an ``error:`` line for a user error)."""
  from absl import app
  _define_flags()
  app.run(functools.partial(_main, main))


def _entry(module: str) -> None:
  prepare()
  import importlib
  run(importlib.import_module(module).main)


def run_main() -> None:
  """``fedjax-sparse-run``: one experiment (``experiments.run``)."""
  _entry("experiments.run")


def sweep_main() -> None:
  """``fedjax-sparse-sweep``: a grid of experiments (``experiments.sweep``)."""
  _entry("experiments.sweep")


def demo_main() -> None:
  """``fedjax-sparse-demo``: the demo grid (``experiments.demo``)."""
  _entry("experiments.demo")
