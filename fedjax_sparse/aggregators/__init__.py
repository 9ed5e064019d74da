"""Aggregation rules behind one contract (see :mod:`.base`) and a registry."""

from fedjax_sparse.aggregators.base import AggContext, AggOut, Aggregator, combine, expand_pack_mask
from fedjax_sparse.aggregators.registry import get, names, register
from fedjax_sparse.aggregators import fedavg as _fedavg  # registers fedavg, nwfedavg

__all__ = ["AggContext", "AggOut", "Aggregator", "combine", "expand_pack_mask",
           "get", "names", "register"]
