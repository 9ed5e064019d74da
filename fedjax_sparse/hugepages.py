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

The same call also lets XLA:CPU emit 512-bit vector code on AMD processors
with AVX-512 (Zen 4 and later, which run it without lowering their clock;
LLVM's default of 256 bits is meant for Intel parts that do):
``--xla_cpu_prefer_vector_width=512`` is added to ``XLA_FLAGS`` unless that
flag is there already or ``FEDJAX_SPARSE_VECTOR_WIDTH=0``. Elementwise loops
that are bound by arithmetic gain most: the mask loop of FLARE's Alg. 2
(``aggregators.combine``, K = 100, d = 270k) ran 12% faster on the 2-core
AMD EPYC development machine, a FLARE round (20 clients, CNN, SafeSparse)
2-6%; the matrix products (Eigen) do not change, and neither did the results
(a 4-round SafeSparse run under IPM wrote the same rounds bit for bit).
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "FEDJAX_SPARSE_HUGEPAGES"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"
VECTOR_FLAG = "--xla_cpu_prefer_vector_width=512"
VECTOR_OPT_OUT = "FEDJAX_SPARSE_VECTOR_WIDTH"
_CPUINFO = "/proc/cpuinfo"


def _amd_avx512(cpuinfo: str) -> bool:
  """Whether ``/proc/cpuinfo`` text describes an AMD CPU with AVX-512F."""
  vendor = flags = None
  for line in cpuinfo.splitlines():
    key, _, value = line.partition(":")
    key = key.strip()
    if key == "vendor_id" and vendor is None:
      vendor = value.strip()
    elif key == "flags" and flags is None:
      flags = value.split()
    if vendor is not None and flags is not None:
      break
  return vendor == "AuthenticAMD" and flags is not None and "avx512f" in flags


def with_vector_width(environ=None, cpuinfo=None) -> dict:
  """``environ`` with the 512-bit XLA:CPU vector width, where it is wanted.

  ``cpuinfo`` is the text of ``/proc/cpuinfo`` (read when ``None``).
  """
  env = dict(os.environ if environ is None else environ)
  flags = env.get("XLA_FLAGS", "")
  if (env.get(VECTOR_OPT_OUT, "1") == "0"
      or "xla_cpu_prefer_vector_width" in flags):
    return env
  if cpuinfo is None:
    try:
      with open(_CPUINFO) as f:
        cpuinfo = f.read()
    except OSError:
      return env
  if _amd_avx512(cpuinfo):
    env["XLA_FLAGS"] = f"{flags} {VECTOR_FLAG}".strip()
  return env


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
  it returns without restarting when the tunable is set already, on
  systems without glibc >= 2.35 or transparent huge pages, and with
  ``FEDJAX_SPARSE_HUGEPAGES=0``. Before that it adds the XLA:CPU vector
  width of :func:`with_vector_width` to this process's environment (which a
  restart inherits).
  """
  if "jax" not in sys.modules:  # XLA reads its flags when JAX starts
    os.environ.update(with_vector_width())
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
