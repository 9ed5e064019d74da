"""Sparsified communication: pack top-k, accounting, SparseFed, count sketch.

* :mod:`.topk`: pack-level and scalar top-k (FLARE IV-C), exact and fast on CPU.
* :mod:`.comm`: uplink/downlink bits per client and per round.
* :mod:`.sparsefed`: SparseFed (sparsefed.txt Alg. 1/5), aggregator ``"sparsefed"``.
* :mod:`.sketch`: count sketch and FetchSGD (Alg. 10), aggregator ``"fetchsgd"``.

FLARE's sparse aggregation (Alg. 2) itself is
:func:`fedjax_sparse.aggregators.combine` with masks.
"""

from fedjax_sparse.sparsify.topk import (TOPK_METHODS, check_k, check_topk_config,
                                         num_kept, num_packs, pack_scores, pack_topk,
                                         pack_topk_batch, pack_topk_numpy, scalar_topk,
                                         topk_by_magnitude, topk_mask)
from fedjax_sparse.sparsify.comm import (RoundComm, dense_bits, round_comm, sketch_bits,
                                         sparse_bits, sparse_uplink_bits, topk_bits,
                                         uplink_bits_from_masks)
from fedjax_sparse.sparsify._common import clip_by_l2_norm, resolve_k
from fedjax_sparse.sparsify.sparsefed import SparseFedState, sparsefed
from fedjax_sparse.sparsify.sketch import (FETCHSGD_MODES, CountSketch, FetchSGDState,
                                           fetchsgd, fetchsgd_round_comm)

__all__ = [
    "TOPK_METHODS", "check_k", "check_topk_config", "num_kept", "num_packs",
    "pack_scores", "pack_topk", "pack_topk_batch", "pack_topk_numpy", "scalar_topk",
    "topk_by_magnitude", "topk_mask",
    "RoundComm", "dense_bits", "round_comm", "sketch_bits", "sparse_bits",
    "sparse_uplink_bits", "topk_bits", "uplink_bits_from_masks",
    "SparseFedState", "clip_by_l2_norm", "resolve_k", "sparsefed",
    "FETCHSGD_MODES", "CountSketch", "FetchSGDState", "fetchsgd", "fetchsgd_round_comm",
]
