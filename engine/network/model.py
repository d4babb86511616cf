"""The dual-time MMDiT of Self-E: FLUX's network with a second time s entering the global vector.

`vec = MLP_t(sinus(t)) + MLP_s(sinus(t - s)) + MLP_clip(pooled)` (docs/method.md §2) replaces
FLUX's time embedding in every block's modulation and in the last layer; nothing else changes.
The model predicts the velocity V; G = x_t - t * V is the objective's business.

The joint sequence is [img; txt], image first: each row's text padding sits at its end, so the blocks'
attention gets each row's count of valid keys (image + real text) instead of a mask, or nothing when
every text token is real (`selfe.network.attention` documents the paths).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from selfe.network.config import MMDiTConfig
from selfe.network.layers import (
    DoubleStreamBlock,
    KernelOps,
    LastLayer,
    MLPEmbedder,
    Modulation,
    QKNorm,
    SingleStreamBlock,
    timestep_embedding,
)
from selfe.network.rope import joint_rope_tables

COND_KEYS = ("txt", "txt_mask", "pooled")


def _call_block(block: nn.Module, *args: Any) -> Any:
    return block(*args)


# Under a torch.compile of the whole model, a block called through here is a nested compile region: traced
# and compiled once per block kind and stamped out for the others (its weights are inputs), which cuts the
# sampler's compile of a deep stack (bench/compile_time.py). A region called once is inlined by dynamo.
# Outside torch.compile it is a plain call.
_block_region = torch.compiler.nested_compile_region(_call_block)


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) latents -> (B, H/p * W/p, C * p * p) tokens.

    Tokens are row-major over the patch grid; each holds its patch ordered (c, ph, pw), as FLUX packs it.
    """
    b, c, h, w = x.shape
    p = patch_size
    x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: Tensor, height: int, width: int, patch_size: int, channels: int) -> Tensor:
    """Inverse of `patchify`: (B, h * w, C * p * p) with a (h x w) token grid -> (B, C, h * p, w * p)."""
    b, p = tokens.shape[0], patch_size
    x = tokens.view(b, height, width, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    # contiguous: with p = 1 the reshape is a strided view, which FSDP2 warns about as a module output.
    return x.reshape(b, channels, height * p, width * p).contiguous()


class MMDiT(nn.Module):
    """FLUX-style MMDiT with dual-time conditioning. Build from a config; runs on the meta device too."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        if not isinstance(config, MMDiTConfig):
            raise TypeError(f"MMDiT needs an MMDiTConfig, got {type(config).__name__}")
        self.config = config
        # Value checks (t, s ranges, s <= t) sync with the host; a compiled or graph-captured sampler
        # step turns them off here or per call. Shape checks are free and always run.
        self.validate_inputs = True
        # Under a whole-model torch.compile, each block as a nested compile region (`_block_region`); no
        # effect in eager mode or when blocks are compiled one by one (the trainer).
        self.compile_regions = True
        d = config.hidden_size
        self.img_in = nn.Linear(config.patch_dim, d)
        self.txt_in = nn.Linear(config.txt_dim, d)
        self.time_in = MLPEmbedder(config.time_embed_dim, d)  # MLP_t
        self.gap_in = MLPEmbedder(config.time_embed_dim, d)  # MLP_s, fed the gap t - s
        self.vector_in = MLPEmbedder(config.vec_dim, d)  # MLP_clip
        block_args = dict(
            eps=config.norm_eps, activation=config.mlp_activation, attention_backend=config.attention_backend
        )
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(d, config.num_heads, config.mlp_hidden_dim, config.qkv_bias, **block_args)
            for _ in range(config.depth_double)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(d, config.num_heads, config.mlp_hidden_dim, **block_args)
            for _ in range(config.depth_single)
        )
        self.final_layer = LastLayer(d, config.patch_dim, config.norm_eps)
        self._kernels_device: str | None = None
        self.init_weights()
        self._bind_kernels(self.img_in.weight.device)
        # Weights swapped in by load_state_dict(assign=True) (meta -> real device) rebind here, not in the
        # first forward, where the rebinding would cost a compiled step a recompile.
        self.register_load_state_dict_post_hook(lambda module, _keys: module._bind_kernels(module.img_in.weight.device))

    @torch.no_grad()
    def init_weights(self) -> None:
        """Training-from-scratch init.

        - Linears: xavier-uniform weights, zero biases (keeps activations O(1) through the stack).
        - adaLN-Zero (DiT): every modulation output layer is zero, so all gates start at 0 and every
          block is the identity at init; the deep residual stack trains stably from there. The last
          layer's Linear is zero too, so V = 0 at init.
        - MLP_s's last layer is zero (when `zero_init_gap_embedder`): the gap t - s has no effect at
          init, so with s = t the network starts as an ordinary flow-matching network (docs/method.md §2).
        - QK-norm weights are ones.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, QKNorm):
                nn.init.ones_(module.query_weight)
                nn.init.ones_(module.key_weight)
        zero = [m.lin for m in self.modules() if isinstance(m, Modulation)] + [self.final_layer.linear]
        if self.config.zero_init_gap_embedder:
            zero.append(self.gap_in.out_layer)
        for linear in zero:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / to_empty(): rebind here, so the first forward (maybe compiled) mutates nothing.
        out = super()._apply(fn, *args, **kwargs)
        self._bind_kernels(self.img_in.weight.device)
        return out

    def _bind_kernels(self, device: torch.device) -> None:
        """Point every block at the fused-op implementations for `device` (re-resolved when it changes).

        Runs at construction and on every device move; `forward` re-checks for weights swapped in by
        `load_state_dict(assign=True)`.
        """
        # On meta the reference ops serve shape inference; a backend named in the config may not load there.
        if self._kernels_device == device.type or device.type == "meta":
            return
        ops = KernelOps.resolve(self.config.kernel_backend, device)
        for module in self.modules():
            if isinstance(getattr(module, "kernels", None), KernelOps):
                module.kernels = ops
        self._kernels_device = device.type

    def time_vector(self, t: Tensor, s: Tensor, pooled: Tensor) -> Tensor:
        """The global vector `MLP_t(sinus(t)) + MLP_s(sinus(t - s)) + MLP_clip(pooled)`.

        t, s: (B,); pooled: (B, vec_dim). Returns (B, D) in the parameters' dtype.
        """
        c, dtype = self.config, self.img_in.weight.dtype
        sinus = lambda u: timestep_embedding(u, c.time_embed_dim, c.time_factor, c.time_max_period).to(dtype)
        return self.time_in(sinus(t)) + self.gap_in(sinus(t - s)) + self.vector_in(pooled.to(dtype))

    def forward(self, x: Tensor, t: Tensor, s: Tensor, cond: Mapping[str, Any], validate: bool | None = None) -> Tensor:
        """Velocity V(x_t, t, s, c).

        x: (B, C, H, W) latents, H and W divisible by the patch size; t, s: (B,) in [0, 1], s <= t;
        cond: {"txt": (B, Lt, txt_dim), "txt_mask": (B, Lt) bool (True = real token, real tokens first,
        then padding) or None (every token real), "pooled": (B, vec_dim)}. Padded text tokens are left
        out as attention keys everywhere.
        validate: run the host-syncing value checks (default: `self.validate_inputs`; always skipped
        while compiling or capturing a CUDA graph); the same sync finds a txt_mask with every token real,
        which then runs as None. Returns V: x's shape and dtype.
        """
        txt, txt_mask, pooled = self._check_inputs(x, t, s, cond)
        if (self.validate_inputs if validate is None else validate) and self._check_values(t, s, txt_mask):
            txt_mask = None  # every text token is real: no key lengths, no mask
        cfg = self.config
        channels, height, width = x.shape[1:]
        h, w = height // cfg.patch_size, width // cfg.patch_size
        n_img = h * w
        dtype = self.img_in.weight.dtype
        self._bind_kernels(x.device)

        img = self.img_in(patchify(x.to(dtype), cfg.patch_size))
        txt = self.txt_in(txt.to(dtype))
        vec = self.time_vector(t, s, pooled)
        cos, sin = joint_rope_tables(txt.shape[1], h, w, cfg.axes_dim, cfg.rope_theta, device=x.device)
        # Tensor data, not Python ints: a compiled step serves every prompt length of its text bucket.
        key_lengths = None if txt_mask is None else txt_mask.sum(dim=1, dtype=torch.int32) + n_img

        call = _block_region if self.compile_regions else _call_block
        for block in self.double_blocks:
            img, txt = call(block, img, txt, vec, cos, sin, key_lengths)
        joint = torch.cat((img, txt), dim=1)
        for block in self.single_blocks:
            joint = call(block, joint, vec, cos, sin, key_lengths)
        out = self.final_layer(joint[:, :n_img], vec)
        return unpatchify(out, h, w, cfg.patch_size, channels).to(x.dtype)

    def _check_inputs(self, x: Tensor, t: Tensor, s: Tensor, cond: Mapping[str, Any]):
        """Shape and type checks (no host sync). Returns (txt, txt_mask, pooled)."""
        cfg = self.config
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a (B, C, H, W) tensor, got {_describe(x)}")
        b, channels, height, width = x.shape
        if channels != cfg.in_channels:
            raise ValueError(f"x has {channels} channels, the model expects in_channels={cfg.in_channels}")
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ValueError(
                f"x's height and width ({height}, {width}) must be divisible by the patch size {cfg.patch_size}"
            )
        for name, value in (("t", t), ("s", s)):
            if not isinstance(value, Tensor) or value.dim() != 1 or not value.is_floating_point():
                raise ValueError(f"{name} must be a (B,) float tensor, got {_describe(value)}")
            if value.shape[0] != b:
                raise ValueError(f"batch size mismatch: x has {b} samples, {name} has {value.shape[0]}")
        if not isinstance(cond, Mapping):
            raise ValueError(f"cond must be a dict with keys {COND_KEYS}, got {type(cond).__name__}")
        unknown = sorted(set(cond) - set(COND_KEYS))
        if unknown:
            raise ValueError(f"cond has unknown keys {unknown}; expected {COND_KEYS}")
        for key in ("txt", "pooled"):
            if key not in cond:
                raise ValueError(f"cond is missing {key!r}")
        txt, pooled, txt_mask = cond["txt"], cond["pooled"], cond.get("txt_mask")
        if not isinstance(txt, Tensor) or txt.dim() != 3 or txt.shape[2] != cfg.txt_dim:
            raise ValueError(f"cond['txt'] must be (B, Lt, txt_dim={cfg.txt_dim}), got {_describe(txt)}")
        if not isinstance(pooled, Tensor) or pooled.dim() != 2 or pooled.shape[1] != cfg.vec_dim:
            raise ValueError(f"cond['pooled'] must be (B, vec_dim={cfg.vec_dim}), got {_describe(pooled)}")
        for name, value in (("cond['txt']", txt), ("cond['pooled']", pooled)):
            if value.shape[0] != b:
                raise ValueError(f"batch size mismatch: x has {b} samples, {name} has {value.shape[0]}")
        if txt_mask is not None:
            if not isinstance(txt_mask, Tensor) or txt_mask.dtype != torch.bool:
                raise ValueError(f"cond['txt_mask'] must be a bool tensor or None, got {_describe(txt_mask)}")
            if tuple(txt_mask.shape) != tuple(txt.shape[:2]):
                raise ValueError(
                    f"cond['txt_mask'] must be (B, Lt) = {tuple(txt.shape[:2])} like cond['txt'], "
                    f"got {tuple(txt_mask.shape)}"
                )
        return txt, txt_mask, pooled

    @staticmethod
    def _check_values(t: Tensor, s: Tensor, txt_mask: Tensor | None = None) -> bool:
        """t, s in [0, 1] and s <= t, up to a few ulps of their dtype; txt_mask's real tokens first. One host
        sync for all checks, which also tells whether every text token is real (the return value; False
        when skipped: while compiling or capturing)."""
        if torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing()):
            return False
        tol = 4 * torch.finfo(t.dtype).eps
        with torch.no_grad():
            no_mask = torch.zeros((), dtype=torch.bool, device=t.device)
            flags = torch.stack(
                (
                    ~((t >= -tol) & (t <= 1 + tol)).all(),
                    ~((s >= -tol) & (s <= 1 + tol)).all(),
                    (s.float() > t.float() + tol).any(),
                    no_mask if txt_mask is None else (txt_mask[:, 1:] & ~txt_mask[:, :-1]).any().to(t.device),
                    no_mask if txt_mask is None else txt_mask.all().to(t.device),
                )
            ).tolist()
        if flags[0]:
            raise ValueError(f"t must lie in [0, 1] (and be finite), got min {t.min().item()}, max {t.max().item()}")
        if flags[1]:
            raise ValueError(f"s must lie in [0, 1] (and be finite), got min {s.min().item()}, max {s.max().item()}")
        if flags[2]:
            raise ValueError(f"s must be <= t for every sample; max(s - t) = {(s.float() - t.float()).max().item()}")
        if flags[3]:
            raise ValueError(
                "cond['txt_mask'] must hold each sample's real tokens first, then its padding (a True after a False)"
            )
        return flags[4]


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__
