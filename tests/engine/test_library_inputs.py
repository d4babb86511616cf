"""The library API as a demanding user meets it: every bad argument, config.json entry or weight file is an
error naming the argument / field / key, raised before any weights load or any sampling starts.

Complements tests/engine/test_pipeline.py (whose `test_inputs_are_checked_before_any_work` covers the common
`__call__` arguments): here `from_pretrained`'s keywords and pipeline folders, the config dataclasses built
directly, `selfe.components.weights` and the rarer call paths. Everything runs on the shipped tiny ShapesEval model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import selfe.sampling.pipeline
from selfe.components.autoencoder import AutoEncoderConfig
from selfe.components.pixel_autoencoder import SpaceToDepthConfig
from selfe.components.weights import StateDictMismatchError, load_safetensors, load_safetensors_into
from selfe.method.schedule import TimeShift
from selfe.network.config import MMDiTConfig
from selfe.network.config import tiny as tiny_mmdit
from selfe.network.model import MMDiT
from selfe.sampling.fast_path import FastPathConfig, FastSampler
from selfe.sampling.pipeline import SelfEPipeline
from selfe.sampling.sampler import SamplerConfig
from selfe.shapes import shipped_model_dir

SHIPPED = shipped_model_dir()
pytestmark = [
    pytest.mark.usefixtures("no_network"),  # the whole module offline, no unpickling
    pytest.mark.skipif(SHIPPED is None, reason="this install lacks the shipped ShapesEval model"),
]
EAGER = FastPathConfig(compile=False)
FILES = ("model.safetensors", "ae.safetensors", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def pipe() -> SelfEPipeline:
    return SelfEPipeline.from_pretrained(SHIPPED, fast_path=EAGER)


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any weight loading fails the test: the error under test must come first."""

    def no_work(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("weights started loading before the inputs were checked")

    monkeypatch.setattr(selfe.sampling.pipeline, "load_safetensors_into", no_work)
    monkeypatch.setattr(selfe.sampling.pipeline, "load_autoencoder", no_work)
    monkeypatch.setattr(selfe.sampling.pipeline.TextEncoders, "from_snapshots", no_work)


def shipped_meta() -> dict[str, Any]:
    return json.loads((SHIPPED / "config.json").read_text())


def variant(root: Path, meta: dict[str, Any] | None = None, copy: tuple[str, ...] = ()) -> Path:
    """A pipeline folder: the shipped files linked (those in `copy` copied, to be damaged) and config.json `meta`."""
    root.mkdir(parents=True)
    for name in FILES:
        if name in copy:
            (shutil.copytree if (SHIPPED / name).is_dir() else shutil.copy)(SHIPPED / name, root / name)
        else:
            (root / name).symlink_to(SHIPPED / name)
    (root / "config.json").write_text(json.dumps(shipped_meta() if meta is None else meta))
    return root


# ----------------------------------------------------------------------------------------------
# from_pretrained's keywords


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(torch_dtype="float64"), "torch_dtype"),
        (dict(torch_dtype=torch.int8), "torch_dtype"),
        (dict(torch_dtype=torch.float64), "torch_dtype"),
        (dict(torch_dtype=3), "torch_dtype"),
        (dict(text_encoder_dtype=torch.int32), "text_encoder_dtype"),
        (dict(device="gpu"), "device='gpu'"),
        (dict(device="cpu:x"), "device='cpu:x'"),
        (dict(device="cuda:99"), "device='cuda:99'"),  # no CUDA, or not 100 CUDA devices
        (dict(device="meta"), "device='meta'"),
        (dict(device=object()), "device must be"),
        (dict(max_size=0), "max_size"),
        (dict(max_size="big"), "max_size"),
        (dict(max_size=16), "'resolution'.*max_size=16"),  # the shipped config's resolution is 32
        (dict(fast_path={}), "fast_path"),
        (dict(fast_path="off"), "fast_path"),
        (dict(fp8=3), "fp8"),
        (dict(autoencoder_path=SHIPPED), "is a directory"),
        (dict(t5_path=123), "t5_path"),
    ],
)
def test_from_pretrained_keywords_are_checked_before_any_work(no_loading: None, kwargs: dict, match: str) -> None:
    with pytest.raises((ValueError, TypeError, OSError), match=match):
        SelfEPipeline.from_pretrained(SHIPPED, **kwargs)


def test_from_pretrained_path_must_be_a_folder(no_loading: None) -> None:
    with pytest.raises(NotADirectoryError, match="is a file, not a pipeline directory"):
        SelfEPipeline.from_pretrained(SHIPPED / "model.safetensors")
    with pytest.raises(TypeError, match="path must be"):
        SelfEPipeline.from_pretrained(None)  # type: ignore[arg-type]


def _set(section: str, key: str, value: Any):
    def mutate(meta: dict) -> dict:
        meta[section][key] = value
        return meta

    return mutate


def _drop(section: str, key: str):
    def mutate(meta: dict) -> dict:
        del meta[section][key]
        return meta

    return mutate


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (_drop("model", "hidden_size"), r"MMDiTConfig lacks the required keys \['hidden_size'\]"),
        (lambda meta: {**meta, "model": None}, "MMDiTConfig must be built from a dict"),
        (_set("model", "axes_dim", 8), "MMDiTConfig.axes_dim"),
        (_set("model", "qkv_bias", "no"), "MMDiTConfig.qkv_bias"),
        (_set("model", "norm_eps", math.inf), "MMDiTConfig.norm_eps"),
        (_set("model", "mlp_ratio", "4"), "MMDiTConfig.mlp_ratio"),
        (_set("model", "txt_dim", 48), "txt_in"),  # the header check names the mismatched weights
        (_set("sampler", "kernel_backend", "bogus"), "SamplerConfig.kernel_backend"),
        (_set("sampler", "guidance", -1.0), "SamplerConfig.guidance"),
        (_set("sampler", "eta", "1"), "SamplerConfig.eta"),
        (_set("sampler", "steps", True), "SamplerConfig.steps"),
        (_set("sampler", "time_shift", "x"), "SamplerConfig.time_shift"),
        (_set("sampler", "time_shift", {"mu": "x"}), "SamplerConfig.time_shift"),
        (_set("text", "t5_max_length", 16.5), "text.t5_max_length"),
        (_set("text", "t5_attention_mask", "no"), "text.t5_attention_mask"),
        (_set("text", "clip_max_length", 1000), "clip_max_length=1000"),
        (_set("autoencoder", "shift_factor", "x"), "AutoEncoderConfig.shift_factor"),
        (_set("autoencoder", "z_channels", 16), "16 latent channels, the model expects in_channels=8"),
        (lambda meta: {**meta, "resolution": 30}, "'resolution'"),
    ],
)
def test_config_json_errors_name_the_key_before_any_work(tmp_path: Path, no_loading: None, mutate, match: str) -> None:
    root = variant(tmp_path / "pipe", mutate(shipped_meta()))
    with pytest.raises(ValueError, match=match):
        SelfEPipeline.from_pretrained(root)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _int_weight(path: Path) -> None:
    tensors = load_file(path)
    tensors["img_in.weight"] = tensors["img_in.weight"].to(torch.int32)
    save_file(tensors, path)


def _folder_for_file(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _t5_width(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "d_model": 32}))


@pytest.mark.parametrize(
    ("name", "damage", "drop_ae_config", "error", "match"),
    [
        ("model.safetensors", _truncate, False, ValueError, "cannot read .*model.safetensors as safetensors"),
        ("model.safetensors", _int_weight, False, StateDictMismatchError, "dtype mismatched.*img_in.weight I32"),
        ("model.safetensors", _folder_for_file, False, IsADirectoryError, "model weights.*is a directory"),
        ("ae.safetensors", _truncate, True, ValueError, "cannot read .*ae.safetensors as safetensors"),
        ("text_encoder", _t5_width, False, ValueError, "T5 encoder's width is 32, the model expects txt_dim=64"),
    ],
)
def test_damaged_files_are_named_before_any_work(
    tmp_path: Path, no_loading: None, name: str, damage, drop_ae_config: bool, error: type, match: str
) -> None:
    meta = shipped_meta()
    if drop_ae_config:  # the autoencoder config is then read from ae.safetensors' metadata
        del meta["autoencoder"]
    root = variant(tmp_path / "pipe", meta, copy=(name,))
    damage(root / name)
    with pytest.raises(error, match=match):
        SelfEPipeline.from_pretrained(root)


def test_constructor_arguments_are_checked(pipe: SelfEPipeline) -> None:
    parts = (pipe.model, pipe.autoencoder, pipe.text_encoders)
    with pytest.raises(TypeError, match="sampler_defaults"):
        SelfEPipeline.from_components(*parts, sampler_defaults={"steps": 4})
    with pytest.raises(TypeError, match="fast_path"):
        SelfEPipeline.from_components(*parts, fast_path="off")
    with pytest.raises(ValueError, match="max_size"):
        SelfEPipeline.from_components(*parts, max_size="4096")
    with pytest.raises(TypeError, match="fast_path"):
        FastSampler(pipe.model, {"compile": False})  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# The config dataclasses, built directly


def _mmdit(**overrides: Any) -> MMDiTConfig:
    return dataclasses.replace(tiny_mmdit(), **overrides)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: _mmdit(axes_dim=16), "MMDiTConfig.axes_dim"),
        (lambda: _mmdit(mlp_ratio="4"), "MMDiTConfig.mlp_ratio"),
        (lambda: _mmdit(rope_theta=math.inf), "MMDiTConfig.rope_theta"),
        (lambda: _mmdit(time_factor=math.inf), "MMDiTConfig.time_factor"),
        (lambda: _mmdit(time_max_period=None), "MMDiTConfig.time_max_period"),
        (lambda: _mmdit(norm_eps=math.inf), "MMDiTConfig.norm_eps"),
        (lambda: _mmdit(qkv_bias="false"), "MMDiTConfig.qkv_bias"),
        (lambda: _mmdit(zero_init_gap_embedder=0), "MMDiTConfig.zero_init_gap_embedder"),
        (lambda: _mmdit(name=None), "MMDiTConfig.name"),
        (lambda: MMDiTConfig.from_dict({"hidden_size": 64}), r"lacks the required keys \['num_heads'"),
        (lambda: MMDiTConfig.from_dict(["hidden_size"]), "must be built from a dict"),
        (lambda: SamplerConfig(steps=True), "SamplerConfig.steps"),
        (lambda: SamplerConfig(steps=-3), "SamplerConfig.steps"),
        (lambda: SamplerConfig(method=None), "SamplerConfig.method"),
        (lambda: SamplerConfig(eta="1"), "SamplerConfig.eta"),
        (lambda: SamplerConfig(eta=math.nan), "SamplerConfig.eta"),
        (lambda: SamplerConfig(guidance=-1.0), "SamplerConfig.guidance"),
        (lambda: SamplerConfig(guidance="5"), "SamplerConfig.guidance"),
        (lambda: SamplerConfig(guidance=True), "SamplerConfig.guidance"),
        (lambda: SamplerConfig(s_fixed=math.nan), "SamplerConfig.s_fixed"),
        (lambda: SamplerConfig(kernel_backend="fast"), "SamplerConfig.kernel_backend"),
        (lambda: SamplerConfig(time_shift="x"), "SamplerConfig.time_shift"),
        (lambda: SamplerConfig(time_shift={"mu": "x"}), "SamplerConfig.time_shift"),
        (lambda: SamplerConfig(time_shift=TimeShift(anchors=((512, "a"), (4096, 1.15)))), "time_shift.anchors"),
        (lambda: FastPathConfig(compile=1), "FastPathConfig.compile"),
        (lambda: FastPathConfig(compile="yes"), "FastPathConfig.compile"),
        (lambda: FastPathConfig(cuda_graph="maybe"), "FastPathConfig.cuda_graph"),
        (lambda: FastPathConfig(compile_mode="fastest"), "FastPathConfig.compile_mode"),
        (lambda: FastPathConfig(compile_mode="reduce-overhead"), "FastPathConfig.compile_mode"),
        (lambda: FastPathConfig(compile_backend=""), "FastPathConfig.compile_backend"),
        (lambda: FastPathConfig(compile_backend="no_such_backend"), "FastPathConfig.compile_backend"),
        (lambda: FastPathConfig(graph_warmup_iters=0), "FastPathConfig.graph_warmup_iters"),
        (lambda: FastPathConfig(graph_warmup_iters="2"), "FastPathConfig.graph_warmup_iters"),
        (lambda: FastPathConfig(graph_warmup_iters=2.5), "FastPathConfig.graph_warmup_iters"),
        (lambda: AutoEncoderConfig(shift_factor=math.inf), "AutoEncoderConfig.shift_factor"),
        (lambda: AutoEncoderConfig(scale_factor="1"), "AutoEncoderConfig.scale_factor"),
        (lambda: SpaceToDepthConfig(shift_factor=math.nan), "SpaceToDepthConfig.shift_factor"),
        (lambda: SpaceToDepthConfig(scale_factor=math.inf), "SpaceToDepthConfig.scale_factor"),
    ],
)
def test_config_dataclasses_name_the_field(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_valid_configs_still_build_and_ints_are_not_bools() -> None:
    """The stricter checks keep what is valid (JSON lists, callables, 0, None) and refuse 0 / 1 for a bool."""
    for compile_flag in (0, 1):
        with pytest.raises(ValueError, match="FastPathConfig.compile"):
            FastPathConfig(compile=compile_flag)
    assert FastPathConfig(compile=True, compile_backend="aot_eager").compile is True
    assert FastPathConfig(compile_backend=lambda gm, inputs: gm, compile_mode="max-autotune-no-cudagraphs")
    assert SamplerConfig(time_shift={"anchors": [[512, 0.5], [4096, 1.15]]}).time_shift.mu is None
    assert SamplerConfig(kernel_backend=None, guidance=0).guidance == 0


# ----------------------------------------------------------------------------------------------
# selfe.components.weights


def test_weight_files_name_every_bad_key(tmp_path: Path) -> None:
    tensors = {k: v.contiguous() for k, v in MMDiT(tiny_mmdit()).state_dict().items()}
    del tensors["txt_in.bias"]
    tensors["extra.weight"] = torch.zeros(2)
    tensors["img_in.bias"] = torch.zeros(3)
    tensors["final_layer.linear.weight"] = tensors["final_layer.linear.weight"].to(torch.int8)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path)
    with torch.device("meta"):
        model = MMDiT(tiny_mmdit())
    with pytest.raises(StateDictMismatchError) as info:
        load_safetensors_into(model, path)
    message = str(info.value)
    assert "missing from the checkpoint (1): txt_in.bias" in message
    assert "unexpected in the checkpoint (1): extra.weight" in message
    assert "img_in.bias [3] vs [64]" in message
    assert "final_layer.linear.weight I8 vs torch.float32" in message
    assert info.value.dtype_mismatched == {"final_layer.linear.weight": ("I8", "torch.float32")}
    # A materialised module is checked the same way: an integer tensor is never cast into a weight.
    with pytest.raises(StateDictMismatchError, match="dtype mismatched"):
        load_safetensors_into(MMDiT(tiny_mmdit()), path)


def test_weight_loaders_check_dtype_and_device_first(tmp_path: Path) -> None:
    path = tmp_path / "ok.safetensors"
    save_file({k: v.contiguous() for k, v in MMDiT(tiny_mmdit()).state_dict().items()}, path)
    for bad in (torch.int8, "bf16"):
        with pytest.raises(ValueError, match="dtype must be None or a floating-point torch.dtype"):
            load_safetensors(path, dtype=bad)
        with torch.device("meta"):
            model = MMDiT(tiny_mmdit())
        with pytest.raises(ValueError, match="dtype must be None or a floating-point torch.dtype"):
            load_safetensors_into(model, path, dtype=bad)
    with pytest.raises(ValueError, match="device='gpu'"):
        load_safetensors(path, device="gpu")


# ----------------------------------------------------------------------------------------------
# The rarer call paths


def test_progress_is_checked_first_and_called_after_each_step(
    pipe: SelfEPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patched:

        def no_work(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("text encoding started before progress was checked")

        patched.setattr(pipe.text_encoders, "encode", no_work)
        for fast in (True, False):
            with pytest.raises(TypeError, match="progress must be a callable"):
                pipe("a red circle", steps=2, seed=0, progress=5, fast=fast)
    forwards = []
    hook = pipe.model.register_forward_hook(lambda *args: forwards.append(1))
    try:
        for fast in (True, False):
            seen: list[tuple[int, int]] = []
            record = lambda k, seen=seen: seen.append((k, len(forwards)))  # noqa: E731
            pipe("a red circle", steps=3, seed=0, guidance=None, fast=fast, progress=record)
            steps, counts = zip(*seen)
            # Called during sampling, one forward (no CFG) after another, not all at the end; the fast path's
            # first call of a shape runs one more forward, its warm-up, before step 0.
            assert steps == (0, 1, 2) and counts[-1] == len(forwards), f"fast={fast}"
            assert [b - a for a, b in zip(counts, counts[1:])] == [1, 1], f"fast={fast}: {seen}"
    finally:
        hook.remove()


def test_rare_call_paths(pipe: SelfEPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    side = pipe.default_size[0]
    encoded: list[list[str]] = []
    encode = pipe.text_encoders.encode
    monkeypatch.setattr(
        pipe.text_encoders, "encode", lambda prompts, **kw: encoded.append(list(prompts)) or encode(prompts, **kw)
    )
    # num_images_per_prompt with a list of prompts and a generator: prompt-major, reproducible.
    first = pipe(
        ["a red circle", "a blue square"],
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
    )
    again = pipe(
        ["a red circle", "a blue square"],
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(7),
        output_type="pt",
    )
    assert encoded[0] == ["a red circle", "a red circle", "a blue square", "a blue square"]
    assert first.images.shape == (4, 3, side, side) and torch.equal(first.images, again.images)
    assert not torch.equal(first.images[0], first.images[1])
    # output_type="latent": the latents themselves, not decoded.
    latent = pipe("a red circle", seed=0, output_type="latent")
    assert latent.images is latent.latents and "decode" not in latent.timings
    assert latent.images.shape == (1, pipe.model.config.in_channels, side // 4, side // 4)
    # One side given: the other is the default (diffusers' convention, documented in __call__).
    assert pipe("a red circle", height=2 * side, seed=0, output_type="pt").images.shape == (1, 3, 2 * side, side)
    assert pipe("a red circle", width=2 * side, seed=0, output_type="pt").images.shape == (1, 3, side, 2 * side)
    # Bad values of the rarer arguments, named before any work.
    for kwargs, match in (
        (dict(seed=2**64), "seed must be an integer in"),
        (dict(eta=True), "eta"),
        (dict(s_fixed=True), "s_fixed"),
    ):
        count = len(encoded)
        with pytest.raises(ValueError, match=match):
            pipe("a red circle", **kwargs)
        assert len(encoded) == count
    with pytest.raises(TypeError, match="guidance must be a bool"):
        pipe.warmup(1, guidance="yes")


def test_a_list_of_generators_makes_each_image_independent_of_its_batch(pipe: SelfEPipeline) -> None:
    def generators(*seeds: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(seed) for seed in seeds]

    call = dict(steps=2, guidance=5.0, output_type="pt")  # eta-DDIM: fresh noise every step, and CFG
    pair = pipe(["a red circle", "a blue square"], generator=generators(3, 4), **call).images
    alone = pipe(["a blue square"], generator=generators(4), **call).images
    swapped = pipe(["a blue square", "a red circle"], generator=generators(4, 3), **call).images
    torch.testing.assert_close(pair[1], alone[0], atol=1e-5, rtol=0)  # only batched matmul rounding differs
    torch.testing.assert_close(pair, swapped.flip(0), atol=1e-5, rtol=0)
    # A list of one is the generator itself; one generator for two images draws them differently.
    single = pipe(["a blue square"], generator=torch.Generator().manual_seed(4), **call).images
    assert torch.equal(single, alone)
    shared = pipe(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(4), **call).images
    assert (shared[1] - alone[0]).abs().max() > 0.1


def test_long_prompts_are_truncated_with_a_warning(pipe: SelfEPipeline) -> None:
    t5_limit = pipe.text_encoders.t5.max_length
    long = " and ".join(["a red circle"] * t5_limit)
    with pytest.warns(UserWarning, match=rf"prompt\[1\] \(T5, {t5_limit} tokens kept\)"):
        out = pipe(["a red circle", long], seed=0, output_type="pt")
    assert out.images.shape[0] == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # prompts that fit: no warning
        pipe(["a red circle", "a blue square"], seed=0, output_type="latent")
    # Fewer characters than CLIP's limit, more tokens: byte-level BPE takes two per "é".
    clip_limit = pipe.text_encoders.clip.max_length
    accented = "é" * (clip_limit - 2)
    assert len(pipe.text_encoders.clip.tokenizer([accented])["input_ids"][0]) > clip_limit
    with pytest.warns(UserWarning, match=rf"prompt\[0\] \(CLIP, {clip_limit} tokens kept\)"):
        with pytest.warns(UserWarning, match="closed vocabulary"):  # nor is "ééé..." a word the shipped T5 knows
            pipe([accented], seed=0, output_type="latent")


def test_numpy_numbers_are_numbers(pipe: SelfEPipeline) -> None:
    side = pipe.default_size[0]
    plain = pipe("a red circle", steps=2, guidance=5.0, seed=3, height=side, output_type="pt")
    numpy = pipe(
        "a red circle",
        steps=np.int64(2),
        guidance=np.float32(5.0),
        seed=np.uint32(3),
        height=np.int32(side),
        eta=np.float32(1.0),
        num_images_per_prompt=np.int64(1),
        output_type="pt",
    )
    assert torch.equal(plain.images, numpy.images)
    assert pipe.warmup(np.int64(1), np.int64(side)) >= 0
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        pipe("a red circle", steps=np.bool_(True))


def test_guidance_one_runs_unguided(pipe: SelfEPipeline) -> None:
    """Omega 1 is v_cond exactly: one forward per step of the batch itself, the same images as None."""
    batches: list[int] = []
    hook = pipe.model.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    try:
        one = pipe("a red circle", steps=2, guidance=1.0, seed=0, output_type="pt")
        assert batches == [1, 1]
        none = pipe("a red circle", steps=2, guidance=None, seed=0, output_type="pt")
        pipe("a red circle", steps=1, guidance=1.5, seed=0, output_type="latent")
        assert batches[-1] == 2  # any other omega: both branches, batched
    finally:
        hook.remove()
    assert torch.equal(one.images, none.images)


def test_warmup_prepares_the_default_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """warmup() without guidance / sampler warms the step a call with the pipeline's defaults runs."""
    warmed: list[tuple[bool, str]] = []
    record = lambda x, cond, null, method, *args: warmed.append((null is not None, method))
    for guidance, method in ((None, "euler"), (5.0, "ddim"), (1.0, "euler")):
        folder = tmp_path / f"{guidance}-{method}"
        shutil.copytree(SHIPPED, folder)
        meta = shipped_meta()
        meta["sampler"].update(guidance=guidance, method=method)
        (folder / "config.json").write_text(json.dumps(meta))
        pipe = SelfEPipeline.from_pretrained(folder, fast_path=EAGER)
        monkeypatch.setattr(pipe.fast, "warmup", record)
        pipe.warmup(1)
        assert warmed.pop() == (guidance not in (None, 1.0), method)


def test_to_moves_and_casts_like_a_pipeline_loaded_that_way() -> None:
    pipe = SelfEPipeline.from_pretrained(SHIPPED, fast_path=EAGER)
    fp32 = pipe("a red circle", steps=2, seed=0, output_type="pt").images
    assert pipe.to("cpu") is pipe and pipe.fast.num_graphs == 0
    pipe.to("bf16")
    assert pipe.dtype == torch.bfloat16 and {p.dtype for p in pipe.autoencoder.parameters()} <= {torch.bfloat16}
    assert pipe.text_encoders.t5.model.dtype == torch.float32  # the text encoders keep theirs
    loaded = SelfEPipeline.from_pretrained(
        SHIPPED, fast_path=EAGER, torch_dtype=torch.bfloat16, text_encoder_dtype=torch.float32
    )
    cast = pipe("a red circle", steps=2, seed=0, output_type="pt").images
    assert torch.equal(cast, loaded("a red circle", steps=2, seed=0, output_type="pt").images)
    assert not torch.equal(cast, fp32)
    for args, kwargs, error, match in (
        (("cpu", "cuda"), {}, TypeError, "device given twice"),
        ((torch.float16,), {"dtype": torch.float32}, TypeError, "dtype given twice"),
        ((), {"dtype": torch.float64}, ValueError, "dtype must be torch.bfloat16"),
        ((), {"device": "tpu"}, ValueError, "device='tpu'"),
    ):
        with pytest.raises(error, match=match):
            pipe.to(*args, **kwargs)
    assert pipe.dtype == torch.bfloat16 and pipe.device.type == "cpu"


def test_negative_prompt_replaces_the_null_prompt_in_cfg(pipe: SelfEPipeline) -> None:
    call = dict(steps=2, guidance=5.0, seed=0, output_type="pt")
    plain = pipe(["a red circle", "a blue square"], **call).images
    empty = pipe(["a red circle", "a blue square"], negative_prompt="", **call).images
    torch.testing.assert_close(empty, plain, rtol=1e-4, atol=1e-4)  # "" is the null prompt itself
    one = pipe(["a red circle", "a blue square"], negative_prompt="a green triangle", **call).images
    assert (one - plain).abs().max() > 0.05
    each = pipe(["a red circle", "a blue square"], negative_prompt=["a green triangle", ""], **call).images
    torch.testing.assert_close(each[0], one[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(each[1], plain[1], rtol=1e-4, atol=1e-4)
    many = pipe(["a red circle"], negative_prompt="a green triangle", num_images_per_prompt=2, **call)
    assert many.images.shape[0] == 2
    for kwargs, error, match in (
        (dict(negative_prompt="a square", guidance=None), ValueError, "negative_prompt needs CFG"),
        (dict(negative_prompt="a square", guidance=1.0), ValueError, "negative_prompt needs CFG"),
        (dict(negative_prompt=["a", "b", "c"]), ValueError, "one prompt or one per prompt \\(2\\), got 3"),
        (dict(negative_prompt=[3]), TypeError, "negative_prompt\\[0\\] must be a string"),
    ):
        with pytest.raises(error, match=match):
            pipe(["a red circle", "a blue square"], **{**call, **kwargs})
