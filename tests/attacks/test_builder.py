"""Tests of fedjax_sparse.attacks.builder: attacks from names and flag arguments."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_sparse import attacks as A
from fedjax_sparse.attacks import builder
from fedjax_sparse.layout import layout_of
from fedjax_sparse.models import get_model
from fedjax_sparse.saliency import num_target, prunable_mask

K = 6
_MODEL = get_model("mlp", 4, width=(16,))
_PARAMS = _MODEL.init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)))["params"]
_LAYOUT = layout_of(_PARAMS)
D = _LAYOUT.d
_RNG = np.random.default_rng(0)
_X = _RNG.normal(size=(40, 6, 6, 1)).astype(np.float32)
_Y = _RNG.integers(0, 4, size=40).astype(np.int32)
_IS_MAL = jnp.asarray([True, False, True, False, False, False])


def _build(name, kwargs=None, **over):
  args = dict(layout=_LAYOUT, params=_PARAMS, apply_fn=_MODEL.apply, attacker_x=_X,
              attacker_y=_Y, key=jax.random.key(1), num_classes=4)
  args.update(over)
  return A.build_update_attack(name, kwargs, **args)


def _run(attack):
  x = jnp.asarray(np.random.default_rng(2).normal(size=(K, D)), jnp.float32)
  ctx = A.AttackContext(round=jnp.int32(12), global_params=jnp.zeros(D),
                        prev_aggregate=jnp.zeros(D), weights=jnp.ones(K),
                        layout=_LAYOUT, num_clients=K)
  out, _ = jax.jit(attack.apply)(attack.init(D), x, _IS_MAL, jax.random.key(3), ctx)
  out, x = np.asarray(out), np.asarray(x)
  is_mal = np.asarray(_IS_MAL)
  np.testing.assert_array_equal(out[~is_mal], x[~is_mal])
  assert np.all(np.any(out[is_mal] != x[is_mal], axis=1))
  assert np.all(np.isfinite(out))
  return out


def test_parse_caps():
  assert A.parse_caps("last_dense:0.25,first_conv:0.2") == {"last_dense": 0.25,
                                                            "first_conv": 0.2}
  assert A.parse_caps("last_dense:0.25;Dense_0:1") == {"last_dense": 0.25, "Dense_0": 1.0}
  assert A.parse_caps({"all": 0.5}) == {"all": 0.5}
  assert A.parse_caps(None) is None and A.parse_caps("none") is None
  for bad in ("last_dense", "last_dense:x", "last_dense:1.5"):
    with pytest.raises(ValueError, match="layer cap"):
      A.parse_caps(bad)


def test_hsa_random_mask_and_reports(tmp_path):
  attack = _build("hsa", {"z2": 2.0, "mask_method": "random", "delta": 0.05},
                  output_dir=str(tmp_path))
  rec = json.loads((tmp_path / "mask_densities.json").read_text())
  mask = rec["masks"]["random"]
  assert mask["num_kept"] == num_target(D, 0.05)
  assert rec["meta"]["attack"] == "hsa" and rec["meta"]["delta"] == 0.05
  assert os.path.getsize(tmp_path / "mask_densities.png") > 0
  out = _run(attack)
  # z2 = 2 on exactly the masked coordinates: recover them from the output.
  x = np.asarray(np.random.default_rng(2).normal(size=(K, D)), np.float64)
  g = x[~np.asarray(_IS_MAL)]
  z = (g.mean(0) - out[0]) / g.std(0, ddof=1)
  assert np.sum(np.abs(z - 2.0) < 1e-3) == mask["num_kept"]


@pytest.mark.parametrize("name,extra", [
    ("hsa", {}),
    ("dhsa", {"caps": "last_dense:0.1", "direction": "inv_mean"})])
def test_force_mask(tmp_path, name, extra):
  delta = 0.05
  attack = _build(name, {"mask_method": "force", "delta": delta, "force_steps": 10,
                         "num_batches": 2, "batch_size": 16, **extra},
                  output_dir=str(tmp_path))
  rec = json.loads((tmp_path / "mask_densities.json").read_text())["masks"]["force"]
  d_prunable = int(prunable_mask(_LAYOUT).sum())
  assert rec["num_kept"] == num_target(d_prunable, delta)
  assert rec["densities"]["Dense_0/bias"] == 0.0  # "force" keeps no critical one
  if "caps" in extra:
    assert rec["densities"]["Dense_1/kernel"] <= 0.1 + 1e-9
  assert os.path.getsize(tmp_path / "mask_densities.png") > 0
  _run(attack)


def test_mask_without_output_dir_writes_nothing(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _build("hsa", {"mask_method": "erk", "delta": 0.1})
  assert not os.listdir(tmp_path)


def test_unknown_arguments_list_accepted():
  with pytest.raises(ValueError, match=r"'hsa' takes no argument\(s\) zz; it accepts: "
                     r"z2, z1, .*direction, mask_method, delta, caps"):
    _build("hsa", {"zz": 1})
  with pytest.raises(ValueError, match=r"'alie' takes no argument\(s\) delta; it "
                     r"accepts: z, knowledge"):
    _build("alie", {"delta": 0.1})
  with pytest.raises(ValueError, match=r"'gna' .* it accepts: space$"):
    _build("gna", {"x": 1})
  with pytest.raises(ValueError, match=r"'sign_flip' .* it accepts: space$"):
    _build("sign_flip", {"x": 1})
  with pytest.raises(ValueError, match="unknown update attack"):
    _build("nope", {})
  with pytest.raises(ValueError, match="unknown mask method"):
    _build("hsa", {"mask_method": "magic"})
  with pytest.raises(ValueError, match="attackers' data"):
    _build("hsa", {"mask_method": "snip"}, attacker_x=None, attacker_y=None)


def test_plain_attack_with_kwargs():
  out = _run(_build("alie", {"z": 1.0, "knowledge": "partial"},
                    attacker_x=None, attacker_y=None))
  x = np.asarray(np.random.default_rng(2).normal(size=(K, D)), np.float64)
  own = x[np.asarray(_IS_MAL)]
  np.testing.assert_allclose(out[0], own.mean(0) - own.std(0, ddof=1), rtol=1e-4,
                             atol=1e-5)


_XT = _RNG.normal(size=(30, 6, 6, 1)).astype(np.float32)  # a "test split"
_YT = _RNG.integers(0, 4, size=30).astype(np.int32)


@pytest.mark.parametrize("source", ["test", "train"])
def test_targeted_pgd_from_test_or_attacker_data(source):
  attack = _build("targeted_pgd", {"aux_size": 8, "clip_norm": 0.5, "steps": 2,
                                   "aux_source": source},
                  test_x=_XT, test_y=_YT)
  out = _run(attack)
  assert np.linalg.norm(out[0]) <= 0.5 * (1 + 1e-4)  # the clipping ball
  np.testing.assert_array_equal(out[0], out[2])
  ax, ay = A.targeted_auxiliary_set(_X, _Y, 4, size=8, seed=0)
  assert ax.shape == (8, 6, 6, 1) and ay.shape == (8,)
  # The attack trains on the set targeted_auxiliary_data draws: handing that
  # set over explicitly gives the same update.
  aux = A.targeted_auxiliary_data({"aux_size": 8, "aux_source": source},
                                  num_classes=4, attacker_x=_X, attacker_y=_Y,
                                  test_x=_XT, test_y=_YT)
  given = _build("targeted_pgd", {"aux_size": 8, "clip_norm": 0.5, "steps": 2,
                                  "aux_source": source}, targeted_aux=aux)
  np.testing.assert_array_equal(_run(given), out)


def test_targeted_auxiliary_data_comes_from_test_points_by_default():
  assert A.TARGETED_OPTIONS["aux_source"] == "test"
  aux = A.targeted_auxiliary_data({"aux_size": 12, "aux_seed": 3},
                                  num_classes=4, attacker_x=_X, attacker_y=_Y,
                                  test_x=_XT, test_y=_YT)
  assert aux.x.shape == (12, 6, 6, 1) and len(set(aux.test_index)) == 12
  np.testing.assert_array_equal(aux.x, _XT[aux.test_index])
  # Flipped labels: never the true class.
  assert np.all(aux.y != _YT[aux.test_index])
  train = A.targeted_auxiliary_data({"aux_size": 12, "aux_seed": 3,
                                     "aux_source": "train"}, num_classes=4,
                                    attacker_x=_X, attacker_y=_Y,
                                    test_x=_XT, test_y=_YT)
  assert train.test_index is None
  rows = {r.tobytes() for r in _X}
  assert all(r.tobytes() in rows for r in train.x)
  assert not any(r.tobytes() in rows for r in aux.x)
  with pytest.raises(ValueError, match="unknown aux_source 'val'"):
    A.targeted_auxiliary_data({"aux_source": "val"}, num_classes=4,
                              test_x=_XT, test_y=_YT)
  with pytest.raises(ValueError, match="needs the test split"):
    _build("targeted_pgd", {"aux_size": 8})
  assert "aux_source" in A.accepted_arguments("targeted_pgd")


@pytest.mark.parametrize("fresh", [None, "true"])
def test_hsa_force_plus_keeps_every_bias(tmp_path, fresh):
  # The hybrid paper's Pi_F^+ setting through the flag arguments.
  kwargs = {"z2": 2.0, "mask_method": "force_plus", "delta": 0.005,
            "caps": "last_dense:0.25", "force_steps": 10, "batch_size": 8}
  if fresh is not None:
    kwargs["fresh_batches"] = fresh       # a flag string, parsed by the builder
  attack = _build("hsa", kwargs, output_dir=str(tmp_path))
  rec = json.loads((tmp_path / "mask_densities.json").read_text())
  assert rec["meta"]["fresh_batches"] is (fresh is not None)
  mask = rec["masks"]["force_plus"]
  biases = [n for n, k in zip(_LAYOUT.names, _LAYOUT.kinds) if k == "bias"]
  assert biases == ["Dense_0/bias", "Dense_1/bias"]
  for b in biases:
    assert mask["densities"][b] == 1.0, b
  assert mask["densities"]["Dense_1/kernel"] <= 0.25
  d_prunable = int(prunable_mask(_LAYOUT).sum())
  n_bias = sum(_LAYOUT.sizes[_LAYOUT.names.index(b)] for b in biases)
  assert mask["num_kept"] == num_target(d_prunable, 0.005) + n_bias
  # The attack perturbs exactly the masked coordinates (z2 = 2 there).
  out = _run(attack)
  x = np.asarray(np.random.default_rng(2).normal(size=(K, D)), np.float64)
  g = x[~np.asarray(_IS_MAL)]
  z = (g.mean(0) - out[0]) / g.std(0, ddof=1)
  hit = np.abs(z - 2.0) < 1e-3
  assert hit.sum() == mask["num_kept"]
  assert hit[~prunable_mask(_LAYOUT)].all()          # every bias is attacked


def test_fresh_batches_option():
  masks = {}
  for fresh in (None, False, True):
    extra = {} if fresh is None else {"fresh_batches": fresh}
    masks[fresh] = builder.build_mask(
        "force", 0.05, layout=_LAYOUT, params=_PARAMS,
        loss_fn=builder.cross_entropy(_MODEL.apply), attacker_x=_X, attacker_y=_Y,
        seed=3, force_steps=10, batch_size=8, **extra).mask
  np.testing.assert_array_equal(masks[None], masks[False])  # default: the old one
  assert np.any(masks[True] != masks[False])
  with pytest.raises(ValueError, match="fresh_batches must be true or false"):
    _build("hsa", {"mask_method": "force", "fresh_batches": "maybe"})
