"""The configuration tree: every setting declared once.

The sections (:mod:`fedjax_sparse.config.sections`) declare each field once,
with its default, its help text and its checks in the field's metadata
(:mod:`fedjax_sparse.config.fields`). The configurations the library uses
are built from those declarations:

* :class:`fedjax_sparse.simulation.config.ExperimentConfig`: the flat view of
  all sections, one field per command-line flag of ``experiments.run``
  (whose flags take their default and help from the fields);
* :class:`fedjax_sparse.simulation.round_config.RoundConfig`: what the round
  step is built from, the :class:`ClientConfig` section plus the server,
  sparsification and engine fields it needs;
* :class:`ClientConfig`: the client section itself.
"""

from fedjax_sparse.config.fields import (at_least, flat_view, help_text,
                                         one_of, option, require, validate,
                                         values, view)
from fedjax_sparse.config.parsing import parse_kwargs, parse_width
from fedjax_sparse.config.sections import (SECTIONS, AttackConfig,
                                           ClientConfig, DataConfig,
                                           FederationConfig, ModelConfig,
                                           RunConfig, ServerConfig,
                                           SparsifyConfig)

__all__ = ["SECTIONS", "AttackConfig", "ClientConfig", "DataConfig",
           "FederationConfig", "ModelConfig", "RunConfig", "ServerConfig",
           "SparsifyConfig", "at_least", "flat_view", "help_text", "one_of",
           "option", "parse_kwargs", "parse_width", "require", "validate",
           "values", "view"]
