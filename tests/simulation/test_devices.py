"""simulation/devices.py and the run's provenance in summary.json."""

import pytest

from fedjax_sparse.simulation import devices
from fedjax_sparse.simulation import loop


def test_cpu_devices_from_the_environment(monkeypatch):
  monkeypatch.setenv("FEDJAX_SPARSE_CPU_DEVICES", "zero")
  with pytest.raises(ValueError, match="FEDJAX_SPARSE_CPU_DEVICES"):
    devices.use_cpu_devices()


def test_patient_collectives_flags():
  out = devices.patient_collectives("--xla_foo=1", "0.10.2")
  assert out.startswith("--xla_foo=1 ")
  assert all(f in out for f in devices.PATIENT_COLLECTIVES)
  assert devices.patient_collectives(out, "0.10.2") == out  # once only
  assert devices.patient_collectives("", "0.4.30") == ""  # unknown flags
  assert devices.patient_collectives("", "dev") == ""


def test_summary_software_names_versions_and_flags(monkeypatch):
  import jax
  import jaxlib
  monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
  sw = loop.software()
  assert sw == {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                "xla_flags": "--xla_foo=1"}
