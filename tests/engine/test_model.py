"""The dual-time MMDiT: shapes, dual time, text masking, backends, RoPE, input checks, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from selfe.kernels import reference
from selfe.network.attention import (
    attention,
    get_attention_backend,
    known_attention_backends,
    register_attention_backend,
)
from selfe.network.config import mmdit_preset
from selfe.network.flops import mmdit_forward_backward_flops, mmdit_forward_flops, mmdit_forward_flops_breakdown
from selfe.network.model import MMDiT, patchify, unpatchify
from selfe.network.rope import image_position_ids, joint_rope_tables, rope_tables


def randomize(module: torch.nn.Module, seed: int = 0, skip: tuple[torch.nn.Module, ...] = ()) -> None:
    """Random weights everywhere (zero-init layers included) so every path changes the output."""
    skipped = {id(p) for m in skip for p in m.parameters()}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if id(param) in skipped:
                continue
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float64).to(param.dtype)
            if param.dim() >= 2:
                param.copy_(noise / math.sqrt(param.shape[1]))  # keeps activations O(1)
            elif name.endswith(("query_weight", "key_weight")):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)


def make_model(seed: int = 0, **overrides) -> MMDiT:
    torch.manual_seed(seed)
    model = MMDiT(mmdit_preset("tiny", **overrides))
    randomize(model, seed)
    return model


def make_inputs(
    batch: int = 2,
    height: int = 8,
    width: int = 12,
    txt_len: int = 5,
    lengths=None,
    seed: int = 1,
    dtype: torch.dtype = torch.float32,
):
    """Valid inputs for the tiny preset; `lengths` gives each sample's real text length (padding after)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, height, width, generator=gen).to(dtype)
    t = torch.rand(batch, generator=gen).to(dtype) * 0.9 + 0.05
    s = t * torch.rand(batch, generator=gen).to(dtype)
    mask = None
    if lengths is not None:
        mask = torch.arange(txt_len)[None, :] < torch.tensor(lengths)[:, None]
    cond = {
        "txt": torch.randn(batch, txt_len, 32, generator=gen).to(dtype),
        "txt_mask": mask,
        "pooled": torch.randn(batch, 16, generator=gen).to(dtype),
    }
    return x, t, s, cond


# ---------------------------------------------------------------- an independent FLUX-formula oracle


def flux_formula_forward(model: MMDiT, x: Tensor, t: Tensor, s: Tensor, cond: dict) -> Tensor:
    """The network written out from FLUX's formulas with plain ops (RoPE as 2x2 matrices, explicit
    softmax), reusing only the model's weights: checks the fused-op wiring of every block."""
    c = model.config
    b, ch, height, width = x.shape
    p, h, w, d, nh = c.patch_size, height // c.patch_size, width // c.patch_size, c.hidden_size, c.num_heads
    img = x.reshape(b, ch, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, ch * p * p)
    img, txt = model.img_in(img), model.txt_in(cond["txt"])
    n_txt = txt.shape[1]

    def sinus(u: Tensor) -> Tensor:
        half = c.time_embed_dim // 2
        freqs = torch.exp(-math.log(c.time_max_period) * torch.arange(half, dtype=torch.float64) / half)
        args = u.double()[:, None] * c.time_factor * freqs[None]
        return torch.cat((torch.cos(args), torch.sin(args)), dim=-1).to(x.dtype)

    def mlp(m, u):
        return m.out_layer(F.silu(m.in_layer(u)))

    vec = (
        mlp(model.time_in, sinus(t)) + mlp(model.gap_in, sinus(t - s)) + mlp(model.vector_in, cond["pooled"])
    )

    ids = torch.zeros(n_txt + h * w, 3, dtype=torch.float64)
    ids[n_txt:, 1] = torch.arange(h, dtype=torch.float64).repeat_interleave(w)
    ids[n_txt:, 2] = torch.arange(w, dtype=torch.float64).repeat(h)
    mats = []
    for axis, dim in enumerate(c.axes_dim):
        omega = 1.0 / c.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        ang = ids[:, axis, None] * omega
        mats.append(torch.stack((ang.cos(), -ang.sin(), ang.sin(), ang.cos()), -1).view(-1, dim // 2, 2, 2))
    pe = torch.cat(mats, dim=1).float().double()  # (L, Dh/2, 2, 2); the tables are float32 by contract

    def rope(u: Tensor) -> Tensor:
        u2 = u.reshape(*u.shape[:-1], -1, 1, 2)
        m = pe.to(u.dtype)
        return (m[..., 0] * u2[..., 0] + m[..., 1] * u2[..., 1]).reshape(u.shape)

    def rms(u: Tensor, weight: Tensor) -> Tensor:
        return u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + c.norm_eps) * weight

    def modulate(u: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
        return F.layer_norm(u, (d,), eps=c.norm_eps) * (1 + scale[:, None]) + shift[:, None]

    def heads(u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return u.view(b, u.shape[1], 3, nh, -1).permute(2, 0, 3, 1, 4)

    full = (
        None
        if cond["txt_mask"] is None
        else torch.cat((cond["txt_mask"], torch.ones(b, h * w, dtype=bool)), 1)
    )

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if full is not None:
            scores = scores.masked_fill(~full[:, None, None, :], -math.inf)
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, d)

    act = F.gelu
    for blk in model.double_blocks:
        im, tm = (F.silu(vec) @ m.lin.weight.T + m.lin.bias for m in (blk.img_mod, blk.txt_mod))
        im, tm = im.chunk(6, -1), tm.chunk(6, -1)
        iq, ik, iv = heads(blk.img_attn.qkv(modulate(img, im[0], im[1])))
        tq, tk, tv = heads(blk.txt_attn.qkv(modulate(txt, tm[0], tm[1])))
        iq, ik = rms(iq, blk.img_attn.norm.query_weight), rms(ik, blk.img_attn.norm.key_weight)
        tq, tk = rms(tq, blk.txt_attn.norm.query_weight), rms(tk, blk.txt_attn.norm.key_weight)
        q = rope(torch.cat((tq, iq), 2))
        k = rope(torch.cat((tk, ik), 2))
        out = attend(q, k, torch.cat((tv, iv), 2))
        img = img + im[2][:, None] * blk.img_attn.proj(out[:, n_txt:])
        txt = txt + tm[2][:, None] * blk.txt_attn.proj(out[:, :n_txt])
        img0, img2 = blk.img_mlp[0], blk.img_mlp[2]
        txt0, txt2 = blk.txt_mlp[0], blk.txt_mlp[2]
        img = img + im[5][:, None] * img2(act(img0(modulate(img, im[3], im[4])), approximate="tanh"))
        txt = txt + tm[5][:, None] * txt2(act(txt0(modulate(txt, tm[3], tm[4])), approximate="tanh"))
    joint = torch.cat((txt, img), 1)
    for blk in model.single_blocks:
        shift, scale, gate = blk.modulation.lin(F.silu(vec)).chunk(3, -1)
        h1 = blk.linear1(modulate(joint, shift, scale))
        qkv, mlp_in = h1[..., : 3 * d], h1[..., 3 * d :]
        q, k, v = heads(qkv)
        q = rope(rms(q, blk.norm.query_weight))
        k = rope(rms(k, blk.norm.key_weight))
        out = blk.linear2(torch.cat((attend(q, k, v), act(mlp_in, approximate="tanh")), -1))
        joint = joint + gate[:, None] * out
    shift, scale = model.final_layer.adaLN_modulation.lin(F.silu(vec)).chunk(2, -1)
    out = model.final_layer.linear(modulate(joint[:, n_txt:], shift, scale))
    return out.view(b, h, w, ch, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, height, width)


@pytest.mark.parametrize("lengths", [None, [3, 5]])
def test_matches_flux_formulas_in_float64(lengths) -> None:
    model = make_model().double()
    x, t, s, cond = make_inputs(lengths=lengths, dtype=torch.float64)
    with torch.no_grad():
        got, want = model(x, t, s, cond), flux_formula_forward(model, x, t, s, cond)
    assert want.abs().mean() > 0.1  # a real signal, not zeros
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- sizes, shapes, init


@pytest.mark.parametrize(("name", "nominal"), [("0.5b", 0.5e9), ("2b", 2e9)])
def test_paper_models_on_meta_device(name: str, nominal: float) -> None:
    config = mmdit_preset(name)
    with torch.device("meta"):
        model = MMDiT(config)
    count = sum(p.numel() for p in model.parameters())
    assert count == config.num_parameters()
    assert abs(count - nominal) / nominal < 0.2
    assert all(p.is_meta for p in model.parameters())


def test_meta_forward_shapes() -> None:
    with torch.device("meta"):
        model = MMDiT(mmdit_preset("0.5b", depth_double=1, depth_single=1))
        x, t = torch.empty(2, 16, 32, 24), torch.empty(2)
        cond = {
            "txt": torch.empty(2, 7, 4096),
            "txt_mask": torch.empty(2, 7, dtype=torch.bool),
            "pooled": torch.empty(2, 768),
        }
        out = model(x, t, t, cond, validate=False)
    assert out.shape == x.shape and out.is_meta


@pytest.mark.parametrize(("height", "width", "txt_len"), [(8, 12, 5), (2, 2, 1), (6, 4, 9)])
def test_forward_shapes(height: int, width: int, txt_len: int) -> None:
    model = make_model()
    x, t, s, cond = make_inputs(height=height, width=width, txt_len=txt_len, lengths=[1, txt_len])
    out = model(x, t, s, cond)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()


def test_bfloat16_forward_keeps_dtype() -> None:
    model = make_model().to(torch.bfloat16)
    x, t, s, cond = make_inputs(lengths=[2, 5], dtype=torch.bfloat16)
    out = model(x, t.float(), s.float(), cond)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_patchify_round_trip_and_layout() -> None:
    x = torch.randn(2, 16, 6, 8)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 12, 64)
    # token (row r, col c) holds x[:, :, 2r:2r+2, 2c:2c+2] flattened channel-major, as FLUX packs it
    torch.testing.assert_close(tokens[:, 1 * 4 + 3], x[:, :, 2:4, 6:8].reshape(2, 64))
    torch.testing.assert_close(unpatchify(tokens, 3, 4, 2, 16), x)


def test_init_is_adaln_zero() -> None:
    model = MMDiT(mmdit_preset("tiny"))
    x, t, s, cond = make_inputs()
    assert torch.count_nonzero(model(x, t, s, cond)) == 0  # final layer zero: V = 0 at init
    zero = [blk.img_mod.lin for blk in model.double_blocks] + [
        blk.modulation.lin for blk in model.single_blocks
    ]
    zero += [model.final_layer.adaLN_modulation.lin, model.final_layer.linear, model.gap_in.out_layer]
    for linear in zero:
        assert torch.count_nonzero(linear.weight) == 0 and torch.count_nonzero(linear.bias) == 0
    qkv = model.double_blocks[0].img_attn.qkv
    bound = math.sqrt(6 / sum(qkv.weight.shape))  # xavier-uniform
    assert 0.5 * bound < qkv.weight.abs().max() <= bound and torch.count_nonzero(qkv.bias) == 0


# ---------------------------------------------------------------- dual time


def test_s_is_ignored_at_init_until_mlp_s_changes() -> None:
    torch.manual_seed(0)
    model = MMDiT(mmdit_preset("tiny"))
    randomize(model, skip=(model.gap_in.out_layer,))  # everything random except MLP_s's zero last layer
    x, t, _, cond = make_inputs(lengths=[3, 5])
    with torch.no_grad():
        out_flow = model(x, t, t, cond)
        out_gap = model(x, t, t * 0.3, cond)
        torch.testing.assert_close(out_gap, out_flow, rtol=0, atol=0)
        randomize(model.gap_in.out_layer, seed=5)
        assert (model(x, t, t * 0.3, cond) - out_flow).abs().max() > 1e-3


def test_s_enters_only_through_the_gap() -> None:
    model = make_model()
    with torch.no_grad():
        model.time_in.out_layer.weight.zero_()
        model.time_in.out_layer.bias.zero_()
    pooled = torch.randn(2, 16)
    t1, s1 = torch.tensor([0.9, 0.5]), torch.tensor([0.6, 0.25])
    t2, s2 = t1 - 0.2, s1 - 0.2  # same gaps t - s
    torch.testing.assert_close(model.time_vector(t1, s1, pooled), model.time_vector(t2, s2, pooled))
    assert (model.time_vector(t1, t1, pooled) - model.time_vector(t1, s1, pooled)).abs().max() > 1e-3


def test_gradient_reaches_every_parameter() -> None:
    model = make_model()
    x, t, s, cond = make_inputs(lengths=[3, 5])
    model(x, t, s, cond).square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().max() > 0, name


# ---------------------------------------------------------------- text mask, batch, backends


def test_padded_text_tokens_do_not_matter() -> None:
    model = make_model()
    x, t, s, cond = make_inputs(lengths=[3, 5], txt_len=5)
    with torch.no_grad():
        out = model(x, t, s, cond)
        changed = dict(cond, txt=cond["txt"].clone())
        changed["txt"][0, 3:] = 100 * torch.randn(2, 32)  # sample 0's padding
        torch.testing.assert_close(model(x, t, s, changed), out, rtol=1e-5, atol=1e-5)
        # ... and padding is the same as a shorter sequence without a mask
        short = {"txt": cond["txt"][:1, :3], "txt_mask": None, "pooled": cond["pooled"][:1]}
        torch.testing.assert_close(model(x[:1], t[:1], s[:1], short), out[:1], rtol=1e-5, atol=1e-5)
        real = dict(cond, txt=cond["txt"].clone())
        real["txt"][0, 2] += 1.0  # a real token does matter
        assert (model(x, t, s, real)[0] - out[0]).abs().max() > 1e-3


def test_batch_independence() -> None:
    model = make_model()
    x, t, s, cond = make_inputs(batch=3, lengths=[2, 5, 4])
    with torch.no_grad():
        out = model(x, t, s, cond)
        for i in range(3):
            one = {k: v[i : i + 1] for k, v in cond.items()}
            torch.testing.assert_close(
                model(x[i : i + 1], t[i : i + 1], s[i : i + 1], one), out[i : i + 1], rtol=1e-5, atol=1e-5
            )
        x2 = x.clone()
        x2[1] = torch.randn_like(x2[1])
        out2 = model(x2, t, s, cond)
    torch.testing.assert_close(out2[[0, 2]], out[[0, 2]], rtol=1e-5, atol=1e-5)
    assert (out2[1] - out[1]).abs().max() > 1e-3


@pytest.mark.parametrize("lengths", [None, [1, 4]])
def test_sdpa_and_math_backends_agree(lengths) -> None:
    sdpa = make_model(attention_backend="sdpa")
    math_model = MMDiT(mmdit_preset("tiny", attention_backend="math"))
    math_model.load_state_dict(sdpa.state_dict())
    x, t, s, cond = make_inputs(lengths=lengths)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(x, t, s, cond), math_model(x, t, s, cond), rtol=1e-4, atol=1e-5)


def test_attention_function_and_registry() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=gen) for _ in range(3))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :3] = False
    want = attention(q.double(), k.double(), v.double(), mask, backend="math")
    assert want.shape == (2, 7, 24) and want.dtype == torch.float64
    for backend in ("sdpa", "math", "auto"):
        torch.testing.assert_close(
            attention(q, k, v, mask, backend=backend), want.float(), rtol=1e-5, atol=1e-5
        )
    # masked keys are really out: changing them changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[0, :, :3], v2[0, :, :3] = 50.0, -50.0
    torch.testing.assert_close(attention(q, k2, v2, mask, "math"), attention(q, k, v, mask, "math"))
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        attention(q, k, v, backend="nope")
    with pytest.raises(ValueError, match="key_mask must be bool of shape"):
        attention(q, k, v, mask.float())
    register_attention_backend(
        "test_double", lambda q, k, v, m: 2 * get_attention_backend("math")(q, k, v, m)
    )
    try:
        assert "test_double" in known_attention_backends()
        torch.testing.assert_close(
            attention(q, k, v, mask, "test_double"), 2 * attention(q, k, v, mask, "math")
        )
    finally:
        from selfe.network import attention as attention_module

        attention_module._REGISTRY.pop("test_double")


def test_cpu_blocks_use_reference_kernels() -> None:
    model = make_model(kernel_backend="auto")
    model(*make_inputs())
    block = model.double_blocks[0]
    assert block.kernels.qk_norm_rope is reference.qk_norm_rope
    assert block.kernels.gated_residual_modulate is reference.gated_residual_modulate
    assert model.final_layer.kernels.layer_norm_modulate is reference.layer_norm_modulate


# ---------------------------------------------------------------- RoPE


def test_rope_scores_depend_only_on_relative_position() -> None:
    axes, theta = (4, 6, 6), 10000.0
    ids = image_position_ids(3, 4)
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 12, 16, generator=gen, dtype=torch.float64) for _ in range(2))

    def scores(position_ids: Tensor) -> Tensor:
        cos, sin = rope_tables(position_ids, axes, theta)
        return reference.apply_rope(q, cos, sin) @ reference.apply_rope(k, cos, sin).transpose(-1, -2)

    base = scores(ids)
    torch.testing.assert_close(scores(ids + torch.tensor([7, -5, 11])), base, rtol=1e-5, atol=1e-5)
    assert (scores(ids * 2) - base).abs().max() > 1e-2  # relative positions changed: scores change
    assert (base - q @ k.transpose(-1, -2)).abs().max() > 1e-2  # and the rotation is not the identity


def test_rope_tables_layout() -> None:
    ids = image_position_ids(3, 4)
    assert ids.shape == (12, 3) and ids[7].tolist() == [0, 1, 3]  # row-major like patchify
    cos, sin = joint_rope_tables(5, 3, 4, (4, 6, 6), 10000.0)
    assert cos.shape == sin.shape == (17, 8) and cos.dtype == torch.float32
    # [img; txt]: image first, so the text padding sits at each row's end; text at position 0
    assert torch.equal(cos[12:], torch.ones(5, 8)) and torch.equal(sin[12:], torch.zeros(5, 8))
    # pair 2 is the row axis' first pair (frequency 1); pair 5 the column axis' first pair
    torch.testing.assert_close(sin[7, 2], torch.tensor(math.sin(1.0)))
    torch.testing.assert_close(sin[7, 5], torch.tensor(math.sin(3.0)))


# ---------------------------------------------------------------- bad inputs


def _bad(field: str, value):
    def mutate(x, t, s, cond):
        args = {"x": x, "t": t, "s": s, "cond": dict(cond)}
        if field.startswith("cond."):
            key = field.removeprefix("cond.")
            if value is KeyError:
                del args["cond"][key]
            else:
                args["cond"][key] = value(cond) if callable(value) else value
        else:
            args[field] = value(args[field])
        return args["x"], args["t"], args["s"], args["cond"]

    return mutate


BAD_INPUTS = [
    (_bad("x", lambda x: x[0]), "x must be a \\(B, C, H, W\\) tensor"),
    (_bad("x", lambda x: x[:, :4]), "x has 4 channels, the model expects in_channels=16"),
    (_bad("x", lambda x: x[:, :, :7]), "must be divisible by the patch size 2"),
    (_bad("x", lambda x: x[:, :, :, :5]), "must be divisible by the patch size 2"),
    (_bad("t", lambda t: t[:1]), "batch size mismatch: x has 2 samples, t has 1"),
    (_bad("s", lambda s: s.repeat(2)), "batch size mismatch: x has 2 samples, s has 4"),
    (_bad("t", lambda t: t[:, None]), "t must be a \\(B,\\) float tensor"),
    (_bad("s", lambda s: (s * 10).long()), "s must be a \\(B,\\) float tensor"),
    (_bad("t", lambda t: 0.5), "t must be a \\(B,\\) float tensor"),
    (_bad("s", lambda s: s + 2.0), "s must lie in \\[0, 1\\]"),
    (_bad("s", lambda s: s - 2.0), "s must lie in \\[0, 1\\]"),
    (_bad("t", lambda t: t + 1.5), "t must lie in \\[0, 1\\]"),
    (_bad("t", lambda t: torch.full_like(t, float("nan"))), "t must lie in \\[0, 1\\]"),
    (_bad("t", lambda t: t * 0.0), "s must be <= t"),
    (_bad("cond", lambda c: [c["txt"]]), "cond must be a dict"),
    (_bad("cond.txt", KeyError), "cond is missing 'txt'"),
    (_bad("cond.pooled", KeyError), "cond is missing 'pooled'"),
    (_bad("cond.text", torch.zeros(1)), "cond has unknown keys \\['text'\\]"),
    (_bad("cond.txt", lambda c: c["txt"][..., :8]), "cond\\['txt'\\] must be \\(B, Lt, txt_dim=32\\)"),
    (_bad("cond.txt", lambda c: c["txt"][0]), "cond\\['txt'\\] must be"),
    (_bad("cond.txt", lambda c: c["txt"][:1]), "x has 2 samples, cond\\['txt'\\] has 1"),
    (_bad("cond.pooled", lambda c: c["pooled"][:, :3]), "cond\\['pooled'\\] must be \\(B, vec_dim=16\\)"),
    (_bad("cond.pooled", lambda c: c["pooled"].repeat(2, 1)), "x has 2 samples, cond\\['pooled'\\] has 4"),
    (_bad("cond.txt_mask", lambda c: c["txt_mask"].float()), "cond\\['txt_mask'\\] must be a bool tensor"),
    (_bad("cond.txt_mask", lambda c: c["txt_mask"][:, :2]), "cond\\['txt_mask'\\] must be \\(B, Lt\\)"),
]


@pytest.mark.parametrize(("mutate", "match"), BAD_INPUTS)
def test_bad_inputs_raise_naming_the_problem(tiny_model: MMDiT, mutate, match: str) -> None:
    args = mutate(*make_inputs(lengths=[2, 5]))
    with pytest.raises(ValueError, match=match):
        tiny_model(*args)


@pytest.fixture(scope="module")
def tiny_model() -> MMDiT:
    return make_model()


def test_value_checks_can_be_switched_off(tiny_model: MMDiT) -> None:
    x, t, s, cond = make_inputs()
    tiny_model(x, s, t, cond, validate=False)  # s > t, unchecked on request
    tiny_model.validate_inputs = False
    try:
        tiny_model(x, s, t, cond)
        with pytest.raises(ValueError, match="channels"):  # shape checks stay on
            tiny_model(x[:, :3], t, s, cond)
    finally:
        tiny_model.validate_inputs = True
    # s == t up to an ulp is fine
    tiny_model(x, t, torch.nextafter(t, torch.ones_like(t)), cond)


# ---------------------------------------------------------------- FLOPs


@pytest.mark.parametrize("overrides", [{}, {"depth_double": 2, "depth_single": 3, "mlp_ratio": 2.0}])
def test_flops_match_flop_counter(overrides: dict) -> None:
    model = make_model(attention_backend="math", **overrides)  # CPU SDPA kernels are not counted
    x, t, s, cond = make_inputs(height=8, width=12, txt_len=5, lengths=[3, 5])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, s, cond)
    analytic = mmdit_forward_flops(model.config, batch=2, img_tokens=24, txt_tokens=5)
    assert abs(analytic - counter.get_total_flops()) / counter.get_total_flops() < 0.02
    assert sum(mmdit_forward_flops_breakdown(model.config, 2, 24, 5).values()) == analytic
    assert mmdit_forward_backward_flops(model.config, 2, 24, 5) == 3 * analytic


def test_flops_bad_arguments() -> None:
    with pytest.raises(ValueError, match="img_tokens must be an int >= 0"):
        mmdit_forward_flops(mmdit_preset("2b"), 1, -1, 0)


# ---------------------------------------------------------------- meta build, compile


def test_meta_build_then_materialise() -> None:
    with torch.device("meta"):
        model = MMDiT(mmdit_preset("tiny"))
    model.to_empty(device="cpu")
    model.init_weights()
    randomize(model)
    x, t, s, cond = make_inputs(lengths=[2, 5])
    assert torch.isfinite(model(x, t, s, cond)).all()
    assert model.single_blocks[0].kernels.qk_norm_rope is reference.qk_norm_rope


@pytest.mark.slow
def test_compiles_in_one_graph_without_recompiling_for_new_times() -> None:
    model = make_model()
    x, t, s, cond = make_inputs(lengths=[3, 5])
    with torch.no_grad():
        want = model(x, t, s, cond)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x, t, s, cond), want)
        with torch._dynamo.config.patch(error_on_recompile=True):  # t, s and the text are data, not guards
            x2, t2, s2, cond2 = make_inputs(lengths=[1, 4], seed=7)
            torch.testing.assert_close(compiled(x2, t2, s2, cond2), model(x2, t2, s2, cond2))
    torch._dynamo.reset()
