"""Runs that cannot silently mix or lose results.

Each test here is a fault that once ended with exit 0 and wrong or lost
results: two runs in one output directory, a corrupt checkpoint trained
on, a run restarted with fewer rounds than its checkpoint, round records
missing for checkpointed rounds, unreadable result files, NaN written as a
bare ``NaN``, private result files, an output directory that cannot be
written. Both loops are covered (``run_experiment`` and the seed-batched
``run_seeds``), and the binaries.
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

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sparse.simulation import io
from fedjax_sparse.simulation.experiment import ExperimentConfig, run_experiment
from fedjax_sparse.simulation.multi_seed import run_seeds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ExperimentConfig(dataset="synthetic", partition="iid", num_clients=6,
                         clients_per_round=4, rounds=2, local_epochs=1,
                         batch_size=16, lr=0.1, model="mlp", eval_every=1,
                         eval_batch_size=100, client_devices=1)
RESULT_FILES = ("config.json", "rounds.jsonl", "summary.json")


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(
      [ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
  return env


def _snapshot(directory):
  """The bytes of every result file of a run directory."""
  out = {}
  for name in RESULT_FILES:
    path = os.path.join(directory, name)
    if os.path.exists(path):
      with open(path, "rb") as f:
        out[name] = f.read()
  return out


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
                        env=_env(), capture_output=True, text=True,
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
    assert _snapshot(out) == {}  # nothing written beside the holder's run
    # The seed-batched loop takes the lock of every seed's directory.
    with pytest.raises(ValueError, match=rf"in use.*pid {holder.pid}"):
      run_seeds(SMALL, [0, 1], mode="map",
                output_dirs=[str(tmp_path / "other"), str(out)])
    assert _snapshot(out) == {}
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
    assert _snapshot(out) == {}
  # Two sweeps with different settings in one directory: the second stops.
  root = tmp_path / "sweep"
  with _Holder(root) as holder:
    r = _run_binary("experiments.sweep", *SMALL_FLAGS, "--attacks=none",
                    "--aggregators=fedavg", f"--output_dir={root}")
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"pid {holder.pid}" in r.stderr and "error:" in r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(os.listdir(root)) == [".lock"]


# ------------------------------------------------- 2. corrupt checkpoints --


def _data_files(ckpt):
  """The array data files of an Orbax checkpoint directory."""
  out = []
  for root, _, files in os.walk(ckpt):
    if os.path.basename(root) == "d":
      out += [os.path.join(root, f) for f in files]
  return sorted(out, key=os.path.getsize)


def _overwrite(path):
  """Overwrites 64 bytes in the middle of a file, keeping its size: the
  (zstd-compressed) array data still decodes, to other values (NaN here)."""
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(b"\xff" * 64)


def test_a_corrupt_checkpoint_is_refused_not_trained_on(tmp_path):
  out = tmp_path / "run"
  cfg = dataclasses.replace(SMALL, output_dir=str(out))
  run_experiment(cfg, progress=False)
  ckpt = str(out / "checkpoint")
  _overwrite(_data_files(ckpt)[-1])
  before = _snapshot(out)
  with pytest.raises(ValueError,
                     match=rf"{re.escape(ckpt)}.*does not match its checksum"):
    run_experiment(dataclasses.replace(cfg, rounds=3), progress=False)
  assert _snapshot(out) == before
  # The seed-batched loop's checkpoint is verified alike.
  dirs = [str(tmp_path / "s0"), str(tmp_path / "s1")]
  run_seeds(SMALL, [0, 1], mode="map", output_dirs=dirs)
  batch_ckpt = os.path.join(dirs[0], "seed_batch", "checkpoint")
  _overwrite(_data_files(batch_ckpt)[-1])
  with pytest.raises(
      ValueError, match=rf"{re.escape(batch_ckpt)}.*does not match its checksum"):
    run_seeds(dataclasses.replace(SMALL, rounds=3), [0, 1], mode="map",
              output_dirs=dirs)


def _state(seed, value=None):
  """Big enough that Orbax stores ``w`` out of line (zstd), as a run's
  parameters."""
  k = jax.random.key(seed)
  w = (jax.random.normal(k, (300, 200)) if value is None
       else jnp.full((300, 200), value))
  return {"w": w, "round": jnp.int32(seed), "key": jax.random.fold_in(k, 1),
          "empty": jnp.zeros((0, 2))}


def _same(got, want):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    if jax.dtypes.issubdtype(w.dtype, jax.dtypes.prng_key):
      g, w = jax.random.key_data(g), jax.random.key_data(w)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("fmt", ["orbax", "npz"])
def test_checkpoint_checksum_is_verified_on_load(tmp_path, fmt):
  path = str(tmp_path / ("checkpoint" + (".npz" if fmt == "npz" else "")))
  io.save_checkpoint(path, _state(1))
  io.save_checkpoint(path, _state(2))
  _same(io.load_checkpoint(path, _state(0)), _state(2))
  _overwrite(path if fmt == "npz" else _data_files(path)[-1])
  with pytest.raises(ValueError,
                     match=rf"{re.escape(path)}.*does not match its checksum"):
    io.load_checkpoint(path, _state(0))


def test_checkpoint_killed_before_its_checksum_still_loads(tmp_path):
  """A kill between a save's commit and its checksum leaves the checksum of
  the step before: the new step is loaded (checked finite), not refused."""
  path = str(tmp_path / "checkpoint")
  io.save_checkpoint(path, _state(1))
  sidecars = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)
              if n != "checkpoint"}
  assert sidecars, "no checksum file beside the checkpoint"
  io.save_checkpoint(path, _state(2))
  for n, data in sidecars.items():
    (tmp_path / n).write_bytes(data)
  _same(io.load_checkpoint(path, _state(0)), _state(2))


def test_non_finite_state_is_refused_unless_saved_so(tmp_path):
  # A state that was NaN when saved (a diverged run) loads as saved.
  path = str(tmp_path / "checkpoint")
  io.save_checkpoint(path, _state(1, value=np.nan))
  got = io.load_checkpoint(path, _state(0))
  assert np.isnan(np.asarray(got["w"])).all()
  # Without a checksum (a checkpoint of an earlier version) a non-finite
  # state is taken for corruption.
  for n in os.listdir(tmp_path):
    if n != "checkpoint":
      os.unlink(tmp_path / n)
  with pytest.raises(ValueError,
                     match=rf"{re.escape(path)}.*non-finite.*\['w'\]"):
    io.load_checkpoint(path, _state(0))
  npz = str(tmp_path / "old.npz")
  io.save_checkpoint(npz, _state(1, value=np.inf))
  for n in os.listdir(tmp_path):
    if n.startswith("old.npz") and n != "old.npz":
      os.unlink(tmp_path / n)
  with pytest.raises(ValueError, match=rf"{re.escape(npz)}.*non-finite"):
    io.load_checkpoint(npz, _state(0))


# ------------------------------------------ 3. fewer rounds than were run --


def test_fewer_rounds_than_the_checkpoint_are_refused(tmp_path):
  out = tmp_path / "run"
  cfg = dataclasses.replace(SMALL, rounds=3, output_dir=str(out))
  run_experiment(cfg, progress=False)
  before = _snapshot(out)
  with pytest.raises(ValueError, match=r"round 3.*--rounds=2"):
    run_experiment(dataclasses.replace(cfg, rounds=2), progress=False)
  assert _snapshot(out) == before
  assert json.loads(before["summary.json"])["rounds"] == 3
  # The same rounds again: nothing to do, the results stay.
  run_experiment(cfg, progress=False)
  assert json.loads((out / "summary.json").read_text())["rounds"] == 3
  dirs = [str(tmp_path / "s0"), str(tmp_path / "s1")]
  run_seeds(dataclasses.replace(SMALL, rounds=3), [0, 1], mode="map",
            output_dirs=dirs)
  before = [_snapshot(d) for d in dirs]
  with pytest.raises(ValueError, match=r"round 3.*--rounds=2"):
    run_seeds(SMALL, [0, 1], mode="map", output_dirs=dirs)
  assert [_snapshot(d) for d in dirs] == before


# ----------------------------------------- 4. round records and checkpoint --


def _keep_records(path, rounds):
  records = [r for r in io.read_jsonl(path) if r["round"] in rounds]
  io.write_jsonl(path, records)


def test_round_records_missing_for_checkpointed_rounds_are_refused(tmp_path):
  out = tmp_path / "run"
  cfg = dataclasses.replace(SMALL, output_dir=str(out))
  run_experiment(cfg, progress=False)
  rounds_path = str(out / "rounds.jsonl")
  _keep_records(rounds_path, {2})
  before = _snapshot(out)
  with pytest.raises(ValueError, match=rf"{re.escape(rounds_path)}.*round 1\b"):
    run_experiment(dataclasses.replace(cfg, rounds=3), progress=False)
  assert _snapshot(out) == before
  dirs = [str(tmp_path / "s0"), str(tmp_path / "s1")]
  run_seeds(SMALL, [0, 1], mode="map", output_dirs=dirs)
  seed1 = os.path.join(dirs[1], "rounds.jsonl")
  _keep_records(seed1, {1})
  before = [_snapshot(d) for d in dirs]
  with pytest.raises(ValueError, match=rf"{re.escape(seed1)}.*round 2\b"):
    run_seeds(dataclasses.replace(SMALL, rounds=3), [0, 1], mode="map",
              output_dirs=dirs)
  assert [_snapshot(d) for d in dirs] == before


@pytest.mark.parametrize("name", ["rounds.jsonl", "config.json"])
def test_unreadable_result_files_are_named(tmp_path, name):
  out = tmp_path / "run"
  cfg = dataclasses.replace(SMALL, rounds=1, output_dir=str(out))
  run_experiment(cfg, progress=False)
  path = out / name
  path.write_text(path.read_text()[:-10] + "\x00garbage\n")
  with pytest.raises(ValueError, match=re.escape(str(path))):
    run_experiment(dataclasses.replace(cfg, rounds=2), progress=False)


def test_unreadable_seed_batch_files_are_named(tmp_path):
  dirs = [str(tmp_path / "s0"), str(tmp_path / "s1")]
  run_seeds(dataclasses.replace(SMALL, rounds=1), [0, 1], mode="map",
            output_dirs=dirs)
  bad = os.path.join(dirs[1], "rounds.jsonl")
  with open(bad, "a") as f:
    f.write("{not json\n")
  with pytest.raises(ValueError, match=re.escape(bad)):
    run_seeds(SMALL, [0, 1], mode="map", output_dirs=dirs)


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
