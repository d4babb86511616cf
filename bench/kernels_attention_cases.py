"""Benchmark cases for the attention kernels: fused QK-norm + RoPE, and RoPE flash attention.

The driver (bench/kernels.py) calls `cases(args)` and times each case's `fn` with CUDA events. A case is
a dict: {"op": str, "impl": str, "fn": zero-arg callable running the work, "bytes": int | None,
"flops": int | None}; the driver turns bytes into GB/s and flops into TFLOP/s. Default shapes are the
2b model's: B=4, 16 heads of 128, L = 512 text + 1024 image = 1536 tokens, bf16.

`args` may carry (all optional, read with getattr): batch, heads, head_dim, txt_tokens, img_tokens,
dtype ("bf16" | "fp16" | "fp32" or a torch.dtype), device, pad_fraction (share of text tokens masked
as padding, default 0.25), seed. Nothing touches CUDA at import time; `cases` allocates the inputs.

Attention FLOPs count the dense L x L work (masked keys included): forward 4 * B * H * L^2 * Dh, and
forward + backward 3.5x that (the backward runs five L x L matmuls to the forward's two).
SDPA backends that cannot run here (or with these inputs) are left out of the list; the model's "varlen"
backend (packed keys, torch's FlashAttention varlen) runs on CUDA in fp16 / bf16 only, with as many valid keys
per row as the mask keeps.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from selfe.kernels import reference

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _arg(args: Any, name: str, default: Any) -> Any:
    value = getattr(args, name, None)
    return default if value is None else value


def _case(op: str, impl: str, fn: Callable[[], Any], bytes_: int | None, flops: int | None) -> dict:
    return {"op": op, "impl": impl, "fn": fn, "bytes": bytes_, "flops": flops}


def _triton_runnable(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _qk_norm_rope_cases(qkv, weights, cos, sin, grads, device) -> list[dict]:
    """qk_norm_rope on q, k viewed out of a fused (B, L, 3, H, Dh) projection, as the model has them."""
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    elt = q.element_size()
    qk_bytes = 2 * q.numel() * elt
    side_bytes = 2 * cos.numel() * cos.element_size() + 2 * weights.shape[-1] * weights.element_size()
    fwd_bytes = 2 * qk_bytes + side_bytes  # read q, k; write q_out, k_out
    bwd_bytes = 3 * qk_bytes + side_bytes  # read q, k, d(out); write dq, dk (weight grads are tiny)

    impls: list[tuple[str, Callable]] = [
        ("torch-eager", reference.qk_norm_rope),
        ("torch-compile", torch.compile(reference.qk_norm_rope, dynamic=False)),
    ]
    if _triton_runnable(device):
        from selfe.kernels.qk_norm_rope import qk_norm_rope as triton_qk_norm_rope

        impls.append(("triton", triton_qk_norm_rope))

    out: list[dict] = []
    for impl, fn in impls:

        def forward(fn=fn):
            with torch.no_grad():
                return fn(q, k, weights[0], weights[1], cos, sin)

        def forward_backward(fn=fn):
            q_out, k_out = fn(q, k, weights[0], weights[1], cos, sin)
            return torch.autograd.grad((q_out, k_out), (qkv, weights), (grads[0], grads[1]))

        out.append(_case("qk_norm_rope.fwd", impl, forward, fwd_bytes, None))
        out.append(_case("qk_norm_rope.fwd+bwd", impl, forward_backward, fwd_bytes + bwd_bytes, None))
    return out


def _sdpa_backend_fns(q, k, v, grad_out, mask=None) -> list[tuple[str, Callable, Callable]]:
    """(name, fwd, fwd+bwd) for each SDPA backend that runs these inputs (pre-rotated; with `mask`, the
    (B, 1, 1, L) key mask the model passes when text is padded, which rules flash out)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    found = []
    suffix = "" if mask is None else " (masked)"
    for name, backend in (
        ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
        ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
        ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        name += suffix

        def forward(backend=backend):
            with sdpa_kernel(backend), torch.no_grad():
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        def forward_backward(backend=backend):
            with sdpa_kernel(backend):
                out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                return torch.autograd.grad(out, (q, k, v), grad_out)

        try:
            forward_backward()
        except RuntimeError:  # this backend does not support the device, dtype or shape: skip it
            continue
        found.append((name, forward, forward_backward))
    return found


def _attention_cases(q, k, v, cos, sin, key_mask, grad_out, device) -> list[dict]:
    B, H, L, D = q.shape
    fwd_flops = 4 * B * H * L * L * D
    fwd_bwd_flops = int(3.5 * fwd_flops)
    impls: list[tuple[str, Callable, Callable]] = []

    with torch.no_grad():
        q_rot, k_rot = reference.apply_rope(q, cos, sin), reference.apply_rope(k, cos, sin)
    q_rot, k_rot = q_rot.requires_grad_(), k_rot.requires_grad_()
    attn_mask = key_mask[:, None, None, :]
    impls += _sdpa_backend_fns(q_rot, k_rot, v, grad_out)
    impls += _sdpa_backend_fns(q_rot, k_rot, v, grad_out, attn_mask)  # the model's case: which kernel to pick
    if device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        # The model's "varlen" backend: as many valid keys per row, laid out first ([img; txt]), packed.
        from selfe.network.varlen import varlen_padded_attention

        lengths = key_mask.sum(dim=1, dtype=torch.int32)

        def varlen_forward():
            with torch.no_grad():
                return varlen_padded_attention(q_rot, k_rot, v, lengths)

        def varlen_forward_backward():
            return torch.autograd.grad(varlen_padded_attention(q_rot, k_rot, v, lengths), (q_rot, k_rot, v), grad_out)

        impls.append(("varlen (packed keys)", varlen_forward, varlen_forward_backward))

    def rope_sdpa(mask):
        return torch.nn.functional.scaled_dot_product_attention(
            reference.apply_rope(q, cos, sin), reference.apply_rope(k, cos, sin), v, attn_mask=mask
        )

    impls.append(
        (
            "rope+sdpa (ref, masked)",
            lambda: rope_sdpa(attn_mask).detach(),
            lambda: torch.autograd.grad(rope_sdpa(attn_mask), (q, k, v), grad_out),
        )
    )
    if _triton_runnable(device):
        from selfe.kernels.rope_attention import rope_flash_attention

        for impl, mask in (("triton rope-flash (masked)", key_mask), ("triton rope-flash", None)):

            def forward(mask=mask):
                with torch.no_grad():
                    return rope_flash_attention(q, k, v, cos, sin, mask)

            def forward_backward(mask=mask):
                return torch.autograd.grad(rope_flash_attention(q, k, v, cos, sin, mask), (q, k, v), grad_out)

            impls.append((impl, forward, forward_backward))

    out: list[dict] = []
    for impl, forward, forward_backward in impls:
        out.append(_case("attention.fwd", impl, forward, None, fwd_flops))
        out.append(_case("attention.fwd+bwd", impl, forward_backward, None, fwd_bwd_flops))
    return out


def cases(args: Any = None) -> list[dict]:
    """All benchmark cases of qk_norm_rope and RoPE attention for the shapes in `args` (2b defaults)."""
    device = torch.device(_arg(args, "device", "cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _arg(args, "dtype", "bf16")
    dtype = _DTYPES[dtype] if isinstance(dtype, str) else dtype
    B, H, D = _arg(args, "batch", 4), _arg(args, "heads", 16), _arg(args, "head_dim", 128)
    txt, img = _arg(args, "txt_tokens", 512), _arg(args, "img_tokens", 1024)
    pad_fraction = float(_arg(args, "pad_fraction", 0.25))
    L = txt + img
    gen = torch.Generator(device="cpu").manual_seed(int(_arg(args, "seed", 0)))

    def randn(*shape: int, requires_grad: bool = False) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen).to(device, dtype)
        return t.requires_grad_(requires_grad)

    angles = torch.rand(L, D // 2, generator=gen, dtype=torch.float64) * 100
    cos, sin = angles.cos().float().to(device), angles.sin().float().to(device)
    # Text padding at the end of each sample's text; image keys always attend.
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[:, txt - int(pad_fraction * txt) : txt] = False
    key_mask = key_mask.to(device)

    qkv = randn(B, L, 3, H, D, requires_grad=True)
    weights = (1 + 0.1 * torch.randn(2, D, generator=gen)).to(device, dtype).requires_grad_()
    grads = randn(2, B, H, L, D)
    result = _qk_norm_rope_cases(qkv, weights, cos, sin, grads, device)

    q, k, v = (randn(B, H, L, D, requires_grad=True) for _ in range(3))
    result += _attention_cases(q, k, v, cos, sin, key_mask, randn(B, H, L, D), device)
    return result
