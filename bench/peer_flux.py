"""diffusers' FLUX built at our sizes, and what a diffusers / torchtitan user would run with it.

The peer of bench/peers.py: `FluxTransformer2DModel` and `AutoencoderKL` configured from our `MMDiTConfig` /
`AutoEncoderConfig` (random weights, or our MMDiT's mapped in: `peer_state_dict`), its denoising loop (CFG
as two batched rows, Euler) and its flow-matching training step (torchtitan's FLUX trainer: full activation
checkpointing and compile per block, FSDP2, AdamW). diffusers is imported here only, lazily: the engine never imports it
(`pip install -e '.[bench]'`).

Parameter counts. Our MMDiT is FLUX's network plus MLP_s (the gap t - s): 256 -> D -> D. FLUX.1-dev's
guidance embedder has exactly that shape, so with `guidance_embeds=True` (the default here) the two models
have the same parameter count and the same work; without it (FLUX.1-schnell's layout) the peer lacks
those 256 D + D^2 + 2 D parameters (0.21% of the 2b). diffusers fixes the timestep sinusoid at 256
channels: our config must use time_embed_dim=256 (the 0.5b and 2b presets do; `peer_config` sets it).

Conditioning inputs differ in meaning, not in cost: FLUX takes t, pooled CLIP and (dev) a guidance
scalar; ours t, s (as the gap t - s) and pooled CLIP. diffusers' FLUX has no text padding mask: in sampling
both sides run unmasked text of the same length (our trainer keeps its mask).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from selfe.components.autoencoder import AutoEncoderConfig
from selfe.network.config import MMDiTConfig, mmdit_preset

PEER_TIME_EMBED_DIM = 256  # diffusers' FLUX: Timesteps(num_channels=256), not configurable
INSTALL_HINT = "pip install -e '.[bench]' (diffusers>=0.35)"


def diffusers_problem() -> str | None:
    """Why diffusers' FLUX cannot be built here, or None."""
    try:
        from diffusers import AutoencoderKL, FluxTransformer2DModel  # noqa: F401
    except Exception as err:  # an ImportError, or diffusers' lazy loader's RuntimeError around one
        return f"diffusers is not importable ({type(err).__name__}: {str(err).splitlines()[0][:200]}); {INSTALL_HINT}"
    return None


def peer_config(preset: str) -> MMDiTConfig:
    """Our preset with the timestep sinusoid diffusers' FLUX uses (a no-op for 0.5b and 2b)."""
    return mmdit_preset(preset, time_embed_dim=PEER_TIME_EMBED_DIM)


def flux_transformer(config: MMDiTConfig, guidance_embeds: bool = True) -> nn.Module:
    """diffusers' FluxTransformer2DModel with `config`'s sizes: width, heads, depths, RoPE axes, text and
    pooled widths, and patch_size^2 * in_channels channels in and out (the tokens arrive packed)."""
    from diffusers import FluxTransformer2DModel

    if config.time_embed_dim != PEER_TIME_EMBED_DIM:
        raise ValueError(
            f"diffusers' FLUX embeds the time with {PEER_TIME_EMBED_DIM} sinusoid channels; this config has "
            f"time_embed_dim={config.time_embed_dim} (use peer_config or time_embed_dim={PEER_TIME_EMBED_DIM})"
        )
    if config.mlp_ratio != 4.0 or config.mlp_activation != "gelu_tanh" or not config.qkv_bias:
        raise ValueError("diffusers' FLUX has mlp_ratio 4, tanh-GELU and qkv biases; this config differs")
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=config.patch_dim,
        out_channels=None,
        num_layers=config.depth_double,
        num_single_layers=config.depth_single,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads,
        joint_attention_dim=config.txt_dim,
        pooled_projection_dim=config.vec_dim,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=tuple(config.axes_dim),
    )


def flux_autoencoder(config: AutoEncoderConfig) -> nn.Module:
    """diffusers' AutoencoderKL with `config`'s sizes (FLUX's layout: no quant convs, its scale and shift)."""
    from diffusers import AutoencoderKL

    levels = len(config.ch_mult)
    return AutoencoderKL(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.ch * m for m in config.ch_mult),
        layers_per_block=config.num_res_blocks,
        latent_channels=config.z_channels,
        norm_num_groups=config.norm_groups,
        sample_size=config.resolution,
        scaling_factor=config.scale_factor,
        shift_factor=config.shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def randomize(module: nn.Module, std: float = 0.02) -> nn.Module:
    """Every parameter N(0, std): zero-initialised gates would make blocks the identity and flatter a timing."""
    for param in module.parameters():
        param.normal_(0.0, std)
    return module


def peer_state_dict(ours: dict[str, Tensor], config: MMDiTConfig) -> dict[str, Tensor]:
    """Our MMDiT's weights under diffusers' FLUX names (with the guidance embedder: it takes MLP_s): the
    peer then computes our V(x, t, s) with guidance = t - s. Fused projections are split (qkv, and the
    single blocks' linear1 into q, k, v and the MLP input); the last layer's (shift, scale) becomes
    diffusers' (scale, shift)."""
    d = config.hidden_size
    out: dict[str, Tensor] = {}

    def linear(src: str, dst: str) -> None:
        for kind in ("weight", "bias"):
            out[f"{dst}.{kind}"] = ours[f"{src}.{kind}"]

    def split(src: str, dsts: list[str], sizes: list[int]) -> None:
        for kind in ("weight", "bias"):
            for dst, part in zip(dsts, ours[f"{src}.{kind}"].split(sizes)):
                out[f"{dst}.{kind}"] = part

    linear("img_in", "x_embedder")
    linear("txt_in", "context_embedder")
    for src, dst in (("time_in", "timestep"), ("gap_in", "guidance"), ("vector_in", "text")):
        linear(f"{src}.in_layer", f"time_text_embed.{dst}_embedder.linear_1")
        linear(f"{src}.out_layer", f"time_text_embed.{dst}_embedder.linear_2")
    for i in range(config.depth_double):
        src, dst = f"double_blocks.{i}", f"transformer_blocks.{i}"
        for stream, mod, qkv, norm, proj, ff in (
            ("img", "norm1", ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"), "to_out.0", "ff"),
            ("txt", "norm1_context", ("add_q_proj", "add_k_proj", "add_v_proj"), ("norm_added_q", "norm_added_k"),
             "to_add_out", "ff_context"),
        ):  # fmt: skip
            linear(f"{src}.{stream}_mod.lin", f"{dst}.{mod}.linear")
            split(f"{src}.{stream}_attn.qkv", [f"{dst}.attn.{name}" for name in qkv], [d] * 3)
            out[f"{dst}.attn.{norm[0]}.weight"] = ours[f"{src}.{stream}_attn.norm.query_weight"]
            out[f"{dst}.attn.{norm[1]}.weight"] = ours[f"{src}.{stream}_attn.norm.key_weight"]
            linear(f"{src}.{stream}_attn.proj", f"{dst}.attn.{proj}")
            linear(f"{src}.{stream}_mlp.0", f"{dst}.{ff}.net.0.proj")
            linear(f"{src}.{stream}_mlp.2", f"{dst}.{ff}.net.2")
    for i in range(config.depth_single):
        src, dst = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        linear(f"{src}.modulation.lin", f"{dst}.norm.linear")
        names = [f"{dst}.attn.to_q", f"{dst}.attn.to_k", f"{dst}.attn.to_v", f"{dst}.proj_mlp"]
        split(f"{src}.linear1", names, [d, d, d, config.mlp_hidden_dim])
        linear(f"{src}.linear2", f"{dst}.proj_out")
        out[f"{dst}.attn.norm_q.weight"] = ours[f"{src}.norm.query_weight"]
        out[f"{dst}.attn.norm_k.weight"] = ours[f"{src}.norm.key_weight"]
    for kind in ("weight", "bias"):
        shift, scale = ours[f"final_layer.adaLN_modulation.lin.{kind}"].chunk(2)
        out[f"norm_out.linear.{kind}"] = torch.cat([scale, shift])
    linear("final_layer.linear", "proj_out")
    return out


def position_ids(txt_tokens: int, h: int, w: int, device) -> tuple[Tensor, Tensor]:
    """FLUX's ids: text at (0, 0, 0), image token (i, j) at (0, i, j). Returns (txt_ids, img_ids)."""
    img = torch.zeros(h, w, 3, device=device)
    img[..., 1] = torch.arange(h, device=device)[:, None]
    img[..., 2] = torch.arange(w, device=device)[None, :]
    return torch.zeros(txt_tokens, 3, device=device), img.reshape(h * w, 3)


@dataclasses.dataclass
class PeerBatch:
    """The peer's inputs for B samples: packed latent tokens (B, h*w, C*p*p), text (B, Lt, txt_dim),
    pooled (B, vec_dim), and the unconditional branch's text and pooled for CFG (None: no CFG)."""

    tokens: Tensor
    txt: Tensor
    pooled: Tensor
    null_txt: Tensor | None
    null_pooled: Tensor | None
    txt_ids: Tensor
    img_ids: Tensor


def flux_velocity(model: nn.Module, x: Tensor, t: Tensor, txt: Tensor, pooled: Tensor, batch: PeerBatch) -> Tensor:
    """One forward of the peer: x (B, L, C) tokens, t (B,) in [0, 1] (diffusers scales by 1000 itself)."""
    guidance = torch.full_like(t, 3.5) if getattr(model.config, "guidance_embeds", False) else None
    return model(
        hidden_states=x,
        encoder_hidden_states=txt,
        pooled_projections=pooled,
        timestep=t,
        img_ids=batch.img_ids,
        txt_ids=batch.txt_ids,
        guidance=guidance,
        return_dict=False,
    )[0]


def flux_step(model: nn.Module, x: Tensor, t_cur: Tensor, t_next: Tensor, batch: PeerBatch, omega: float) -> Tensor:
    """One Euler step; with CFG the two branches as one forward of 2B rows (not diffusers' two calls)."""
    if batch.null_txt is None:
        v = flux_velocity(model, x, t_cur, batch.txt, batch.pooled, batch)
    else:
        both = flux_velocity(
            model,
            torch.cat([x, x]),
            torch.cat([t_cur, t_cur]),
            torch.cat([batch.txt, batch.null_txt]),
            torch.cat([batch.pooled, batch.null_pooled]),
            batch,
        )
        v_cond, v_uncond = both.chunk(2)
        v = v_uncond + omega * (v_cond - v_uncond)
    return x + (t_next - t_cur).view(-1, 1, 1).to(x.dtype) * v


@torch.no_grad()
def flux_image(
    model: nn.Module, vae: nn.Module | None, batch: PeerBatch, grid: Tensor, omega: float, latent_hw: tuple[int, int]
) -> Tensor:
    """`len(grid) - 1` steps from the packed noise, then (vae given) the decode of diffusers' FLUX pipeline:
    unpack, latents / scaling + shift, `vae.decode`. grid: (N + 1,) times from 1 down to 0."""
    x, b = batch.tokens, batch.tokens.shape[0]
    for k in range(len(grid) - 1):
        x = flux_step(model, x, grid[k].expand(b), grid[k + 1].expand(b), batch, omega)
    if vae is None:
        return x
    h, w = latent_hw
    channels = vae.config.latent_channels
    p = int(round((x.shape[-1] // channels) ** 0.5))
    latents = x.view(b, h, w, channels, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, channels, h * p, w * p)
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(latents.to(next(vae.parameters()).dtype), return_dict=False)[0]


# ------------------------------------------------------------------------------------------ training


def blocks_view(model: nn.Module) -> SimpleNamespace:
    """The peer's block lists under our names, so selfe.train.parallelize's passes apply to them as they are."""
    return SimpleNamespace(double_blocks=model.transformer_blocks, single_blocks=model.single_transformer_blocks)


def parallelize_peer(
    model: nn.Module, mesh, param_dtype: torch.dtype, compile: bool, checkpointing: bool, backend: str = "inductor"
) -> nn.Module:
    """torchtitan's FLUX order: activation checkpointing per block (full) -> compile per block -> FSDP2 per
    block, then the root; the same passes as our trainer's (selfe.train.parallelize). FSDP casts the inputs
    to the compute dtype (torchtitan's default policy): diffusers' FLUX does not cast them itself."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from selfe.train.parallelize import apply_activation_checkpointing, apply_compile

    view = blocks_view(model)
    if checkpointing:
        apply_activation_checkpointing(view)
    if compile:
        apply_compile(view, fullgraph=True, backend=backend)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for blocks in (view.double_blocks, view.single_blocks):
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=mesh.size() > 1)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return model


def flux_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: PeerBatch, generator) -> Tensor:
    """One flow-matching step as torchtitan's FLUX trainer runs it: t ~ sigmoid(N(0, 1)),
    x_t = (1 - t) x0 + t eps, loss = |V - (eps - x0)|^2, backward, clip to norm 1, AdamW. Returns the loss."""
    x0 = batch.tokens
    b, device = x0.shape[0], x0.device
    t = torch.randn(b, device=device, generator=generator).sigmoid()
    eps = torch.randn(x0.shape, device=device, dtype=x0.dtype, generator=generator)
    x_t = (1 - t).view(-1, 1, 1) * x0 + t.view(-1, 1, 1) * eps
    v = flux_velocity(model, x_t, t, batch.txt, batch.pooled, batch)
    loss = (v.float() - (eps - x0).float()).square().mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()
