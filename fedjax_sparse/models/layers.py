"""Convolution and pooling layers that stay fast when clients are vmapped.

Every client of a round is trained at once with ``jax.vmap`` over a stacked
parameter pytree, so each convolution sees a *per-client* kernel. On XLA:CPU,
``vmap`` of ``lax.conv_general_dilated`` over per-client kernels is
pathological (DESIGN.md, performance rules: a 20-client CNN round took 212 s
to compile and over 100 s to run). An im2col convolution, built from shifted
strided slices and a single matmul, vmaps into a batched ``dot_general`` that
XLA:CPU handles well (3 s to compile, 1.16 s per 20-client step).

:class:`Conv` is a drop-in replacement for ``flax.linen.Conv`` (same parameter
names, shapes and default initialisers, so checkpoints and
:class:`fedjax_sparse.layout.Layout` entries are identical) that picks its
implementation per backend: ``'im2col'`` on CPU, ``lax.conv_general_dilated``
elsewhere, where cuDNN/TPU convolutions batch well.

Measured here (``benchmarks/conv_impl.py``, shared 2-core CPU, batch 32,
28x28x1; two runs under different load): one vmapped SGD step compiles in
1-3 s with lax.conv and 2-5 s with im2col. For 'cnn2' im2col ran 1.3x
(K = 10) and 2.2-3.1x (K = 20) faster; for LeNet-5 (tiny convolutions) the
two were within noise, lax.conv up to 1.7x faster. The pathology shows once
the local steps sit in a ``lax.scan`` inside the vmap, as in local training:
10 steps of 'cnn2' at K = 20 took 1.8 s with im2col, while lax.conv had not
finished its warm-up call and one more within 60 s.

Pooling: :func:`max_pool` and :func:`avg_pool` use a reshape and a reduction
when the stride equals the window and padding is ``'VALID'`` (the case of
every model here), and fall back to ``flax.linen`` pooling
(``lax.reduce_window``) otherwise. The reshape form differentiates into
elementwise selects instead of ``select_and_scatter_add``; see
``benchmarks/conv_impl.py`` for the measurement.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
PaddingLike = str | int | Sequence[int | tuple[int, int]]

CONV_IMPLS = ("auto", "im2col", "lax")

_default_kernel_init = nn.linear.default_kernel_init


def resolve_conv_impl(impl: str) -> str:
  """Resolves ``'auto'`` to the convolution implementation for this backend.

  Args:
    impl: ``'auto'``, ``'im2col'`` or ``'lax'``.

  Returns:
    ``'im2col'`` or ``'lax'``: ``'auto'`` becomes ``'im2col'`` when
    ``jax.default_backend() == 'cpu'`` and ``'lax'`` otherwise.

  Raises:
    ValueError: for an unknown implementation name.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(
        f"Unknown conv impl {impl!r}; expected one of {CONV_IMPLS}.")
  if impl == "auto":
    return "im2col" if jax.default_backend() == "cpu" else "lax"
  return impl


def _as_pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
  if isinstance(v, int):
    return (v, v)
  v = tuple(int(x) for x in v)
  if len(v) != 2:
    raise ValueError(f"{name} must be an int or a pair of ints, got {v}.")
  return v


def conv_padding(padding: PaddingLike, in_hw: Sequence[int],
                 kernel_hw: Sequence[int],
                 strides: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """Explicit ``((low, high), (low, high))`` padding of a 2-D convolution.

  Args:
    padding: ``'SAME'``, ``'VALID'``, an int, or a length-2 sequence of ints
      or ``(low, high)`` pairs, as accepted by ``flax.linen.Conv``.
    in_hw: input height and width.
    kernel_hw: kernel height and width.
    strides: strides along height and width.

  Returns:
    The padding per spatial dimension, with ``'SAME'`` resolved exactly as
    ``lax.conv_general_dilated`` resolves it.
  """
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(
          f"Conv padding {padding!r} is not supported; use 'SAME', 'VALID' "
          "or explicit ints.")
    return tuple(tuple(p) for p in lax.padtype_to_pads(
        tuple(in_hw), tuple(kernel_hw), tuple(strides), padding.upper()))
  canon = nn.linear.canonicalize_padding(padding, 2)
  return tuple((int(lo), int(hi)) for lo, hi in canon)


# Jitted so that eager calls (``model.init`` outside jit) compile one program
# per shape instead of one per slice; inside an outer jit it is inlined.
@functools.partial(jax.jit, static_argnames=("strides", "padding",
                                             "precision"))
def im2col_conv(x: Array, kernel: Array, strides: tuple[int, int],
                padding: tuple[tuple[int, int], tuple[int, int]],
                precision: Any = None) -> Array:
  """2-D convolution as shifted strided slices and one matmul.

  Args:
    x: ``f32[N, H, W, Cin]`` inputs (NHWC).
    kernel: ``f32[kh, kw, Cin, Cout]`` (HWIO, the ``flax.linen.Conv`` layout).
    strides: ``(sh, sw)``, a tuple (static).
    padding: explicit ``((top, bottom), (left, right))`` padding, a tuple of
      tuples (static).
    precision: passed to ``lax.dot_general`` (static).

  Returns:
    ``f32[N, H', W', Cout]``, equal to ``lax.conv_general_dilated`` with the
    same arguments up to float rounding.
  """
  kh, kw, cin, cout = kernel.shape
  sh, sw = strides
  (pt, pb), (pl, pr) = padding
  if pt or pb or pl or pr:
    x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  n, h, w, c = x.shape
  if c != cin:
    raise ValueError(f"Input has {c} channels but the kernel expects {cin}.")
  ho = (h - kh) // sh + 1
  wo = (w - kw) // sw + 1
  if ho <= 0 or wo <= 0:
    raise ValueError(
        f"Kernel {kh}x{kw} does not fit the padded input {h}x{w}.")
  if kh == 1 and kw == 1:
    cols = lax.slice(x, (0, 0, 0, 0), (n, (ho - 1) * sh + 1,
                                       (wo - 1) * sw + 1, c), (1, sh, sw, 1))
  else:
    # Patch entry (i, j, c) at position i * kw * Cin + j * Cin + c, which is
    # the row-major order of the HWIO kernel reshaped to [kh * kw * Cin, Cout].
    cols = jnp.concatenate([
        lax.slice(x, (0, i, j, 0),
                  (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                  (1, sh, sw, 1))
        for i in range(kh) for j in range(kw)
    ], axis=-1)
  return lax.dot_general(
      cols, kernel.reshape(kh * kw * cin, cout),
      (((3,), (0,)), ((), ())), precision=precision)


class Conv(nn.Module):
  """2-D convolution (NHWC) with a backend-dependent implementation.

  Parameters match ``flax.linen.Conv``: ``kernel`` ``[kh, kw, Cin, Cout]``
  (LeCun normal) and ``bias`` ``[Cout]`` (zeros), so a model built with
  either implementation has the same parameter pytree. Unlike
  ``flax.linen.Conv``, an int ``kernel_size`` or ``strides`` means a square
  2-D window (flax reads ``kernel_size=3`` as a 1-D kernel); only 2-D
  convolutions without dilation or feature groups are supported.

  Attributes:
    features: number of output channels.
    kernel_size: ``int`` or ``(kh, kw)``.
    strides: ``int`` or ``(sh, sw)``.
    padding: ``'SAME'``, ``'VALID'``, an int, or per-dimension ints or
      ``(low, high)`` pairs.
    use_bias: whether to add a bias.
    impl: ``'auto'``, ``'im2col'`` or ``'lax'`` (see
      :func:`resolve_conv_impl`).
    dtype: computation dtype (default: inferred from inputs and params).
    param_dtype: parameter dtype.
    precision: matmul/convolution precision.
    kernel_init: kernel initialiser.
    bias_init: bias initialiser.
  """

  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: PaddingLike = "SAME"
  use_bias: bool = True
  impl: str = "auto"
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable[..., Array] = _default_kernel_init
  bias_init: Callable[..., Array] = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Applies the convolution.

    Args:
      x: ``[..., H, W, Cin]``; any number of leading batch dimensions,
        including none.

    Returns:
      ``[..., H', W', features]``.
    """
    impl = resolve_conv_impl(self.impl)
    kh, kw = _as_pair(self.kernel_size, "kernel_size")
    strides = _as_pair(self.strides, "strides")
    if x.ndim < 3:
      raise ValueError(f"Conv expects [..., H, W, C] inputs, got {x.shape}.")
    batch_shape = x.shape[:-3]
    x4 = x.reshape((-1,) + x.shape[-3:])
    cin = x4.shape[-1]
    kernel = self.param("kernel", self.kernel_init,
                        (kh, kw, cin, self.features), self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    x4, kernel, bias = nn.dtypes.promote_dtype(x4, kernel, bias,
                                               dtype=self.dtype)
    pads = conv_padding(self.padding, x4.shape[1:3], (kh, kw), strides)
    if impl == "im2col":
      y = im2col_conv(x4, kernel, strides, pads, precision=self.precision)
    else:
      y = lax.conv_general_dilated(
          x4, kernel, window_strides=strides, padding=pads,
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
          precision=self.precision)
    if bias is not None:
      y = y + bias
    return y.reshape(batch_shape + y.shape[1:])


def _pool_reshape(x: Array, window: tuple[int, int], reduce: str) -> Array:
  """Non-overlapping pooling by reshape; drops a ragged border like VALID."""
  wh, ww = window
  *lead, h, w, c = x.shape
  ho, wo = h // wh, w // ww
  if ho == 0 or wo == 0:
    raise ValueError(f"Pooling window {window} larger than input {h}x{w}.")
  if ho * wh != h or wo * ww != w:
    x = x[..., :ho * wh, :wo * ww, :]
  x = x.reshape(tuple(lead) + (ho, wh, wo, ww, c))
  axes = (x.ndim - 4, x.ndim - 2)
  if reduce == "max":
    return jnp.max(x, axis=axes)
  return jnp.mean(x, axis=axes)


def _pool(x: Array, window: int | Sequence[int],
          strides: int | Sequence[int] | None, padding: str,
          reduce: str) -> Array:
  window = _as_pair(window, "window")
  strides = window if strides is None else _as_pair(strides, "strides")
  if strides == window and padding == "VALID":
    return _pool_reshape(x, window, reduce)
  fn = nn.max_pool if reduce == "max" else nn.avg_pool
  return fn(x, window, strides=strides, padding=padding)


def max_pool(x: Array, window: int | Sequence[int] = 2,
             strides: int | Sequence[int] | None = None,
             padding: str = "VALID") -> Array:
  """Max pooling over the H, W axes of ``[..., H, W, C]``.

  Non-overlapping windows (``strides`` equal to ``window``, the default) with
  ``'VALID'`` padding use a reshape and ``jnp.max``, which stays cheap under
  ``vmap`` and in its gradient on CPU; other settings use
  ``flax.linen.max_pool``.

  Args:
    x: ``[..., H, W, C]``.
    window: ``int`` or ``(wh, ww)``.
    strides: ``int`` or ``(sh, sw)``; defaults to ``window``.
    padding: ``'VALID'`` or ``'SAME'``.

  Returns:
    The pooled array; with ``'VALID'``, ``H' = (H - wh) // sh + 1``.
  """
  return _pool(x, window, strides, padding, "max")


def avg_pool(x: Array, window: int | Sequence[int] = 2,
             strides: int | Sequence[int] | None = None,
             padding: str = "VALID") -> Array:
  """Average pooling over the H, W axes of ``[..., H, W, C]``.

  The arguments, the output shape and when the reshape form is used are
  those of :func:`max_pool`.
  """
  return _pool(x, window, strides, padding, "avg")
