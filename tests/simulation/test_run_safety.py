"""Runs that cannot silently mix or lose results.

Each test here is a fault that once ended with exit 0 and wrong or lost
results: two runs in one output directory, a corrupt checkpoint trained
on, a run restarted with fewer rounds than its checkpoint, round records
missing for checkpointed rounds, unreadable result files, NaN written as a
bare ``NaN``, private result files, an output directory that cannot be
written. Both loops are covered (``run_experiment`` and the seed-batched
``run_seeds``), and the binaries. Checkpoints and resumed runs:
test_run_safety_checkpoints.py.
"""

import dataclasses
import fcntl
import json
import os
import re
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fedjax_sparse.simulation import io
from fedjax_sparse.simulation.experiment import run_experiment
from fedjax_sparse.simulation.multi_seed import run_seeds
from tests.helpers import TWO_ROUND_RUN as SMALL
from tests.helpers import ROOT, snapshot, subprocess_env


def _lock_is_free(directory) -> bool:
  fd = os.open(os.path.join(directory, ".lock"), os.O_RDWR | os.O_CREAT)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except BlockingIOError:
    return False
  finally:
    os.close(fd)  # releases the lock taken here


_HOLDER = textwrap.dedent("""
    import fcntl, os, sys
    os.makedirs(sys.argv[1], exist_ok=True)
    fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\\n".encode())
    print("locked", flush=True)
    sys.stdin.read()  # hold the lock until the test closes stdin
""")


class _Holder:
  """Another process holding ``<directory>/.lock`` as a running run does."""

  def __init__(self, directory):
    self.proc = subprocess.Popen([sys.executable, "-c", _HOLDER,
                                  str(directory)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
    assert self.proc.stdout.readline().strip() == "locked"

  @property
  def pid(self) -> int:
    return self.proc.pid

  def release(self):
    if self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait(timeout=30)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()
    if self.proc.poll() is None:
      self.proc.kill()


def _run_binary(module, *args, timeout=300):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                        env=subprocess_env(), capture_output=True, text=True,
                        timeout=timeout)


SMALL_FLAGS = ["--dataset=synthetic", "--partition=iid", "--num_clients=6",
               "--clients_per_round=4", "--rounds=1", "--batch_size=16",
               "--model=mlp", "--eval_batch_size=100"]


# ------------------------------------------------------ 1. the output lock --


def test_a_second_run_in_a_locked_directory_is_refused(tmp_path):
  out = tmp_path / "run"
  with _Holder(out) as holder:
    with pytest.raises(ValueError, match=rf"in use.*pid {holder.pid}"):
      run_experiment(dataclasses.replace(SMALL, output_dir=str(out)),
                     progress=False)
    assert snapshot(out) == {}  # nothing written beside the holder's run
    # The seed-batched loop takes the lock of every seed's directory.
    with pytest.raises(ValueError, match=rf"in use.*pid {holder.pid}"):
      run_seeds(SMALL, [0, 1], mode="map",
                output_dirs=[str(tmp_path / "other"), str(out)])
    assert snapshot(out) == {}
  # Released with the holder: the run goes ahead and releases it in turn,
  # on success and on an exception alike.
  run_experiment(dataclasses.replace(SMALL, output_dir=str(out)),
                 progress=False)
  assert _lock_is_free(out)
  with pytest.raises(ValueError, match="another configuration"):
    run_experiment(dataclasses.replace(SMALL, output_dir=str(out), lr=0.2),
                   progress=False)
  assert _lock_is_free(out)
  assert _lock_is_free(tmp_path / "other")


def test_the_lock_holds_the_pid_and_is_exclusive_in_one_process(tmp_path):
  from fedjax_sparse.simulation import run_safety
  with run_safety.output_lock(str(tmp_path)):
    with open(tmp_path / ".lock") as f:
      assert f.read().strip() == str(os.getpid())
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))}.*pid {os.getpid()}"):
      with run_safety.output_lock(str(tmp_path)):
        pass
  assert _lock_is_free(tmp_path)
  with pytest.raises(RuntimeError):
    with run_safety.output_lock(str(tmp_path)):
      raise RuntimeError
  assert _lock_is_free(tmp_path)


def test_binaries_refuse_a_locked_directory(tmp_path):
  out = tmp_path / "run"
  with _Holder(out) as holder:
    r = _run_binary("experiments.run", *SMALL_FLAGS, f"--output_dir={out}")
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"pid {holder.pid}" in r.stderr and "error:" in r.stderr
    assert "Traceback" not in r.stderr
    assert snapshot(out) == {}
  # Two sweeps with different settings in one directory: the second stops.
  root = tmp_path / "sweep"
  with _Holder(root) as holder:
    r = _run_binary("experiments.sweep", *SMALL_FLAGS, "--attacks=none",
                    "--aggregators=fedavg", f"--output_dir={root}")
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"pid {holder.pid}" in r.stderr and "error:" in r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(os.listdir(root)) == [".lock"]


# ------------------------------------------------------ result files --


def test_result_files_are_readable_by_others(tmp_path):
  umask = os.umask(0o022)
  try:
    io.atomic_write_json(str(tmp_path / "a.json"), {"a": 1})
    io.write_jsonl(str(tmp_path / "r.jsonl"), [{"round": 1}])
    io.atomic_write_text(str(tmp_path / "t.txt"), "x")
  finally:
    os.umask(umask)
  for name in ("a.json", "r.jsonl", "t.txt"):
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name


def _strict_json(text):
  def refuse(name):
    raise AssertionError(f"bare {name} in JSON")
  return json.loads(text, parse_constant=refuse)


def test_non_finite_floats_are_written_as_null(tmp_path):
  obj = {"loss": float("nan"), "oif": float("inf"),
         "nested": [{"x": -float("inf"), "y": np.float64("nan")}, 1.5],
         "tuple": (float("nan"), 2)}
  want = {"loss": None, "oif": None, "nested": [{"x": None, "y": None}, 1.5],
          "tuple": [None, 2]}
  io.atomic_write_json(str(tmp_path / "s.json"), obj)
  assert _strict_json((tmp_path / "s.json").read_text()) == want
  io.write_jsonl(str(tmp_path / "r.jsonl"), [obj, {"round": 2}])
  lines = (tmp_path / "r.jsonl").read_text().splitlines()
  assert [_strict_json(l) for l in lines] == [want, {"round": 2}]


# --------------------------------------------- configuration, output dir --


def test_eval_batch_size_zero_is_refused_before_training():
  with pytest.raises(ValueError, match="eval_batch_size"):
    dataclasses.replace(SMALL, eval_batch_size=0).validate()


def test_unwritable_output_directory_is_named(tmp_path, monkeypatch):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  out = blocker / "run"
  with pytest.raises(ValueError, match=re.escape(str(out))):
    run_experiment(dataclasses.replace(SMALL, output_dir=str(out)),
                   progress=False)
  with pytest.raises(ValueError, match=re.escape(str(out))):
    run_seeds(SMALL, [0, 1], mode="map",
              output_dirs=[str(out), str(tmp_path / "s1")])
  # A full disk: every write of a result file fails.
  import errno
  import tempfile

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(tempfile, "mkstemp", full)
  with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path / 'run'))}.*space"):
    run_experiment(dataclasses.replace(SMALL, output_dir=str(tmp_path / "run")),
                   progress=False)


def test_binaries_name_an_unwritable_output_directory(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  out = blocker / "run"
  r = _run_binary("experiments.run", *SMALL_FLAGS, f"--output_dir={out}")
  assert r.returncode == 2, r.stderr[-3000:]
  assert "error:" in r.stderr and str(out) in r.stderr
  assert "Traceback" not in r.stderr
  r = _run_binary("experiments.sweep", *SMALL_FLAGS, "--attacks=none",
                  "--aggregators=fedavg", f"--output_dir={out}")
  assert r.returncode == 2, r.stderr[-3000:]
  assert "error:" in r.stderr and str(out) in r.stderr
  assert "Traceback" not in r.stderr
