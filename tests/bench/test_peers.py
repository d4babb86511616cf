"""bench/peers.py and bench/peer_flux.py: diffusers' FLUX built at our sizes, run beside ours on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import peer_flux

pytestmark = pytest.mark.skipif(
    peer_flux.diffusers_problem() is not None, reason=f"the peer bench needs diffusers: {peer_flux.diffusers_problem()}"
)

TINY = ["--preset", "tiny", "--resolution", "32", "--txt-tokens", "8", "--iters", "1"]


def mlp_s_parameters(width: int) -> int:
    """Our MLP_s (the gap t - s): 256 -> D -> D with biases; what FLUX.1-schnell's layout lacks."""
    return 256 * width + width + width * width + width


@pytest.mark.parametrize("preset", ["tiny", "2b"])
def test_peer_is_built_with_our_sizes(preset: str) -> None:
    config = peer_flux.peer_config(preset)
    with torch.device("meta"):
        dev = peer_flux.flux_transformer(config)
        schnell = peer_flux.flux_transformer(config, guidance_embeds=False)
    # FLUX.1-dev's guidance embedder has MLP_s's shape: the same count; without it exactly MLP_s fewer
    assert peer_flux.num_parameters(dev) == config.num_parameters()
    assert config.num_parameters() - peer_flux.num_parameters(schnell) == mlp_s_parameters(config.hidden_size)
    assert dev.config.in_channels == config.patch_dim and dev.config.num_attention_heads == config.num_heads
    assert (dev.config.num_layers, dev.config.num_single_layers) == (config.depth_double, config.depth_single)
    assert tuple(dev.config.axes_dims_rope) == config.axes_dim


def test_with_our_weights_the_peer_computes_our_network() -> None:
    """Same weights, same inputs, guidance = t - s: the same V (float64; diffusers builds its sinusoid and
    RoPE tables in float32, hence the tolerance). The two models do the same work, token for token."""
    from selfe.network.model import MMDiT, patchify

    torch.manual_seed(0)
    config = peer_flux.peer_config("tiny")
    ours = peer_flux.randomize(MMDiT(config)).double()
    peer = peer_flux.flux_transformer(config).double()
    peer.load_state_dict(peer_flux.peer_state_dict(ours.state_dict(), config), strict=True)
    x, txt, pooled = torch.randn(2, 16, 8, 6).double(), torch.randn(2, 5, 32).double(), torch.randn(2, 16).double()
    t, s = torch.tensor([0.9, 0.5]).double(), torch.tensor([0.3, 0.5]).double()
    v = ours(x, t, s, {"txt": txt, "txt_mask": None, "pooled": pooled})
    txt_ids, img_ids = peer_flux.position_ids(5, 4, 3, "cpu")
    peer_v = peer(
        hidden_states=patchify(x, 2), encoder_hidden_states=txt, pooled_projections=pooled, timestep=t,
        img_ids=img_ids.double(), txt_ids=txt_ids.double(), guidance=t - s, return_dict=False,
    )[0]  # fmt: skip
    torch.testing.assert_close(peer_v, patchify(v, 2), rtol=1e-6, atol=1e-6)
    assert (patchify(v, 2) - peer_v).abs().max() < 1e-3 * v.abs().max()  # and V is not ~0


def test_peer_autoencoder_has_our_autoencoder_sizes() -> None:
    from selfe.components.autoencoder import AUTOENCODER_PRESETS, AutoEncoder

    for name in ("tiny", "flux1"):
        config = AUTOENCODER_PRESETS[name]()
        with torch.device("meta"):
            assert peer_flux.num_parameters(peer_flux.flux_autoencoder(config)) == peer_flux.num_parameters(
                AutoEncoder(config)
            )


def test_peer_refuses_a_time_embedding_it_cannot_have() -> None:
    from selfe.network.config import mmdit_preset

    with pytest.raises(ValueError, match="time_embed_dim=32"):
        peer_flux.flux_transformer(mmdit_preset("tiny"))


def test_peer_image_runs_at_our_shapes() -> None:
    from selfe.components.autoencoder import AUTOENCODER_PRESETS

    torch.manual_seed(0)
    config = peer_flux.peer_config("tiny")
    model = peer_flux.randomize(peer_flux.flux_transformer(config)).eval()
    vae = peer_flux.randomize(peer_flux.flux_autoencoder(AUTOENCODER_PRESETS["tiny"]())).eval()
    h = w = 4
    txt_ids, img_ids = peer_flux.position_ids(8, h, w, "cpu")
    assert img_ids[w + 2].tolist() == [0.0, 1.0, 2.0]  # token (row 1, col 2)
    txt, pooled = torch.randn(2, 8, config.txt_dim), torch.randn(2, config.vec_dim)
    batch = peer_flux.PeerBatch(
        torch.randn(2, h * w, config.patch_dim), txt, pooled, torch.zeros_like(txt), torch.zeros_like(pooled),
        txt_ids, img_ids,
    )  # fmt: skip
    image = peer_flux.flux_image(model, vae, batch, torch.linspace(1, 0, 3), 5.0, (h, w))
    assert image.shape == (2, 3, 16, 16) and torch.isfinite(image).all()  # 8x8 latents, the tiny 2x autoencoder


@pytest.mark.slow
def test_bench_prints_the_ratio_table_and_writes_every_row(tmp_path: Path, capsys) -> None:
    from bench import peers

    out = tmp_path / "peers.json"
    result = peers.main([*TINY, "--variants", "eager", "--steps", "1", "2", "--no-train", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["params"]["ours"] == result["params"]["peer"] == peer_flux.peer_config("tiny").num_parameters()
    assert [r["what"] for r in result["rows"]] == ["denoiser step", "image, 1 step", "image, 2 steps"]
    for row in result["rows"]:
        assert row["peer_ms"] > 0 and row["ours_ms"] > 0
        assert row["ratio"] == pytest.approx(row["peer_ms"] / row["ours_ms"])
    printed = capsys.readouterr().out
    assert peers.HEADER in printed and "| sample | image, 2 steps | eager | eager |" in printed


@pytest.mark.slow
def test_bench_times_both_training_steps(tmp_path: Path) -> None:
    from bench import peers

    result = peers.main([*TINY, "--no-sample", "--train-compile", "off", "--train-steps", "1", "--train-warmup", "0"])
    fm, selfe = result["rows"]
    assert (fm["part"], fm["variant"], fm["work"]) == ("train", "ac", 1.0)
    assert selfe["work"] > 1.0  # the self-evaluation passes counted
    assert fm["peer_ms"] == selfe["peer_ms"] > 0 and fm["ours_ms"] > 0 and selfe["ours_ms"] > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps values must be >= 1"),
        (["--resolution", "40"], "multiple of 16"),
        (["--no-train", "--no-sample"], "nothing to run"),
        (["--no-guidance-embeds"], "parameter counts differ by 8.04%"),  # tiny: MLP_s is 8% of the model
    ],
)
def test_bad_arguments_are_refused_before_any_model_is_built(argv, message, capsys) -> None:
    from bench import peers

    with pytest.raises(SystemExit):
        peers.parse_args([*TINY, *argv])
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_the_engine_never_imports_diffusers() -> None:
    code = (
        "import sys, pkgutil, importlib, selfe\n"
        "for m in pkgutil.walk_packages(selfe.__path__, 'selfe.'):\n"
        "    importlib.import_module(m.name)\n"
        "print('diffusers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.slow
def test_the_device_step_s_command_parses_and_its_wheel_prefix_runs_it(tmp_path: Path) -> None:
    from bench import device_session, peers

    step = next(s for s in device_session.engine_steps() if s.name == "peers")
    script = step.argv.index("bench/peers.py")  # argv: the wheel prefix, {py}, bench/peers.py, its arguments
    args = peers.parse_args([a.replace("{work}", str(tmp_path)) for a in step.argv[script + 1 :]])
    assert (args.preset, args.batch, args.steps, args.train_batch) == ("2b", 1, [2], 4)
    # diffusers importable here: nothing installed, and the command after the prefix runs with its arguments
    prefix = [a.replace("{py}", sys.executable).replace("{work}", str(tmp_path)) for a in step.argv[: script - 1]]
    command = [sys.executable, "-c", "import sys; print(sys.argv[1:])", "a b"]
    out = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "['a b']", out.stderr
    assert not (tmp_path / "peer-site").exists()
