"""Partitioning of a labelled training set among ``C`` clients.

A partition never copies the data: client ``i`` is the row ``idx[i, :counts[i]]``
of a padded index table ``i32[C, n_max]`` into the dataset (see "Data at
scale" in DESIGN.md). Every sample belongs to exactly one client, and every
client holds at least one sample, unless ``allow_empty=True``: then a
population larger than the dataset (cross-device scale, e.g. 100,000 clients
over FashionMNIST's 60,000 samples) is allowed and some clients hold nothing.

Methods (names as the federated-learning literature uses them):

* ``"iid"``: a random permutation cut as evenly as possible.
* ``"dirichlet"``: per-class Dirichlet(alpha) proportions over clients
  (Yurochkin et al., 2019; Hsu et al., 2019, "Measuring the effects of
  non-identical data distribution"): small alpha -> strong label skew.
* ``"shards"``: sort by label, cut into ``C * s`` shards, ``s`` per client
  (McMahan et al., 2017, "Communication-efficient learning", section 3).
* ``"one_class"``: every client holds samples of a single class.

All methods are vectorised numpy (no Python loop over clients), deterministic
given ``seed``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from fedjax_sparse.data.client_index import ClientIndex, from_assignment

METHODS = ("iid", "dirichlet", "shards", "one_class")

# Redraws of the Dirichlet proportions before falling back to topping up.
_DIRICHLET_DRAWS = 10


def _classes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Returns (class id in [0, K) of every sample, size of each class)."""
  _, inv, sizes = np.unique(labels, return_inverse=True, return_counts=True)
  return inv.reshape(-1).astype(np.int64), sizes.astype(np.int64)


def _rank_within(group: np.ndarray, num_groups: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Random order within groups: (sample ids grouped, rank of each there)."""
  perm = rng.permutation(len(group))
  order = perm[np.argsort(group[perm], kind="stable")]
  sizes = np.bincount(group, minlength=num_groups)
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  rank = np.arange(len(group)) - starts[group[order]]
  return order, rank


def iid(labels: np.ndarray, num_clients: int, *, seed: int = 0,
        allow_empty: bool = False) -> ClientIndex:
  """IID split: a random permutation cut into nearly equal parts.

  Client sizes differ by at most one.

  Args:
    labels: ``int[N]`` (only its length is used).
    num_clients: ``C <= N`` (any ``C`` with ``allow_empty``: beyond ``N``,
      ``C - N`` clients are empty).
    seed: seed of the permutation.
    allow_empty: allow ``C > N``.

  Returns:
    The :class:`ClientIndex`.
  """
  n = len(labels)
  _check_sizes(n, num_clients, allow_empty)
  perm = np.random.default_rng(seed).permutation(n)
  client_of = np.empty(n, dtype=np.int64)
  client_of[perm] = np.arange(n) % num_clients
  return from_assignment(client_of, num_clients)


def dirichlet(labels: np.ndarray,
              num_clients: int,
              *,
              alpha: float = 1.0,
              min_samples: int = 10,
              seed: int = 0,
              allow_empty: bool = False) -> ClientIndex:
  """Label-skewed split with per-class Dirichlet proportions.

  For each class ``k``, proportions ``p_k ~ Dir(alpha * 1_C)`` over clients
  are drawn and the class's samples are dealt to clients by a multinomial draw
  with those proportions (Hsu et al., 2019). Small ``alpha`` concentrates each
  class on few clients; large ``alpha`` approaches IID.

  Minimum size: as in the usual recipe the whole draw is repeated (up to 10
  times) while some client holds fewer than ``min_samples`` samples. If the
  last draw still leaves clients short, they are topped up: the missing
  samples are drawn uniformly at random, without replacement, from the
  surplus of the other clients (their samples beyond their first
  ``min_samples``, in random order), so donors keep at least ``min_samples``.
  This always terminates and changes only as many samples as are missing.

  Args:
    labels: ``int[N]`` class labels.
    num_clients: ``C``.
    alpha: Dirichlet concentration, > 0.
    min_samples: least number of samples per client, with
      ``min_samples * C <= N``.
    seed: seed of the draws.
    allow_empty: let clients hold nothing: ``C > N`` is allowed and
      ``min_samples=0`` means no minimum (without it, every client gets at
      least one sample). At cross-device scale (``C`` near or above ``N``)
      most clients hold a handful of samples and ``n_max`` stays small.

  Returns:
    The :class:`ClientIndex`.
  """
  if not alpha > 0:
    raise ValueError(f"dirichlet partition needs alpha > 0, got {alpha}")
  n = len(labels)
  _check_sizes(n, num_clients, allow_empty)
  if min_samples < 0:
    raise ValueError(f"min_samples must be >= 0, got {min_samples}")
  if min_samples * num_clients > n:
    raise ValueError(
        f"min_samples={min_samples} for each of {num_clients} clients needs "
        f"{min_samples * num_clients} samples but there are only {n}; lower "
        "min_samples or num_clients")
  rng = np.random.default_rng(seed)
  cls, sizes = _classes(np.asarray(labels))
  order, _ = _rank_within(cls, len(sizes), rng)
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  need = min_samples if allow_empty else max(min_samples, 1)
  concentration = np.full(num_clients, float(alpha))
  for _ in range(_DIRICHLET_DRAWS):
    p = rng.dirichlet(concentration, size=len(sizes))
    # Tiny alpha can underflow a whole row to 0; such a class goes uniform.
    p = np.where(np.isfinite(p), p, 0.0)
    bad = p.sum(axis=1) <= 0
    p[bad] = 1.0 / num_clients
    p /= p.sum(axis=1, keepdims=True)
    # deal[k, i]: samples of class k given to client i.
    deal = rng.multinomial(sizes, p)
    counts = deal.sum(axis=0)
    if counts.min() >= need:
      break
  # Client of the r-th (shuffled) sample of class k: cumulative deal of row k.
  bounds = np.cumsum(deal, axis=1)  # [K, C]
  client_of_sorted = np.empty(n, dtype=np.int64)
  for k in range(len(sizes)):  # Loop over classes, vectorised over clients.
    seg = slice(starts[k], starts[k] + sizes[k])
    client_of_sorted[seg] = np.searchsorted(
        bounds[k], np.arange(sizes[k]), side="right")
  client_of = np.empty(n, dtype=np.int64)
  client_of[order] = client_of_sorted
  client_of = _top_up(client_of, num_clients, need, rng)
  return from_assignment(client_of, num_clients)


def _top_up(client_of: np.ndarray, num_clients: int, need: int,
            rng: np.random.Generator) -> np.ndarray:
  """Moves random surplus samples to clients with fewer than ``need``."""
  counts = np.bincount(client_of, minlength=num_clients)
  deficit = np.maximum(need - counts, 0)
  total = int(deficit.sum())
  if total == 0:
    return client_of
  order, rank = _rank_within(client_of, num_clients, rng)
  surplus = order[rank >= need]
  take = rng.choice(surplus, size=total, replace=False)
  client_of = client_of.copy()
  client_of[take] = np.repeat(np.arange(num_clients), deficit)
  return client_of


def _allocate(total: int, sizes: np.ndarray) -> np.ndarray:
  """Splits ``total`` parts among groups proportionally to ``sizes``.

  Largest-remainder apportionment with ``1 <= parts[k] <= sizes[k]``.
  Needs ``len(sizes) <= total <= sizes.sum()``. Loops run at most
  ``len(sizes)`` times.
  """
  quota = total * sizes / sizes.sum()
  parts = np.clip(np.floor(quota).astype(np.int64), 1, sizes)
  rem = quota - parts
  while parts.sum() < total:
    room = np.where(parts < sizes, rem, -np.inf)
    k = int(np.argmax(room))
    parts[k] += 1
    rem[k] -= 1
  while parts.sum() > total:
    room = np.where(parts > 1, rem, np.inf)
    k = int(np.argmin(room))
    parts[k] -= 1
    rem[k] += 1
  return parts


def _class_aligned_shards(labels: np.ndarray, num_shards: int,
                          rng: np.random.Generator) -> np.ndarray:
  """Shard of every sample, each shard inside one class.

  Classes get shards in proportion to their size (at least one each); a
  class's shuffled samples are cut into its shards as evenly as possible.
  """
  cls, sizes = _classes(labels)
  order, rank = _rank_within(cls, len(sizes), rng)
  per_class = _allocate(num_shards, sizes)
  first = np.concatenate([[0], np.cumsum(per_class)[:-1]])
  c = cls[order]
  shard_sorted = first[c] + rank * per_class[c] // sizes[c]
  shard = np.empty(len(labels), dtype=np.int64)
  shard[order] = shard_sorted
  return shard


def shards(labels: np.ndarray,
           num_clients: int,
           *,
           shards_per_client: int = 2,
           seed: int = 0) -> ClientIndex:
  """Pathological non-IID split (McMahan et al., 2017, section 3).

  Samples are sorted by label and cut into ``S = C * s`` shards; each client
  receives ``s`` shards at random. Unlike McMahan et al., who cut the sorted
  list into equal pieces that may straddle two classes, shards here never
  straddle classes when ``S >= K`` (the number of classes present): each
  class is cut into a number of shards proportional to its size, so a client
  holds at most ``s`` classes. When ``S < K`` that is impossible and the
  sorted list is cut into ``S`` equal contiguous pieces instead.

  Args:
    labels: ``int[N]`` class labels.
    num_clients: ``C``.
    shards_per_client: ``s >= 1``, with ``C * s <= N``.
    seed: seed of the within-class order and of the dealing.

  Returns:
    The :class:`ClientIndex`.
  """
  labels = np.asarray(labels)
  n = len(labels)
  _check_sizes(n, num_clients)
  if shards_per_client < 1:
    raise ValueError(
        f"shards_per_client must be >= 1, got {shards_per_client}")
  num_shards = num_clients * shards_per_client
  if num_shards > n:
    raise ValueError(
        f"{num_clients} clients x {shards_per_client} shards = {num_shards} "
        f"shards but only {n} samples; lower num_clients or "
        "shards_per_client")
  rng = np.random.default_rng(seed)
  num_classes = len(np.unique(labels))
  if num_shards >= num_classes:
    shard = _class_aligned_shards(labels, num_shards, rng)
  else:
    perm = rng.permutation(n)
    order = perm[np.argsort(labels[perm], kind="stable")]
    shard = np.empty(n, dtype=np.int64)
    shard[order] = np.arange(n) * num_shards // n
  client_of_shard = rng.permutation(num_shards) // shards_per_client
  return from_assignment(client_of_shard[shard], num_clients)


def one_class(labels: np.ndarray, num_clients: int, *,
              seed: int = 0, allow_empty: bool = False) -> ClientIndex:
  """Every client holds samples of exactly one class.

  Each class gets a number of clients proportional to its size (at least
  one, largest-remainder rounding); the clients of a class split its
  shuffled samples as evenly as possible. Client ids are shuffled, so they do
  not follow the classes. Vectorised: 100,000 clients take well under a
  second.

  With ``allow_empty`` and ``C > N``, ``N`` clients (chosen at random) hold
  one sample each and the other ``C - N`` hold none.

  Args:
    labels: ``int[N]`` class labels.
    num_clients: ``C``, with ``K <= C <= N`` (``K``: classes present; any
      ``C >= K`` with ``allow_empty``).
    seed: seed of the within-class order and of the client ids.
    allow_empty: allow ``C > N``.

  Returns:
    The :class:`ClientIndex`.
  """
  labels = np.asarray(labels)
  n = len(labels)
  _check_sizes(n, num_clients, allow_empty)
  num_classes = len(np.unique(labels))
  if num_clients < num_classes:
    raise ValueError(
        f"one_class partition needs at least one client per class: "
        f"{num_classes} classes but num_clients={num_clients}; raise "
        "num_clients or use method 'shards'")
  rng = np.random.default_rng(seed)
  shard = _class_aligned_shards(labels, min(num_clients, n), rng)
  return from_assignment(rng.permutation(num_clients)[shard], num_clients)


def _check_sizes(n: int, num_clients: int, allow_empty: bool = False) -> None:
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}")
  if num_clients > n and not allow_empty:
    raise ValueError(f"num_clients={num_clients} exceeds the number of "
                     f"samples ({n}); every client needs at least one "
                     "(or pass allow_empty=True for clients without data)")


_METHODS: dict[str, Callable[..., ClientIndex]] = {
    "iid": lambda y, c, alpha, s, m, seed, e: iid(y, c, seed=seed,
                                                   allow_empty=e),
    "dirichlet": lambda y, c, alpha, s, m, seed, e: dirichlet(
        y, c, alpha=alpha, min_samples=m, seed=seed, allow_empty=e),
    "shards": lambda y, c, alpha, s, m, seed, e: shards(
        y, c, shards_per_client=s, seed=seed),
    "one_class": lambda y, c, alpha, s, m, seed, e: one_class(
        y, c, seed=seed, allow_empty=e),
}


def partition(labels: np.ndarray,
              num_clients: int,
              method: str = "iid",
              *,
              alpha: float = 1.0,
              shards_per_client: int = 2,
              min_samples: int = 10,
              seed: int = 0,
              allow_empty: bool = False) -> ClientIndex:
  """Partitions samples among clients.

  Args:
    labels: ``int[N]`` class labels of the training set.
    num_clients: ``C``, with ``1 <= C <= N``.
    method: ``"iid"``, ``"dirichlet"``, ``"shards"`` or ``"one_class"``.
    alpha: Dirichlet concentration (``"dirichlet"`` only), > 0.
    shards_per_client: shards per client (``"shards"`` only).
    min_samples: least samples per client (``"dirichlet"`` only; the other
      methods give every client at least ``N // C``, ``s`` or 1 samples).
    seed: seed; the same seed gives the same partition.
    allow_empty: let clients hold no sample (``"iid"``, ``"dirichlet"``,
      ``"one_class"``): populations larger than the dataset, and
      ``min_samples=0`` meaning no minimum for ``"dirichlet"``. Empty clients
      train on nothing, send a zero update and weigh 0 in weighted
      aggregation.

  Returns:
    The :class:`ClientIndex`.

  Raises:
    ValueError: unknown method (the message lists the known ones) or
      impossible sizes (the message says what to change).
  """
  if method not in _METHODS:
    raise ValueError(f"unknown partition method {method!r}; known methods: "
                     f"{', '.join(METHODS)}")
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers, got {labels.dtype}")
  return _METHODS[method](labels, int(num_clients), alpha, int(shards_per_client),
                          int(min_samples), seed, bool(allow_empty))
