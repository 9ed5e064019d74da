"""What a resumed run refuses: corrupt checkpoints, fewer rounds than were
run, round records missing for checkpointed rounds, unreadable result files.
The setup of test_run_safety.py (tests/helpers.py).
"""

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sparse.simulation import io
from fedjax_sparse.simulation.experiment import run_experiment
from fedjax_sparse.simulation.multi_seed import run_seeds
from tests.helpers import TWO_ROUND_RUN as SMALL
from tests.helpers import snapshot


# ------------------------------------------------- 1. corrupt checkpoints --


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
  before = snapshot(out)
  with pytest.raises(ValueError,
                     match=rf"{re.escape(ckpt)}.*does not match its checksum"):
    run_experiment(dataclasses.replace(cfg, rounds=3), progress=False)
  assert snapshot(out) == before
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


# ------------------------------------------ 2. fewer rounds than were run --


def test_fewer_rounds_than_the_checkpoint_are_refused(tmp_path):
  out = tmp_path / "run"
  cfg = dataclasses.replace(SMALL, rounds=3, output_dir=str(out))
  run_experiment(cfg, progress=False)
  before = snapshot(out)
  with pytest.raises(ValueError, match=r"round 3.*--rounds=2"):
    run_experiment(dataclasses.replace(cfg, rounds=2), progress=False)
  assert snapshot(out) == before
  assert json.loads(before["summary.json"])["rounds"] == 3
  # The same rounds again: nothing to do, the results stay.
  run_experiment(cfg, progress=False)
  assert json.loads((out / "summary.json").read_text())["rounds"] == 3
  dirs = [str(tmp_path / "s0"), str(tmp_path / "s1")]
  run_seeds(dataclasses.replace(SMALL, rounds=3), [0, 1], mode="map",
            output_dirs=dirs)
  before = [snapshot(d) for d in dirs]
  with pytest.raises(ValueError, match=r"round 3.*--rounds=2"):
    run_seeds(SMALL, [0, 1], mode="map", output_dirs=dirs)
  assert [snapshot(d) for d in dirs] == before


# ----------------------------------------- 3. round records and checkpoint --


def _keep_records(path, rounds):
  records = [r for r in io.read_jsonl(path) if r["round"] in rounds]
  io.write_jsonl(path, records)


def test_round_records_missing_for_checkpointed_rounds_are_refused(tmp_path):
  out = tmp_path / "run"
  cfg = dataclasses.replace(SMALL, output_dir=str(out))
  run_experiment(cfg, progress=False)
  rounds_path = str(out / "rounds.jsonl")
  _keep_records(rounds_path, {2})
  before = snapshot(out)
  with pytest.raises(ValueError, match=rf"{re.escape(rounds_path)}.*round 1\b"):
    run_experiment(dataclasses.replace(cfg, rounds=3), progress=False)
  assert snapshot(out) == before
  dirs = [str(tmp_path / "s0"), str(tmp_path / "s1")]
  run_seeds(SMALL, [0, 1], mode="map", output_dirs=dirs)
  seed1 = os.path.join(dirs[1], "rounds.jsonl")
  _keep_records(seed1, {1})
  before = [snapshot(d) for d in dirs]
  with pytest.raises(ValueError, match=rf"{re.escape(seed1)}.*round 2\b"):
    run_seeds(dataclasses.replace(SMALL, rounds=3), [0, 1], mode="map",
              output_dirs=dirs)
  assert [snapshot(d) for d in dirs] == before


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
