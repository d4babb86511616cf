"""Analytical FLOPs of the MMDiT, and the peak of the device, for MFU.

Counted: every matmul as 2*m*n*k (the linears, biases ignored), and attention as 4*B*H*L^2*Dh
(QK^T and PV over the joint sequence, padded keys included: kernels compute them). Not counted:
norms, RoPE, activations, softmax, residuals (O(L*D), under 1% at the paper's sizes). This is
what `torch.utils.flop_counter.FlopCounterMode` counts. Backward = 2x forward, so a forward +
backward is 3x forward.
"""

from __future__ import annotations

import torch

from selfe.network.config import MMDiTConfig


def mmdit_forward_flops_breakdown(
    config: MMDiTConfig, batch: int, img_tokens: int, txt_tokens: int
) -> dict[str, int]:
    """FLOPs of one forward by part: embed, double, single, final (each summed over its blocks)."""
    for name, value in (("batch", batch), ("img_tokens", img_tokens), ("txt_tokens", txt_tokens)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    b, n_img, n_txt = batch, img_tokens, txt_tokens
    d, f, p = config.hidden_size, config.mlp_hidden_dim, config.patch_dim
    length = n_img + n_txt

    def mm(m: int, n: int, k: int) -> int:
        return 2 * m * n * k

    def attn(seq: int) -> int:
        return 4 * b * config.num_heads * seq * seq * config.head_dim

    embed = (
        mm(b * n_img, d, p)
        + mm(b * n_txt, d, config.txt_dim)
        + 2 * (mm(b, d, config.time_embed_dim) + mm(b, d, d))  # MLP_t, MLP_s
        + mm(b, d, config.vec_dim)
        + mm(b, d, d)  # MLP_clip
    )

    def stream(tokens: int) -> int:  # one stream of a double block, attention itself excluded
        return mm(b, 6 * d, d) + mm(b * tokens, 3 * d, d) + mm(b * tokens, d, d) + 2 * mm(b * tokens, f, d)

    double = stream(n_img) + stream(n_txt) + attn(length)
    single = mm(b, 3 * d, d) + mm(b * length, 3 * d + f, d) + mm(b * length, d, d + f) + attn(length)
    final = mm(b, 2 * d, d) + mm(b * n_img, p, d)
    return {
        "embed": embed,
        "double": config.depth_double * double,
        "single": config.depth_single * single,
        "final": final,
    }


def mmdit_forward_flops(config: MMDiTConfig, batch: int, img_tokens: int, txt_tokens: int) -> int:
    """FLOPs of one forward of `batch` samples with `img_tokens` image and `txt_tokens` text tokens each."""
    return sum(mmdit_forward_flops_breakdown(config, batch, img_tokens, txt_tokens).values())


def mmdit_forward_backward_flops(config: MMDiTConfig, batch: int, img_tokens: int, txt_tokens: int) -> int:
    """Forward + backward (backward = 2x forward, the usual convention): 3x `mmdit_forward_flops`."""
    return 3 * mmdit_forward_flops(config, batch, img_tokens, txt_tokens)


# Dense bf16 tensor-core peaks per GPU, FLOP/s (vendor datasheets; the "with sparsity" figures are twice
# these). MFU is taken against the bf16 peak whatever the recipe (FP8 included), so runs compare. Matched
# as substrings of torch.cuda.get_device_name() in this order: the more specific names first.
DENSE_BF16_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("GH200", 989e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM ("NVIDIA H200")
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
)
# Where the device is not listed (a CPU included, where MFU is only a relative figure): the H100 SXM's.
DEFAULT_PEAK_FLOPS = 989e12


def peak_flops_of(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name (DENSE_BF16_PEAK_FLOPS); None when the name is not listed."""
    for key, peak in DENSE_BF16_PEAK_FLOPS:
        if key in device_name:
            return peak
    return None


def device_peak_flops(device: torch.device | str | None = None) -> float:
    """The peak MFU is taken against on `device` (default: the current CUDA device): a listed GPU's dense
    bf16 peak, else DEFAULT_PEAK_FLOPS. `metrics.peak_flops` / `--peak-flops` override it."""
    device = torch.device("cuda" if device is None else device)
    if device.type == "cuda" and torch.cuda.is_available():
        return peak_flops_of(torch.cuda.get_device_name(device)) or DEFAULT_PEAK_FLOPS
    return DEFAULT_PEAK_FLOPS
