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

