"""Settings given on the command line that the configuration does not use.

A flag that has no effect in the chosen configuration is almost always a
mistake (``--topk_ratio=0.1`` without ``--sparsify=topk`` runs dense uploads
to the end). The binaries pass the names of the flags the user gave
(``FLAGS[name].present``, flagfiles included) to :func:`ineffective`:

* the sparsification settings without ``--sparsify=topk`` are errors: they
  change what is uploaded, and a run without them answers another question;
* the rest are warnings: a flagfile written for one partition or optimizer
  is often reused with another on the command line (``flare_sweep.flags``
  sets ``--alpha``; its IID run adds ``--partition=iid``).
"""

from __future__ import annotations

from typing import Callable, Iterable

# (flag, the field that decides whether it is used, is it used given that
# field's value, what makes it used).
_Rule = tuple[str, str, Callable[[object], bool], str]

ERRORS: tuple[_Rule, ...] = (
    ("topk_ratio", "sparsify", lambda v: v == "topk", "--sparsify=topk"),
    ("pack_size", "sparsify", lambda v: v == "topk", "--sparsify=topk"),
)

WARNINGS: tuple[_Rule, ...] = (
    ("alpha", "partition", lambda v: v == "dirichlet",
     "--partition=dirichlet"),
    ("min_samples", "partition", lambda v: v == "dirichlet",
     "--partition=dirichlet"),
    ("shards_per_client", "partition", lambda v: v == "shards",
     "--partition=shards"),
    ("lr_decay_factor", "lr_decay_at", lambda v: v > 0, "--lr_decay_at > 0"),
    ("server_momentum", "server_optimizer", lambda v: v == "momentum",
     "--server_optimizer=momentum"),
    ("map_batch_size", "engine", lambda v: v == "map", "--engine=map"),
    ("attack_args", "attack", lambda v: v != "none", "an --attack"),
    ("malicious_fraction", "attack", lambda v: v != "none", "an --attack"),
    ("attack_start", "attack", lambda v: v != "none", "an --attack"),
)


def _messages(rules, cfg, given: set[str]) -> list[str]:
  return [f"--{name} has no effect without {needs} (the configuration has "
          f"--{field}={getattr(cfg, field)})"
          for name, field, used, needs in rules
          if name in given and not used(getattr(cfg, field))]


def ineffective(cfg, given: Iterable[str]) -> tuple[list[str], list[str]]:
  """``(errors, warnings)`` about the flags in ``given`` that ``cfg`` does
  not use; each a sentence naming the flag and what would make it count."""
  given = set(given)
  return _messages(ERRORS, cfg, given), _messages(WARNINGS, cfg, given)


def given_flags(fv, names: Iterable[str]) -> set[str]:
  """The names among ``names`` set on the command line or in a flagfile."""
  return {n for n in names if n in fv and fv[n].present}
