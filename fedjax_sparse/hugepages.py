"""Transparent huge pages for the large buffers of XLA:CPU.

On Linux, every call of a compiled XLA:CPU computation gets fresh output and
temporary buffers; above glibc's mmap threshold each is a new mapping, and
the kernel faults it in one 4 KiB page at a time. For the stacked client
updates of a round (``f32[K, d]``, 108 MB at K = 100, d = 270k) that costs
more than the computation: writing a fresh 108 MB array ran at about 4 GB/s
on the 2-core development machine, 27 ms where the arithmetic needs 4 ms.

glibc (2.35 and later) can ask for transparent huge pages on its mappings
(``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``): 2 MiB pages, 512 times fewer
faults. The tunable is read when the process starts, so the command-line
binaries restart themselves once with it set (:func:`restart_with_huge_pages`),
before they import JAX. Measured: the same fresh 108 MB write 27 -> 16 ms,
a FLARE sweep round (20 clients, MLP, pack top-k) 0.57 -> 0.50 s, a
``benchmarks/scale.py`` round (K = 100, MLP) 82 -> 60 ms. Nothing changes in
the results: only where the memory comes from.

Opt out with ``FEDJAX_SPARSE_HUGEPAGES=0``; an explicit
``glibc.malloc.hugetlb`` in ``GLIBC_TUNABLES`` is kept as it is. This module
imports nothing heavy so that the restart is cheap.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "FEDJAX_SPARSE_HUGEPAGES"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_supports() -> bool:
  lib, version = platform.libc_ver()
  if lib != "glibc":
    return False
  try:
    major, minor = (int(x) for x in version.split(".")[:2])
  except ValueError:
    return False
  return (major, minor) >= (2, 35)


def _thp_available() -> bool:
  try:
    with open(_THP) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def wanted(environ=None) -> bool:
  """Whether this process should restart with the tunable set."""
  env = os.environ if environ is None else environ
  if env.get(OPT_OUT, "1") == "0" or sys.platform != "linux":
    return False
  if "glibc.malloc.hugetlb" in env.get("GLIBC_TUNABLES", ""):
    return False  # set already: by the restart, or by the user
  return _glibc_supports() and _thp_available()


def environment(environ=None) -> dict:
  """``environ`` with the huge-page tunable added to ``GLIBC_TUNABLES``."""
  env = dict(os.environ if environ is None else environ)
  old = env.get("GLIBC_TUNABLES", "")
  env["GLIBC_TUNABLES"] = f"{old}:{TUNABLE}" if old else TUNABLE
  return env


def restart_with_huge_pages() -> None:
  """Re-executes this command with huge-page malloc, when that helps.

  Call it first thing in a binary's ``__main__`` (before JAX is imported);
  it returns without doing anything when the tunable is set already, on
  systems without glibc >= 2.35 or transparent huge pages, and with
  ``FEDJAX_SPARSE_HUGEPAGES=0``.
  """
  if not wanted():
    return
  argv = getattr(sys, "orig_argv", None)
  if not argv or sys.argv[:1] == ["-"]:
    return  # no command line to repeat (a script read from stdin is gone)
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable] + list(argv[1:]),
              environment())
  except OSError:
    return  # keep running as we are
