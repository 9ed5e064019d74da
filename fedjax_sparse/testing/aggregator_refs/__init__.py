"""Numpy references of the aggregation rules (test oracles and benchmark baselines).

Each function follows the formulas of ALGORITHMS.md sections 2-4 with plain
numpy (scikit-learn for DBSCAN and k-means). The tests call them on tiny
inputs (``dtype=np.float64``, the default, for exactness); the benchmark
(benchmarks/aggregators.py) calls the same functions at scale with
``dtype=np.float32``, the precision of the jitted rules. Distances go through
Gram matrices so that K up to 100 at d = 700k fits in memory.

One module a family (:mod:`.core`, :mod:`.extra`, :mod:`.sketched`,
:mod:`.published`, :mod:`.backdoor`, :mod:`.byzfl_rules`); every reference is
importable from this package.
"""

from fedjax_sparse.testing.aggregator_refs.backdoor import (
    np_cosine_distances, np_flame, np_foolsgold, np_hdbscan, np_rlr)
from fedjax_sparse.testing.aggregator_refs.byzfl_rules import (
    np_arc, np_caf, np_mda, np_meamed, np_monna, np_smea, np_usable_sq_dists)
from fedjax_sparse.testing.aggregator_refs.core import (
    coord, np_cc, np_combine, np_krum_scores, np_median, np_rfa, np_safesparse,
    np_sign_cos, np_sq_dists, np_trimmed, np_two_means_high)
from fedjax_sparse.testing.aggregator_refs.extra import (
    np_dnc, np_flguardian_trust, np_fltrust, np_gas, np_lasa)
from fedjax_sparse.testing.aggregator_refs.published import (
    np_bulyan, np_geometric_median, np_iterated_krum, np_mean_around_median,
    np_rfa_weiszfeld)
from fedjax_sparse.testing.aggregator_refs.sketched import (
    np_fetchsgd_round, np_fmix32, np_sparsefed_round, np_topk_mask)

__all__ = [
    "coord", "np_arc", "np_bulyan", "np_caf", "np_cc", "np_combine",
    "np_cosine_distances", "np_dnc", "np_fetchsgd_round", "np_flame",
    "np_flguardian_trust", "np_fltrust", "np_fmix32", "np_foolsgold", "np_gas",
    "np_geometric_median", "np_hdbscan", "np_iterated_krum", "np_krum_scores",
    "np_lasa", "np_mda", "np_meamed", "np_mean_around_median", "np_median",
    "np_monna", "np_rfa", "np_rfa_weiszfeld", "np_rlr", "np_safesparse",
    "np_sign_cos", "np_smea", "np_sparsefed_round", "np_sq_dists",
    "np_topk_mask", "np_trimmed", "np_two_means_high", "np_usable_sq_dists",
]
