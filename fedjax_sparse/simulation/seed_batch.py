"""S experiments that differ only in their seed, advanced by one compiled step.

:class:`SeedBatch` builds the stacked state and the shared data and
``vmap``s, ``lax.map``s or ``shard_map``s the round step over the seeds;
:func:`fedjax_sparse.simulation.multi_seed.run_seeds` runs it (what a seed
means, the limits and the speed are described there).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sparse import requirements
from fedjax_sparse.simulation.config import ExperimentConfig
from fedjax_sparse.simulation.evaluation import make_evaluate
from fedjax_sparse.simulation.experiment import Experiment, build_data
from fedjax_sparse.simulation.round import make_round_step
from fedjax_sparse.simulation.round_state import RoundData
from fedjax_sparse.simulation.twin import make_twin_round_step


MODES = ("auto", "vmap", "map", "shard")


def seed_mesh(num_seeds: int):
  """A 1-D mesh named ``"seeds"`` over the most local devices that divide S."""
  from jax.sharding import Mesh
  devices = jax.local_devices()
  n = max(k for k in range(1, len(devices) + 1) if num_seeds % k == 0)
  return Mesh(np.array(devices[:n]), ("seeds",))


def unbatchable_reason(cfg: ExperimentConfig) -> Optional[str]:
  """Why the seeds of ``cfg`` cannot share one step (None: they can)."""
  from fedjax_sparse import attacks as attacks_lib
  if cfg.attack != "none" and attacks_lib.is_update_attack(cfg.attack):
    from fedjax_sparse.attacks.builder import takes_mask
    if takes_mask(cfg.attack):
      return (f"--attack={cfg.attack} builds its mask from each seed's "
              "initial model, so seeds cannot share one round step")
  return None


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _same(a, b) -> bool:
  if a is None or b is None:
    return a is None and b is None
  return a.shape == b.shape and bool(jnp.array_equal(a, b))


def _check_same_aux(base: Experiment, exp: Experiment, seed: int) -> None:
  """The seeds of a targeted attack must share its auxiliary set (they do
  unless it is drawn from attackers that the seed picks)."""
  a, b = base.targeted_aux, exp.targeted_aux
  if a is None:
    return
  if not (np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)):
    raise ValueError(
        f"seed {seed} draws another auxiliary set for --attack="
        f"{exp.cfg.attack} (aux_source=train with malicious_mode="
        f"{exp.cfg.malicious_mode}): run the seeds separately")


class SeedBatch:
  """S experiments that differ only in their seed, advanced together.

  Attributes:
    cfg: the configuration (its ``seed`` only picks the data, see the module
      docstring).
    seeds: the S seeds.
    fd: the federated data all seeds share.
    base: the :class:`Experiment` of the first seed, whose data, model and
      rules every seed uses (an Experiment is built per seed only to derive
      its initial state and per-seed data).
    data: the shared :class:`RoundData` (per-seed fields stacked on axis 0).
    data_axes: the ``vmap`` ``in_axes`` of ``data``.
    mode: ``"vmap"`` (all seeds at once: one round step over S times the
      work, for accelerators with room to spare), ``"map"`` (``lax.map``
      over the seeds inside the one compiled step: no larger working set,
      only the per-call overhead is shared) or ``"shard"`` (the seed axis
      split over the local devices with ``shard_map``, each device
      ``lax.map``-ing its own seeds with the client axis kept whole: no
      traffic between devices; the mesh uses the most devices that divide
      S). ``"auto"`` (the default) picks ``"shard"`` on a CPU split into
      several host devices, ``"map"`` on a single CPU device, and
      ``"vmap"`` on accelerators (``benchmarks/scale.py`` compares them).
    mesh: the ``"seeds"`` mesh of the ``"shard"`` mode (else None).
    round_step: jitted ``(stacked_state, data) -> (stacked_state, metrics)``
      with the state donated; every metric has a leading seed axis.
    evaluate: jitted ``(params, model_state, x, y) -> dict`` over stacked
      params (each value ``f32[S]``).
  """

  def __init__(self, cfg: ExperimentConfig, seeds: Sequence[int], fd=None,
               mode: str = "auto"):
    if mode not in MODES:
      raise ValueError(f"unknown mode {mode!r}; choose one of "
                       f"{', '.join(MODES)}")
    if mode == "auto":
      if jax.default_backend() != "cpu":
        mode = "vmap"
      else:
        mode = "shard" if len(jax.local_devices()) > 1 else "map"
    seeds = [int(s) for s in seeds]
    if not seeds:
      raise ValueError("run_seeds needs at least one seed")
    if len(set(seeds)) != len(seeds):
      raise ValueError(f"seeds must be distinct, got {seeds}")
    reason = unbatchable_reason(cfg)
    if reason and len(seeds) > 1:
      raise ValueError(f"{reason}; run the seeds separately "
                       "(experiments.run) instead")
    cfg.validate(check_data=fd is None)
    self.cfg = cfg
    self.seeds = seeds
    fd = fd if fd is not None else build_data(cfg)
    self.fd = fd
    states, datas = [], []
    base = None
    for s in seeds:
      exp = Experiment(dataclasses.replace(cfg, seed=s), fd=fd)
      states.append(exp.init_state())
      if base is None:
        base = exp
        datas.append(exp.data)
      else:
        _check_same_aux(base, exp, s)
        # Only the fields that differ from the first seed's are kept.
        datas.append(RoundData(*(None if _same(a, b) else a
                                 for a, b in zip(exp.data, base.data))))
    self.base = base
    self.state0 = _stack(states)
    fields, axes = [], []
    for i, shared in enumerate(base.data):
      per_seed = [d[i] for d in datas[1:]]
      if any(p is not None for p in per_seed):
        fields.append(jnp.stack([shared] + [base.data[i] if p is None else p
                                            for p in per_seed]))
        axes.append(0)
      else:
        fields.append(shared)
        axes.append(None)
    self.data = RoundData(*fields)
    self.data_axes = RoundData(*axes)
    round_config = base.round_config
    if mode == "shard":
      # Each device runs whole seeds: the client axis stays on one device.
      round_config = dataclasses.replace(round_config, client_devices=1)
    make_step = make_twin_round_step if cfg.twin else make_round_step
    step = make_step(
        round_config, base.model.apply, base.aggregator, base.layout,
        n_max=fd.clients.idx.shape[1], has_model_state=base.has_model_state,
        update_attack=base.update_attack, data_attack=base.data_attack,
        server_size=(len(fd.y_val) if requirements.SERVER_DATA
                     in requirements.aggregator_needs(cfg.aggregator)
                     else 0), jit=False)
    axes = self.data_axes

    def mapped(state, data):
      per_seed = [a if ax == 0 else None for a, ax in zip(data, axes)]

      def one(xs):
        st, own = xs
        return step(st, RoundData(*(o if ax == 0 else a for a, o, ax
                                    in zip(data, own, axes))))

      return jax.lax.map(one, (state, per_seed))

    self.mesh = None
    if mode == "vmap":
      batched = jax.vmap(step, in_axes=(0, self.data_axes))
    elif mode == "map":
      batched = mapped
    else:
      from jax.sharding import NamedSharding
      from jax.sharding import PartitionSpec as P
      self.mesh = mesh = seed_mesh(len(seeds))
      data_specs = RoundData(*(
          None if f is None else jax.tree.map(
              lambda _, ax=ax: P("seeds") if ax == 0 else P(), f)
          for f, ax in zip(self.data, axes)))
      batched = jax.shard_map(mapped, mesh=mesh,
                              in_specs=(P("seeds"), data_specs),
                              out_specs=P("seeds"), check_vma=False)
      self.state0 = jax.device_put(self.state0,
                                   NamedSharding(mesh, P("seeds")))
      self.data = jax.device_put(self.data, jax.tree.map(
          lambda spec: NamedSharding(mesh, spec), data_specs))
    self.mode = mode
    self.round_step = jax.jit(batched, donate_argnums=0)
    self.evaluate = jax.jit(jax.vmap(
        make_evaluate(base.model.apply, cfg.eval_batch_size, jit=False),
        in_axes=(0, 0, None, None)))

  @property
  def num_seeds(self) -> int:
    return len(self.seeds)

  def init_state(self):
    """A fresh stacked state (the round step donates the one it is given)."""
    return jax.tree.map(lambda a: jnp.array(a, copy=True), self.state0)

  def eval_state(self, state, x=None, y=None) -> list[dict]:
    """Test metrics of every seed (or on ``x, y``)."""
    x = self.base.x_test if x is None else x
    y = self.base.y_test if y is None else y
    out = jax.device_get(self.evaluate(state.params, state.model_state, x, y))
    return [{k: float(v[i]) for k, v in out.items()}
            for i in range(self.num_seeds)]
