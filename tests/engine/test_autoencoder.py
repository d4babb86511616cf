"""The FLUX.1 autoencoder: released key layout, safetensors loading, encode/decode contracts, tiling."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from selfe.components.autoencoder import (
    CONFIG_METADATA_KEY,
    AutoEncoder,
    AutoEncoderConfig,
    config_from_file,
    flux1,
    load_autoencoder,
    save_autoencoder,
    tiny,
)
from selfe.components.weights import (
    StateDictMismatchError,
    check_state_dict,
    load_safetensors,
    load_safetensors_into,
    load_state_dict_into,
    safetensors_shapes,
)
from tests.helpers_text import forbid_network_and_unpickling

# A sample of the released ae.safetensors (FLUX.1-dev/-schnell) names and shapes, written out
# from black-forest-labs/flux src/flux/modules/autoencoder.py with ch=128, ch_mult=(1, 2, 4, 4),
# num_res_blocks=2, z_channels=16: every kind of layer, first and last levels, both nin_shortcuts
# of each side, and the decoder's reversed level numbering (up.3 is the 512-channel level).
RELEASED_SAMPLE = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.conv_in.bias": (128,),
    "encoder.down.0.block.0.norm1.weight": (128,),
    "encoder.down.0.block.1.conv2.weight": (128, 128, 3, 3),
    "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.down.1.block.0.conv1.weight": (256, 128, 3, 3),
    "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.down.2.block.0.nin_shortcut.bias": (512,),
    "encoder.down.2.downsample.conv.bias": (512,),
    "encoder.down.3.block.1.norm2.bias": (512,),
    "encoder.mid.block_1.conv1.weight": (512, 512, 3, 3),
    "encoder.mid.attn_1.norm.weight": (512,),
    "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.k.bias": (512,),
    "encoder.mid.attn_1.v.weight": (512, 512, 1, 1),
    "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "encoder.mid.block_2.norm2.weight": (512,),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (32, 512, 3, 3),
    "encoder.conv_out.bias": (32,),
    "decoder.conv_in.weight": (512, 16, 3, 3),
    "decoder.mid.block_1.norm1.bias": (512,),
    "decoder.mid.attn_1.proj_out.bias": (512,),
    "decoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
    "decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
    "decoder.up.3.block.2.conv2.bias": (512,),
    "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.up.2.upsample.conv.bias": (512,),
    "decoder.up.1.block.0.conv1.weight": (256, 512, 3, 3),
    "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.up.1.upsample.conv.weight": (256, 256, 3, 3),
    "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "decoder.up.0.block.2.norm2.weight": (128,),
    "decoder.norm_out.weight": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
    "decoder.conv_out.bias": (3,),
}
# Names the released file does not have: the last encoder level does not downsample, the
# full-resolution decoder level does not upsample, no diffusers quant convs, no empty-attn keys.
NOT_RELEASED = [
    "encoder.down.3.downsample.conv.weight",
    "decoder.up.0.upsample.conv.weight",
    "encoder.down.0.block.0.nin_shortcut.weight",
    "decoder.up.3.block.0.nin_shortcut.weight",
    "quant_conv.weight",
    "post_quant_conv.weight",
    "encoder.down.0.attn.0.q.weight",
]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_network_and_unpickling(monkeypatch)


def _tiny_model(seed: int = 0) -> AutoEncoder:
    torch.manual_seed(seed)
    model = AutoEncoder(tiny()).eval()
    with torch.no_grad():  # move GroupNorm's affine off (1, 0) so a mis-loaded norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _images(b: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _latents(b: int, size: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(b, 16, size, size, generator=torch.Generator().manual_seed(seed))


def test_flux1_state_dict_matches_released_layout():
    with torch.device("meta"):
        model = AutoEncoder(flux1())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, shape in RELEASED_SAMPLE.items():
        assert shapes.get(name) == shape, f"{name}: {shapes.get(name)} != {shape}"
    for name in NOT_RELEASED:
        assert name not in shapes
    # 244 = encoder 106 + decoder 138 (see the report); 83,819,683 parameters.
    assert len(shapes) == 244
    assert sum(k.startswith("encoder.") for k in shapes) == 106
    assert sum(k.startswith("decoder.") for k in shapes) == 138
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 83_819_683
    assert model.downsample_factor == 8


def test_safetensors_round_trip_loads_identically(tmp_path):
    model = _tiny_model()
    path = tmp_path / "ae.safetensors"
    save_file(model.state_dict(), str(path))
    loaded = load_autoencoder(path, tiny())
    assert not any(p.is_meta for p in loaded.parameters())
    assert not loaded.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    images, latents = _images(2, 16), _latents(2, 4)
    with torch.no_grad():
        assert torch.equal(loaded.encode(images), model.encode(images))
        assert torch.equal(loaded.decode(latents), model.decode(latents))


def test_saved_autoencoder_carries_its_config_and_loads_alone(tmp_path):
    config = dataclasses.replace(tiny(), z_channels=4, scale_factor=1.7, shift_factor=-0.2)
    torch.manual_seed(1)
    model = AutoEncoder(config).eval()
    path = tmp_path / "ae.safetensors"
    save_autoencoder(model, path)
    assert config_from_file(path) == config and not list(tmp_path.glob("*.tmp*"))
    loaded = load_autoencoder(path)  # no config passed: the file's own
    assert loaded.config == config
    images = _images(2, 16)
    with torch.no_grad():
        assert torch.equal(loaded.encode(images), model.encode(images))

    plain = tmp_path / "plain.safetensors"
    save_file(model.state_dict(), str(plain))
    assert config_from_file(plain) is None  # a file without the entry (FLUX.1's) -> the caller's default
    with pytest.raises(StateDictMismatchError):
        load_autoencoder(plain)  # ... which is flux1(), not this file's layout

    bad = tmp_path / "bad.safetensors"
    save_file(model.state_dict(), str(bad), metadata={CONFIG_METADATA_KEY: json.dumps({"chanels": 3})})
    with pytest.raises(ValueError, match="is not an AutoEncoderConfig"):
        load_autoencoder(bad)


def test_load_autoencoder_casts_dtype(tmp_path):
    path = tmp_path / "ae.safetensors"
    save_file(_tiny_model().state_dict(), str(path))
    loaded = load_autoencoder(path, tiny(), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = loaded.decode(_latents(1, 4))  # fp32 input is cast to the model's dtype
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 8, 8)


def test_loader_names_missing_unexpected_and_mismatched_keys(tmp_path):
    state = _tiny_model().state_dict()
    del state["decoder.mid.attn_1.q.weight"]
    state["encoder.quant_conv.weight"] = torch.zeros(1)
    state["encoder.conv_in.weight"] = torch.zeros(32, 3, 5, 5)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(StateDictMismatchError) as info:
        load_autoencoder(path, tiny())
    message = str(info.value)
    assert "decoder.mid.attn_1.q.weight" in message
    assert "encoder.quant_conv.weight" in message
    assert "encoder.conv_in.weight [32, 3, 5, 5] vs [32, 3, 3, 3]" in message
    assert str(path) in message
    assert info.value.missing == ["decoder.mid.attn_1.q.weight"]
    assert info.value.unexpected == ["encoder.quant_conv.weight"]
    assert list(info.value.shape_mismatched) == ["encoder.conv_in.weight"]
    # The real config against a tiny file: everything mismatches, the message stays bounded.
    with pytest.raises(StateDictMismatchError, match=r"and \d+ more"):
        load_autoencoder(path)


def test_weights_helpers_generic(tmp_path):
    path = tmp_path / "lin.safetensors"
    source = nn.Linear(4, 3)
    save_file({**source.state_dict(), "step": torch.tensor([7])}, str(path))
    assert safetensors_shapes(path) == {"weight": (3, 4), "bias": (3,), "step": (1,)}
    # Cast only floating tensors; key_map drops and renames.
    rename = lambda k: None if k == "step" else f"lin.{k}"
    tensors = load_safetensors(path, dtype=torch.float16, key_map=rename)
    assert set(tensors) == {"lin.weight", "lin.bias"} and tensors["lin.weight"].dtype == torch.float16
    assert load_safetensors(path, dtype=torch.float16)["step"].dtype == torch.int64
    # Materialised module: copied into, its own dtype kept.
    target = nn.Linear(4, 3).double()
    load_safetensors_into(target, path, key_map=lambda k: None if k == "step" else k)
    assert target.weight.dtype == torch.float64
    assert torch.equal(target.weight, source.weight.double())
    # Meta module: assigned, takes the file's tensors (and the requested dtype).
    with torch.device("meta"):
        meta = nn.Linear(4, 3)
    load_state_dict_into(meta, source.state_dict(), dtype=torch.bfloat16)
    assert meta.weight.device.type == "cpu" and meta.weight.dtype == torch.bfloat16
    assert meta.weight.requires_grad
    with pytest.raises(StateDictMismatchError, match="unexpected in the checkpoint.*step"):
        load_safetensors_into(nn.Linear(4, 3), path)
    with pytest.raises(StateDictMismatchError, match="missing from the checkpoint.*bias"):
        check_state_dict(nn.Linear(4, 3), {"weight": torch.zeros(3, 4)})
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_safetensors(tmp_path / "nothere.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        load_safetensors(garbage)


def test_encode_decode_shapes_and_sampling():
    model = _tiny_model()
    images = _images(3, 12)
    with torch.no_grad():
        mean_latents = model.encode(images)
        again = model.encode(images)
        sampled = model.encode(images, sample=True, generator=torch.Generator().manual_seed(5))
        resampled = model.encode(images, sample=True, generator=torch.Generator().manual_seed(5))
        decoded = model.decode(mean_latents)
        reconstructed = model(images)
    assert model.downsample_factor == 2  # tiny: 2 levels
    assert mean_latents.shape == (3, 16, 6, 6)
    assert torch.equal(mean_latents, again)  # the mean is deterministic
    assert torch.equal(sampled, resampled) and not torch.allclose(sampled, mean_latents)
    assert decoded.shape == (3, 3, 12, 12)
    assert torch.equal(reconstructed, decoded)


def test_bad_inputs_raise_named_errors():
    model = _tiny_model()
    with pytest.raises(ValueError, match="images must have 3 channels"):
        model.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="divisible by the downsample factor 2"):
        model.encode(torch.zeros(1, 3, 17, 16))
    with pytest.raises(ValueError, match="4-D"):
        model.encode(torch.zeros(3, 16, 16))
    with pytest.raises(TypeError, match="floating point"):
        model.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="latents must have 16 channels"):
        model.decode(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="batch_chunk"):
        model.decode(torch.zeros(1, 16, 4, 4), batch_chunk=0)
    with pytest.raises(ValueError, match="overlap"):
        model.tiled_decode(torch.zeros(1, 16, 4, 4), tile=4, overlap=4)
    with pytest.raises(ValueError, match="tile"):
        model.tiled_decode(torch.zeros(1, 16, 4, 4), tile=0, overlap=0)
    with pytest.raises(FileNotFoundError):
        load_autoencoder("/nonexistent/ae.safetensors", tiny())


def test_config_validation_and_json_round_trip():
    config = flux1()
    assert (config.ch, config.ch_mult, config.num_res_blocks, config.z_channels) == (128, (1, 2, 4, 4), 2, 16)
    assert (config.norm_groups, config.scale_factor, config.shift_factor) == (32, 0.3611, 0.1159)
    assert AutoEncoderConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config
    assert AutoEncoderConfig(**json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="norm_groups=32 must divide"):
        AutoEncoderConfig(ch=48)
    with pytest.raises(ValueError, match="ch_mult"):
        AutoEncoderConfig(ch_mult=())
    with pytest.raises(ValueError, match="z_channels"):
        AutoEncoderConfig(z_channels=0)
    with pytest.raises(ValueError, match="resolution"):
        AutoEncoderConfig(resolution=100)
    with pytest.raises(ValueError, match="scale_factor"):
        AutoEncoderConfig(scale_factor=0.0)


def test_batch_chunked_encode_decode_match_whole_batch():
    model = _tiny_model()
    images, latents = _images(5, 16), _latents(5, 4)
    with torch.no_grad():
        close = dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.decode(latents, batch_chunk=2), model.decode(latents), **close)
        torch.testing.assert_close(model.encode(images, batch_chunk=3), model.encode(images), **close)
        chunked = model.encode(images, sample=True, generator=torch.Generator().manual_seed(3), batch_chunk=2)
        whole = model.encode(images, sample=True, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_scale_shift_round_trip():
    """encode applies scale * (z - shift); decode hands the decoder latents / scale + shift = z."""
    model = _tiny_model()
    images = _images(2, 16)
    with torch.no_grad():
        mean, _ = model.posterior(images)
        latents = model.encode(images)
        torch.testing.assert_close(latents, 0.3611 * (mean - 0.1159))
        seen = []
        model.decoder = _Recorder(seen)
        model.decode(latents)
    torch.testing.assert_close(seen[0], mean, rtol=1e-6, atol=1e-6)


class _Recorder(nn.Module):
    def __init__(self, seen: list[torch.Tensor]):
        super().__init__()
        self.seen = seen
        self.anchor = nn.Parameter(torch.zeros(1))  # so the model still has a parameter for dtype/device

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.seen.append(z)
        return z


class _PointwiseDecoder(nn.Module):
    """A decoder stand-in where every output pixel depends on one latent pixel only: any tiling of it
    blends identical values, so tiled output must equal whole output - this isolates the blending."""

    def __init__(self, factor: int):
        super().__init__()
        self.proj = nn.Conv2d(16, 3, kernel_size=1)
        self.factor = factor

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(torch.tanh(self.proj(z)), scale_factor=self.factor, mode="nearest")


def test_tiled_decode():
    model = _tiny_model()
    latents = _latents(2, 10)
    with torch.no_grad():
        whole = model.decode(latents)
        # One tile covering everything is exactly decode.
        assert torch.equal(model.tiled_decode(latents, tile=10, overlap=2), whole)
        # Real decoder, 2x2 tiles: close, not equal (GroupNorm and attention see one tile).
        tiled = model.tiled_decode(latents, tile=8, overlap=4)
        assert tiled.shape == whole.shape and torch.isfinite(tiled).all()
        assert (tiled - whole).abs().mean() < 0.25 * whole.std()
        # The blending itself is exact: tile placement, ramps and normalisation lose nothing.
        model.decoder = _PointwiseDecoder(model.downsample_factor)
        pointwise_whole = model.decode(latents)
        for tile, overlap in [(4, 2), (3, 0), (6, 5), (7, 3)]:
            torch.testing.assert_close(
                model.tiled_decode(latents, tile=tile, overlap=overlap), pointwise_whole, rtol=1e-6, atol=1e-6
            )
