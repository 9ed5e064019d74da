"""The one command-line entry (fedjax_sparse/cli.py) and the installed
entry points."""

import importlib
import os
import tomllib

from absl import app
import pytest

from fedjax_sparse import cli
from tests.helpers import ROOT


def test_user_errors_become_one_error_line_and_status_2(capsys):
  def bad():
    raise ValueError("--foo must be > 0, got -1")
  assert cli._main(bad, ["prog"]) == 2
  assert capsys.readouterr().err == "error: --foo must be > 0, got -1\n"

  def missing():
    raise FileNotFoundError("no FashionMNIST in /nowhere")
  assert cli._main(missing, ["prog"]) == 2
  assert "error: no FashionMNIST" in capsys.readouterr().err
  assert cli._main(lambda: None, ["prog"]) == 0
  assert cli._main(lambda: 1, ["prog"]) == 1


def test_other_exceptions_are_not_hidden():
  def bug():
    raise KeyError("a bug, not a user error")
  with pytest.raises(KeyError):
    cli._main(bug, ["prog"])


def test_stray_arguments_are_refused():
  with pytest.raises(app.UsageError, match="unexpected arguments: extra"):
    cli._main(lambda: 0, ["prog", "extra"])


def test_entry_points_name_existing_functions():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
  assert set(scripts) == {"fedjax-sparse-run", "fedjax-sparse-sweep",
                          "fedjax-sparse-demo"}
  for target in scripts.values():
    module, func = target.split(":")
    assert callable(getattr(importlib.import_module(module), func))
  # Each binary's main takes no arguments: cli.run parses the flags.
  for name in ("run", "sweep", "demo"):
    main = importlib.import_module(f"experiments.{name}").main
    assert main.__code__.co_argcount == 0


@pytest.mark.slow  # a subprocess run of the binary
def test_the_binaries_keep_compiled_programs_in_the_cache(tmp_path):
  import subprocess
  import sys
  cache = tmp_path / "cache"
  r = subprocess.run(
      [sys.executable, "-m", "experiments.run", "--dataset=synthetic",
       "--num_clients=4", "--clients_per_round=4", "--rounds=1",
       f"--compilation_cache_dir={cache}"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-2000:]
  assert any(p.name.endswith("-cache") for p in cache.iterdir())
