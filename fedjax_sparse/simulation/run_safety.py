"""What keeps runs from silently mixing or losing results.

Shared by the run loop (:func:`fedjax_sparse.simulation.experiment.run_experiment`)
and the seed-batched loop (:func:`fedjax_sparse.simulation.multi_seed.run_seeds`):

* :func:`output_lock`: one run at a time in an output directory (an
  exclusive ``flock`` on ``<output_dir>/.lock``, which holds the pid of the
  run that has it);
* :func:`prepare_output_dir`: a directory that cannot be created is named
  in a ValueError, not a traceback;
* :func:`check_rounds` and :func:`resumed_records`: a resume never goes
  back behind its checkpoint (fewer ``--rounds`` than it holds) and never
  continues without the records of the rounds it holds.

The checkpoints' own checks (checksum, finite values) are in
:mod:`fedjax_sparse.simulation.io`. Every error is a ValueError whose
message says what to do, which the binaries print as ``error: ...`` with
exit status 2.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from typing import Iterator, Sequence

from fedjax_sparse.simulation import io

LOCK_NAME = ".lock"


class OutputDirInUse(ValueError):
  """Another run holds the output directory's lock (nothing of this run
  may be written there, not even an error file)."""


def prepare_output_dir(directory: str) -> None:
  """Creates ``directory`` (and its parents) if needed.

  Raises:
    ValueError: it cannot be created (a read-only or full file system, a
      file in the way, ...); the message names it.
  """
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise io.unwritable(directory, e) from e
  if not os.path.isdir(directory):
    raise ValueError(f"cannot write into {directory}: it is not a directory")


def _holder(fd: int) -> str:
  try:
    text = os.pread(fd, 64, 0).decode(errors="replace").strip()
  except OSError:
    text = ""
  return f"pid {text}" if text.isdigit() else "a process that did not say its pid"


@contextlib.contextmanager
def output_lock(directory: str) -> Iterator[None]:
  """Holds the exclusive lock of the output directory ``directory``.

  The lock is an ``fcntl.flock`` on ``<directory>/.lock``, which holds the
  pid of its holder. It is released when the block exits (normally or by an
  exception) and by the system when the process ends, whatever the way: a
  killed run leaves no stale lock. ``flock`` locks belong to an open file
  description, so a second ``output_lock`` of the same directory fails in
  the same process as well.

  Under ``jax.distributed`` the processes of one run share their output
  directory: process 0 holds the lock for all of them.

  Raises:
    OutputDirInUse: another run holds it (the message names its pid).
    ValueError: the directory cannot be written.
  """
  import jax
  if jax.process_count() > 1 and jax.process_index() != 0:
    yield
    return
  prepare_output_dir(directory)
  path = os.path.join(directory, LOCK_NAME)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise io.unwritable(path, e) from e
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise io.unwritable(path, e) from e
      raise OutputDirInUse(
          f"{directory} is in use by another run ({_holder(fd)} holds "
          f"{path}); two runs in one output directory would mix their "
          "results: wait for it to end, or choose another --output_dir"
      ) from None
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as e:
      raise io.unwritable(path, e) from e
    yield
  finally:
    os.close(fd)  # releases the lock


@contextlib.contextmanager
def output_locks(directories: Sequence[str]) -> Iterator[None]:
  """:func:`output_lock` of every directory (all or none)."""
  with contextlib.ExitStack() as stack:
    for d in directories:
      stack.enter_context(output_lock(d))
    yield


def check_rounds(done: int, rounds: int, where: str) -> None:
  """Refuses to run ``rounds`` rounds from a checkpoint at round ``done``.

  Raises:
    ValueError: ``done > rounds``: the run would say ``rounds`` rounds while
      its model and records hold ``done``.
  """
  if done > rounds:
    raise ValueError(
        f"{where} holds a run at round {done}, more than --rounds={rounds}: "
        f"it cannot go back. Run it with --rounds={done} or more (to extend "
        "it), or choose a new --output_dir")


def resumed_records(path: str, done: int, checkpoint: str) -> list[dict]:
  """The records of rounds 1..``done`` in the rounds file ``path``.

  The records of the rounds after the checkpoint (written before a kill
  that came before the next checkpoint) are dropped: the resumed run
  computes them again.

  Raises:
    ValueError: ``path`` cannot be read, or lacks (or repeats) some of the
      rounds 1..``done`` that the checkpoint ``checkpoint`` holds: the run
      cannot be resumed (those rounds' records cannot be rebuilt, and the
      totals of the summary would be wrong without them).
  """
  try:
    records = io.read_jsonl(path)
  except FileNotFoundError:
    records = []
  for i, r in enumerate(records, 1):
    if not isinstance(r.get("round"), int):
      raise ValueError(f"{path}: record {i} has no round number: the file "
                       "was damaged or written by something else")
  kept = [r for r in records if r["round"] <= done]
  got = [r["round"] for r in kept]
  if got == list(range(1, done + 1)):
    return kept
  missing = sorted(set(range(1, done + 1)) - set(got))
  if missing:
    what = f"lacks the records of {_rounds_text(missing)}"
  else:
    what = "repeats or misorders the records of the rounds up to " + str(done)
  raise ValueError(
      f"{path} {what}, which the checkpoint {checkpoint} holds (round "
      f"{done}): the run cannot be resumed without them, and they cannot be "
      "rebuilt. Choose a new --output_dir, or delete the checkpoint to run "
      "again from the beginning")


def _rounds_text(rounds: list[int]) -> str:
  """``"round 3"``, ``"rounds 1-4, 7"``."""
  spans, start = [], rounds[0]
  for a, b in zip(rounds, rounds[1:] + [None]):
    if b != a + 1:
      spans.append(str(start) if start == a else f"{start}-{a}")
      start = b
  return ("round " if len(rounds) == 1 else "rounds ") + ", ".join(spans)
