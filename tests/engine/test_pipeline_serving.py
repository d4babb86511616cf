"""A pipeline that can serve: calls from several threads give exactly the images of the same calls one by one
(eager, the fast path's graph bookkeeping, the compiled step), and a NaN or Inf output is reported with the step
where it appeared, never written as a black image in silence. Runs on the shipped ShapesEval model."""

from __future__ import annotations

import shutil
import threading
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from selfe.generate import generate_main
from selfe.method.schedule import sampling_grid
from selfe.sampling.fast_path import FastPathConfig, FastSampler
from selfe.sampling.nonfinite import NonFiniteOutputWarning, first_nonfinite_step
from selfe.sampling.pipeline import SelfEPipeline
from selfe.sampling.sampler import SamplerConfig
from selfe.shapes import shipped_model_dir
from tests.engine.test_pipeline import _ReplayOnCPU
from tests.helpers_text import allow_inductor_unpickling

SHIPPED = shipped_model_dir()
pytestmark = [
    pytest.mark.usefixtures("no_network"),  # the whole module offline, no unpickling
    pytest.mark.skipif(SHIPPED is None, reason="this install lacks the shipped ShapesEval model"),
]
EAGER = FastPathConfig(compile=False)
REQUESTS = [
    dict(prompt="a red circle", seed=0, steps=2),
    dict(prompt="a green triangle", seed=1, steps=2),
    dict(prompt="a blue square", seed=2, steps=2),
    dict(prompt="a red triangle", seed=3, steps=2),
]


@pytest.fixture(scope="module")
def pipe() -> SelfEPipeline:
    return SelfEPipeline.from_pretrained(SHIPPED, fast_path=EAGER)


def call(pipe: SelfEPipeline, request: dict, fast: bool) -> torch.Tensor:
    request = dict(request)
    return pipe(request.pop("prompt"), guidance=3.0, output_type="pt", fast=fast, **request).images


def in_threads(pipe: SelfEPipeline, fast: bool) -> list[torch.Tensor]:
    """Each request in a thread of its own, all released at once."""
    results: list = [None] * len(REQUESTS)
    errors: list[BaseException] = []
    start = threading.Barrier(len(REQUESTS))

    def work(i: int) -> None:
        try:
            start.wait()
            results[i] = call(pipe, REQUESTS[i], fast)
        except BaseException as err:  # surfaced below: an exception in a thread does not fail the test
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(REQUESTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


@pytest.mark.parametrize("path", ["eager", "graphed"])
def test_calls_from_four_threads_equal_the_calls_one_by_one(
    pipe: SelfEPipeline, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The graphed path is the CUDA-graph bookkeeping on the CPU: static inputs that every call writes, one
    static output. Without the pipeline's lock its threads mix each other's inputs (seen: all four differ)."""
    fast = path == "graphed"
    if fast:
        monkeypatch.setattr(FastSampler, "graph_class", _ReplayOnCPU)
        monkeypatch.setattr(FastSampler, "uses_cuda_graph", lambda self, device: True)
        pipe.fast.forget_captures()
    one_by_one = [call(pipe, request, fast) for request in REQUESTS]
    assert not torch.equal(one_by_one[0], one_by_one[1])
    for together, alone in zip(in_threads(pipe, fast), one_by_one):
        torch.testing.assert_close(together, alone, rtol=0, atol=0)
    if fast:
        assert pipe.fast.num_graphs == 1  # one shape: all four threads replayed the same graph
        pipe.fast.forget_captures()


@pytest.mark.slow
def test_calls_from_four_threads_share_one_compiled_step() -> None:
    torch._dynamo.reset()
    pipe = SelfEPipeline.from_pretrained(SHIPPED, fast_path=FastPathConfig(compile=True, compile_backend="aot_eager"))
    together = in_threads(pipe, fast=True)  # the first shape compiles while three threads wait
    with torch._dynamo.config.patch(error_on_recompile=True):
        for result, request in zip(together, REQUESTS):
            torch.testing.assert_close(result, call(pipe, request, fast=True), rtol=0, atol=0)


@pytest.mark.gpu
def test_threads_and_a_nan_model_on_real_cuda_graphs(tmp_path: Path) -> None:
    """The real thing: the inductor-compiled step in CUDA graphs, called from four threads at once; then a NaN
    model on a graphed step (its generators forked on the device, so the search draws the same noise)."""
    graphed = FastPathConfig(compile=True, cuda_graph="on")
    pipe = SelfEPipeline.from_pretrained(SHIPPED, torch_dtype=torch.float32, device="cuda", fast_path=graphed)
    with allow_inductor_unpickling():
        one_by_one = [call(pipe, request, fast=True) for request in REQUESTS]
        together = in_threads(pipe, fast=True)
    for result, alone in zip(together, one_by_one):
        torch.testing.assert_close(result, alone, rtol=0, atol=0)
    assert pipe.fast.num_graphs == 1
    eager_graphed = FastPathConfig(compile=False, cuda_graph="on")
    nan = SelfEPipeline.from_pretrained(nan_weights_copy(tmp_path / "nan"), device="cuda", fast_path=eager_graphed)
    with pytest.warns(NonFiniteOutputWarning, match="at step 1 of 4"):
        nan("a red circle", steps=4, seed=0, output_type="pt")
    assert nan.fast.num_graphs == 1


# ----------------------------------------------------------------------------------------------
# NaN / Inf


def nan_weights_copy(root: Path) -> Path:
    """The shipped model folder with one weight of the network's last layer NaN."""
    shutil.copytree(SHIPPED, root)
    tensors = load_file(root / "model.safetensors")
    name = next(k for k in tensors if k.startswith("final_layer") and k.endswith("weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, root / "model.safetensors")
    return root


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return nan_weights_copy(tmp_path_factory.mktemp("nan") / "model")


@pytest.fixture(scope="module")
def nan_pipe(nan_model: Path) -> SelfEPipeline:
    return SelfEPipeline.from_pretrained(nan_model, fast_path=EAGER)


@pytest.mark.parametrize("fast", [False, True])
def test_nan_weights_give_a_warning_naming_the_step(nan_pipe: SelfEPipeline, fast: bool) -> None:
    pipe = nan_pipe
    with pytest.warns(
        NonFiniteOutputWarning, match=r"model 'shapes': the sampled latents went NaN or Inf at step 1 of 4"
    ):
        out = pipe("a red circle", steps=4, seed=0, output_type="pt", fast=fast)
    assert "at step 1 of 4" in out.nonfinite and "come out black" in out.nonfinite
    with pytest.warns(NonFiniteOutputWarning, match="at step 1 of 2") as record:
        assert pipe("a red circle", steps=2, seed=0, output_type="latent", fast=fast).nonfinite
    assert record[0].filename == __file__  # it points at the caller, through the lock's frame


def test_the_truncation_warning_points_at_the_caller(pipe: SelfEPipeline) -> None:
    long = " and ".join(["a red circle"] * pipe.text_encoders.t5.max_length)
    with pytest.warns(UserWarning, match="truncated") as record:
        pipe(long, steps=1, seed=0, output_type="latent")
    assert record[0].filename == __file__


def test_a_finite_output_is_silent_and_a_broken_decoder_is_named(pipe: SelfEPipeline) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonFiniteOutputWarning)
        assert pipe("a red circle", steps=2, seed=0).nonfinite is None
    decoder_weight = next(p for name, p in pipe.autoencoder.named_parameters() if "decoder" in name)
    kept = decoder_weight.detach().clone()
    try:
        with torch.no_grad():
            decoder_weight.fill_(float("nan"))
        with pytest.warns(NonFiniteOutputWarning, match="the autoencoder decoded finite latents to NaN or Inf"):
            pipe("a red circle", steps=2, seed=0)
    finally:
        with torch.no_grad():
            decoder_weight.copy_(kept)


def test_the_first_nonfinite_step_is_found_and_the_search_stops_there() -> None:
    """A stand-in network that goes NaN once t falls below 0.5: the search names the step whose output went
    non-finite, and runs no network pass past it."""
    steps, calls = 6, []
    grid = sampling_grid(steps, 1.0)
    first_bad = next(k for k in range(steps) if grid[k] < 0.5)

    def net(x, t, s, cond):
        calls.append(float(t[0]))
        return torch.full_like(x, float("nan")) if float(t[0]) < 0.5 else torch.zeros_like(x)

    config = SamplerConfig(steps=steps, guidance=None, time_shift={"mu": 1.0})
    noise = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    assert first_nonfinite_step(net, noise, {}, None, config, None, torch.Generator().manual_seed(1)) == first_bad
    assert len(calls) == first_bad + 1
    finite = SamplerConfig(steps=2, guidance=None, time_shift={"mu": 1.0})
    assert first_nonfinite_step(lambda x, *a: torch.zeros_like(x), noise, {}, None, finite, None, None) is None


def test_generate_exits_non_zero_naming_the_model_and_the_step(nan_model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "grid.png"
    argv = ["--model", str(nan_model), "--prompt", "a red circle", "--steps", "2", "--eager", "--no-progress"]
    assert generate_main([*argv, "--out", str(out)]) == 3
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("selfe generate: error:"))
    assert f"the model {str(nan_model)!r} at 2 steps" in line and "at step 1 of 2" in line
    assert "no image written" in line and "Warning" not in err
    assert not out.parent.exists() or not list(out.parent.iterdir())
