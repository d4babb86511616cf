"""SelfEPipeline end to end on a tiny pipeline directory in the real formats, offline.

The directory holds a tiny random MMDiT (model.safetensors + config.json as the trainer exports it), a
tiny FLUX-architecture autoencoder (ae.safetensors) and tiny T5 / CLIP snapshots. The fast path is
compiled with the aot_eager backend: dynamo traces, guards and recompiles exactly as with inductor, but
a C++ build of the step (about 80 s on 2 cores) stays out of CI.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import selfe.shapes
from selfe.components.autoencoder import AutoEncoder
from selfe.components.autoencoder import tiny as tiny_autoencoder
from selfe.generate import generate_main
from selfe.network.config import tiny as tiny_mmdit
from selfe.sampling.fast_path import FastPathConfig, FastSampler
from selfe.sampling.pipeline import SelfEPipeline, SelfEPipelineOutput
from tests.helpers_pipeline import ReplayOnCPU as _ReplayOnCPU
from tests.helpers_pipeline import random_mmdit, write_pipeline_dir
from tests.helpers_text import allow_inductor_unpickling

pytestmark = pytest.mark.usefixtures("no_network")  # the whole module offline, no unpickling

SIZE = 32  # pixels; the tiny autoencoder downsamples 2x and patches are 2x2, so 16 x 16 latents, 64 tokens
FAST = FastPathConfig(compile=True, compile_backend="aot_eager")
PROMPTS = ["a photo of a cat", "a red dog on the table"]


def write_tiny_pipeline(root: Path, seed: int = 0, **model_overrides) -> Path:
    """A pipeline directory with random weights: the layout `SelfEPipeline.from_pretrained` documents."""
    root.mkdir(parents=True, exist_ok=True)
    config, ae_config = dataclasses.replace(tiny_mmdit(), **model_overrides), tiny_autoencoder()
    model = random_mmdit(config, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        autoencoder = AutoEncoder(ae_config)
    save_file({k: v.contiguous() for k, v in autoencoder.state_dict().items()}, root / "ae.safetensors")
    ae_dict = dataclasses.asdict(ae_config)
    ae_dict["ch_mult"] = list(ae_dict["ch_mult"])
    meta = {
        "model": config.to_dict(),
        "sampler": {"steps": 2, "guidance": 5.0, "kernel_backend": "torch"},
        "autoencoder": ae_dict,
        "text": {"t5_max_length": 16, "clip_max_length": 16},
    }
    return write_pipeline_dir(root, model, meta)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_pipeline(tmp_path_factory.mktemp("pipeline") / "tiny")


@pytest.fixture(scope="module")
def pipe(pipeline_dir: Path) -> SelfEPipeline:
    return SelfEPipeline.from_pretrained(pipeline_dir, fast_path=FAST)


def run(pipe: SelfEPipeline, **kwargs) -> SelfEPipelineOutput:
    kwargs = {"height": SIZE, "width": SIZE, "output_type": "pt", **kwargs}
    return pipe(kwargs.pop("prompt", PROMPTS), **kwargs)


def test_from_pretrained_generates_at_any_step_count(pipe: SelfEPipeline) -> None:
    assert pipe.size_multiple == 4 and pipe.dtype == torch.float32
    results = {}
    for steps in (1, 2, 4):
        out = run(pipe, steps=steps, seed=0, fast=False)
        assert out.images.shape == (2, 3, SIZE, SIZE) and out.latents.shape == (2, 16, SIZE // 2, SIZE // 2)
        assert torch.isfinite(out.images).all() and 0 <= out.images.min() and out.images.max() <= 1
        assert {"text_encoder", "denoise", "decode", "end_to_end"} <= set(out.timings)
        stages = sum(out.timings[k] for k in ("text_encoder", "denoise", "decode"))
        assert 0 < stages <= out.timings["end_to_end"]
        results[steps] = out.images
    assert not torch.allclose(results[1], results[2]) and not torch.allclose(results[2], results[4])
    # Prompts matter, seeds matter, and a seed reproduces.
    assert not torch.allclose(results[2][0], results[2][1])
    again = run(pipe, steps=2, seed=0, fast=False).images
    torch.testing.assert_close(again, results[2], rtol=0, atol=0)
    assert not torch.allclose(run(pipe, steps=2, seed=1, fast=False).images, results[2])


def test_output_types_and_aliases(pipe: SelfEPipeline) -> None:
    pil = pipe("a cat", num_inference_steps=1, guidance_scale=3.0, height=SIZE, width=SIZE, seed=3, fast=False)
    assert len(pil.images) == 1 and pil.images[0].size == (SIZE, SIZE) and pil.images[0].mode == "RGB"
    pt = run(pipe, prompt="a cat", steps=1, guidance=3.0, seed=3, fast=False)
    expected = (pt.images[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(np.asarray(pil.images[0]), expected)
    arr = run(pipe, prompt="a cat", steps=1, seed=3, output_type="np", fast=False).images
    assert isinstance(arr, np.ndarray) and arr.shape == (1, SIZE, SIZE, 3)
    latent = run(pipe, prompt="a cat", steps=1, seed=3, output_type="latent", fast=False)
    assert latent.images is latent.latents and "decode" not in latent.timings
    many = run(pipe, prompt=["a cat"], steps=1, num_images_per_prompt=3, seed=3, fast=False)
    assert many.images.shape[0] == 3 and not torch.allclose(many.images[0], many.images[1])
    unguided = run(pipe, prompt="a cat", steps=1, guidance=None, seed=3, fast=False)
    assert not torch.allclose(unguided.images, pt.images)


def test_fast_path_matches_eager_and_never_recompiles(pipeline_dir: Path) -> None:
    torch._dynamo.reset()
    pipe = SelfEPipeline.from_pretrained(pipeline_dir, fast_path=FAST)  # fresh: the first forward is compiled
    seconds = pipe.warmup(batch=2, height=SIZE, width=SIZE)
    assert seconds > 0
    cases = [
        dict(steps=2, seed=0),
        dict(steps=1, seed=1, guidance=2.0),
        dict(steps=4, seed=2, guidance=7.5, s_policy="midpoint"),
        dict(steps=3, seed=3, eta=0.5, s_policy="fixed", s_fixed=0.3),
    ]
    # A new t, s, omega, eta, noise or step count is tensor data: any recompile raises here.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for case in cases:
            fast = run(pipe, fast=True, **case)
            assert "warmup" not in fast.timings
            eager = run(pipe, fast=False, **case)
            torch.testing.assert_close(fast.latents, eager.latents, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(fast.images, eager.images, rtol=1e-4, atol=1e-5)
    assert pipe.fast.num_graphs == 0  # no CUDA on this machine: compiled step only


def test_fast_path_compiles_once_per_shape(pipe: SelfEPipeline) -> None:
    torch._dynamo.reset()
    first = run(pipe, prompt=["a cat"], steps=1, seed=0, sampler="euler", fast=True)
    assert "warmup" in first.timings  # the first call of a shape warms up by itself
    second = run(pipe, prompt=["a dog"], steps=3, seed=1, sampler="euler", guidance=1.5, fast=True)
    assert "warmup" not in second.timings
    eager = run(pipe, prompt=["a dog"], steps=3, seed=1, sampler="euler", guidance=1.5, fast=False)
    torch.testing.assert_close(second.images, eager.images, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_step_serves_more_shapes_than_dynamos_recompile_limit(pipeline_dir: Path) -> None:
    """Every (batch, size, guided, sampler) is a trace of the one compiled step: past dynamo's default of
    8 under fullgraph that was a hard error. Up to max_compiled_shapes they compile; one more runs the
    uncompiled step (same images) with one warning, and dynamo's global limit is left as it was."""
    torch._dynamo.reset()
    limit = 10
    fast_path = FastPathConfig(compile=True, compile_backend="eager", max_compiled_shapes=limit)
    pipe = SelfEPipeline.from_pretrained(pipeline_dir, fast_path=fast_path)
    default_limit = torch._dynamo.config.recompile_limit
    assert default_limit < limit
    for n in range(1, limit + 1):
        run(pipe, prompt="a cat", steps=1, seed=n, num_images_per_prompt=n, guidance=None)
    assert len(pipe.fast._compiled_keys) == limit and torch._dynamo.config.recompile_limit == default_limit
    with pytest.warns(UserWarning, match="max_compiled_shapes=10"):
        past = run(pipe, prompt="a cat", steps=2, seed=0, num_images_per_prompt=limit + 1, guidance=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once for that shape
        again = run(pipe, prompt="a cat", steps=2, seed=0, num_images_per_prompt=limit + 1, guidance=None)
    eager = run(pipe, prompt="a cat", steps=2, seed=0, num_images_per_prompt=limit + 1, guidance=None, fast=False)
    torch.testing.assert_close(past.images, eager.images, rtol=0, atol=0)
    torch.testing.assert_close(again.images, eager.images, rtol=0, atol=0)


def test_blocks_compile_as_nested_regions_and_fall_back_whole(tmp_path: Path, monkeypatch) -> None:
    """FastPathConfig.compile_regions: the step's one graph calls each block through a nested compile
    region (compiled once per block kind); the images are the eager ones, with regions or without. If the
    compiler fails on the regions, the step is compiled whole, with one warning."""
    import selfe.network.model

    # Two blocks of each kind: dynamo inlines a region that is called once.
    pipeline_dir = write_tiny_pipeline(tmp_path / "deeper", depth_double=2, depth_single=2)

    def recorder(graphs: list[str]):
        def backend(gm, example_inputs):
            graphs.append(gm.code)
            return gm.forward

        return backend

    eager = run(SelfEPipeline.from_pretrained(pipeline_dir, fast_path=FastPathConfig(compile=False)), seed=4)
    for regions in (True, False):
        torch._dynamo.reset()
        graphs: list[str] = []
        fast_path = FastPathConfig(compile=True, compile_backend=recorder(graphs), compile_regions=regions)
        pipe = SelfEPipeline.from_pretrained(pipeline_dir, fast_path=fast_path)
        torch.testing.assert_close(run(pipe, seed=4).images, eager.images, rtol=0, atol=1e-6)
        assert len(graphs) == 1 and ("invoke_subgraph" in graphs[0]) == regions, f"regions={regions}"

    @torch.compiler.nested_compile_region
    def breaks(block, *args):  # a region the compiler refuses under fullgraph
        torch._dynamo.graph_break()
        return block(*args)

    torch._dynamo.reset()
    monkeypatch.setattr(selfe.network.model, "_block_region", breaks)
    graphs = []
    pipe = SelfEPipeline.from_pretrained(
        pipeline_dir, fast_path=FastPathConfig(compile=True, compile_backend=recorder(graphs))
    )
    with pytest.warns(UserWarning, match="compiling it whole"):
        fallen_back = run(pipe, seed=4)
    torch.testing.assert_close(fallen_back.images, eager.images, rtol=0, atol=1e-6)
    assert pipe.model.compile_regions is False and "invoke_subgraph" not in graphs[-1]


def test_eager_step_of_the_fast_path_matches(pipeline_dir: Path) -> None:
    plain = SelfEPipeline.from_pretrained(pipeline_dir, fast_path=FastPathConfig(compile=False))
    forwards = []
    plain.model.register_forward_hook(lambda *_: forwards.append(1))
    a = run(plain, steps=2, seed=5, fast=True)
    # Nothing to compile or capture: no warm-up step, one forward per step (CFG's two branches batched).
    assert "warmup" not in a.timings and len(forwards) == 2
    b = run(plain, steps=2, seed=5, fast=False)
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)


def test_graph_replay_bookkeeping(pipeline_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Static inputs are refreshed correctly between steps and calls (condition once per call, x / t / s /
    noise every step), one graph per shape serves every step count, and results are copies."""
    plain = SelfEPipeline.from_pretrained(pipeline_dir, fast_path=FastPathConfig(compile=False))
    monkeypatch.setattr(FastSampler, "graph_class", _ReplayOnCPU)
    monkeypatch.setattr(FastSampler, "uses_cuda_graph", lambda self, device: True)
    plain.warmup(batch=2, height=SIZE, width=SIZE)
    assert plain.fast.num_graphs == 1
    outputs = []
    for case in (dict(steps=3, seed=0), dict(steps=1, seed=1, guidance=2.0), dict(steps=2, seed=2)):
        replayed = run(plain, fast=True, **case)
        outputs.append(replayed.latents)
        eager = run(plain, fast=False, **case)
        torch.testing.assert_close(replayed.images, eager.images, rtol=1e-5, atol=1e-6)
    other_prompts = run(plain, prompt=["a blue dog", "the fake image"], steps=2, seed=2, fast=True)
    eager = run(plain, prompt=["a blue dog", "the fake image"], steps=2, seed=2, fast=False)
    torch.testing.assert_close(other_prompts.images, eager.images, rtol=1e-5, atol=1e-6)
    run(plain, prompt=["a cat"], steps=2, seed=0, fast=True, guidance=None)  # new shape: its own graph
    assert plain.fast.num_graphs == 2  # batch 2 guided, batch 1 unguided
    assert not torch.allclose(outputs[0], outputs[2])  # earlier results were copies, not the static output


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(prompt=3), "prompt"),
        (dict(prompt=[]), "prompt"),
        (dict(prompt=["ok", None]), r"prompt\[1\]"),
        (dict(steps=0), "steps"),
        (dict(steps=1.5), "steps"),
        (dict(num_inference_steps=-1), "steps"),
        (dict(steps=2, num_inference_steps=3), "num_inference_steps"),
        (dict(guidance=float("nan")), "guidance"),
        (dict(guidance_scale=float("inf")), "guidance"),
        (dict(guidance="5"), "guidance"),
        (dict(guidance=-1.0), "guidance must be a finite number >= 0"),
        (dict(height=30), "height"),
        (dict(width=0), "width"),
        (dict(width=SIZE * 1000), "width"),
        (dict(sampler="heun"), "sampler"),
        (dict(s_policy="random"), "s_policy"),
        (dict(eta=2.0), "eta"),
        (dict(s_fixed=-0.1), "s_fixed"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(seed=-1), "seed"),
        (dict(seed=1, generator=torch.Generator()), "seed or generator"),
        (dict(generator=7), "generator"),
        (dict(generator=[torch.Generator(), 7]), "torch.Generators only"),
        (dict(generator=[torch.Generator()]), "one per image: got 1 for 2 images"),
        (dict(generator=[torch.Generator()] * 2, num_images_per_prompt=2), "got 2 for 4 images"),
        (dict(fast="yes"), "fast"),
    ],
)
def test_inputs_are_checked_before_any_work(
    pipe: SelfEPipeline, monkeypatch: pytest.MonkeyPatch, kwargs: dict, match: str
) -> None:
    def no_work(*args, **kw):
        raise AssertionError("text encoding started before the arguments were checked")

    monkeypatch.setattr(pipe.text_encoders, "encode", no_work)
    with pytest.raises((ValueError, TypeError), match=match):
        run(pipe, **kwargs)


def test_the_text_bucket_cuts_padding_and_keeps_the_images(pipeline_dir: Path) -> None:
    eager = dataclasses.replace(FAST, compile=False)
    full = SelfEPipeline.from_pretrained(pipeline_dir, fast_path=dataclasses.replace(eager, text_bucket=None))
    cut = SelfEPipeline.from_pretrained(pipeline_dir, fast_path=dataclasses.replace(eager, text_bucket=2))
    # T5 pads to 16 here; the longest prompt has 7 tokens (EOS included), so the bucket is 8 (2, 4, 8).
    cond_full, null_full = full.encode_prompts(PROMPTS, guided=True)
    cond, null = cut.encode_prompts(PROMPTS, guided=True)
    assert cond_full["txt"].shape[1] == 16 and int(cond_full["txt_mask"].sum(1).max()) == 7
    assert cond["txt"].shape[1] == null["txt"].shape[1] == 8
    torch.testing.assert_close(cond["txt"], cond_full["txt"][:, :8])  # T5 ran on 8 tokens, not 16
    assert torch.equal(null["txt_mask"], null_full["txt_mask"][:, :8])
    # Padded text is masked out as keys and sits at position 0: the images do not change.
    for fast in (True, False):
        want, got = run(full, seed=3, fast=fast).images, run(cut, seed=3, fast=fast).images
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    # Negative prompts count towards the bucket, and take the null prompt's place at the same length.
    for negatives, length in ((["a blurry photo of a dog and a cat and a table", ""], 16), (["a photo", ""], 4)):
        cond, neg = cut.encode_prompts(["a cat", "a dog"], guided=True, negative=negatives)
        assert cond["txt"].shape[1] == neg["txt"].shape[1] == length
        want = run(full, prompt=["a cat", "a dog"], seed=3, negative_prompt=negatives).images
        got = run(cut, prompt=["a cat", "a dog"], seed=3, negative_prompt=negatives).images
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    # A long prompt keeps the encoder's length; warm-up takes the bucket to prepare.
    long_prompt = " ".join(["red"] * 40)
    assert cut.encode_prompts([long_prompt], guided=False)[0]["txt"].shape[1] == 16
    assert cut.encode_prompts([""], guided=False, text_tokens=5)[0]["txt"].shape[1] == 8
    with pytest.raises(ValueError, match="at most the text encoder's padded length 16, got 17"):
        cut.warmup(1, text_tokens=17)
    with pytest.raises(ValueError, match="text_tokens"):
        cut.warmup(1, text_tokens=0)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="text_bucket"):
            FastPathConfig(text_bucket=bad)


def test_the_text_bucket_with_an_unmasked_t5_cuts_its_states_after(pipeline_dir: Path, tmp_path: Path) -> None:
    # FLUX's way: T5 without its attention mask, so real states depend on the padding. T5 then runs at its
    # full length and only the denoiser's input is cut: still exact.
    unmasked = tmp_path / "unmasked"
    shutil.copytree(pipeline_dir, unmasked)
    meta = json.loads((unmasked / "config.json").read_text())
    meta["text"]["t5_attention_mask"] = False
    (unmasked / "config.json").write_text(json.dumps(meta))
    eager = dataclasses.replace(FAST, compile=False)
    full = SelfEPipeline.from_pretrained(unmasked, fast_path=dataclasses.replace(eager, text_bucket=None))
    cut = SelfEPipeline.from_pretrained(unmasked, fast_path=dataclasses.replace(eager, text_bucket=2))
    cond_full, _ = full.encode_prompts(PROMPTS, guided=True)
    cond, _ = cut.encode_prompts(PROMPTS, guided=True)
    assert cond["txt"].shape[1] == 8 and torch.equal(cond["txt"], cond_full["txt"][:, :8])  # the same T5 run
    torch.testing.assert_close(run(cut, seed=3).images, run(full, seed=3).images, atol=2e-5, rtol=0)


def test_pipeline_directory_errors(pipeline_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pipeline directory"):
        SelfEPipeline.from_pretrained(tmp_path / "nothing")
    broken = tmp_path / "broken"
    shutil.copytree(pipeline_dir, broken)
    (broken / "ae.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="autoencoder"):
        SelfEPipeline.from_pretrained(broken)
    meta = json.loads((pipeline_dir / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**meta, "extra": 1}))
    with pytest.raises(ValueError, match="extra"):
        SelfEPipeline.from_pretrained(broken, autoencoder_path=pipeline_dir / "ae.safetensors")
    (broken / "config.json").write_text(json.dumps({**meta, "model": {**meta["model"], "txt_dim": 48}}))
    with pytest.raises(ValueError, match="txt_in"):  # weights of another shape: the key check names it
        SelfEPipeline.from_pretrained(broken, autoencoder_path=pipeline_dir / "ae.safetensors")
    shutil.rmtree(broken / "text_encoder")
    (broken / "config.json").write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError, match="T5"):
        SelfEPipeline.from_pretrained(broken, autoencoder_path=pipeline_dir / "ae.safetensors")


def test_flux_layout_and_bare_model_config(pipeline_dir: Path, tmp_path: Path, pipe: SelfEPipeline) -> None:
    """diffusers/FLUX order (text_encoder = CLIP, text_encoder_2 = T5) and a config.json that is just the
    MMDiTConfig dict load too; sampler defaults then come from SamplerConfig."""
    other = tmp_path / "flux_layout"
    other.mkdir()
    for name in ("model.safetensors", "ae.safetensors"):
        (other / name).symlink_to(pipeline_dir / name)
    (other / "text_encoder").symlink_to(pipeline_dir / "text_encoder_2")
    (other / "text_encoder_2").symlink_to(pipeline_dir / "text_encoder")
    meta = json.loads((pipeline_dir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**meta, "sampler": {"kernel_backend": "torch"}}))
    loaded = SelfEPipeline.from_pretrained(other)
    assert loaded.text_encoders.t5.width == 32 and loaded.text_encoders.clip.width == 16
    expected = run(pipe, steps=1, seed=0, fast=False).images
    torch.testing.assert_close(run(loaded, steps=1, seed=0, fast=False).images, expected)
    (other / "config.json").write_text(json.dumps(meta["model"]))
    with pytest.raises(FileNotFoundError, match="autoencoder"):  # no autoencoder config: FLUX.1 assumed
        SelfEPipeline.from_pretrained(other, autoencoder_path=other / "missing.safetensors")


def test_from_components(pipe: SelfEPipeline) -> None:
    same = SelfEPipeline.from_components(pipe.model, pipe.autoencoder, pipe.text_encoders)
    torch.testing.assert_close(
        run(same, steps=1, seed=4, fast=False).images, run(pipe, steps=1, seed=4, fast=False).images
    )
    with pytest.raises(TypeError, match="model"):
        SelfEPipeline.from_components(pipe.autoencoder, pipe.autoencoder, pipe.text_encoders)


def test_generate_cli_writes_images_and_grid(pipeline_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "grid.png"
    argv = ["--model", str(pipeline_dir), "--prompt", *PROMPTS, "--steps", "1", "2", "--seed", "0"]
    argv += ["--height", str(SIZE), "--width", str(SIZE), "--out", str(out), "--eager", "--upscale", "1"]
    assert generate_main(argv) == 0
    from PIL import Image

    grid = Image.open(out)
    assert grid.size == (2 * SIZE, 2 * SIZE)  # columns: step counts; rows: prompts
    singles = sorted(p.name for p in tmp_path.glob("grid_p*.png"))
    assert singles == ["grid_p00_1steps.png", "grid_p00_2steps.png", "grid_p01_1steps.png", "grid_p01_2steps.png"]
    cell = np.asarray(grid)[SIZE:, SIZE:]  # prompt 1 at 2 steps
    np.testing.assert_array_equal(cell, np.asarray(Image.open(tmp_path / "grid_p01_2steps.png")))
    assert "steps" in capsys.readouterr().err  # the progress bar


def test_generate_cli_without_model_says_how_to_get_one(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(selfe.shapes, "shipped_model_dir", lambda: None)  # as in an install without it
    assert generate_main(["--prompt", "a cat"]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "model.safetensors" in err and "export" in err
    assert generate_main(["--model", "/nonexistent/selfe", "--prompt", "a cat"]) == 2
    assert "pipeline directory" in capsys.readouterr().err


@pytest.mark.gpu
def test_to_cuda_moves_every_part_and_samples_like_the_cpu(pipeline_dir: Path) -> None:
    """pipe.to("cuda") after loading on the CPU: model, autoencoder, text encoders and the cached null
    condition all move; the graphed step samples what the CPU's eager step does (fp32, tolerance)."""
    pipe = SelfEPipeline.from_pretrained(pipeline_dir, torch_dtype=torch.float32, device="cpu")
    # The same starting noise from a CPU generator, and eta 0: no per-step noise, which a CUDA device draws
    # from a generator of its own.
    same_noise = lambda: dict(steps=2, eta=0.0, generator=torch.Generator().manual_seed(0))
    on_cpu = run(pipe, fast=False, **same_noise())
    pipe.to("cuda")
    assert pipe.device.type == "cuda" and pipe.text_encoders.t5.device.type == "cuda"
    assert {p.device.type for p in pipe.autoencoder.parameters()} == {"cuda"}
    with allow_inductor_unpickling():
        on_gpu = run(pipe, fast=True, **same_noise())
    assert pipe.fast.num_graphs == 1
    torch.testing.assert_close(on_gpu.images.cpu(), on_cpu.images, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_cuda_graph_matches_eager_on_gpu(tmp_path: Path) -> None:
    """The real thing: inductor-compiled step captured in a CUDA graph, replayed for 1, 2, 4 and 8 steps."""
    root = write_tiny_pipeline(tmp_path / "tiny")
    pipe = SelfEPipeline.from_pretrained(
        root, torch_dtype=torch.float32, device="cuda", fast_path=FastPathConfig(compile=True, cuda_graph="on")
    )
    with allow_inductor_unpickling():  # the weights above loaded under the guard; inductor needs pickle
        pipe.warmup(batch=2, height=SIZE, width=SIZE)
    assert pipe.fast.num_graphs == 1
    with torch._dynamo.config.patch(error_on_recompile=True), allow_inductor_unpickling():
        for steps in (1, 2, 4, 8):
            graphed = run(pipe, steps=steps, seed=steps, fast=True)
            eager = run(pipe, steps=steps, seed=steps, fast=False)
            torch.testing.assert_close(graphed.images, eager.images, rtol=1e-3, atol=1e-3)
    assert pipe.fast.num_graphs == 1


def test_compiled_guided_step_runs_a_named_kernel_backend(pipeline_dir: Path) -> None:
    """The guided step calls the renorm op inside the compiled step: a backend named there (not `torch`)
    used to import its provider mid-trace, which dynamo refuses under fullgraph. It is resolved before."""
    from selfe.kernels import dispatch

    dispatch.clear_resolved()
    pipe = SelfEPipeline.from_pretrained(pipeline_dir, fast_path=FastPathConfig(compile=True, compile_backend="eager"))
    pipe.sampler_defaults = dataclasses.replace(pipe.sampler_defaults, kernel_backend="triton")
    fast = run(pipe, prompt="a cat", steps=2, seed=3, guidance=3.0)
    eager = run(pipe, prompt="a cat", steps=2, seed=3, guidance=3.0, fast=False)
    torch.testing.assert_close(fast.images, eager.images, rtol=1e-4, atol=1e-5)
