"""The torch side of the peer-round benchmark (:mod:`benchmarks.peer_round`).

FL-Byzantine-Library's round written the fastest way we know in PyTorch
(:class:`FlbRound`; the module docstring of :mod:`benchmarks.peer_round`
lists how it differs from FLB's code), twins of our models and rules, and
the choice of torch's thread count and oneDNN by measurement.
"""

from __future__ import annotations

import os
import statistics

import numpy as np

from benchmarks._peer_round import (BATCH, BETA, LR, MODELS, RULES, make_data,
                                    timed)

try:
  import torch
  import torch.nn.functional as F
except ImportError:  # the benchmark is skipped without torch
  torch = None


def torch_model(name: str, num_classes: int = 10) -> "torch.nn.Module":
  """The torch twin of our model ``name`` on 1x28x28 inputs (NCHW)."""
  nn = torch.nn
  if name == "mlp":
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 200), nn.ReLU(),
                         nn.Linear(200, 200), nn.ReLU(),
                         nn.Linear(200, num_classes))
  if name == "cnn2":  # FLB's MNIST_NET; ReLU after pooling, as ours
    return nn.Sequential(nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.ReLU(),
                         nn.Conv2d(20, 50, 5), nn.MaxPool2d(2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(800, 500), nn.ReLU(),
                         nn.Linear(500, num_classes))
  raise ValueError(f"no torch model {name!r}; known: {', '.join(MODELS)}")


def torch_median(u: "torch.Tensor") -> "torch.Tensor":
  """Coordinate median of ``u: f32[K, d]``, the mean of the two middle values at even K."""
  if u.shape[0] % 2:
    return u.median(dim=0).values
  # FLB's CM: torch.median returns the lower middle value, -median(-u) the upper.
  return (u.median(dim=0).values - (-u).median(dim=0).values) / 2


def torch_krum_scores(u: "torch.Tensor", f: int) -> "torch.Tensor":
  """Sum of the squared distances from each row to its ``K - f - 2`` nearest others."""
  k = u.shape[0]
  c = u - u.mean(dim=0)
  sq = (c * c).sum(dim=1)
  d2 = (sq[:, None] + sq[None, :] - 2.0 * (c @ c.T)).clamp_min_(0.0)
  d2.fill_diagonal_(float("inf"))
  return torch.topk(d2, k - f - 2, dim=1, largest=False).values.sum(dim=1)


def torch_multi_krum(u: "torch.Tensor", f: int) -> "torch.Tensor":
  """Mean of the ``K - f`` rows with the lowest Krum scores."""
  k = u.shape[0]
  order = torch.argsort(torch_krum_scores(u, f), stable=True)
  return u.index_select(0, order[:k - f]).mean(dim=0)


def torch_centered_clipping(u: "torch.Tensor", v: "torch.Tensor", tau: float,
                            num_iters: int) -> "torch.Tensor":
  """``num_iters`` times ``v <- v + mean_i clip(u_i - v, tau)``; returns ``v``."""
  k = u.shape[0]
  for _ in range(num_iters):
    z = u - v
    scale = (tau / z.norm(dim=1).clamp_min(1e-30)).clamp_max(1.0)
    v = v + (scale @ z) / k
  return v


class FlbRound:
  """One FLB-style federated round per call, in PyTorch (module docstring).

  Args:
    model: a torch module; its parameters become views into one flat
      vector, and its initial weights the global model.
    x: ``f32[N, ...]`` preloaded inputs; y: ``int64[N]`` labels.
    idx: ``int64[K, n]`` each client's example indices (all ``K`` clients
      take part in every round).
    rule: ``'mean'``, ``'median'``, ``'multi_krum'`` or
      ``'centered_clipping'``.
    local_steps, batch_size, lr, beta: local SGD with worker momentum.
    f: Byzantine clients Multi-Krum assumes.
    cc_tau, cc_iters: centered clipping's radius and iterations.
    seed: seed of the batch draws.
  """

  def __init__(self, model, x, y, idx, rule, local_steps, batch_size=BATCH,
               lr=LR, beta=BETA, f=0, cc_tau=1.0, cc_iters=1, seed=0):
    if rule not in RULES:
      raise ValueError(f"unknown rule {rule!r}; known: {', '.join(RULES)}")
    self.model, self.x, self.y, self.idx = model, x, y, idx
    self.rule, self.local_steps, self.batch_size = rule, local_steps, batch_size
    self.lr, self.beta, self.f = lr, beta, f
    self.cc_tau, self.cc_iters = cc_tau, cc_iters
    self.params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
      self.flat = torch.cat([p.detach().reshape(-1) for p in self.params])
      self.global_flat = self.flat.clone()
    self.d = self.flat.numel()
    self.momentum = torch.zeros(idx.shape[0], self.d)  # one buffer per client
    self.prev_aggregate = torch.zeros(self.d)
    self.param_views = self._views(self.flat)
    for p, view in zip(self.params, self.param_views):
      p.data = view
    self.momentum_views = [self._views(row) for row in self.momentum]
    self.gen = torch.Generator().manual_seed(seed)

  def _views(self, flat):
    out, off = [], 0
    for p in self.params:
      out.append(flat[off:off + p.numel()].view(p.shape))
      off += p.numel()
    return out

  def draw_positions(self) -> "torch.Tensor":
    """``int64[K, local_steps, batch]`` positions into the clients' index rows."""
    k, n = self.idx.shape
    return torch.randint(0, n, (k, self.local_steps, self.batch_size),
                         generator=self.gen)

  def aggregate(self, u: "torch.Tensor") -> "torch.Tensor":
    """The rule applied to the stacked uploads ``u: f32[K, d]``."""
    if self.rule == "mean":
      return u.mean(dim=0)
    if self.rule == "median":
      return torch_median(u)
    if self.rule == "multi_krum":
      return torch_multi_krum(u, self.f)
    self.prev_aggregate = torch_centered_clipping(
        u, self.prev_aggregate, self.cc_tau, self.cc_iters)
    return self.prev_aggregate

  def __call__(self, positions=None) -> float:
    """Runs one round; returns the mean training loss of its local steps."""
    k = self.idx.shape[0]
    if positions is None:
      positions = self.draw_positions()
    rows = self.idx.gather(1, positions.reshape(k, -1)).reshape(positions.shape)
    loss_sum = torch.zeros(())
    for i in range(k):
      with torch.no_grad():
        self.flat.copy_(self.global_flat)  # the client loads the global model
      bufs = self.momentum_views[i]
      for s in range(self.local_steps):
        r = rows[i, s]
        xb, yb = self.x.index_select(0, r), self.y.index_select(0, r)
        for p in self.params:
          p.grad = None
        loss = F.cross_entropy(self.model(xb), yb)
        loss.backward()
        with torch.no_grad():
          loss_sum += loss.detach()
          torch._foreach_mul_(bufs, self.beta)
          torch._foreach_add_(bufs, [p.grad for p in self.params],
                              alpha=1.0 - self.beta)
          torch._foreach_add_(self.param_views, bufs, alpha=-self.lr)
    with torch.no_grad():  # the uploads are the K flat momentum rows
      self.global_flat.add_(self.aggregate(self.momentum), alpha=-self.lr)
    return float(loss_sum) / (k * self.local_steps)


def flb_round(name, x, y, idx, rule, k, local_steps, cc):
  """The :class:`FlbRound` of one row on the numpy data of :func:`make_data`
  (``cc``: centered clipping's ``(tau, num_iters)``)."""
  model = torch_model(name)
  xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  yt = torch.from_numpy(y.astype(np.int64))
  it = torch.from_numpy(idx.astype(np.int64))
  return FlbRound(model, xt, yt, it, rule, local_steps, f=k // 5,
                  cc_tau=cc[0], cc_iters=cc[1])


TORCH_CONFIGS = (("default", 0, True), ("1_thread", 1, True),
                 ("onednn_off", 0, False))


def torch_settings_check(name, reps, k=10, local_steps=2):
  """Times the torch round under each of ``TORCH_CONFIGS``; picks the fastest.

  ``default`` is one thread per core with oneDNN on; ``1_thread`` and
  ``onednn_off`` change one of the two. Torch alone, FedAvg, ``k`` clients
  of ``local_steps`` steps, the median of ``reps`` rounds after one warm-up.

  Returns:
    A record with the seconds per configuration and the ``best`` one, whose
    ``threads`` and ``onednn`` the benchmark then uses for ``name``.
  """
  x, y, idx = make_data(k)
  ncpu = os.cpu_count() or 1
  seconds, configs = {}, {}
  for label, n_threads, onednn in TORCH_CONFIGS:
    threads = n_threads or ncpu
    if label == "1_thread" and ncpu == 1:
      continue
    torch.set_num_threads(threads)
    with torch.backends.mkldnn.flags(enabled=onednn):
      rnd = flb_round(name, x, y, idx, "mean", k, local_steps, (1.0, 1))
      rnd()
      seconds[label] = statistics.median(timed(rnd)[0] for _ in range(reps))
    configs[label] = {"threads": threads, "onednn": onednn}
  best = min(seconds, key=seconds.get)
  print(f"  torch settings, {name} K={k} {local_steps} local steps: " + ", ".join(
      f"{lab} {s * 1e3:.0f} ms" for lab, s in seconds.items())
      + f" -> {best}", flush=True)
  return {"model": name, "K": k, "local_steps": local_steps,
          "seconds": seconds, "configs": configs, "best": best,
          **configs[best]}


def use_torch_config(threads: int, onednn: bool) -> None:
  torch.set_num_threads(threads)
  torch.backends.mkldnn.enabled = onednn
