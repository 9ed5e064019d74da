"""Name -> model constructor registry, and parameter counting."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from fedjax_sparse.models import layers
from fedjax_sparse.models.cnn import CNN2, LeNet5
from fedjax_sparse.models.mlp import MLP
from fedjax_sparse.models.resnet import NORMS, ResNet20
from fedjax_sparse.registry import Registry

Width = int | Sequence[int] | None


def _mlp(num_classes: int, conv_impl: str, norm: str, width: Width,
         **kwargs) -> nn.Module:
  del conv_impl, norm
  if width is not None:
    kwargs["hidden"] = ((int(width),) if isinstance(width, int)
                        else tuple(int(w) for w in width))
  return MLP(num_classes, **kwargs)


def _mlp_bn(num_classes: int, conv_impl: str, norm: str, width: Width,
            **kwargs) -> nn.Module:
  return _mlp(num_classes, conv_impl, norm, width, batch_norm=True, **kwargs)


def _cnn2(num_classes: int, conv_impl: str, norm: str, width: Width,
          **kwargs) -> nn.Module:
  del norm
  if width is not None:
    kwargs["features"] = _width_tuple(width, 3, "cnn2")
  return CNN2(num_classes, conv_impl=conv_impl, **kwargs)


def _lenet(num_classes: int, conv_impl: str, norm: str, width: Width,
           **kwargs) -> nn.Module:
  del norm
  if width is not None:
    kwargs["features"] = _width_tuple(width, 4, "lenet")
  return LeNet5(num_classes, conv_impl=conv_impl, **kwargs)


def _resnet20(num_classes: int, conv_impl: str, norm: str, width: Width,
              **kwargs) -> nn.Module:
  if width is not None:
    if not isinstance(width, int):
      raise ValueError("resnet20 width is the first stage's channel count, "
                       f"an int (default 16); got {width!r}.")
    kwargs["width"] = width
  return ResNet20(num_classes, norm=norm, conv_impl=conv_impl, **kwargs)


def _width_tuple(width: Width, n: int, name: str) -> tuple[int, ...]:
  if isinstance(width, int) or len(width) != n:
    raise ValueError(f"{name} width must be a sequence of {n} ints; got "
                     f"{width!r}.")
  return tuple(int(w) for w in width)


MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
MODELS.register("mlp", _mlp)
MODELS.register("mlp_bn", _mlp_bn)
MODELS.register("cnn2", _cnn2)
MODELS.register("lenet", _lenet)
MODELS.register("resnet20", _resnet20)


def names() -> list[str]:
  """The registered model names."""
  return MODELS.names()


def get_model(name: str, num_classes: int, *, conv_impl: str = "auto",
              norm: str = "group", width: Width = None,
              **kwargs: Any) -> nn.Module:
  """Builds a registered Linen model.

  Every model is called as ``model.apply(variables, x, train=...)`` on
  ``[N, H, W, C]`` (or, for ``'mlp'``, any ``[N, ...]``) inputs and returns
  ``[N, num_classes]`` logits.

  Args:
    name: ``'mlp'``, ``'cnn2'``, ``'lenet'`` or ``'resnet20'``.
    num_classes: number of logits.
    conv_impl: ``'auto'``, ``'im2col'`` or ``'lax'``
      (:func:`fedjax_sparse.models.layers.resolve_conv_impl`); ignored by
      ``'mlp'``.
    norm: ``'group'``, ``'batch'`` or ``'none'``, used by models that have
      normalisation layers (``'resnet20'``); the others have none and ignore
      it.
    width: the model's width, ``None`` for its default: ``'mlp'`` hidden
      sizes (an int for one hidden layer, or a sequence; default
      ``(200, 200)``); ``'cnn2'`` ``(conv1, conv2, dense)``, default
      ``(20, 50, 500)``; ``'lenet'`` ``(conv1, conv2, dense1, dense2)``,
      default ``(6, 16, 120, 84)``; ``'resnet20'`` the first stage's
      channels, default 16.
    **kwargs: further fields of the model class (e.g. ``dropout_rate`` of
      ``'cnn2'``).

  Returns:
    The (unbound) Linen module.

  Raises:
    ValueError: for an unknown name, conv impl or norm, or a malformed width;
      the message lists the accepted values.
  """
  factory = MODELS.get(name)
  if conv_impl not in layers.CONV_IMPLS:
    raise ValueError(f"unknown conv_impl {conv_impl!r}; known: "
                     f"{', '.join(layers.CONV_IMPLS)}")
  if norm not in NORMS:
    raise ValueError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")
  if num_classes < 1:
    raise ValueError(f"num_classes must be positive, got {num_classes}.")
  return factory(num_classes, conv_impl, norm, width, **kwargs)


def count_params(params: Any) -> int:
  """Number of scalars in a pytree (e.g. ``variables['params']``).

  Pass the ``'params'`` collection to count trainable parameters; passing
  the full variables dict would also count BatchNorm running statistics.
  """
  return int(sum(np.prod(np.shape(x), dtype=np.int64)
                 for x in jax.tree_util.tree_leaves(params)))
