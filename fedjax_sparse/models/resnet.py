"""CIFAR-style ResNet-20 (He et al., 2016, section 4.2) with a choice of norm.

Architecture: conv 3x3, 16 -> norm -> ReLU, then three stages of three basic
blocks with 16, 32 and 64 channels (the first block of stages 2 and 3 has
stride 2), global average pooling and a dense output layer. Shortcuts are
option A (He et al., section 4.2; the ResNet-20 the HSA paper trains on
CIFAR-10): identity, or strided subsampling plus zero channel padding when
the shape changes, so shortcuts have no parameters. Convolutions are
:class:`fedjax_sparse.models.layers.Conv`, kernels He-normal initialised (as
the common PyTorch CIFAR ResNet code), without bias when followed by a norm.

Parameters with 10 classes: convolutions 267,696; dense 650; each norm layer
has 2*C (scale, bias), 1,376 in all for 'group' and 'batch'; total 269,722.
With ``norm='none'`` convolutions carry a bias instead (688): 269,034.

Normalisation (``norm``):
  * ``'group'`` (default): ``nn.GroupNorm`` with ``min(8, C)`` groups (2, 4 and
    8 channels per group in the three stages). It has no state and behaves the
    same in training and evaluation, which is why it is the default for
    non-IID federated training (Hsieh et al., 2020).
  * ``'batch'``: ``nn.BatchNorm`` (momentum 0.9 and epsilon 1e-5, PyTorch's
    defaults), with ``use_running_average=not train``. Its running mean and
    variance live in the ``'batch_stats'`` collection: initialise with
    ``model.init(key, x)`` and train with
    ``model.apply({'params': p, 'batch_stats': s}, x, train=True,
    mutable=['batch_stats'])``. Under ``jax.vmap`` over clients each client
    normalises with its own batch statistics (no ``axis_name``).
  * ``'none'``: no normalisation.

BatchNorm running statistics across clients: each client starts a round from
the global statistics and updates its own copy during local training. The
statistics are not parameters: they are NOT part of the flattened update
vector that sparsifiers, attacks and aggregators see (the update is built from
the ``'params'`` collection only, and the BatchNorm ``scale``/``bias``, which
are parameters, are in it). After aggregation the server sets the new global
statistics to the mean of the participating clients' final statistics,
weighted by their dataset sizes. (The trainer in ``fedjax_sparse.simulation``
implements this; the model only exposes the collection.)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from fedjax_sparse.models import layers

NORMS = ("group", "batch", "none")

_conv_init = nn.initializers.he_normal()


def _norm_layer(norm: str, channels: int, train: bool, name: str):
  if norm == "group":
    return nn.GroupNorm(num_groups=min(8, channels), epsilon=1e-5, name=name)
  if norm == "batch":
    return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                        epsilon=1e-5, name=name)
  if norm == "none":
    return lambda x: x
  raise ValueError(f"Unknown norm {norm!r}; expected one of {NORMS}.")


def shortcut_option_a(x: jax.Array, features: int, stride: int) -> jax.Array:
  """Parameter-free shortcut: strided subsampling and zero channel padding.

  Args:
    x: ``[N, H, W, C]``.
    features: output channels (``>= C``).
    stride: spatial stride.

  Returns:
    ``[N, ceil(H / stride), ceil(W / stride), features]``, the channels of
    ``x`` in the middle and zeros on both sides (as the PyTorch reference
    pads ``planes // 4`` channels on each side).
  """
  n, h, w, c = x.shape
  if stride != 1:
    x = lax.slice(x, (0, 0, 0, 0), (n, h, w, c), (1, stride, stride, 1))
  if features != c:
    lo = (features - c) // 2
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (lo, features - c - lo)))
  return x


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with norm and ReLU, plus an option-A shortcut.

  Attributes:
    features: output channels.
    stride: stride of the first convolution and the shortcut.
    norm: ``'group'``, ``'batch'`` or ``'none'``.
    conv_impl: ``'auto'``, ``'im2col'`` or ``'lax'``.
  """

  features: int
  stride: int = 1
  norm: str = "group"
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    bias = self.norm == "none"
    y = layers.Conv(self.features, 3, strides=self.stride, padding=1,
                    use_bias=bias, impl=self.conv_impl,
                    kernel_init=_conv_init, name="conv1")(x)
    y = nn.relu(_norm_layer(self.norm, self.features, train, "norm1")(y))
    y = layers.Conv(self.features, 3, padding=1, use_bias=bias,
                    impl=self.conv_impl, kernel_init=_conv_init,
                    name="conv2")(y)
    y = _norm_layer(self.norm, self.features, train, "norm2")(y)
    return nn.relu(y + shortcut_option_a(x, self.features, self.stride))


class ResNet20(nn.Module):
  """CIFAR ResNet-20; see the module docstring.

  Attributes:
    num_classes: number of logits.
    width: channels of the first stage (16); stages use width, 2*width and
      4*width.
    blocks_per_stage: 3 for ResNet-20 (depth 6n+2).
    norm: ``'group'``, ``'batch'`` or ``'none'``.
    conv_impl: ``'auto'``, ``'im2col'`` or ``'lax'``.
  """

  num_classes: int
  width: int = 16
  blocks_per_stage: int = 3
  norm: str = "group"
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Maps ``[N, H, W, C]`` images to ``[N, num_classes]`` logits."""
    if self.norm not in NORMS:
      raise ValueError(f"Unknown norm {self.norm!r}; expected one of {NORMS}.")
    bias = self.norm == "none"
    x = layers.Conv(self.width, 3, padding=1, use_bias=bias,
                    impl=self.conv_impl, kernel_init=_conv_init,
                    name="conv_init")(x)
    x = nn.relu(_norm_layer(self.norm, self.width, train, "norm_init")(x))
    for stage in range(3):
      features = self.width * 2**stage
      for block in range(self.blocks_per_stage):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(features, stride, self.norm, self.conv_impl,
                       name=f"stage{stage + 1}_block{block + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)
