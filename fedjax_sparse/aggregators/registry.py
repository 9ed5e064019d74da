"""Name -> aggregator factory registry (names as the papers write them).

A :class:`~fedjax_sparse.registry.Registry`; the functions below are its
methods under the names the rest of the package uses.
"""

from __future__ import annotations

from typing import Callable

from fedjax_sparse.aggregators.base import Aggregator
from fedjax_sparse.registry import Registry

# Names as the papers write them -> registry names (case-insensitive).
ALIASES = {"cm": "median", "tm": "trimmed_mean", "cc": "centered_clipping",
           "mkrum": "multi_krum", "m_krum": "multi_krum"}

RULES: Registry[Callable[..., Aggregator]] = Registry("aggregator", ALIASES)

canonical = RULES.canonical
register = RULES.register
get = RULES.get
names = RULES.names
