"""The compiled text encoders and decoder (selfe.sampling.fast_components) against their eager selves.

Compiled here with aot_eager (dynamo traces, guards and recompiles exactly as with inductor, without its
C++ build, minutes on this CPU) and with torch._dynamo.testing.CompileCounter, which counts the frames
dynamo compiles; one test per part runs inductor itself (slow). Tolerances the flash-attention way: the
compiled part's error against a float64 eager reference is at most about twice eager float32's own.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from selfe.components.autoencoder import AutoEncoder
from selfe.components.autoencoder import tiny as tiny_autoencoder
from selfe.components.text_encoders import TextEncoders
from selfe.sampling.fast_components import FastComponents
from selfe.sampling.fast_path import FastPathConfig
from selfe.sampling.pipeline import SelfEPipeline
from selfe.utils.compiling import CompiledPerShape
from tests.helpers_text import (
    allow_inductor_unpickling,
)

pytestmark = pytest.mark.usefixtures("no_network")  # the whole module offline, no unpickling

CPU = torch.device("cpu")
PROMPTS = ["a photo of a cat", "a red dog on the table, photo of the dog"]
PARTS_ON = dict(compile_text_encoder=True, compile_decoder=True, decoder_channels_last=True)


def fast_config(backend, **overrides) -> FastPathConfig:
    return FastPathConfig(compile=True, compile_backend=backend, **{**PARTS_ON, **overrides})


def random_autoencoder(seed: int = 0, dtype: torch.dtype = torch.float32) -> AutoEncoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoEncoder(tiny_autoencoder()).to(dtype).eval().requires_grad_(False)


def assert_flash_tolerance(got: torch.Tensor, eager: torch.Tensor, reference: torch.Tensor) -> None:
    """got's error against the float64 reference at most twice eager's own (plus float32's last bits)."""
    own = (eager.double() - reference).abs().max().item()
    err = (got.double() - reference).abs().max().item()
    assert err <= 2 * own + 1e-6 * reference.abs().max().item(), (err, own)


# ----------------------------------------------------------------------------------------------
# Text encoders


@pytest.mark.slow
def test_text_encoders_compile_once_per_bucket_and_equal_eager(snapshots: tuple[Path, Path]) -> None:
    torch._dynamo.reset()
    counter = CompileCounter()
    encoders = TextEncoders.from_snapshots(*snapshots, t5_max_length=64)
    eager = {bucket: encoders.encode(PROMPTS, bucket=bucket) for bucket in (4, 32)}
    FastComponents(fast_config(counter), encoders, None).prepare(CPU)
    assert isinstance(encoders.t5.compiled_model, CompiledPerShape)
    for bucket, want in eager.items():
        got = encoders.encode(PROMPTS, bucket=bucket)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
    frames = counter.frame_count
    assert frames > 0 and len(encoders.t5.compiled_model.shapes) == 2  # T5 at (2, 16) and (2, 32)
    with torch._dynamo.config.patch(error_on_recompile=True):  # same shapes, other prompts: no recompile
        encoders.encode(["zebra", "a blue square on a table"], bucket=4)
        encoders.encode(["a cat", "a dog"], bucket=32)
    assert counter.frame_count == frames


def test_text_encoders_stay_eager_on_a_cpu_by_default(snapshots: tuple[Path, Path]) -> None:
    encoders = TextEncoders.from_snapshots(*snapshots, t5_max_length=64)
    components = FastComponents(FastPathConfig(compile=True), encoders, random_autoencoder())
    components.prepare(CPU)
    assert encoders.t5.compiled_model is None and encoders.clip.compiled_model is None
    assert not components.decoder_compiled and not components.autoencoder.decoder_channels_last
    assert components.compiles_text_encoder(torch.device("cuda")) and components.uses_compile_cache(
        torch.device("cuda")
    )
    off = FastComponents(FastPathConfig(compile=False), encoders, None)
    assert not off.compiles_text_encoder(torch.device("cuda")) and not off.uses_channels_last(torch.device("cuda"))


@pytest.mark.slow
def test_inductor_t5_equals_eager_within_twice_its_error(snapshots: tuple[Path, Path]) -> None:
    torch._dynamo.reset()
    encoders = TextEncoders.from_snapshots(*snapshots, t5_max_length=64)
    eager = encoders.encode(PROMPTS, bucket=16)["txt"]
    encoders.t5.model.double()
    reference = encoders.encode(PROMPTS, bucket=16)["txt"]
    encoders.t5.model.float()
    FastComponents(fast_config("inductor"), encoders, None).prepare(CPU)
    with allow_inductor_unpickling():
        got = encoders.encode(PROMPTS, bucket=16)["txt"]
    assert_flash_tolerance(got, eager, reference)


# ----------------------------------------------------------------------------------------------
# The decoder


def test_channels_last_compiled_decoder_equals_eager_and_tiles_share_one_trace() -> None:
    torch._dynamo.reset()
    counter = CompileCounter()
    autoencoder = random_autoencoder()
    latents = torch.randn(2, 16, 12, 12, generator=torch.Generator().manual_seed(0))
    eager, eager_tiles = autoencoder.decode(latents), autoencoder.tiled_decode(latents, tile=8, overlap=4)
    components = FastComponents(fast_config(counter), None, autoencoder)
    components.prepare(CPU)
    assert components.decoder_compiled and autoencoder.decoder_channels_last
    assert autoencoder.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    got = autoencoder.decode(latents)
    assert got.is_contiguous()  # handed back in the usual layout
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    tiles = autoencoder.tiled_decode(latents, tile=8, overlap=4)  # four 8 x 8 tiles: one shape
    torch.testing.assert_close(tiles, eager_tiles, rtol=1e-5, atol=1e-5)
    assert len(autoencoder.compiled_decoder.shapes) == 2 and counter.frame_count == 2
    # The state dict is the plain one (the compiled decoder is no submodule).
    assert set(autoencoder.state_dict()) == set(random_autoencoder().state_dict())


@pytest.mark.slow
def test_inductor_channels_last_decoder_equals_eager_within_twice_its_error() -> None:
    torch._dynamo.reset()
    autoencoder = random_autoencoder()
    latents = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    eager = autoencoder.decode(latents)
    reference = random_autoencoder(dtype=torch.float64).decode(latents.double())
    FastComponents(fast_config("inductor"), None, autoencoder).prepare(CPU)
    with allow_inductor_unpickling():
        got = autoencoder.decode(latents)
    assert_flash_tolerance(got, eager, reference)


def test_past_max_shapes_the_eager_part_runs_with_one_warning() -> None:
    torch._dynamo.reset()
    autoencoder = random_autoencoder()
    FastComponents(fast_config("eager", max_compiled_shapes=1), None, autoencoder).prepare(CPU)
    autoencoder.decode(torch.zeros(1, 16, 4, 4))
    with pytest.warns(UserWarning, match="compiled decoder already serves 1 shapes"):
        autoencoder.decode(torch.zeros(1, 16, 6, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        autoencoder.decode(torch.zeros(1, 16, 6, 6))  # warned once per shape
    assert len(autoencoder.compiled_decoder.shapes) == 1


# ----------------------------------------------------------------------------------------------
# The pipeline: a new resolution mid-serving


@pytest.mark.slow
def test_a_new_resolution_compiles_once_and_the_others_stay(tmp_path: Path) -> None:
    from tests.engine.test_pipeline import write_tiny_pipeline

    torch._dynamo.reset()
    counter = CompileCounter()
    config = fast_config(counter, compile_cache=False)
    pipe = SelfEPipeline.from_pretrained(write_tiny_pipeline(tmp_path / "tiny"), fast_path=config)
    reference = SelfEPipeline.from_pretrained(tmp_path / "tiny", fast_path=dataclasses.replace(config, compile=False))
    call = dict(steps=2, seed=0, output_type="pt", guidance=None)
    for size in (16, 32):
        pipe.warmup(1, size, size, guidance=False)
    frames = counter.frame_count
    with torch._dynamo.config.patch(error_on_recompile=True):  # warmed shapes serve without a compile
        for size in (16, 32):
            pipe("a cat", height=size, width=size, **call)
    assert counter.frame_count == frames
    new = pipe("a cat", height=24, width=24, **call)  # mid-serving: step, decoder compile once each
    added = counter.frame_count - frames
    assert added >= 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        for size in (16, 24, 32):
            pipe("a dog", height=size, width=size, **call)
    assert counter.frame_count == frames + added
    torch.testing.assert_close(new.images, reference("a cat", height=24, width=24, **call).images, rtol=1e-4, atol=1e-5)
    assert [shape["height"] for shape in pipe.components.warmed] == [16, 32]


@pytest.mark.slow
def test_the_pipeline_keeps_prompts_and_negative_prompts_and_the_images_stay(tmp_path: Path) -> None:
    from tests.engine.test_pipeline import write_tiny_pipeline

    eager = FastPathConfig(compile=False, cuda_graph="off")
    root = write_tiny_pipeline(tmp_path / "tiny")
    plain = SelfEPipeline.from_pretrained(root, fast_path=eager)
    kept = SelfEPipeline.from_pretrained(root, fast_path=dataclasses.replace(eager, prompt_cache_size=4))
    assert kept.text_encoders.prompt_cache.capacity == 4 and plain.text_encoders.prompt_cache.capacity == 0
    batches: list[list[str]] = []
    t5_encode = kept.text_encoders.t5.encode
    kept.text_encoders.t5.encode = lambda prompts, **kw: batches.append(list(prompts)) or t5_encode(prompts, **kw)
    call = dict(height=16, width=16, steps=1, guidance=3.0, output_type="pt", negative_prompt="blurry")
    for seed in (0, 1):
        want = plain(["a cat", "a dog"], seed=seed, **call).images
        torch.testing.assert_close(kept(["a cat", "a dog"], seed=seed, **call).images, want, rtol=1e-5, atol=1e-6)
    assert batches == [["a cat", "a dog"], ["blurry"]]  # the second call encoded nothing
