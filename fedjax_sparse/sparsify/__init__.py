"""Sparsification primitives: pack top-k, count sketch, accounting.

* :mod:`.topk`: pack-level and scalar top-k (FLARE IV-C), exact and fast on CPU.
* :mod:`.sketch`: the count sketch (FetchSGD's uploads).
* :mod:`.comm`: uplink/downlink bits per client and per round.
* :func:`resolve_k`: the ``k`` of a global top-k, absolute or a fraction of d.

The aggregators built on them live in :mod:`fedjax_sparse.aggregators`:
SparseFed (``"sparsefed"``, :mod:`fedjax_sparse.aggregators.sparsefed`),
FetchSGD (``"fetchsgd"``, :mod:`fedjax_sparse.aggregators.fetchsgd`) and
FLARE's sparse aggregation (Alg. 2), :func:`fedjax_sparse.aggregators.combine`
with masks. Nothing here imports :mod:`fedjax_sparse.aggregators`.
"""

from fedjax_sparse.sparsify.topk import (TOPK_METHODS, check_k, check_topk_config,
                                         num_kept, num_packs, pack_scores, pack_topk,
                                         pack_topk_batch, pack_topk_numpy, scalar_topk,
                                         topk_by_magnitude, topk_mask)
from fedjax_sparse.sparsify.comm import (RoundComm, dense_bits, fetchsgd_round_comm,
                                         round_comm, sketch_bits, sparse_bits,
                                         sparse_uplink_bits, topk_bits,
                                         uplink_bits_from_masks)
from fedjax_sparse.sparsify._common import check_k_spec, resolve_k
from fedjax_sparse.sparsify.sketch import CountSketch, check_sketch_config

__all__ = [
    "TOPK_METHODS", "check_k", "check_topk_config", "num_kept", "num_packs",
    "pack_scores", "pack_topk", "pack_topk_batch", "pack_topk_numpy", "scalar_topk",
    "topk_by_magnitude", "topk_mask",
    "RoundComm", "dense_bits", "fetchsgd_round_comm", "round_comm", "sketch_bits",
    "sparse_bits", "sparse_uplink_bits", "topk_bits", "uplink_bits_from_masks",
    "check_k_spec", "resolve_k",
    "CountSketch", "check_sketch_config",
]
