"""Runs killed with SIGKILL: a checkpoint is never half-written, and a killed
run started again ends exactly as an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sparse.simulation import io
from tests.helpers import ROOT, subprocess_env

# Enough rounds that the run is still going when the test sees round 2.
ROUNDS = 30
FLAGS = ["--dataset=synthetic", "--partition=iid", "--num_clients=6",
         "--clients_per_round=4", "--model=mlp", "--batch_size=16",
         "--lr=0.1", f"--rounds={ROUNDS}", "--eval_every=1"]
# Timings differ from run to run; everything else must match exactly.
TIMINGS = ("seconds", "compile_seconds", "median_round_seconds",
           "wall_seconds", "startup_seconds")


def _start(out_dir, log_path, cache_dir):
  with open(log_path, "w") as log:
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.run", *FLAGS,
         f"--output_dir={out_dir}"],
        cwd=ROOT, env=subprocess_env(cache_dir), stdout=log, stderr=subprocess.STDOUT)


def _rounds_done(out_dir) -> int:
  try:
    records = io.read_jsonl(os.path.join(out_dir, "rounds.jsonl"))
  except FileNotFoundError:
    return 0
  return max((r["round"] for r in records), default=0)


def _strip(obj):
  if isinstance(obj, list):
    return [_strip(o) for o in obj]
  return {k: v for k, v in obj.items() if k not in TIMINGS}


def _results(out_dir):
  records = io.read_jsonl(os.path.join(out_dir, "rounds.jsonl"))
  with open(os.path.join(out_dir, "summary.json")) as f:
    return records, json.load(f)


def _log(path) -> str:
  with open(path) as f:
    return f.read()[-3000:]


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
  ref_dir, run_dir = str(tmp_path / "ref"), str(tmp_path / "run")
  cache = str(tmp_path / "jax_cache")
  logs = {name: str(tmp_path / f"{name}.log")
          for name in ("ref", "killed", "resumed")}
  procs = []
  try:
    # Kill the run as soon as it has recorded round 2.
    victim = _start(run_dir, logs["killed"], cache)
    procs.append(victim)
    deadline = time.monotonic() + 120
    while _rounds_done(run_dir) < 2:
      assert victim.poll() is None, _log(logs["killed"])
      assert time.monotonic() < deadline, "no round finished in 120 s"
      time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    killed_records = io.read_jsonl(os.path.join(run_dir, "rounds.jsonl"))
    assert 2 <= len(killed_records) < ROUNDS, "the kill did not land mid-run"
    assert not os.path.exists(os.path.join(run_dir, "summary.json"))
    # The same command again, and an uninterrupted run beside it.
    resumed = _start(run_dir, logs["resumed"], cache)
    ref = _start(ref_dir, logs["ref"], cache)
    procs += [resumed, ref]
    for name, proc in (("resumed", resumed), ("ref", ref)):
      proc.wait(timeout=120)
      assert proc.returncode == 0, _log(logs[name])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()

  ref_records, ref_summary = _results(ref_dir)
  records, summary = _results(run_dir)
  assert [r["round"] for r in records] == list(range(1, ROUNDS + 1))
  assert _strip(records) == _strip(ref_records)
  assert _strip(summary) == _strip(ref_summary)
  assert summary["final_accuracy"] == ref_summary["final_accuracy"]
  # It resumed instead of starting over: round 1 (checkpointed before round
  # 2 was recorded) kept the record, timing included, of the killed run.
  assert records[0] == killed_records[0]


_SAVER = textwrap.dedent("""
    import sys
    import jax
    import jax.numpy as jnp
    from fedjax_sparse.simulation import io
    x = jnp.ones((1_000_000,))
    for i in range(1_000_000):
      io.save_checkpoint(sys.argv[1], {"x": x * i, "i": jnp.int32(i),
                                       "key": jax.random.key(i)})
      print(i, flush=True)
""")


def test_kill_during_save_leaves_a_complete_checkpoint(tmp_path):
  """SIGKILL a process that does nothing but save: the kill lands inside a
  save, and the directory still holds the last or the next checkpoint."""
  path = str(tmp_path / "checkpoint")
  log_path = str(tmp_path / "saver.log")
  rng = np.random.default_rng(0)
  with open(log_path, "w") as log:
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, path], cwd=ROOT,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=log,
                            text=True)
  watchdog = threading.Timer(120, proc.kill)  # readline below blocks
  watchdog.start()
  try:
    line = ""
    for _ in range(3):
      line = proc.stdout.readline()
      assert line, _log(log_path)
    last = int(line)
    time.sleep(rng.uniform(0.0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    last = max([last] + [int(l) for l in proc.stdout.read().split()])
  finally:
    watchdog.cancel()
    if proc.poll() is None:
      proc.kill()
  like = {"x": jnp.zeros((1_000_000,)), "i": jnp.int32(0),
          "key": jax.random.key(0)}
  assert io.checkpoint_exists(path)
  got = io.load_checkpoint(path, like)
  i = int(got["i"])
  assert i in (last, last + 1)
  np.testing.assert_array_equal(np.asarray(got["x"]), np.full(1_000_000, i))
  np.testing.assert_array_equal(jax.random.key_data(got["key"]),
                                jax.random.key_data(jax.random.key(i)))
  # The next save cleans up whatever the kill left half-done.
  io.save_checkpoint(path, got)
  assert len(os.listdir(path)) == 1

