"""`selfe generate` refuses bad arguments up front (one line, exit 2, before the model loads) and turns a
broken model folder into a one-line load error (exit 1), never a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import selfe.sampling.pipeline
from selfe.generate import build_parser, generate_main
from selfe.sampling.pipeline_files import text_encoder_dirs
from selfe.shapes import shipped_model_dir

SHIPPED = shipped_model_dir()
needs_shipped = pytest.mark.skipif(SHIPPED is None, reason="this install lacks the shipped ShapesEval model")


class FakePipe:
    """Stands in for SelfEPipeline: records each call's keyword arguments, returns 4x4 black images."""

    device = torch.device("cpu")
    default_size = (4, 4)

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.bar_config: dict | None = None

    def set_progress_bar_config(self, **kwargs) -> None:
        self.bar_config = kwargs

    def __call__(self, prompts, steps, generator, progress, **kwargs):
        from PIL import Image

        self.calls.append(kwargs)
        return SimpleNamespace(images=[Image.new("RGB", (4, 4)) for _ in prompts], nonfinite=None)


@pytest.fixture
def fake_pipe(monkeypatch: pytest.MonkeyPatch) -> FakePipe:
    pipe = FakePipe()
    pipeline_class = selfe.sampling.pipeline.SelfEPipeline
    monkeypatch.setattr(pipeline_class, "from_pretrained", classmethod(lambda cls, *a, **k: pipe))
    return pipe


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the model fails the test: the argument must be refused before that."""

    def refuse(cls, *args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(selfe.sampling.pipeline.SelfEPipeline, "from_pretrained", classmethod(refuse))


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Runs generate_main, expects exit 2, returns its one error line."""
    with pytest.raises(SystemExit) as exit_info:
        generate_main(["--prompt", "a cat", "--no-progress", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("selfe generate: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_out_is_checked_before_the_model_loads(tmp_path: Path, no_load, capsys) -> None:
    model = ["--model", str(tmp_path)]
    (tmp_path / "a_file").write_text("")
    assert "'.txt'" in refused([*model, "--out", str(tmp_path / "grid.txt")], capsys)
    assert "without a suffix" in refused([*model, "--out", str(tmp_path / "grid")], capsys)
    assert "'.xbm'" in refused([*model, "--out", str(tmp_path / "grid.xbm")], capsys)  # registered, but 1-bit only
    assert "is a directory" in refused([*model, "--out", str(tmp_path)], capsys)
    assert "is a file, not a folder" in refused([*model, "--out", str(tmp_path / "a_file" / "grid.png")], capsys)
    assert "is a file, not a folder" in refused([*model, "--out", str(tmp_path / "a_file" / "x" / "g.png")], capsys)


def test_out_keeps_writing_beside_the_grid(tmp_path: Path, fake_pipe: FakePipe) -> None:
    out = tmp_path / "new" / "deeper" / "grid.JPG"  # missing folders are made; any suffix PIL writes
    assert generate_main(["--model", str(tmp_path), "--prompt", "a", "b", "--steps", "1", "3", "--out", str(out)]) == 0
    assert out.is_file() and fake_pipe.bar_config == {"disable": True}  # the command's own bar, none per call
    assert sorted(p.name for p in out.parent.glob("grid_p*.png")) == [
        "grid_p00_1steps.png", "grid_p00_3steps.png", "grid_p01_1steps.png", "grid_p01_3steps.png",
    ]  # fmt: skip


def test_a_second_run_removes_the_single_images_the_first_left(tmp_path: Path, fake_pipe: FakePipe, capsys) -> None:
    out = tmp_path / "grid.png"
    generate_main(["--model", str(tmp_path), "--prompt", "a", "b", "--steps", "1", "3", "--out", str(out)])
    others = ["grid_p00_1steps_edited.png", "other_p00_1steps.png", "grid_notes.txt", "grid_pxx_1steps.png"]
    for name in others:  # not of the pattern this grid's images are named by: left alone
        (tmp_path / name).write_text("")
    capsys.readouterr()
    assert generate_main(["--model", str(tmp_path), "--prompt", "a", "--steps", "1", "--out", str(out)]) == 0
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("grid", "other")))
    assert left == sorted(["grid.png", "grid_p00_1steps.png", *others])
    assert "removed 3 images of an earlier run" in capsys.readouterr().out


def test_a_write_failure_after_sampling_is_one_line(tmp_path: Path, fake_pipe: FakePipe, monkeypatch, capsys) -> None:
    import selfe.generate

    real_write = selfe.generate.atomic_write_bytes

    def disk_full_at_the_grid(path, data):
        if path.name == "g.png":
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(selfe.generate, "atomic_write_bytes", disk_full_at_the_grid)
    assert generate_main(["--model", str(tmp_path), "--prompt", "a", "--out", str(tmp_path / "g.png")]) == 1
    err = capsys.readouterr().err
    assert "could not write the images" in err and "No space left" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"g_p00_{n}steps.png" for n in (1, 2, 4, 8)]  # no grid


def test_device_is_checked_before_the_model_loads(tmp_path: Path, no_load, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only machine
    model = ["--model", str(tmp_path), "--out", str(tmp_path / "g.png")]
    assert refused([*model, "--device", "cuda"], capsys).endswith("--device cuda: this torch has no CUDA device")
    assert "no CUDA device" in refused([*model, "--device", "cuda:0"], capsys)
    assert "'foo' is not a torch device" in refused([*model, "--device", "foo"], capsys)
    assert "--device meta" in refused([*model, "--device", "meta"], capsys)
    assert "--dtype" in refused([*model, "--dtype", "fp64"], capsys)


@pytest.mark.parametrize("value", ["-1", "-0.5", "nan", "inf"])
def test_guidance_must_be_finite_and_not_negative(value: str, tmp_path: Path, no_load, capsys) -> None:
    line = refused(["--model", str(tmp_path), "--out", str(tmp_path / "g.png"), "--guidance", value], capsys)
    assert "--guidance must be a finite number >= 0" in line


def test_other_numbers_are_checked_up_front(tmp_path: Path, no_load, capsys) -> None:
    model = ["--model", str(tmp_path), "--out", str(tmp_path / "g.png")]
    assert "contradict" in refused([*model, "--guidance", "2", "--no-guidance"], capsys)
    assert "--seed" in refused([*model, "--seed", "-1"], capsys)
    assert "--seed" in refused([*model, "--seed", str(2**64)], capsys)
    for flag in ("--height", "--width"):
        with pytest.raises(SystemExit) as exit_info:  # argparse's own error (usage, then the line)
            generate_main([*model, "--prompt", "a", flag, "0"])
        assert exit_info.value.code == 2 and f"argument {flag}: must be an integer >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_main([*model, "--prompt", "a", "--s-policy", "nope"])
    assert "invalid choice" in capsys.readouterr().err
    assert generate_main([*model, "--prompt", "a", "--steps", "2", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert generate_main([*model, "--prompt", "a", "--steps", "2", "2"]) == 2  # one file per count
    assert "--steps must be distinct" in capsys.readouterr().err


def test_guidance_zero_and_the_model_default_reach_the_pipeline(tmp_path: Path, fake_pipe: FakePipe) -> None:
    argv = ["--model", str(tmp_path), "--prompt", "a", "--steps", "1", "--out", str(tmp_path / "g.png")]
    assert generate_main([*argv, "--guidance", "0"]) == 0  # omega 0: the unconditional velocity, allowed
    assert fake_pipe.calls[-1]["guidance"] == 0.0
    assert generate_main([*argv, "--no-guidance"]) == 0
    assert fake_pipe.calls[-1]["guidance"] is None
    assert generate_main(argv) == 0
    assert "guidance" not in fake_pipe.calls[-1]  # the model's own default applies


def test_guidance_help_names_no_stale_default() -> None:
    text = " ".join(build_parser().format_help().split())
    assert "5.0" not in text and "export_guidance" in text and "shipped model" in text


@needs_shipped
def test_a_size_the_model_cannot_take_is_one_line_before_sampling(tmp_path: Path, capsys, monkeypatch) -> None:
    sampled = []
    monkeypatch.setattr(selfe.sampling.pipeline, "sample", lambda *a, **k: sampled.append(1))
    argv = ["--prompt", "a", "--height", "30", "--eager", "--no-progress", "--out", str(tmp_path / "g.png")]
    assert generate_main(argv) == 2  # the multiple needs the model (autoencoder x patch): checked after loading
    err = capsys.readouterr().err
    assert "height must be a multiple of 4" in err and "Traceback" not in err and not sampled


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if SHIPPED is None:
        pytest.skip("this install lacks the shipped ShapesEval model")
    return Path(shutil.copytree(SHIPPED, tmp_path_factory.mktemp("shipped") / "model"))


def broken_copy(model_copy: Path, tmp_path: Path, name: str) -> Path:
    """A copy of the model folder with file `name` cut to half its length."""
    root = Path(shutil.copytree(model_copy, tmp_path / "model"))
    data = (root / name).read_bytes()
    (root / name).write_bytes(data[: len(data) // 2])
    return root


@needs_shipped
@pytest.mark.parametrize(
    "name, named",
    [
        ("text_encoder/model.safetensors", "the T5 encoder from '{root}/text_encoder'"),
        ("text_encoder_2/model.safetensors", "the CLIP text model from '{root}/text_encoder_2'"),
        ("model.safetensors", "cannot read {root}/model.safetensors as safetensors"),
        ("ae.safetensors", "cannot read {root}/ae.safetensors as safetensors"),
    ],
)
def test_a_truncated_weight_file_is_a_one_line_load_error(
    name: str, named: str, model_copy: Path, tmp_path: Path, capsys
) -> None:
    root = broken_copy(model_copy, tmp_path, name)
    argv = ["--model", str(root), "--prompt", "a", "--steps", "1", "--eager", "--no-progress"]
    assert generate_main([*argv, "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "could not load the pipeline" in err and named.format(root=root) in err


@needs_shipped
def test_a_broken_text_encoder_config_is_named(model_copy: Path, tmp_path: Path, capsys) -> None:
    root = broken_copy(model_copy, tmp_path, "text_encoder/config.json")
    path = root / "text_encoder" / "config.json"
    with pytest.raises(ValueError, match=f"{path} is not valid JSON"):
        text_encoder_dirs(root, None, None)
    # Both encoders given elsewhere: the folder in the model is not read, as before.
    assert text_encoder_dirs(root, model_copy / "text_encoder", model_copy / "text_encoder_2")[0].is_dir()
    argv = ["--model", str(root), "--prompt", "a", "--steps", "1", "--no-progress"]
    assert generate_main([*argv, "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert f"{path} is not valid JSON" in err and "no T5 text encoder" not in err and "Traceback" not in err


@needs_shipped
def test_a_model_only_export_names_the_flags_that_complete_it(model_copy: Path, tmp_path: Path, capsys) -> None:
    """A run on cached latents (or on synthetic ones without checkpoint.export_stand_ins) exports the model alone."""
    root = tmp_path / "export"
    root.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copy(model_copy / name, root / name)
    argv = ["--model", str(root), "--prompt", "a", "--steps", "1", "--no-progress", "--out", str(tmp_path / "g.png")]
    assert generate_main(argv) == 2
    err = capsys.readouterr().err
    assert "autoencoder weights not found" in err and "exports only the model" in err and "--ae, --t5, --clip" in err
    assert generate_main([*argv, "--ae", str(model_copy / "ae.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "no T5 text encoder" in err and "or --t5 to selfe generate" in err
