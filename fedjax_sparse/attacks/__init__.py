"""Data and update attacks behind one contract (see :mod:`.base`) and registries.

Update attacks (``get_update_attack(name)(**hyperparameters)``): ``gna``,
``ipm``, ``scaling``, ``boosted_update``, ``copy_boost``, ``sign_flip``,
``model_replacement``, ``alie``, ``rop``, ``mimic``, ``min_max``, ``min_sum``, ``hsa``, ``dhsa``, ``c_lasa``,
``index_poisoning``, ``targeted_pgd``, ``optimal_ipm``, ``optimal_alie``
(the attack factor searched against the deployed rule).

From flags (name and parsed arguments, mask built on the initial model):
:func:`build_update_attack`.

Data attacks (``get_data_attack(name)(num_classes, ...)``): ``label_flip``,
``pixel_backdoor``, ``dba``, ``semantic_backdoor``,
``convergence_prevention``, ``neurotoxin`` (a pixel backdoor trained by
projected gradient descent off the coordinates of the largest previous
global update), ``edge_case_backdoor`` (tail examples of a source class,
from the test split, labelled a target class).
"""

from fedjax_sparse.attacks.base import (CHOOSE_MODES, KNOWLEDGE, AttackContext,
                                        DataAttack, UpdateAttack, choose_malicious,
                                        malicious_rank, replace_malicious)
from fedjax_sparse.attacks.registry import (data_attack_names, get_data_attack,
                                            get_update_attack, is_data_attack,
                                            is_update_attack, names, register_data,
                                            register_update, update_attack_names)
from fedjax_sparse.attacks._stats import bisect_max, z_max
from fedjax_sparse.attacks.update import (MimicState, alie, boosted_update, gna, ipm,
                                          mimic, model_replacement, rop, scaling,
                                          sign_flip)
from fedjax_sparse.attacks.adaptive import copy_boost, copy_targets
from fedjax_sparse.attacks.optimized import (DEVIATIONS, OptimizedSolution, min_max,
                                             min_max_solve, min_sum, min_sum_solve)
from fedjax_sparse.attacks.hsa import (CLASA_SELECTIONS, HSA_DIRECTIONS, STABILIZERS,
                                       DHSASolution, bottomk_mask, c_lasa, dhsa,
                                       dhsa_solve, direction_sign, hsa,
                                       stabilization_threshold)
from fedjax_sparse.attacks.index_poisoning import (index_poisoning,
                                                   malicious_contributor_ratio)
from fedjax_sparse.attacks.targeted import (make_auxiliary_set, pgd_update,
                                            project_l2_ball, targeted_pgd)
from fedjax_sparse.attacks.fang import fang_krum, fang_trmean, krum_selects_crafted
from fedjax_sparse.attacks.mimicry import (MIMICRY_KNOWLEDGE, MIMICRY_VALUES,
                                           majority_sign, mask_mimicry, mimicry_mask,
                                           own_pack_masks, sign_camouflage)
from fedjax_sparse.attacks.builder import (AUX_SOURCES, MASK_OPTIONS,
                                           TARGETED_OPTIONS, TargetedAux,
                                           accepted_arguments, attack_space,
                                           build_update_attack,
                                           parse_caps, takes_mask,
                                           targeted_auxiliary_data,
                                           targeted_auxiliary_set)
from fedjax_sparse.attacks.data import (LABEL_MAPPINGS, Trigger, apply_trigger,
                                        backdoor_test_set, choose_rows,
                                        convergence_prevention, dba, dba_triggers,
                                        global_trigger, label_flip, pixel_backdoor,
                                        semantic_backdoor, square_trigger)

__all__ = [
    "AttackContext", "CHOOSE_MODES", "DataAttack", "KNOWLEDGE", "UpdateAttack",
    "choose_malicious", "malicious_rank", "replace_malicious",
    "data_attack_names", "get_data_attack", "get_update_attack", "is_data_attack",
    "is_update_attack", "names", "register_data", "register_update",
    "update_attack_names", "bisect_max", "z_max",
    "MimicState", "alie", "boosted_update", "gna", "ipm", "mimic", "model_replacement", "rop",
    "scaling", "sign_flip", "copy_boost", "copy_targets",
    "DEVIATIONS", "OptimizedSolution", "min_max", "min_max_solve", "min_sum",
    "min_sum_solve",
    "CLASA_SELECTIONS", "HSA_DIRECTIONS", "STABILIZERS", "DHSASolution",
    "bottomk_mask", "c_lasa", "dhsa", "dhsa_solve", "direction_sign", "hsa",
    "stabilization_threshold",
    "AUX_SOURCES", "MASK_OPTIONS", "TARGETED_OPTIONS", "TargetedAux",
    "accepted_arguments", "attack_space", "build_update_attack", "parse_caps", "takes_mask",
    "targeted_auxiliary_data", "targeted_auxiliary_set",
    "index_poisoning", "malicious_contributor_ratio",
    "make_auxiliary_set", "pgd_update", "project_l2_ball", "targeted_pgd",
    "fang_krum", "fang_trmean", "krum_selects_crafted",
    "MIMICRY_KNOWLEDGE", "MIMICRY_VALUES", "majority_sign", "mask_mimicry",
    "mimicry_mask", "own_pack_masks", "sign_camouflage",
    "LABEL_MAPPINGS", "Trigger", "apply_trigger", "backdoor_test_set",
    "choose_rows", "convergence_prevention", "dba", "dba_triggers",
    "global_trigger", "label_flip", "pixel_backdoor", "semantic_backdoor",
    "square_trigger",
]
from fedjax_sparse.attacks.neurotoxin import neurotoxin, neurotoxin_mask
from fedjax_sparse.attacks.optimal import optimal_alie, optimal_ipm
from fedjax_sparse.attacks.edge_case import edge_case_backdoor, edge_case_split
