"""Atomic result files and resumable checkpoints: the names callers use.

Result files (:mod:`fedjax_sparse.simulation.files`): every one is written
to a temporary sibling and renamed into place, so a run killed at any moment
leaves either the old or the new file, never half of one; it gets the mode
``open`` would give it (0644 under umask 022), JSON writers write nan and
inf as null (never a bare ``NaN``), and a file or directory that cannot be
written (read-only, full) raises a ValueError that names it. Readers name
the file they cannot parse.

Checkpoints (:mod:`fedjax_sparse.simulation.checkpoint`) are Orbax
checkpoint directories with the same guarantee: a step is written under a
temporary name and renamed into place once complete, and the previous step
is deleted only after that. Beside each, ``<path>.sha256``
(:mod:`fedjax_sparse.simulation.checksums`) holds the sha256 of its files
and which leaves were non-finite when it was saved; a checkpoint whose
bytes changed, or whose state holds nan or inf where the saved one did not,
is refused (ValueError), never trained on.

The run loop calls these through this module (``io.append_jsonl``, ...), so
a test may replace one here.
"""

from fedjax_sparse.simulation.checkpoint import (checkpoint_arrays,
                                                 checkpoint_exists,
                                                 load_checkpoint,
                                                 save_checkpoint)
from fedjax_sparse.simulation.checksums import checksum_path
from fedjax_sparse.simulation.files import (append_jsonl, atomic_write_bytes,
                                            atomic_write_json,
                                            atomic_write_text, finite_json,
                                            read_json, read_jsonl, unwritable,
                                            write_jsonl)

__all__ = ["append_jsonl", "atomic_write_bytes", "atomic_write_json",
           "atomic_write_text", "checkpoint_arrays", "checkpoint_exists",
           "checksum_path", "finite_json", "load_checkpoint", "read_json",
           "read_jsonl", "save_checkpoint", "unwritable", "write_jsonl"]
