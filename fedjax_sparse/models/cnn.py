"""Small CNNs: the hybrid sparse attack paper's F-MNIST CNN and LeNet-5.

Convolutions are :class:`fedjax_sparse.models.layers.Conv` (im2col on CPU,
``lax.conv_general_dilated`` elsewhere) and pooling is the reshape-based
:func:`fedjax_sparse.models.layers.max_pool`, so both models vmap over
per-client parameters without the XLA:CPU slow path.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from fedjax_sparse.models import layers


def _conv_pool_flatten(x: jax.Array, widths: Sequence[int],
                       conv_impl: str) -> jax.Array:
  """Per width: conv 5x5 VALID -> max pool 2x2 -> ReLU; then flatten.

  Called inside a model's ``nn.compact`` ``__call__``: the convolutions are
  that model's submodules, named ``Conv_0``, ``Conv_1``, ... as if written
  there.

  Args:
    x: ``[N, H, W, C]`` images.
    widths: the convolutions' output channels, in order.
    conv_impl: ``'auto'``, ``'im2col'`` or ``'lax'``.

  Returns:
    ``[N, features]``.
  """
  for width in widths:
    # max_pool(relu(z)) == relu(max_pool(z)); pooling first applies ReLU to
    # a quarter of the values.
    x = nn.relu(layers.max_pool(
        layers.Conv(width, 5, padding="VALID", impl=conv_impl)(x), 2))
  return x.reshape((x.shape[0], -1))


class CNN2(nn.Module):
  """The 2-layer CNN that HSA trains on F-MNIST.

  HSA (hybrid sparse attack paper), appendix C, "CNN without BatchNorm":
  "2 convolutional layers and 1 fully connected layer, with additional max
  pooling and dropout operations, totalling 431 x 10^3 parameters". The paper
  gives no layer widths. The authors' released code (CRYPTO-KU
  FL-Byzantine-Library, ``MNIST_NET``) has exactly 431,080 parameters on
  28x28x1 inputs, and we follow it:

    conv 5x5, 20, VALID, ReLU -> max pool 2x2
    conv 5x5, 50, VALID, ReLU -> max pool 2x2
    flatten (4*4*50 = 800) -> dense 500, ReLU -> dense ``num_classes``.

  Parameters (28x28x1, 10 classes): 5*5*1*20 + 20 = 520;
  5*5*20*50 + 50 = 25,050; 800*500 + 500 = 400,500; 500*10 + 10 = 5,010;
  total 431,080. The paper's "1 fully connected layer" counts the hidden
  dense layer; the output layer is the second dense layer (the 431k total
  only matches with it).

  Dropout: the paper mentions dropout but gives neither its rate nor its
  place, and the released code has none. ``dropout_rate`` defaults to 0 (as
  the code); when positive it is applied after the hidden dense layer in
  training and needs a ``'dropout'`` PRNG stream.

  On 32x32x3 inputs the same layers give a 5*5*50 = 1,250 flattened vector.

  Attributes:
    num_classes: number of logits.
    features: ``(conv1, conv2, dense)`` widths, default ``(20, 50, 500)``.
    dropout_rate: dropout before the output layer (training only).
    conv_impl: ``'auto'``, ``'im2col'`` or ``'lax'``.
  """

  num_classes: int
  features: Sequence[int] = (20, 50, 500)
  dropout_rate: float = 0.0
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps ``[N, H, W, C]`` images to ``[N, num_classes]`` logits."""
    c1, c2, fc = self.features
    x = _conv_pool_flatten(x, (c1, c2), self.conv_impl)
    x = nn.relu(nn.Dense(fc)(x))
    if self.dropout_rate > 0:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


class LeNet5(nn.Module):
  """LeNet-5 style CNN (LeCun et al., 1998), ReLU and max pooling.

    conv 5x5, 6, VALID, ReLU -> max pool 2x2
    conv 5x5, 16, VALID, ReLU -> max pool 2x2
    flatten -> dense 120, ReLU -> dense 84, ReLU -> dense ``num_classes``.

  Both convolutions are VALID (the common FL benchmark form, e.g. the
  CIFAR-10 "SimpleCNN" of FedAvg/MOON code bases), so the flattened size
  depends on the input: 16*5*5 = 400 on 32x32x3 (62,006 parameters with 10
  classes) and 16*4*4 = 256 on 28x28x1 (44,426 parameters). The original
  LeNet-5 zero-pads 28x28 digits to 32x32 first; pad the inputs to get it.

  Attributes:
    num_classes: number of logits.
    features: ``(conv1, conv2, dense1, dense2)``, default
      ``(6, 16, 120, 84)``.
    conv_impl: ``'auto'``, ``'im2col'`` or ``'lax'``.
  """

  num_classes: int
  features: Sequence[int] = (6, 16, 120, 84)
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps ``[N, H, W, C]`` images to ``[N, num_classes]`` logits."""
    del train  # No dropout or normalisation.
    c1, c2, d1, d2 = self.features
    x = _conv_pool_flatten(x, (c1, c2), self.conv_impl)
    x = nn.relu(nn.Dense(d1)(x))
    x = nn.relu(nn.Dense(d2)(x))
    return nn.Dense(self.num_classes)(x)
