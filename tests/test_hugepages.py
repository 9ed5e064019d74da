"""Huge-page malloc for the binaries: when they restart, and that they do."""

import os
import subprocess
import sys

import pytest

from fedjax_sparse import hugepages

SNIPPET = ("import os; from fedjax_sparse.hugepages import "
           "restart_with_huge_pages as r; r(); "
           "print(os.environ.get('GLIBC_TUNABLES', ''))")


def test_wanted_respects_opt_out_and_an_existing_tunable():
  base = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  assert not hugepages.wanted({**base, hugepages.OPT_OUT: "0"})
  assert not hugepages.wanted({**base,
                               "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
  env = hugepages.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + hugepages.TUNABLE
  assert hugepages.environment({})["GLIBC_TUNABLES"] == hugepages.TUNABLE


def _run(env):
  return subprocess.run([sys.executable, "-c", SNIPPET], env=env,
                        capture_output=True, text=True, check=True,
                        timeout=60).stdout.strip()


def test_restart_sets_the_tunable_once():
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env.pop(hugepages.OPT_OUT, None)
  if not hugepages.wanted(env):
    pytest.skip("no glibc >= 2.35 with transparent huge pages here")
  assert _run(env) == hugepages.TUNABLE
  assert _run({**env, hugepages.OPT_OUT: "0"}) == ""
  kept = "glibc.malloc.hugetlb=0"
  assert _run({**env, "GLIBC_TUNABLES": kept}) == kept


AMD = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
INTEL = "vendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
AMD_AVX2 = "vendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2\n"


def test_vector_width_only_on_amd_with_avx512_and_never_twice():
  flag = hugepages.VECTOR_FLAG
  assert hugepages.with_vector_width({}, AMD)["XLA_FLAGS"] == flag
  assert "XLA_FLAGS" not in hugepages.with_vector_width({}, INTEL)
  assert "XLA_FLAGS" not in hugepages.with_vector_width({}, AMD_AVX2)
  other = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert (hugepages.with_vector_width(other, AMD)["XLA_FLAGS"]
          == "--xla_force_host_platform_device_count=2 " + flag)
  mine = {"XLA_FLAGS": "--xla_cpu_prefer_vector_width=256"}
  assert hugepages.with_vector_width(mine, AMD) == mine
  out = {hugepages.VECTOR_OPT_OUT: "0"}
  assert hugepages.with_vector_width(out, AMD) == out
  once = hugepages.with_vector_width({}, AMD)
  assert hugepages.with_vector_width(once, AMD) == once


def test_restart_passes_the_vector_width_to_the_binary():
  snippet = ("import os; from fedjax_sparse.hugepages import "
             "restart_with_huge_pages as r; r(); "
             "print(os.environ.get('XLA_FLAGS', ''))")
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", hugepages.VECTOR_OPT_OUT)}
  want = hugepages.with_vector_width(env).get("XLA_FLAGS", "")
  got = subprocess.run([sys.executable, "-c", snippet], env=env,
                       capture_output=True, text=True, check=True,
                       timeout=60).stdout.strip()
  assert got == want
