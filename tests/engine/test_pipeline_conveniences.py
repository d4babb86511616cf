"""The small conveniences diffusers users expect of a pipeline: a progress bar per call
(set_progress_bar_config), callback_on_step_end on every sampling path, a readable repr, a warning naming
words outside a closed vocabulary, and a Hub id refused with how to get its files."""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

import selfe.sampling.progress
from selfe import shipped_model_dir
from selfe.cli import main
from selfe.components.autoencoder import AutoEncoder
from selfe.components.autoencoder import tiny as tiny_autoencoder
from selfe.components.text_encoders import TextEncoders
from selfe.components.vocabulary import unknown_words
from selfe.network.config import tiny as tiny_mmdit
from selfe.sampling.fast_path import FastPathConfig, FastSampler
from selfe.sampling.pipeline import SelfEPipeline
from selfe.sampling.pipeline_files import check_pipeline_dir
from tests.helpers_pipeline import ReplayOnCPU, random_mmdit
from tests.helpers_text import (
    allow_inductor_unpickling,
    make_tiny_clip_snapshot,
    make_tiny_t5_snapshot,
)

pytestmark = pytest.mark.usefixtures("no_network")  # the whole module offline, no unpickling

SIZE = 16  # 8 x 8 latents, 16 tokens
COMPILED = FastPathConfig(compile=True, compile_backend="aot_eager")  # traced by dynamo, no C++ build
EAGER = FastPathConfig(compile=False)


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random MMDiT, FLUX-architecture autoencoder and T5 / CLIP (open vocabulary), in memory."""
    root = tmp_path_factory.mktemp("parts")
    config = tiny_mmdit()
    t5 = make_tiny_t5_snapshot(root / "t5", d_model=config.txt_dim)
    clip = make_tiny_clip_snapshot(root / "clip", hidden_size=config.vec_dim)
    text = TextEncoders.from_snapshots(t5, clip, t5_max_length=16, clip_max_length=16, device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        autoencoder = AutoEncoder(tiny_autoencoder())
    return random_mmdit(config), autoencoder, text


def make_pipe(parts, fast_path: FastPathConfig = EAGER) -> SelfEPipeline:
    model, autoencoder, text = parts
    return SelfEPipeline.from_components(model, autoencoder, text, fast_path=fast_path, default_resolution=SIZE)


@pytest.fixture(scope="module")
def pipe(parts) -> SelfEPipeline:
    return make_pipe(parts)


def call(pipe: SelfEPipeline, **kwargs):
    kwargs = {"steps": 3, "seed": 0, "guidance": 3.0, "output_type": "pt", **kwargs}
    return pipe(kwargs.pop("prompt", "a red dog"), **kwargs)


# ---------------------------------------------------------------------------------------------
# The progress bar


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> list[tqdm]:
    """Every bar the pipeline opens, with the number of steps it had counted each time the sampler's
    progress callable ran."""
    made: list[tqdm] = []

    class Recorded(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(selfe.sampling.progress, "tqdm", Recorded)
    return made


def test_one_bar_per_call_ticks_once_a_step_and_can_be_configured_or_disabled(pipe, bars) -> None:
    seen = []
    try:
        call(pipe, steps=3, progress=lambda k: seen.append((k, bars[-1].n, bars[-1].disable)))
        assert len(bars) == 1 and bars[0].total == 3
        # On, ticked from the host loop after each step, closed after the last (tqdm disables a closed bar).
        assert seen == [(0, 1, False), (1, 2, False), (2, 3, True)]

        stream = io.StringIO()
        pipe.set_progress_bar_config(file=stream, desc="denoising", ascii=True)
        call(pipe, steps=2, fast=True)
        assert len(bars) == 2 and "denoising" in stream.getvalue() and "2/2" in stream.getvalue()

        quiet = io.StringIO()
        pipe.set_progress_bar_config(disable=True, file=quiet)  # replaces the earlier keywords, as in diffusers
        call(pipe, steps=2)
        assert bars[-1].disable and quiet.getvalue() == ""
    finally:
        pipe.set_progress_bar_config()


def test_progress_bar_config_names_keywords_tqdm_does_not_take(pipe) -> None:
    with pytest.raises(TypeError, match=r"\['colour_'\]"):
        pipe.set_progress_bar_config(colour_="red")
    with pytest.raises(TypeError, match=r"\['total'\]"):
        pipe.set_progress_bar_config(total=5)


def test_the_bar_adds_no_host_sync(parts, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way a tensor's value reaches the host, counted over a call on the compiled fast path: the same
    with the bar on and off (so none is the bar's)."""
    pipe = make_pipe(parts, COMPILED)
    call(pipe)  # compiled and warm
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name):
            reads.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = {}
    for disable in (False, True):
        pipe.set_progress_bar_config(disable=disable)
        reads.clear()
        call(pipe)
        counts[disable] = sorted(reads)
    assert counts[False] == counts[True]


# ---------------------------------------------------------------------------------------------
# callback_on_step_end


def recorder(log: list):
    def callback(pipe, step_index, timestep, callback_kwargs):
        log.append((step_index, timestep.clone(), callback_kwargs["latents"]))
        return callback_kwargs

    return callback


def halve_at_step(step: int):
    def callback(pipe, step_index, timestep, callback_kwargs):
        if step_index == step:
            return {"latents": callback_kwargs["latents"] * 0.5}
        return callback_kwargs

    return callback


@pytest.fixture(params=["eager", pytest.param("compiled", marks=pytest.mark.slow), "graph"])
def path(request, parts, monkeypatch: pytest.MonkeyPatch) -> tuple[SelfEPipeline, bool]:
    """(pipe, fast): the eager sampler loop, the compiled fast path, and the CUDA-graph bookkeeping replayed
    on the CPU (static inputs, one static output)."""
    if request.param == "eager":
        return make_pipe(parts), False
    if request.param == "compiled":
        return make_pipe(parts, COMPILED), True
    monkeypatch.setattr(FastSampler, "graph_class", ReplayOnCPU)
    monkeypatch.setattr(FastSampler, "uses_cuda_graph", lambda self, device: True)
    return make_pipe(parts), True


def test_callback_sees_every_step_and_can_replace_the_latents(path) -> None:
    pipe, fast = path
    plain = call(pipe, fast=fast)
    log: list = []
    recorded = call(pipe, fast=fast, callback_on_step_end=recorder(log))
    assert [k for k, _, _ in log] == [0, 1, 2]
    times = [t for _, t, _ in log]
    assert all(t.dim() == 0 for t in times) and times[0] == 1 and times[0] > times[1] > times[2] > 0
    # The latents it is given are its own: the graph's static output is copied, not lent.
    assert not torch.equal(log[0][2], log[1][2])
    torch.testing.assert_close(log[-1][2], recorded.latents, rtol=0, atol=0)
    torch.testing.assert_close(recorded.images, plain.images, rtol=0, atol=0)  # returning them changes nothing

    halved = call(pipe, fast=fast, callback_on_step_end=halve_at_step(1))
    assert not torch.allclose(halved.images, plain.images, atol=1e-3)
    eager = call(pipe, fast=False, callback_on_step_end=halve_at_step(1))
    torch.testing.assert_close(halved.images, eager.images, rtol=1e-4, atol=1e-5)  # every path honours it


@pytest.mark.gpu
def test_callback_on_the_cuda_graph_path(parts) -> None:
    """The real thing: the inductor-compiled step in a CUDA graph; the callback gets copies of its static
    output, and latents it replaces reach the next replay."""
    model, autoencoder, text = copy.deepcopy(parts)  # the module's parts stay on the CPU
    fast_path = FastPathConfig(compile=True, cuda_graph="on")
    pipe = SelfEPipeline.from_components(model, autoencoder, text, fast_path=fast_path, default_resolution=SIZE)
    pipe.to("cuda").set_progress_bar_config(disable=True)
    log: list = []
    with allow_inductor_unpickling():
        recorded = call(pipe, callback_on_step_end=recorder(log))
        halved = call(pipe, callback_on_step_end=halve_at_step(1))
        eager = call(pipe, fast=False, callback_on_step_end=halve_at_step(1))
    assert pipe.fast.num_graphs == 1
    assert [k for k, _, _ in log] == [0, 1, 2] and not torch.equal(log[0][2], log[1][2])
    torch.testing.assert_close(log[-1][2], recorded.latents, rtol=0, atol=0)
    torch.testing.assert_close(halved.images, eager.images, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(callback_on_step_end="print"), TypeError, "callback_on_step_end must be a callable"),
        (
            dict(callback_on_step_end=recorder([]), callback_on_step_end_tensor_inputs=["prompt_embeds"]),
            ValueError,
            r"callback_on_step_end_tensor_inputs has names .*\['prompt_embeds'\]",
        ),
        (
            dict(callback_on_step_end=recorder([]), callback_on_step_end_tensor_inputs="latents"),
            TypeError,
            "callback_on_step_end_tensor_inputs must be a list",
        ),
    ],
)
def test_callback_arguments_are_checked_before_any_work(pipe, monkeypatch, kwargs, error, match) -> None:
    def no_work(*args, **kw):
        raise AssertionError("text encoding started before the arguments were checked")

    monkeypatch.setattr(pipe.text_encoders, "encode", no_work)
    with pytest.raises(error, match=match):
        call(pipe, **kwargs)


def test_callback_results_are_checked(pipe) -> None:
    with pytest.raises(TypeError, match="callback_on_step_end must return a dict.*NoneType at step 0"):
        call(pipe, callback_on_step_end=lambda *args: None)
    with pytest.raises(ValueError, match=r"returned latents \(1, 16, 4, 4\).*at step 0"):
        call(pipe, callback_on_step_end=lambda p, k, t, kw: {"latents": kw["latents"][:, :, ::2, ::2]})
    with pytest.raises(ValueError, match=r"returned \['noise'\] at step 0"):
        call(pipe, callback_on_step_end=lambda p, k, t, kw: {"noise": kw["latents"]})
    # Asking for no tensors is allowed: the callback then sees an empty dict.
    given = []
    call(pipe, steps=1, callback_on_step_end=lambda p, k, t, kw: given.append(kw) or kw,
         callback_on_step_end_tensor_inputs=[])  # fmt: skip
    assert given == [{}]


# ---------------------------------------------------------------------------------------------
# repr


def test_repr_says_what_the_pipeline_holds(parts) -> None:
    text = repr(make_pipe(parts, COMPILED))
    count = sum(p.numel() for p in parts[0].parameters())
    assert 1e5 <= count < 1e6  # the tiny model: counted in K
    for part in (
        f"model: MMDiT 'tiny', {count / 1e3:.2f}K parameters, torch.float32 on cpu",
        f"resolution: {SIZE}x{SIZE} by default (sides a multiple of 4)",
        "sampler: 2 steps, ddim (eta 1, s_policy next), EP-CFG omega 5",
        "text_encoders: T5 (t5, width 32, 16 tokens) + CLIP (width 16, 16 tokens)",
        "autoencoder: FLUX-architecture, 16 latent channels, 2x down",
        "fast_path: compiled step, no CUDA graph (compile=True, cuda_graph='auto'); fp8: none",
    ):
        assert part in text, text
    assert "eager step" in repr(make_pipe(parts))
    assert text.startswith("SelfEPipeline(\n") and text.endswith("\n)")


# ---------------------------------------------------------------------------------------------
# Closed vocabularies


@pytest.fixture(scope="module")
def shipped() -> SelfEPipeline:
    pipe = SelfEPipeline.from_pretrained(shipped_model_dir(), device="cpu", fast_path=EAGER)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_words_outside_a_closed_vocabulary_are_named(shipped) -> None:
    assert "closed vocabulary of" in repr(shipped)
    latent = dict(steps=1, seed=0, output_type="latent")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shipped("a red circle to the left of a blue square", **latent)
    with pytest.warns(UserWarning, match=r"prompt\[0\]: 'photo', 'cat';") as record:
        shipped("a photo of a cat", **latent)
    assert len(record) == 1 and record[0].filename == __file__  # points at the caller's line
    with pytest.warns(UserWarning, match=r"negative_prompt\[0\]: 'dog'"):
        shipped("a red circle", negative_prompt="a dog", guidance=2.0, **latent)


def test_an_open_vocabulary_never_warns(pipe) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(pipe, prompt="one zebra", steps=1)  # not a word of the snapshot's list


def test_unknown_words_strip_punctuation_and_keep_case() -> None:
    vocabulary = frozenset({"a", "red", "circle", "left"})
    assert unknown_words("A red circle, to the left! red circle", vocabulary) == ["A", "to", "the"]
    assert unknown_words("  , ; a red circle  ", vocabulary) == []


# ---------------------------------------------------------------------------------------------
# Hub ids


def test_a_hub_id_is_refused_with_how_to_download_it(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    hub_id = "black-forest-labs/FLUX.1-dev"
    how = rf"local folders only.*huggingface-cli download {hub_id} --local-dir DIR"
    with pytest.raises(FileNotFoundError, match=how):
        SelfEPipeline.from_pretrained(hub_id)
    with pytest.raises(FileNotFoundError, match=how):
        check_pipeline_dir(hub_id)  # what `selfe eval shapes` checks its --model folders with
    assert main(["generate", "--model", hub_id, "--prompt", "a cat"]) == 2
    assert f"huggingface-cli download {hub_id} --local-dir DIR" in capsys.readouterr().err
    # A folder of that name that exists here, or a path that is no Hub id, gets the plain error.
    (tmp_path / "black-forest-labs" / "FLUX.1-dev").mkdir(parents=True)
    for path in (hub_id, str(tmp_path / "missing" / "folder"), "./owner/name"):
        with pytest.raises(FileNotFoundError) as info:
            SelfEPipeline.from_pretrained(path)
        assert "Hub" not in str(info.value)
