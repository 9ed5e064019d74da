"""Metric writers (fedjax_sparse/metrics/writers.py): TensorBoard event files
beside rounds.jsonl."""

import dataclasses
import glob
import os
import struct

import pytest

from fedjax_sparse.metrics import writers
from fedjax_sparse.simulation import io
from fedjax_sparse.simulation.experiment import ExperimentConfig, run_experiment

tensorboardX = pytest.importorskip("tensorboardX")
from tensorboardX.proto import event_pb2  # noqa: E402

SMALL = ExperimentConfig(dataset="synthetic", partition="iid", num_clients=6,
                         clients_per_round=4, rounds=3, local_epochs=1,
                         batch_size=16, lr=0.1, model="mlp", eval_every=2,
                         eval_batch_size=100, client_devices=1)


def _events(logdir):
  """(step, tag, value) of every scalar in the event files of ``logdir``
  (TFRecord framing: length, its CRC, the record, its CRC)."""
  out = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        out.append((event.step, v.tag, v.simple_value))
  return out


def test_record_scalars_keep_numbers_only():
  rec = {"round": 3, "loss": 0.5, "attack_active": True, "tpr": None,
         "attack_space": "model", "accuracy": float("nan"), "uplink_bits": 8}
  assert writers.record_scalars(rec) == {"loss": 0.5, "attack_active": 1.0,
                                         "uplink_bits": 8.0}


def test_a_run_writes_the_rounds_to_tensorboard(tmp_path):
  cfg = dataclasses.replace(SMALL, output_dir=str(tmp_path))
  writer = writers.create_writer(cfg.output_dir, tensorboard=True)
  try:
    run_experiment(cfg, progress=False, on_round=writers.round_callback(writer))
  finally:
    writer.close()
  events = _events(str(tmp_path / writers.TENSORBOARD_DIR))
  records = io.read_jsonl(str(tmp_path / "rounds.jsonl"))
  want = sorted((r["round"], k, pytest.approx(v))
                for r in records for k, v in writers.record_scalars(r).items())
  assert sorted(events) == want
  assert {s for s, t, _ in events if t == "accuracy"} == {2, 3}


def test_without_a_backend_nothing_is_written(tmp_path):
  w = writers.create_writer(str(tmp_path), tensorboard=False)
  w.write_scalars(1, {"loss": 1.0})
  w.close()
  assert os.listdir(tmp_path) == []
  with pytest.raises(ValueError, match="--output_dir"):
    writers.create_writer("", tensorboard=True)


@pytest.mark.slow
def test_a_sweep_writes_one_event_directory_per_cell(tmp_path):
  from experiments import sweep
  base = dataclasses.replace(SMALL, output_dir=str(tmp_path), rounds=2)
  cells = sweep.make_cells(base, ["none"], ["fedavg", "median"])
  status = sweep.run_cells(cells, log=lambda _: None, tensorboard=True)
  assert set(status.values()) == {"ran"}
  for cell in cells:
    events = _events(os.path.join(cell.dir, writers.TENSORBOARD_DIR))
    assert {s for s, t, _ in events if t == "loss"} == {1, 2}
