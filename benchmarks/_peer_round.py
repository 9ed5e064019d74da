"""The peer-round benchmark's setting and our side (benchmarks.peer_round).

The rows' constants, the random data both sides train on, the timing of one
call, and our round: the compiled round step of one row
(:class:`OurRound`) and the choice of its engine (:func:`select_engine`).
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np

MODELS = ("mlp", "cnn2")
RULES = ("mean", "median", "multi_krum", "centered_clipping")
# Our registry's names of the rules.
OUR_RULE = {"mean": "fedavg", "median": "median", "multi_krum": "multi_krum",
            "centered_clipping": "centered_clipping"}
BATCH = 32
N_PER_CLIENT = 320
LR = 0.1
BETA = 0.9  # FLB's worker momentum (Lmomentum)
MAP_CHUNK = 5
# Pause before each timed call: XLA's and OpenMP's worker threads spin for a
# while after a call (see benchmarks/aggregators.py).
SETTLE_S = 0.2


def make_data(num_clients: int, seed: int = 0):
  """Random FashionMNIST-shaped data: numpy ``(x NHWC, y, idx)``."""
  rng = np.random.default_rng(seed)
  n = num_clients * N_PER_CLIENT
  x = rng.normal(size=(n, 28, 28, 1)).astype(np.float32)
  y = rng.integers(0, 10, n).astype(np.int32)
  idx = np.arange(n, dtype=np.int32).reshape(num_clients, N_PER_CLIENT)
  return x, y, idx


def engine_candidates(ndev: int) -> list[tuple[str, int, int]]:
  """``(engine, chunk, client_devices)``: split over the devices, plus unsplit sequential."""
  split = 0 if ndev > 1 else 1
  return [("vmap", 1, split), ("map", MAP_CHUNK, split),
          ("sequential", 1, split)] + ([("sequential", 1, 1)] if ndev > 1 else [])


def engine_label(engine: str, chunk: int, devices: int, ndev: int) -> str:
  label = engine if engine != "map" else f"map/{chunk}"
  return label + (f"@{ndev}" if devices != 1 and ndev > 1 else "")


class OurRound:
  """Our round step for one row, compiled; call it to run one round."""

  def __init__(self, model, variables, data, k, local_steps, rule, engine,
               chunk, devices):
    from fedjax_sparse import aggregators
    from fedjax_sparse.client.local import ClientConfig
    from fedjax_sparse.layout import layout_of
    from fedjax_sparse.simulation.round import (RoundConfig, init_server_state,
                                                make_round_step)
    ccfg = ClientConfig(optimizer="sgd", lr=LR, momentum=BETA,
                        local_steps=local_steps, batch_size=BATCH,
                        update_mode="momentum")
    cfg = RoundConfig(num_clients=k, clients_per_round=k, client=ccfg,
                      engine=engine, map_batch_size=chunk,
                      client_devices=devices, server_lr=LR,
                      num_byzantine=k // 5)
    agg = aggregators.get(OUR_RULE[rule])()
    step = make_round_step(cfg, model.apply, agg,
                           layout_of(variables["params"]), N_PER_CLIENT)
    self.data = data
    self.state = init_server_state(cfg, variables, agg, jax.random.key(0))
    t0 = time.perf_counter()
    self.compiled = step.lower(self.state, data).compile()
    self.compile_s = time.perf_counter() - t0

  def __call__(self) -> float:
    self.state, metrics = self.compiled(self.state, self.data)
    jax.block_until_ready((self.state, metrics))
    return float(metrics["loss"])


def timed(fn) -> tuple[float, float]:
  """``(seconds, result)`` of ``fn()``, after a pause of ``SETTLE_S``."""
  time.sleep(SETTLE_S)
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def select_engine(model, variables, data, k, local_steps, reps, ndev):
  """Times every engine candidate with FedAvg; returns (best label, config, times)."""
  times, configs = {}, {}
  for engine, chunk, devices in engine_candidates(ndev):
    label = engine_label(engine, chunk, devices, ndev)
    ours = OurRound(model, variables, data, k, local_steps, "mean", engine,
                    chunk, devices)
    ours()  # warm-up
    times[label] = statistics.median(timed(ours)[0] for _ in range(reps))
    configs[label] = (engine, chunk, devices)
    print(f"    engine {label:14s} {times[label] * 1e3:9.1f} ms/round "
          f"(compile {ours.compile_s:.1f} s)", flush=True)
    del ours
  best = min(times, key=times.get)
  return best, configs[best], times
