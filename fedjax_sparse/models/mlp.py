"""Multi-layer perceptron (the common FedAvg MNIST model)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax


class MLP(nn.Module):
  """Flatten, ``len(hidden)`` dense + ReLU layers, and a dense output layer.

  The default ``hidden=(200, 200)`` is the "2NN" of FedAvg (McMahan et al.,
  2017, section 3): on 28x28x1 inputs with 10 classes it has
  784*200 + 200 + 200*200 + 200 + 200*10 + 10 = 199,210 parameters.

  The hybrid sparse attack paper (HSA, appendix C, "MLP") trains "2 fully
  connected layers with 80 x 10^3 trainable parameters" on MNIST without
  giving the width; ``hidden=(100,)`` gives 784*100 + 100 + 100*10 + 10 =
  79,510, the closest two-layer match (our reading, not stated by the paper).

  ``batch_norm=True`` (the registered ``"mlp_bn"``) puts a BatchNorm layer
  (momentum 0.9, epsilon 1e-5, as the ResNet-20 of this package) between
  each hidden dense layer and its ReLU: the smallest model with
  normalisation, for settings whose claim depends on it (class-aware
  masking trains ResNet-18 with BatchNorm; ours when the CPU budget rules
  the ResNets out).

  Attributes:
    num_classes: number of logits.
    hidden: hidden layer widths.
    batch_norm: BatchNorm after each hidden dense layer.
  """

  num_classes: int
  hidden: Sequence[int] = (200, 200)
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps ``[N, ...]`` inputs to ``[N, num_classes]`` logits."""
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.Dense(width)(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                         epsilon=1e-5)(x)
      x = nn.relu(x)
    return nn.Dense(self.num_classes)(x)
