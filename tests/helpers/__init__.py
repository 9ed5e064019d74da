"""What several test modules share, in one place (one import point; the
sections live in submodules under 400 lines each).

Import as ``from tests.helpers import ...`` (pytest puts the repository's
root on ``sys.path``: ``tests/`` and its folders are packages). Sections:

* paths and subprocesses: ``ROOT``, ``subprocess_env``;
* small runs: ``TWO_ROUND_RUN``, ``FOUR_ROUND_RUN``, ``snapshot``,
  ``run_and_resume``;
* sweeps: ``SWEEP_BASE``, ``parse_sweep_flags``;
* aggregators at fixed shapes (``AGG_K`` clients, ``AGG_D`` coordinates,
  packs of ``AGG_P``): ``agg_ctx``, ``run_rule`` (``jitted_rule``),
  ``aggregator_data``, ``coord_mask``, ``np_combine``, ``np_safesparse``;
  and ``jitted_agg``, ``assert_close``;
* the aggregator property suite (tests/aggregators/test_property_*.py): the
  claims, the inputs with outliers and the runner;
* sparsification: ``np_topk_mask``, ``np_alg2``, ``pack_ctx``;
* clustering: ``same_partition``;
* rounds: ``TinyMLP``, ``TinyBN``, ``round_data``;
* attacks: on a real layout (``ATTACK_K``, ``ATTACK_LAYOUT``, ``HSA_MASK``,
  ``attack_updates``, ``attack_malicious``, ``attack_ctx``) and the adaptive
  attacks' runner (``run_attack``, ``adaptive_ctx``, ``malicious_rows``,
  ``random_updates``, ``sparsify_batch``).

Importing this module runs JAX (PRNG keys, a model's ``init``): a module
that a subprocess imports before ``jax.distributed.initialize`` must not
import it (tests/simulation/test_scale.py).
"""


from tests.helpers.common import *  # noqa: F401,F403
from tests.helpers.properties import *  # noqa: F401,F403
from tests.helpers.rounds_attacks import *  # noqa: F401,F403
