"""ByzFL (EPFL; ``pip install byzfl``), an independent implementation of the
common robust rules and attacks in numpy/torch, used as an oracle by the
tests and as a peer by ``benchmarks/aggregators.py``.

ByzFL 0.0.11's package ``__init__`` also imports its training benchmark,
which needs torchvision; the aggregators and attacks need only numpy, scipy
and torch. :func:`load` therefore imports ``byzfl.aggregators`` and
``byzfl.attacks`` without running the package ``__init__`` when torchvision
is missing, so ByzFL works beside a CPU-only torch:

  pip install torch==2.13.0 scipy && pip install --no-deps byzfl==0.0.11
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Optional


def load() -> Optional[types.SimpleNamespace]:
  """ByzFL's aggregators and attacks as one namespace, or ``None`` when ByzFL
  (or torch, scipy) is not installed."""
  try:
    spec = importlib.util.find_spec("byzfl")
  except (ImportError, ValueError):
    return None
  if spec is None or spec.submodule_search_locations is None:
    return None
  if "byzfl" not in sys.modules:
    try:
      importlib.import_module("byzfl")
    except ImportError:
      # The package __init__ failed (torchvision): a bare package object
      # lets its submodules import.
      for name in [m for m in sys.modules if m == "byzfl"
                   or m.startswith("byzfl.")]:
        del sys.modules[name]
      pkg = types.ModuleType("byzfl")
      pkg.__path__ = list(spec.submodule_search_locations)
      pkg.__spec__ = spec
      sys.modules["byzfl"] = pkg
  try:
    aggregators = importlib.import_module("byzfl.aggregators")
    attacks = importlib.import_module("byzfl.attacks")
  except ImportError:
    return None
  names = {n: getattr(m, n) for m in (aggregators, attacks)
           for n in dir(m) if n[:1].isupper()}
  version = None
  try:
    from importlib import metadata
    version = metadata.version("byzfl")
  except Exception:  # noqa: BLE001 -- the version is informative only
    pass
  return types.SimpleNamespace(version=version, **names)
