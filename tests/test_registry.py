"""The generic name registry and the tables built on it."""

import pytest

from fedjax_sparse import aggregators, attacks, models
from fedjax_sparse.aggregators import registry as agg_registry
from fedjax_sparse.data import sources
from fedjax_sparse.registry import Registry


def _table():
  reg = Registry("widget", aliases={"w": "wheel", "cog": "gear"})
  reg.register("wheel", lambda: "wheel")

  @reg.register("gear")
  def gear():
    return "gear"

  return reg, gear


def test_register_get_names_contains():
  reg, gear = _table()
  assert reg.get("gear") is gear and gear() == "gear"
  assert reg.get("wheel")() == "wheel"
  assert reg.names() == ["gear", "wheel"] and list(reg) == reg.names()
  assert len(reg) == 2
  assert "gear" in reg and "nope" not in reg and 3 not in reg


def test_register_returns_the_factory_both_ways():
  reg = Registry("widget")
  f = lambda: 1  # noqa: E731
  assert reg.register("a", f) is f
  assert reg.register("b")(f) is f


def test_aliases_are_case_insensitive_and_stripped():
  reg, gear = _table()
  assert reg.canonical(" COG ") == "gear"
  assert reg.canonical(" gear ") == "gear"
  assert reg.canonical("other") == "other"
  assert reg.get("Cog") is gear and reg.get(" gear") is gear
  assert "W" in reg


def test_unknown_name_lists_names_and_aliases():
  reg, _ = _table()
  with pytest.raises(ValueError) as e:
    reg.get("sprocket")
  assert str(e.value) == ("unknown widget 'sprocket'; known widgets: gear, "
                          "wheel (aliases: w=wheel, cog=gear)")
  # Without aliases there is no parenthesis; a note follows the name.
  plain = Registry("gadget")
  plain.register("x", object)
  assert str(plain.unknown("y", " (a hint)")) == (
      "unknown gadget 'y' (a hint); known gadgets: x")


def test_aliases_of_other_tables_are_not_listed():
  shared = {"lfa": "label_flip"}
  reg = Registry("update attack", shared)
  reg.register("alie", object)
  assert "aliases" not in str(reg.unknown("x"))
  assert reg.aliases is shared  # held, not copied


def test_duplicate_name_is_refused():
  reg, _ = _table()
  with pytest.raises(ValueError, match="widget 'gear' is already registered"):
    reg.register("gear", object)


def test_ported_tables():
  assert agg_registry.RULES.names() == aggregators.names()
  assert aggregators.get("CM") is aggregators.get("median")
  with pytest.raises(ValueError, match=r"unknown aggregator 'krumm'; known "
                     r"aggregators: .*\(aliases: cm=median"):
    aggregators.get("krumm")
  assert {"bucketing", "clip", "nnm"} <= set(aggregators.pre_names())
  with pytest.raises(ValueError, match="known pre-aggregators"):
    aggregators.get_pre("nope")
  with pytest.raises(ValueError, match="it is a data attack: use get_data_attack"):
    attacks.get_update_attack("dba")
  with pytest.raises(ValueError, match="it is an update attack: use get_update_attack"):
    attacks.get_data_attack("alie")
  assert attacks.get_data_attack("LFA") is attacks.get_data_attack("label_flip")
  with pytest.raises(ValueError, match="attack 'alie' is already registered"):
    attacks.registry.register_data("alie", object)
  with pytest.raises(ValueError, match="unknown model 'vgg'; known models: cnn2"):
    models.get_model("vgg", 10)
  with pytest.raises(ValueError, match="known datasets: digits"):
    sources.load("cifar")


def test_clip_composes_by_name_and_stateless_rules_keep_empty_state():
  import jax
  import jax.numpy as jnp
  import numpy as np

  from fedjax_sparse.aggregators import AggContext
  from fedjax_sparse.aggregators.clipping import clip_by_l2_norm

  u = jnp.asarray(np.random.RandomState(0).randn(5, 4) * 3, jnp.float32)
  w = jnp.ones((5,), jnp.float32)
  ctx = AggContext(round=jnp.int32(0), num_byzantine=1, num_clients=5)
  key = jax.random.PRNGKey(0)
  krum = aggregators.get("krum")()
  composed = aggregators.compose(krum, [("clip", {"clip_norm": 1.0})])
  assert krum.init(4) == () and composed.init(4) == ()
  out, state = composed.apply((), u, None, w, key, ctx)
  ref, _ = krum.apply((), clip_by_l2_norm(u, 1.0)[0], None, w, key, ctx)
  assert state == ()
  np.testing.assert_array_equal(out.update, ref.update)
  np.testing.assert_array_equal(out.acceptance, ref.acceptance)
  assert set(out.diagnostics) == set(ref.diagnostics) | {"clip_scale"}
