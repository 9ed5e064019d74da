"""Tests of fedjax_sparse.models: shapes, parameter counts, conv equivalence."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_sparse import models
from fedjax_sparse.models import layers
from fedjax_sparse.models.resnet import shortcut_option_a

MNIST = (2, 28, 28, 1)
CIFAR = (2, 32, 32, 3)


def _normal(shape, seed=0):
  # numpy draws: jax.random would compile a sampler for every new shape.
  return np.random.default_rng(seed).standard_normal(shape).astype(
      np.float32)


def _init(model, shape, seed=0):
  return model.init(jax.random.key(seed), jnp.zeros(shape), train=False)


def _random_variables(model, shape, seed=0):
  """Variables of ``model`` drawn with numpy: no initialiser to compile."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(lambda: _init(model, shape))

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "batch_stats" in name:
      fill = 1.0 if name.endswith("['var']") else 0.0
      return np.full(leaf.shape, fill, np.float32)
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(
        np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


# --- Shapes and parameter counts -------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn2", "lenet", "resnet20"])
@pytest.mark.parametrize("shape", [MNIST, CIFAR])
def test_output_shape(name, shape):
  # Abstract evaluation: shapes without compiling (numerics are checked by
  # the im2col/lax and vmap tests below).
  model = models.get_model(name, 10)
  variables = jax.eval_shape(lambda: _init(model, shape))
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  for train in (False, True):
    logits = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=train), variables, x)
    assert logits.shape == (shape[0], 10)
    assert logits.dtype == jnp.float32


def _dense(i, o):
  return i * o + o


def _conv(k, i, o, bias=True):
  return k * k * i * o + (o if bias else 0)


def _resnet20(cin, norm):
  bias = norm == "none"
  n = _conv(3, cin, 16, bias)
  norms = [16]
  c_in = 16
  for c in (16, 32, 64):
    for _ in range(3):
      n += _conv(3, c_in, c, bias) + _conv(3, c, c, bias)
      norms += [c, c]
      c_in = c
  if norm != "none":
    n += sum(2 * c for c in norms)
  return n + _dense(64, 10)


HAND_COUNTS = [
    ("mlp", MNIST, {}, 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10),
    ("mlp", MNIST, {"width": (100,)}, _dense(784, 100) + _dense(100, 10)),
    ("mlp", CIFAR, {}, _dense(3072, 200) + _dense(200, 200) + _dense(200, 10)),
    ("cnn2", MNIST, {}, _conv(5, 1, 20) + _conv(5, 20, 50)
     + _dense(4 * 4 * 50, 500) + _dense(500, 10)),
    ("cnn2", CIFAR, {}, _conv(5, 3, 20) + _conv(5, 20, 50)
     + _dense(5 * 5 * 50, 500) + _dense(500, 10)),
    ("lenet", MNIST, {}, _conv(5, 1, 6) + _conv(5, 6, 16)
     + _dense(16 * 4 * 4, 120) + _dense(120, 84) + _dense(84, 10)),
    ("lenet", CIFAR, {}, _conv(5, 3, 6) + _conv(5, 6, 16)
     + _dense(16 * 5 * 5, 120) + _dense(120, 84) + _dense(84, 10)),
    ("resnet20", CIFAR, {"norm": "group"}, _resnet20(3, "group")),
    ("resnet20", CIFAR, {"norm": "batch"}, _resnet20(3, "batch")),
    ("resnet20", CIFAR, {"norm": "none"}, _resnet20(3, "none")),
]


@pytest.mark.parametrize("name,shape,kwargs,expected", HAND_COUNTS)
def test_param_count(name, shape, kwargs, expected):
  model = models.get_model(name, 10, **kwargs)
  shapes = jax.eval_shape(lambda: _init(model, shape))
  assert models.count_params(shapes["params"]) == expected


def test_known_param_counts():
  # The numbers quoted in the docstrings and the papers.
  assert HAND_COUNTS[0][3] == 199_210
  assert HAND_COUNTS[1][3] == 79_510  # HSA appendix C: "80 x 10^3".
  assert HAND_COUNTS[3][3] == 431_080  # HSA appendix C: "431 x 10^3".
  assert HAND_COUNTS[6][3] == 62_006
  assert _resnet20(3, "batch") == 269_722  # The usual "0.27M".


# --- Conv layer --------------------------------------------------------------


def test_resolve_conv_impl():
  expected = "im2col" if jax.default_backend() == "cpu" else "lax"
  assert layers.resolve_conv_impl("auto") == expected
  assert layers.resolve_conv_impl("lax") == "lax"
  assert layers.resolve_conv_impl("im2col") == "im2col"
  with pytest.raises(ValueError, match="im2col"):
    layers.resolve_conv_impl("winograd")


def test_conv_params_match_flax_conv():
  x = jnp.ones((1, 8, 8, 3))
  ours = models.Conv(4, (3, 2), impl="im2col").init(jax.random.key(3), x)
  ref = nn.Conv(4, (3, 2)).init(jax.random.key(3), x)
  chex_equal = jax.tree_util.tree_map(np.testing.assert_array_equal, ours,
                                      ref)
  del chex_equal
  no_bias = models.Conv(4, 3, use_bias=False).init(jax.random.key(0), x)
  assert list(no_bias["params"]) == ["kernel"]


_PADDINGS = st.sampled_from(
    ["SAME", "VALID", 0, 1, 2, ((1, 0), (0, 2)), (1, 2)])


@settings(max_examples=12, deadline=None, derandomize=True)
@given(k=st.tuples(st.integers(1, 5), st.integers(1, 5)),
       s=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       padding=_PADDINGS,
       cin=st.integers(1, 4), cout=st.integers(1, 5),
       hw=st.tuples(st.integers(5, 11), st.integers(5, 11)))
def test_im2col_equals_lax_conv(k, s, padding, cin, cout, hw):
  x = _normal((2, *hw, cin), 0)
  variables = {"params": {"kernel": _normal((*k, cin, cout), 1),
                          "bias": _normal((cout,), 2)}}

  @jax.jit
  def run(variables, x):  # One compile per example.
    return [
        models.Conv(cout, k, strides=s, padding=padding,
                    impl="im2col").apply(variables, x),
        models.Conv(cout, k, strides=s, padding=padding,
                    impl="lax").apply(variables, x),
        nn.Conv(cout, k, strides=s, padding=padding).apply(variables, x)]

  # "highest": on GPU/TPU the default float32 matmul may use TF32/bf16 passes.
  with jax.default_matmul_precision("highest"):
    im2col, lax_out, ref = run(variables, x)
  np.testing.assert_allclose(im2col, lax_out, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(lax_out, ref, atol=1e-5, rtol=1e-5)


def test_conv_leading_batch_dims():
  conv = models.Conv(3, 3, impl="im2col")
  x = _normal((2, 3, 6, 6, 2))
  variables = conv.init(jax.random.key(1), x)
  y = conv.apply(variables, x)
  assert y.shape == (2, 3, 6, 6, 3)
  np.testing.assert_allclose(y[1], conv.apply(variables, x[1]), atol=1e-6)
  assert conv.apply(variables, x[0, 0]).shape == (6, 6, 3)


# --- Pooling -------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(8, 8), (9, 7)])
def test_pooling_matches_flax(hw):
  x = _normal((2, *hw, 3))
  np.testing.assert_allclose(models.max_pool(x, 2),
                             nn.max_pool(x, (2, 2), strides=(2, 2)))
  np.testing.assert_allclose(models.avg_pool(x, 2),
                             nn.avg_pool(x, (2, 2), strides=(2, 2)),
                             rtol=1e-6)
  # Overlapping windows take the reduce_window fallback.
  np.testing.assert_allclose(models.max_pool(x, 3, strides=1),
                             nn.max_pool(x, (3, 3), strides=(1, 1)))


# --- Models: implementations, vmap over clients, BatchNorm --------------------


@pytest.mark.parametrize("name,shape", [("cnn2", MNIST), ("lenet", CIFAR),
                                        ("resnet20", CIFAR)])
def test_model_im2col_equals_lax(name, shape):
  im2col = models.get_model(name, 10, conv_impl="im2col")
  lax_model = models.get_model(name, 10, conv_impl="lax")
  variables = _random_variables(im2col, shape)
  x = _normal(shape, 1)
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(jax.jit(im2col.apply)(variables, x),
                               jax.jit(lax_model.apply)(variables, x),
                               atol=1e-4, rtol=1e-4)


def test_vmap_over_clients_equals_loop():
  k = 4
  model = models.get_model("cnn2", 10, conv_impl="im2col")
  stacked = jax.tree_util.tree_map(
      lambda *leaves: np.stack(leaves),
      *[_random_variables(model, MNIST, seed) for seed in range(k)])
  x = _normal((k, *MNIST), 1)
  y = np.random.default_rng(2).integers(0, 10, (k, MNIST[0]))

  def loss(variables, xb, yb):
    logits = model.apply(variables, xb, train=True)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits),
                                         yb[:, None], axis=1))

  step = jax.jit(jax.vmap(jax.value_and_grad(loss)))
  losses, grads = step(stacked, x, y)
  single = jax.jit(jax.value_and_grad(loss))
  for i in range(k):
    client = jax.tree_util.tree_map(lambda a: a[i], stacked)
    loss_i, grad_i = single(client, x[i], y[i])
    np.testing.assert_allclose(losses[i], loss_i, rtol=1e-5)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a[i], b, atol=1e-5,
                                                rtol=1e-4), grads, grad_i)


@pytest.mark.slow
def test_batchnorm_exposes_batch_stats():
  model = models.get_model("resnet20", 10, norm="batch")
  variables = _random_variables(model, CIFAR)
  assert set(variables) == {"params", "batch_stats"}
  stats = variables["batch_stats"]
  assert set(stats["norm_init"]) == {"mean", "var"}
  x = 1.0 + _normal(CIFAR, 1)
  logits, updates = jax.jit(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
          variables, x)
  assert logits.shape == (2, 10)
  new_mean = updates["batch_stats"]["norm_init"]["mean"]
  assert not np.allclose(new_mean, stats["norm_init"]["mean"])
  # Evaluation uses the running averages and needs nothing mutable.
  assert model.apply(variables, x, train=False).shape == (2, 10)
  # Group norm and no norm carry no state.
  for norm in ("group", "none"):
    model = models.get_model("resnet20", 10, norm=norm)
    assert set(jax.eval_shape(lambda: _init(model, CIFAR))) == {"params"}


def test_shortcut_option_a():
  x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  y = shortcut_option_a(x, 7, 2)
  assert y.shape == (2, 2, 2, 7)
  np.testing.assert_array_equal(y[..., 2:5], x[:, ::2, ::2, :])
  np.testing.assert_array_equal(y[..., :2], 0)
  np.testing.assert_array_equal(y[..., 5:], 0)
  np.testing.assert_array_equal(shortcut_option_a(x, 3, 1), x)


def test_cnn2_dropout():
  model = models.get_model("cnn2", 10, dropout_rate=0.5)
  variables = _random_variables(model, MNIST)
  x = jnp.ones(MNIST)
  np.testing.assert_array_equal(model.apply(variables, x),
                                model.apply(variables, x))
  a = model.apply(variables, x, train=True,
                  rngs={"dropout": jax.random.key(0)})
  b = model.apply(variables, x, train=True,
                  rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(a, b)


# --- Registry errors -------------------------------------------------------------


def test_unknown_model_lists_known():
  with pytest.raises(ValueError, match="unknown model 'vgg11'") as e:
    models.get_model("vgg11", 10)
  for name in ("cnn2", "lenet", "mlp", "resnet20"):
    assert name in str(e.value)
  assert models.names() == ["cnn2", "lenet", "mlp", "mlp_bn", "resnet20"]


def test_bad_options():
  with pytest.raises(ValueError, match="conv_impl"):
    models.get_model("cnn2", 10, conv_impl="cudnn")
  with pytest.raises(ValueError, match="norm"):
    models.get_model("resnet20", 10, norm="layer")
  with pytest.raises(ValueError, match="3 ints"):
    models.get_model("cnn2", 10, width=(8, 16))
  with pytest.raises(ValueError, match="int"):
    models.get_model("resnet20", 10, width=(16, 32))


def test_mlp_bn_normalises_hidden_layers():
  model = models.get_model("mlp_bn", 10)
  x = jax.random.normal(jax.random.key(0), (32, 28, 28, 1)) * 3.0 + 2.0
  variables = model.init(jax.random.key(1), x)
  assert set(variables) == {"params", "batch_stats"}
  # The dense layers of "mlp" plus a scale and bias per hidden unit.
  n = sum(a.size for a in jax.tree.leaves(variables["params"]))
  assert n == 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10 + 2 * (200 + 200)
  # Training mode normalises with the batch statistics and updates the
  # running ones; eval mode uses the running statistics.
  logits, new = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert logits.shape == (32, 10)
  pre = x.reshape(32, -1) @ variables["params"]["Dense_0"]["kernel"] + \
      variables["params"]["Dense_0"]["bias"]
  np.testing.assert_allclose(new["batch_stats"]["BatchNorm_0"]["mean"],
                             0.1 * np.asarray(pre).mean(0), rtol=1e-4, atol=1e-5)
  a = model.apply(variables, x, train=False)
  b = model.apply(new | {"params": variables["params"]}, x, train=False)
  assert not np.allclose(a, b)
  # The plain MLP is unchanged: no batch statistics.
  assert set(models.get_model("mlp", 10).init(jax.random.key(1), x)) == {"params"}
