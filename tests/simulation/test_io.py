"""Checkpoints (Orbax directories, legacy .npz) and atomic result files."""

import os
import shutil
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_sparse.simulation import io

TMP_SUFFIX = ".orbax-checkpoint-tmp"


class Opt(NamedTuple):
  count: jax.Array
  mu: dict


def _state(seed: int):
  """A server-state-like pytree: floats, ints, typed keys, empty nodes."""
  k = jax.random.key(seed)
  return {
      "params": {"w": jax.random.normal(k, (5, 3)),
                 "b": jnp.arange(3, dtype=jnp.float32) + seed},
      "opt_state": (Opt(jnp.int32(seed), {"w": jnp.full((5, 3), seed,
                                                         jnp.float32)}), ()),
      "agg_state": (),
      "client_state": {"mask": jnp.arange(8) % (seed + 2) == 0,
                       "count": jnp.arange(8, dtype=jnp.int32) * seed},
      "attack_state": {},
      "history": [jnp.full((2,), seed, jnp.uint8), ()],
      "round": jnp.int32(seed),
      "key": jax.random.fold_in(k, 7),
      "keys": jax.random.split(jax.random.key(seed + 100), 4),
      "raw_key": jax.random.PRNGKey(seed),  # an old-style uint32[2] key
      "zero_size": (jnp.zeros((0, 3)), jax.random.split(k, 0)),
  }


def _assert_same(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert isinstance(g, jax.Array)
    assert g.dtype == w.dtype and g.shape == w.shape
    assert g.sharding == w.sharding and g.committed == w.committed
    if jax.dtypes.issubdtype(w.dtype, jax.dtypes.prng_key):
      assert jax.random.key_impl(g) == jax.random.key_impl(w)
      g, w = jax.random.key_data(g), jax.random.key_data(w)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _steps(path):
  return sorted(n for n in os.listdir(path) if TMP_SUFFIX not in n)


def test_round_trip_is_exact_and_keeps_one_checkpoint(tmp_path):
  path = str(tmp_path / "checkpoint")
  assert not io.checkpoint_exists(path)
  for seed in (1, 2, 3):
    io.save_checkpoint(path, _state(seed))
  assert io.checkpoint_exists(path)
  assert len(_steps(path)) == 1  # disk use stays bounded
  got = io.load_checkpoint(path, _state(0))
  _assert_same(got, _state(3))
  # Uncommitted like the fresh state, so jit may move it to other devices.
  mesh = Mesh(np.array(jax.devices()[:2]), ("clients",))
  spread = jax.device_put(jnp.ones(2), NamedSharding(mesh,
                                                     PartitionSpec("clients")))
  np.testing.assert_array_equal(
      jax.jit(lambda a, b: a + b.sum())(spread, got["params"]["b"]),
      np.full(2, 1 + _state(3)["params"]["b"].sum()))
  # The restored key draws the same numbers as the saved one.
  np.testing.assert_array_equal(jax.random.normal(got["key"], (4,)),
                                jax.random.normal(_state(3)["key"], (4,)))


def test_checkpoint_arrays(tmp_path):
  path = str(tmp_path / "checkpoint")
  state = _state(2)
  io.save_checkpoint(path, state)
  arrays = io.checkpoint_arrays(path)
  want = {jax.tree_util.keystr(p): (jax.random.key_data(v)
                                    if jax.dtypes.issubdtype(
                                        v.dtype, jax.dtypes.prng_key) else v)
          for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}
  assert arrays.keys() == want.keys()
  for k, v in want.items():
    assert isinstance(arrays[k], np.ndarray) and arrays[k].dtype == v.dtype
    np.testing.assert_array_equal(arrays[k], np.asarray(v), err_msg=k)


def test_states_without_data(tmp_path):
  for i, state in enumerate([{"a": ()}, {"a": jnp.zeros((2, 0))}]):
    path = str(tmp_path / str(i))
    io.save_checkpoint(path, state)
    assert io.checkpoint_exists(path)
    _assert_same(io.load_checkpoint(path, state), state)


def test_relative_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  io.save_checkpoint("ckpt", _state(1))
  assert io.checkpoint_exists("ckpt")
  _assert_same(io.load_checkpoint("ckpt", _state(0)), _state(1))


def test_restores_into_the_shardings_of_like(tmp_path):
  devices = np.array(jax.devices()[:2])
  mesh = Mesh(devices, ("clients",))
  sharded = NamedSharding(mesh, PartitionSpec("clients"))
  replicated = NamedSharding(mesh, PartitionSpec())

  def place(state):
    return {"client_state": jax.device_put(state["client_state"], sharded),
            "params": jax.device_put(state["params"], replicated),
            "key": state["key"]}

  path = str(tmp_path / "checkpoint")
  io.save_checkpoint(path, place(_state(1)))
  got = io.load_checkpoint(path, place(_state(0)))
  _assert_same(got, place(_state(1)))
  assert got["client_state"]["count"].sharding == sharded


def test_numpy_leaves_come_back_as_numpy(tmp_path):
  path = str(tmp_path / "checkpoint")
  io.save_checkpoint(path, {"a": np.arange(4.0), "b": jnp.ones(2)})
  got = io.load_checkpoint(path, {"a": np.zeros(4), "b": jnp.zeros(2)})
  assert isinstance(got["a"], np.ndarray)
  np.testing.assert_array_equal(got["a"], np.arange(4.0))


@pytest.mark.parametrize("change", ["shape", "dtype", "extra_leaf",
                                    "renamed", "key_impl"])
def test_another_configuration_is_refused(tmp_path, change):
  path = str(tmp_path / "checkpoint")
  io.save_checkpoint(path, _state(1))
  like = _state(0)
  if change == "shape":
    like["params"]["b"] = jnp.zeros(4)
  elif change == "dtype":
    like["params"]["b"] = jnp.zeros(3, jnp.int32)
  elif change == "extra_leaf":
    like["agg_state"] = (jnp.zeros(3),)
  elif change == "renamed":
    like["params"]["bias"] = like["params"].pop("b")
  else:
    like["key"] = jax.random.key(0, impl="rbg")
  with pytest.raises(ValueError, match="another configuration"):
    io.load_checkpoint(path, like)


def test_missing_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError):
    io.load_checkpoint(str(tmp_path / "nothing"), _state(0))
  os.makedirs(tmp_path / "empty")
  assert not io.checkpoint_exists(str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError):
    io.load_checkpoint(str(tmp_path / "empty"), _state(0))


def test_half_written_checkpoint_is_ignored(tmp_path):
  """A save killed before its rename leaves only a temporary directory:
  the last complete checkpoint loads, and the next save cleans it up."""
  path = str(tmp_path / "checkpoint")
  io.save_checkpoint(path, _state(1))
  (step,) = _steps(path)
  # What a save of the next step killed half-way leaves: a partial copy
  # under the temporary name (some files missing, one truncated).
  tmp = os.path.join(path, f"{int(step) + 1}{TMP_SUFFIX}")
  shutil.copytree(os.path.join(path, step), tmp)
  os.remove(os.path.join(tmp, "commit_success.txt"))
  for root, _, files in os.walk(tmp):
    for f in files:
      if f == "manifest.ocdbt":
        with open(os.path.join(root, f), "r+b") as fh:
          fh.truncate(3)
  assert io.checkpoint_exists(path)
  _assert_same(io.load_checkpoint(path, _state(0)), _state(1))
  # Only temporary directories, no complete step: nothing to resume from.
  lone = str(tmp_path / "lone")
  os.makedirs(os.path.join(lone, f"0{TMP_SUFFIX}"))
  assert not io.checkpoint_exists(lone)
  # The next save replaces the leftover and the old step.
  io.save_checkpoint(path, _state(2))
  assert not [n for n in os.listdir(path) if TMP_SUFFIX in n]
  assert len(_steps(path)) == 1
  _assert_same(io.load_checkpoint(path, _state(0)), _state(2))


def test_npz_checkpoints_still_work(tmp_path):
  path = str(tmp_path / "checkpoint.npz")
  assert not io.checkpoint_exists(path)
  io.save_checkpoint(path, _state(1))
  assert io.checkpoint_exists(path) and os.path.isfile(path)
  _assert_same(io.load_checkpoint(path, _state(0)), _state(1))
  like = _state(0)
  like["params"]["b"] = jnp.zeros(4)
  with pytest.raises(ValueError, match="configuration"):
    io.load_checkpoint(path, like)
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_atomic_result_files(tmp_path):
  records = [{"round": 1, "loss": 0.5}, {"round": 2, "loss": 0.25}]
  io.write_jsonl(str(tmp_path / "r.jsonl"), records)
  assert io.read_jsonl(str(tmp_path / "r.jsonl")) == records
  io.atomic_write_json(str(tmp_path / "s.json"), {"a": 1})
  assert (tmp_path / "s.json").read_text() == '{\n  "a": 1\n}\n'
  assert sorted(os.listdir(tmp_path)) == ["r.jsonl", "s.json"]
