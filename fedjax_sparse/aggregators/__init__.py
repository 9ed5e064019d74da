"""Aggregation rules behind one contract (see :mod:`.base`) and a registry."""

from fedjax_sparse.aggregators.base import (AggContext, AggOut, Aggregator, combine,
                                           expand_pack_mask, stateless)
from fedjax_sparse.aggregators.registry import get, names, register
from fedjax_sparse.aggregators.pre_registry import compose, get_pre, pre_names, register_pre
from fedjax_sparse.aggregators import fedavg as _fedavg  # registers fedavg, nwfedavg
from fedjax_sparse.aggregators import clipping as _clipping  # registers clipping; pre: clip
from fedjax_sparse.aggregators import fednova as _fednova  # registers fednova
from fedjax_sparse.aggregators import median as _median  # registers median
from fedjax_sparse.aggregators import trimmed_mean as _trimmed_mean  # registers trimmed_mean
from fedjax_sparse.aggregators import krum as _krum  # registers krum, multi_krum
from fedjax_sparse.aggregators import bulyan as _bulyan  # registers bulyan, bulyan_fast
from fedjax_sparse.aggregators import rfa as _rfa  # registers rfa
from fedjax_sparse.aggregators import centered_clipping as _cc  # registers centered_clipping
from fedjax_sparse.aggregators import signsgd as _signsgd  # registers signsgd
from fedjax_sparse.aggregators import fedsign as _fedsign  # registers fedsign
from fedjax_sparse.aggregators import robust_dpfl as _robust_dpfl  # registers robust_dpfl
from fedjax_sparse.aggregators import safesparse as _safesparse  # registers safesparse
from fedjax_sparse.aggregators import gas as _gas  # registers gas
from fedjax_sparse.aggregators import dnc as _dnc  # registers dnc
from fedjax_sparse.aggregators import fltrust as _fltrust  # registers fltrust
from fedjax_sparse.aggregators import lasa as _lasa  # registers lasa
from fedjax_sparse.aggregators import flguardian as _flguardian  # registers flguardian
from fedjax_sparse.aggregators import class_aware_masking as _cam  # registers class_aware_masking
from fedjax_sparse.aggregators import bucketing as _bucketing  # pre-registers bucketing
from fedjax_sparse.aggregators import nnm as _nnm  # pre-registers nnm
from fedjax_sparse.aggregators import sparsefed as _sparsefed  # registers sparsefed
from fedjax_sparse.aggregators import fetchsgd as _fetchsgd  # registers fetchsgd
from fedjax_sparse.aggregators import flame as _flame  # registers flame
from fedjax_sparse.aggregators import foolsgold as _foolsgold  # registers foolsgold
from fedjax_sparse.aggregators import rlr as _rlr  # registers rlr
from fedjax_sparse.aggregators import mda as _mda  # registers mda
from fedjax_sparse.aggregators import monna as _monna  # registers monna
from fedjax_sparse.aggregators import meamed as _meamed  # registers meamed
from fedjax_sparse.aggregators import caf as _caf  # registers caf
from fedjax_sparse.aggregators import smea as _smea  # registers smea
from fedjax_sparse.aggregators import arc as _arc  # pre-registers arc
from fedjax_sparse.aggregators import signguard as _signguard  # registers signguard
from fedjax_sparse.aggregators import crfl as _crfl  # registers crfl

__all__ = ["AggContext", "AggOut", "Aggregator", "combine", "compose",
           "expand_pack_mask", "get", "get_pre", "names", "pre_names",
           "register", "register_pre", "stateless"]
