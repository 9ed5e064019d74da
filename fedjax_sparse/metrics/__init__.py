"""Metrics of federated runs (ALGORITHMS.md section 7): accuracy, attack
success rate, detection rates, escape ratios, outsized impact factor, model
distance and communication. Pure functions of arrays (jittable where they
take arrays)."""

from fedjax_sparse.metrics.accuracy import accuracy, top_k_accuracy, top_k_correct
from fedjax_sparse.metrics.backdoor import (attack_success_rate,
                                            backdoor_attacks, backdoor_eval_set,
                                            is_backdoor)
from fedjax_sparse.metrics.communication import (bits_to_megabytes,
                                                 communication_totals,
                                                 compression_ratio,
                                                 dense_uplink_bits)
from fedjax_sparse.metrics.detection import (Detection, detection,
                                             detection_rates, flagged)
from fedjax_sparse.metrics.escape import selection_escape_ratio
from fedjax_sparse.metrics.impact import (influence, l1_distance,
                                          outsized_impact_factor)

__all__ = [
    "Detection", "backdoor_attacks", "is_backdoor", "accuracy", "attack_success_rate",
    "backdoor_eval_set", "bits_to_megabytes", "communication_totals",
    "compression_ratio", "dense_uplink_bits", "detection", "detection_rates",
    "flagged", "influence", "l1_distance", "outsized_impact_factor",
    "top_k_accuracy", "top_k_correct",
    # Escape ratios (metrics.escape); the coordinate-wise ones are computed
    # by the rules that have the order statistics.
    "selection_escape_ratio",
]
