"""Checkpoints never run what they hold: a pickle planted in any file of one (.metadata, a .distcp entry,
a rank file, the JSON files) runs no code on resume or export. A damaged newest checkpoint is named and
the one before it resumed; a run killed before its first checkpoint restarts with clean metrics."""

from __future__ import annotations

import io
import logging
import pickle
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from selfe.cli import main
from selfe.network.model import MMDiT
from selfe.train.checkpoint import Checkpointer
from selfe.train.checkpoint_reader import DamagedCheckpointError, MetadataUnpickler, load_dcp
from selfe.train.trainer import Trainer
from tests.train.helpers_trainer import read_metrics, run_train, tiny_config, tiny_overrides

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

STEPS = 4  # the module's run: checkpoints at 2 and 4
RUN = ("checkpoint.every=2", "checkpoint.keep=2", "checkpoint.export_at_end=false")


class Payload:
    """Unpickled, it writes `marker`: the proof that a load ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _payload(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    return buffer.getvalue()


def _read_metadata(step: Path):
    with open(step / ".metadata", "rb") as f:
        return pickle.load(f)  # the test's own file: plain pickle is fine here


def replace_entry(step: Path, fqn: str, data: bytes) -> Path:
    """Put `data` in place of DCP entry `fqn` of checkpoint `step`, and fix up the offsets in .metadata (the
    checkpoint stays consistent: a loader that trusts it would torch.load the planted bytes)."""
    metadata = _read_metadata(step)
    (index,) = [i for i in metadata.storage_data if i.fqn == fqn]
    info = metadata.storage_data[index]
    path = step / info.relative_path
    old = path.read_bytes()
    path.write_bytes(old[: info.offset] + data + old[info.offset + info.length :])
    shift = len(data) - info.length
    for other in metadata.storage_data.values():
        if other.relative_path == info.relative_path and other.offset > info.offset:
            other.offset += shift
    info.length = len(data)
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    return path


def _plant_metadata_whole(step: Path, marker: Path) -> Path:
    (step / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    return step / ".metadata"


def _plant_metadata_inside(step: Path, marker: Path) -> Path:
    """DCP's real metadata with the payload tucked into it: everything else about it is right."""
    metadata = _read_metadata(step)
    metadata.planner_data = {"x": Payload(marker)}
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    return step / ".metadata"


def _plant_file(name: str) -> Callable[[Path, Path], Path]:
    def plant(step: Path, marker: Path) -> Path:
        (step / name).write_bytes(_payload(marker))
        return step / name

    return plant


def _plant_entry(fqn: str) -> Callable[[Path, Path], Path]:
    return lambda step, marker: replace_entry(step, fqn, _payload(marker))


# name: (plant, whether `selfe export` reads what it plants: it loads the EMA weights and config.json only)
PLANTS = {
    "metadata": (_plant_metadata_whole, True),
    "metadata inside": (_plant_metadata_inside, True),
    "distcp bytes entry": (_plant_entry("train.step"), False),
    "distcp tensor entry": (_plant_entry("ema.img_in.weight"), True),
    "distcp whole": (_plant_file("__0_0.distcp"), True),
    "rank file": (_plant_file("rank00000.pt"), False),
    "meta.json": (_plant_file("meta.json"), False),
    "config.json": (_plant_file("config.json"), True),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run of STEPS steps with checkpoints at 2 and 4 (tests copy it before changing anything)."""
    root = tmp_path_factory.mktemp("safety") / "run"
    _train(tiny_config(root, STEPS, *RUN))
    return root


def _train(config):
    trainer = Trainer(config)
    try:
        return trainer.train()
    finally:
        trainer.close()


def _copy(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _step(root: Path, step: int) -> Path:
    return root / "checkpoints" / f"step_{step:09d}"


def test_stock_dcp_runs_the_planted_payloads(run, tmp_path):
    """What the tests below guard against: torch's own loader executes a planted entry and .metadata."""
    root = _copy(run, tmp_path)
    marker = tmp_path / "ran"
    replace_entry(_step(root, 4), "train.step", _payload(marker))
    state = {"train": {"step": 0}}
    dcp.load(state, storage_reader=dcp.FileSystemReader(_step(root, 4)), no_dist=True)
    assert marker.read_text() == "ran"
    marker.unlink()
    _plant_metadata_inside(_step(root, 2), marker)
    dcp.FileSystemReader(_step(root, 2)).read_metadata()
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("plant", [p for p, _ in PLANTS.values()], ids=PLANTS.keys())
def test_a_planted_pickle_runs_nothing_on_resume_and_the_previous_checkpoint_is_used(plant, run, tmp_path, caplog):
    root = _copy(run, tmp_path)
    marker = tmp_path / "ran"
    planted = plant(_step(root, 4), marker)
    checkpointer = Checkpointer(root / "checkpoints", keep=2)
    model = tiny_config(root, STEPS).model
    with caplog.at_level(logging.WARNING, logger="selfe.train.checkpoint"):
        path, state, rank_state = checkpointer.load_newest(
            lambda: {"train": {"step": -1}, "ema": MMDiT(model).state_dict()}
        )
    assert not marker.exists()
    assert path == _step(root, 2) and state["train"]["step"] == 2 and "rng" in rank_state
    assert str(planted) in caplog.text and "step_000000004 not used" in caplog.text


@pytest.mark.parametrize(("plant", "read"), PLANTS.values(), ids=PLANTS.keys())
def test_a_planted_pickle_runs_nothing_on_export(plant, read, run, tmp_path, capsys):
    root = _copy(run, tmp_path)
    marker = tmp_path / "ran"
    planted = plant(_step(root, 4), marker)
    try:
        code = main(["export", str(_step(root, 4)), "--out", str(tmp_path / "out")])
    except SystemExit as exit_info:
        code = exit_info.code
    assert not marker.exists()
    err = capsys.readouterr().err
    if read:
        assert code == 2 and str(planted) in err, err
    else:
        assert code == 0, err


def test_the_metadata_unpickler_admits_dcps_classes_only(run):
    with open(_step(run, 2) / ".metadata", "rb") as f:
        metadata = MetadataUnpickler(f).load()
    assert metadata.state_dict_metadata.keys() == _read_metadata(_step(run, 2)).state_dict_metadata.keys()
    for module, name in [("builtins", "exec"), ("os", "system"), ("torch", "load"), ("torch", "Tensor")]:
        with pytest.raises(pickle.UnpicklingError, match=f"refused to load global {module}.{name}"):
            MetadataUnpickler(io.BytesIO(b"")).find_class(module, name)


def test_a_damaged_newest_checkpoint_falls_back_and_training_continues_from_the_one_before(run, tmp_path, caplog):
    root = _copy(run, tmp_path)
    full = [r["loss"] for r in read_metrics(run)]
    (root / "metrics.jsonl").write_text("\n".join((root / "metrics.jsonl").read_text().splitlines()[:3]) + "\n")
    damaged = _step(root, 4) / "__0_0.distcp"  # as if killed after step 3, with the checkpoint of step 4 damaged
    damaged.write_bytes(damaged.read_bytes()[:5000])
    with caplog.at_level(logging.WARNING, logger="selfe.train.checkpoint"):
        resumed = _train(tiny_config(root, STEPS, *RUN))
    assert f"{damaged} is damaged" in caplog.text
    assert resumed.losses == full[2:]  # steps 3 and 4, as from the checkpoint of step 2
    assert [r["step"] for r in read_metrics(root)] == list(range(1, STEPS + 1))
    loaded = {"train": {"step": -1}}
    load_dcp(_step(root, 4), loaded, no_dist=True)  # rewritten whole by the resumed run
    assert loaded["train"]["step"] == 4


def test_fall_back_false_refuses_naming_the_damaged_file(run, tmp_path):
    root = _copy(run, tmp_path)
    damaged = _step(root, 4) / "meta.json"
    damaged.write_text("{")
    with pytest.raises(ValueError, match=f"{damaged} is damaged.*checkpoint.fall_back=true"):
        Trainer(tiny_config(root, STEPS + 2, "checkpoint.fall_back=false"))


def test_no_readable_checkpoint_is_an_error_naming_each(run, tmp_path):
    root = _copy(run, tmp_path)
    for step in (2, 4):
        (_step(root, step) / "rank00000.pt").unlink()
    checkpointer = Checkpointer(root / "checkpoints", keep=2)
    with pytest.raises(ValueError, match="no checkpoint in .* can be read") as err:
        checkpointer.load_newest(lambda: {"train": {"step": -1}})
    assert all(str(_step(root, s) / "rank00000.pt") in str(err.value) for s in (2, 4))


def test_a_damaged_checkpoint_error_survives_the_trip_between_ranks():
    err = pickle.loads(pickle.dumps(DamagedCheckpointError("/x/.metadata", "EOFError")))
    assert isinstance(err, DamagedCheckpointError) and str(err) == "/x/.metadata is damaged (EOFError)"


TIMING = ("step_time", "images_per_s", "tokens_per_s", "tflops_per_device", "mfu")


def _metrics_without_timing(root: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(root)]


@pytest.mark.slow
def test_a_kill_before_the_first_checkpoint_leaves_no_duplicate_metrics(tmp_path):
    # the first checkpoint is at step 2: a SIGKILL inside its write, after steps 1 and 2 were logged
    killed = run_train(tiny_overrides(tmp_path / "kill", 3, "checkpoint.every=2", "fault.kill_in_checkpoint_step=2"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path / "kill")] == [1, 2]
    restarted = run_train(tiny_overrides(tmp_path / "kill", 3, "checkpoint.every=2"))
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    clean = run_train(tiny_overrides(tmp_path / "clean", 3, "checkpoint.every=2"))
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert _metrics_without_timing(tmp_path / "kill") == _metrics_without_timing(tmp_path / "clean")


@pytest.mark.dist
@pytest.mark.slow
def test_ranks_agree_to_fall_back_when_only_one_rank_reads_a_damaged_file(tmp_path):
    """Rank 1's file of step 4 is damaged, rank 0's is fine: both resume from step 2, none hangs. Then rank
    1's DCP shard of step 6 is cut short: the collective load fails on rank 1 alone, both resume from 4."""
    run = lambda steps: run_train(tiny_overrides(tmp_path, steps, *RUN), nproc=2)
    assert (first := run(4)).returncode == 0, first.stderr[-3000:]
    before = [r["loss"] for r in read_metrics(tmp_path)]
    for damaged, steps, again in [(_step(tmp_path, 4) / "rank00001.pt", 6, (2, 4)),
                                  (_step(tmp_path, 6) / "__1_0.distcp", 8, (4, 6))]:  # fmt: skip
        damaged.write_bytes(damaged.read_bytes()[:100])
        resumed = run(steps)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"{damaged} is damaged" in resumed.stderr
        losses = [r["loss"] for r in read_metrics(tmp_path)]
        assert len(losses) == steps
        assert losses[slice(*again)] == before[slice(*again)]  # run again from the checkpoint before
        before = losses
