"""Sparse masks for the hybrid sparse attack (hybrid_sparse_attack.txt 3.2, App. B).

FORCE and SNIP saliency pruning with the layer-wise constraint (Alg. 4-7),
ERK and random masks, critical parameters, and per-layer density reports.
Entry point: :func:`compute_mask` (methods: :func:`names`).
"""

from fedjax_sparse.saliency.masks import (CAP_ALIASES, CRITICAL_KINDS, MaskResult,
                                          critical_mask, erk_densities, erk_mask,
                                          exact_counts, num_target, prunable_leaves,
                                          prunable_mask, random_mask, resolve_layer_caps,
                                          schedule, scheduled_caps)
from fedjax_sparse.saliency._select import layerwise_select, topk_keys
from fedjax_sparse.saliency.pruning import cross_entropy_loss, force_mask, snip_mask
from fedjax_sparse.saliency.registry import compute_mask, names, needs_data
from fedjax_sparse.saliency.report import (densities_record, plot_densities,
                                           write_densities_json)

__all__ = [
    "CAP_ALIASES", "CRITICAL_KINDS", "MaskResult", "critical_mask", "erk_densities",
    "erk_mask", "exact_counts", "num_target", "prunable_leaves", "prunable_mask",
    "random_mask", "resolve_layer_caps", "schedule", "scheduled_caps",
    "layerwise_select", "topk_keys", "cross_entropy_loss", "force_mask", "snip_mask",
    "compute_mask", "names", "needs_data", "densities_record", "plot_densities",
    "write_densities_json",
]
