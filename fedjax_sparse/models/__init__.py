"""Flax (Linen) models and CPU-friendly layers, behind a name registry.

``get_model(name, num_classes, conv_impl=..., norm=..., width=...)`` builds
``'mlp'``, ``'cnn2'``, ``'lenet'`` or ``'resnet20'``. Convolutions choose their
implementation per backend (im2col on CPU, ``lax.conv`` elsewhere) because
clients are vmapped over stacked parameters (DESIGN.md, performance rules).
See :mod:`fedjax_sparse.models.resnet` for how BatchNorm statistics are
handled across clients.
"""

from fedjax_sparse.models.cnn import CNN2, LeNet5
from fedjax_sparse.models.layers import (CONV_IMPLS, Conv, avg_pool,
                                         im2col_conv, max_pool,
                                         resolve_conv_impl)
from fedjax_sparse.models.mlp import MLP
from fedjax_sparse.models.registry import count_params, get_model, names
from fedjax_sparse.models.resnet import NORMS, BasicBlock, ResNet20

__all__ = [
    "BasicBlock", "CNN2", "CONV_IMPLS", "Conv", "LeNet5", "MLP", "NORMS",
    "ResNet20", "avg_pool", "count_params", "get_model", "im2col_conv",
    "max_pool", "names", "resolve_conv_impl",
]
