"""The on-disk compile cache (selfe.sampling.compile_cache): its folder, its trust checks, and a fresh process
that loads it compiling less (inductor's own counters) and giving the same images."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import selfe.sampling.compile_cache as compile_cache
from selfe.sampling.compile_cache import COMPILE_CACHE_ENV, CompileCache, compile_cache_root, shape_set_key
from selfe.sampling.fast_components import FastComponents
from selfe.sampling.fast_path import FastPathConfig

ROOT = Path(__file__).resolve().parents[2]


class FakeInfo:
    def __init__(self, artifacts: dict[str, list[str]]):
        self.artifacts = defaultdict(list, artifacts)


class RecordedArtifacts:
    """Stands in for torch's save / load of its artifacts: `save` hands out `blob`, `load` records its bytes."""

    def __init__(self):
        self.blob = b"artifacts-1"
        self.loads: list[bytes] = []

    def save(self):
        return self.blob, FakeInfo({"inductor": ["k"]})

    def load(self, data: bytes):
        self.loads.append(data)
        return FakeInfo({"inductor": ["k"], "aot_autograd": ["a", "b"]})


@pytest.fixture
def torch_artifacts(monkeypatch: pytest.MonkeyPatch) -> RecordedArtifacts:
    """torch's artifacts recorded (the folder logic is what these tests check; the two-process test below
    runs torch's own); the process's memory of loaded files starts empty."""
    recorded = RecordedArtifacts()
    monkeypatch.setattr(compile_cache, "_loaded", set())
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", recorded.save)
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", recorded.load)
    return recorded


def test_the_folder_is_versioned_private_and_written_whole(tmp_path: Path, torch_artifacts: RecordedArtifacts) -> None:
    cache = CompileCache(tmp_path / "cc")
    assert cache.folder.parent == tmp_path / "cc" and cache.folder.name.startswith("torch-")
    shapes = [dict(batch=1, height=512, width=512, text_length=64)]
    path = cache.save(shapes)
    assert path == cache.folder / f"{shape_set_key(shapes)}.bin" and path.read_bytes() == b"artifacts-1"
    assert stat.S_IMODE(cache.folder.stat().st_mode) == 0o700 and stat.S_IMODE(path.stat().st_mode) == 0o600
    described = json.loads(path.with_suffix(".json").read_text())
    assert described["shapes"] == shapes and described["torch"] == torch.__version__
    assert [p.name for p in cache.folder.iterdir() if p.name.startswith(".")] == []  # no temp file left
    # Its own file counts as loaded; a new process (a fresh memory) loads it once.
    assert CompileCache(tmp_path / "cc").load().files == []
    compile_cache._loaded.clear()
    load = CompileCache(tmp_path / "cc").load()
    assert load.files == [path.resolve()] and load.artifacts == {"inductor": 1, "aot_autograd": 2}
    assert torch_artifacts.loads == [b"artifacts-1"]
    assert CompileCache(tmp_path / "cc").load().files == []


def test_a_grown_shape_set_replaces_only_its_own_smaller_file(
    tmp_path: Path, torch_artifacts: RecordedArtifacts
) -> None:
    other = CompileCache(tmp_path).save([dict(batch=4)])  # another process's warm-up
    cache = CompileCache(tmp_path)
    first = cache.save([dict(batch=1)])
    torch_artifacts.blob = b"artifacts-2"
    both = cache.save([dict(batch=1), dict(batch=2)])
    assert not first.exists() and both.read_bytes() == b"artifacts-2" and other.exists()
    assert sorted(p.suffix for p in cache.folder.iterdir()) == [".bin", ".bin", ".json", ".json"]


def test_a_folder_or_file_others_can_write_is_refused(tmp_path: Path, torch_artifacts: RecordedArtifacts) -> None:
    cache = CompileCache(tmp_path)
    path = cache.save([dict(batch=1)])
    compile_cache._loaded.clear()
    os.chmod(cache.folder, 0o777)
    with pytest.raises(PermissionError, match="writable by its group or by others .*trusted like code"):
        cache.load()
    with pytest.raises(PermissionError, match="writable by its group or by others"):
        cache.save([dict(batch=1)])
    os.chmod(cache.folder, 0o700)
    os.chmod(path, 0o620)
    with pytest.raises(PermissionError, match=f"{path.name} is writable by its group"):
        cache.load()
    assert torch_artifacts.loads == []  # nothing untrusted was handed to torch
    assert CompileCache(tmp_path / "absent").load().files == []  # no folder yet: nothing to load


def test_where_the_cache_lives(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(COMPILE_CACHE_ENV, raising=False)
    assert compile_cache_root() == Path.home() / ".cache" / "selfe" / "compile"
    monkeypatch.setenv(COMPILE_CACHE_ENV, str(tmp_path / "env"))
    assert compile_cache_root() == tmp_path / "env"
    assert compile_cache_root(tmp_path / "given") == tmp_path / "given"
    for bad in (3, ""):
        with pytest.raises(ValueError, match="compile_cache_dir must be a folder path or None"):
            FastPathConfig(compile_cache_dir=bad)
    for bad in ("on", 1):
        with pytest.raises(ValueError, match="FastPathConfig.compile_cache must be True, False or 'auto'"):
            FastPathConfig(compile_cache=bad)


def test_warmed_shapes_are_saved_only_with_the_cache_on(tmp_path: Path, torch_artifacts: RecordedArtifacts) -> None:
    cpu = torch.device("cpu")
    off = FastComponents(FastPathConfig(compile=True, compile_cache_dir=str(tmp_path)), None, None)
    assert off.warmed_up(dict(batch=1), cpu) is None and not any(tmp_path.iterdir())
    on = FastComponents(FastPathConfig(compile=True, compile_cache=True, compile_cache_dir=str(tmp_path)), None, None)
    on.prepare(cpu)
    assert on.cache_load is not None and on.cache_load.files == []
    path = on.warmed_up(dict(batch=1), cpu)
    assert on.warmed_up(dict(batch=1), cpu) == path and on.warmed == [dict(batch=1, device="cpu")]


# ----------------------------------------------------------------------------------------------
# Two processes, inductor for real

CHILD = """
import json, sys
from safetensors.torch import save_file
from torch._dynamo.utils import counters
from selfe.sampling.fast_path import FastPathConfig
from selfe.sampling.pipeline import SelfEPipeline

pipeline_dir, cache_dir, out = sys.argv[1:]
config = FastPathConfig(compile=True, compile_decoder=True, compile_cache=True, compile_cache_dir=cache_dir)
pipe = SelfEPipeline.from_pretrained(pipeline_dir, fast_path=config)
pipe.warmup(1, 32, 32, guidance=False)
images = pipe("a red circle", steps=2, seed=0, height=32, width=32, guidance=None, output_type="pt").images
save_file({"images": images.contiguous()}, out)
loaded = pipe.components.cache_load
print(json.dumps({"inductor": dict(counters["inductor"]), "loaded": loaded.artifacts, "files": len(loaded.files)}))
"""


def run_child(pipeline_dir: Path, cache_dir: Path, out: Path, inductor_dir: Path) -> dict:
    """One fresh process with its own empty inductor cache: only our folder carries compiled work over."""
    env = dict(
        os.environ,
        TORCHINDUCTOR_CACHE_DIR=str(inductor_dir),
        TORCHINDUCTOR_COMPILE_THREADS="1",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    args = [sys.executable, "-c", CHILD, str(pipeline_dir), str(cache_dir), str(out)]
    done = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_second_process_with_a_warm_cache_compiles_less_and_gives_the_same_images(tmp_path: Path) -> None:
    from tests.engine.test_pipeline import write_tiny_pipeline

    pipeline_dir = write_tiny_pipeline(tmp_path / "tiny")
    cold = run_child(pipeline_dir, tmp_path / "cc", tmp_path / "cold.safetensors", tmp_path / "inductor-1")
    assert cold["files"] == 0 and cold["inductor"].get("fxgraph_cache_miss", 0) >= 2  # the step and the decoder
    assert [p.suffix for p in (tmp_path / "cc").glob("torch-*/*.bin")] == [".bin"]
    warm = run_child(pipeline_dir, tmp_path / "cc", tmp_path / "warm.safetensors", tmp_path / "inductor-2")
    assert warm["files"] == 1 and warm["loaded"].get("inductor", 0) >= cold["inductor"]["fxgraph_cache_miss"]
    assert warm["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert warm["inductor"]["fxgraph_cache_hit"] >= cold["inductor"]["fxgraph_cache_miss"]
    cold_images = load_file(tmp_path / "cold.safetensors")["images"]
    torch.testing.assert_close(load_file(tmp_path / "warm.safetensors")["images"], cold_images, rtol=0, atol=0)
