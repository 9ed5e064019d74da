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
