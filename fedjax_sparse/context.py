"""The typed round context that rules and attacks receive (issue #14).

One :class:`RoundContext` carries everything an aggregator or an attack may
know besides the updates: the round, the global model, and the side inputs
that some rules and attacks need, each as a typed field that is ``None``
when the caller does not provide it (in the spirit of optax's
``GradientTransformationExtraArgs``: side inputs are named, not looked up in
an untyped dict). :class:`~fedjax_sparse.aggregators.AggContext` and
:class:`~fedjax_sparse.attacks.AttackContext` are this class under the
names the two contracts use::

  ctx = RoundContext(round=jnp.int32(3), clients=ids, lr=jnp.float32(0.1),
                     num_byzantine=2, num_clients=10)
  out, state = agg.apply(state, updates, masks, weights, key, ctx)

The round step (:mod:`fedjax_sparse.simulation.round`) fills every field it
has; a rule or attack that needs one checks that it is not ``None`` and
says which field is missing otherwise. Which run-level resources a factory
needs (server data, the model, ...) is declared separately, in
:mod:`fedjax_sparse.requirements`.

Traced fields (pytree leaves; jit-compatible):

* ``round``: int32 scalar, the current round (0-based).
* ``global_params``: ``f32[d]``, the flat global model before this round's
  update.
* ``client_model_state``: the sampled clients' non-parameter collections
  after local training (e.g. BatchNorm statistics), each leaf with a leading
  ``[K]`` axis; None for models without them.
* ``prev_aggregate``: ``f32[d]``, last round's aggregated update (zeros at
  the start; ROP and Neurotoxin build on it).
* ``weights``: ``f32[K]``, the aggregation weights of the sampled clients
  (update attacks that simulate the rule).
* ``clients``: ``int32[K]``, the sampled client ids, to index per-client
  state (FoolsGold's histories, class-aware masking's masks).
* ``malicious``: ``bool[K]``, which sampled clients are malicious. Ground
  truth, for diagnostics only (the escape ratios of
  :mod:`fedjax_sparse.metrics.escape`): no rule may use it to decide.
* ``lr``: f32 scalar, the round's server learning rate after any decay
  (adaptive clipping of SparseFed, FetchSGD and ``clip``).
* ``local_steps``: ``f32[K]``, the local steps each client ran (FedNova).
* ``server_update``: ``f32[d]``, the server's own update on its root data
  set (FLTrust; provided when the run has server data).
* ``client_rank``: int32 scalar, a malicious client's index among the
  malicious set (-1 if benign), given to data attacks per client (DBA picks
  its trigger by it).
* ``targeted_update``: ``f32[d]``, a precomputed targeted update for
  the targeted PGD attack built without a loss function.
* ``agg_state``: the deployed rule's state (update attacks that run the
  rule inside their search).

Static fields (part of the jit cache key):

* ``layout``: the :class:`~fedjax_sparse.layout.Layout` of the flat vectors
  (layer-wise rules and attacks), or None.
* ``pack_size``: parameters per pack of the sparsifier (1 for dense uploads).
* ``num_byzantine``: ``f``, the number of attackers a rule such as Krum is
  told to tolerate.
* ``num_clients``: K, the number of updates of the round.
* ``finite_uploads``: True when the caller has screened every row holding
  inf/nan (the round step with ``nonfinite="reject"``); the weighted means
  then skip their own check (see
  :func:`~fedjax_sparse.aggregators.base.combine_finite`).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional

import flax.struct
import jax

from fedjax_sparse.layout import Layout

Array = jax.Array
PyTree = Any

# The side inputs, by field name. Before issue #14 they travelled as keys of
# an untyped ``extra`` dict with these names.
SIDE_INPUTS = ("clients", "malicious", "lr", "local_steps", "server_update",
               "client_rank", "targeted_update", "agg_state")


@flax.struct.dataclass
class RoundContext:
  """Everything a rule or an attack may know besides the updates.

  See the module docstring for each field. Every field but ``round`` is
  keyword-only.

  ``extra`` (deprecated, init-only) maps the keys of the untyped dict of
  earlier versions onto the typed fields (``extra={"lr": lr}`` is
  ``lr=lr``) and raises on any other key; it is not stored (``ctx.extra``
  is always None).
  """

  round: Array = 0
  _: dataclasses.KW_ONLY
  global_params: Optional[Array] = None
  client_model_state: Optional[PyTree] = None
  prev_aggregate: Optional[Array] = None
  weights: Optional[Array] = None
  clients: Optional[Array] = None
  malicious: Optional[Array] = None
  lr: Optional[Array] = None
  local_steps: Optional[Array] = None
  server_update: Optional[Array] = None
  client_rank: Optional[Array] = None
  targeted_update: Optional[Array] = None
  agg_state: Optional[PyTree] = None
  extra: dataclasses.InitVar[Optional[dict]] = None
  layout: Optional[Layout] = flax.struct.field(pytree_node=False, default=None)
  pack_size: int = flax.struct.field(pytree_node=False, default=1)
  num_byzantine: int = flax.struct.field(pytree_node=False, default=0)
  num_clients: int = flax.struct.field(pytree_node=False, default=0)
  finite_uploads: bool = flax.struct.field(pytree_node=False, default=False)

  def __post_init__(self, extra):
    if not extra:
      return
    unknown = sorted(set(extra) - set(SIDE_INPUTS))
    if unknown:
      raise TypeError(f"RoundContext: unknown extra key(s) {unknown}; the "
                      f"side inputs are the fields {', '.join(SIDE_INPUTS)}")
    both = sorted(k for k in extra if getattr(self, k) is not None)
    if both:
      raise TypeError(f"RoundContext: {both} given both as fields and in "
                      "extra")
    warnings.warn("RoundContext(extra={...}) is deprecated: pass the side "
                  f"inputs as fields ({', '.join(sorted(extra))}=...)",
                  DeprecationWarning, stacklevel=3)
    for k, v in extra.items():
      object.__setattr__(self, k, v)

