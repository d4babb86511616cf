"""Analytical FLOPs of the MMDiT, and the peak of the device, for MFU.

Counted: every matmul as 2*m*n*k (the linears, biases ignored), and attention as 4*B*H*L^2*Dh
(QK^T and PV over the joint sequence). Not counted: norms, RoPE, activations, softmax, residuals
(O(L*D), under 1% at the paper's sizes). This is what `torch.utils.flop_counter.FlopCounterMode`
counts. Backward = 2x forward, so a forward + backward is 3x forward.

Two counts of one forward (`forward_flops`): *useful* FLOPs, each row at its real text length (the
prompt's tokens, EOS included), which MFU is taken on; and *executed* FLOPs, every row at the padded
text length the kernels ran (the text bucket or T5's max length), padding included. A 10-token prompt
padded to 512 runs the step at 1536 tokens a row, of which 1034 are work: MFU over executed FLOPs
would credit the padding.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

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


@dataclass(frozen=True)
class ForwardFlops:
    """FLOPs of one forward: `useful` (each row at its real text length) and `executed` (each row at the
    padded length the kernels ran; an upper bound where attention skips padded keys)."""

    useful: int
    executed: int

    @property
    def useful_share(self) -> float:
        """useful / executed: the share of the executed work that was not padding (1.0: no padding)."""
        return self.useful / self.executed if self.executed else 1.0

    def __add__(self, other: ForwardFlops) -> ForwardFlops:
        return ForwardFlops(self.useful + other.useful, self.executed + other.executed)

    def __mul__(self, factor: int) -> ForwardFlops:
        """`factor` such forwards (e.g. the steps of a call; 3 for a forward + backward)."""
        return ForwardFlops(self.useful * factor, self.executed * factor)

    __rmul__ = __mul__


def forward_flops(
    config: MMDiTConfig, *, img_tokens: int, txt_lengths: Sequence[int], executed_txt_tokens: int
) -> ForwardFlops:
    """One forward of len(txt_lengths) rows of `img_tokens` image tokens each.

    txt_lengths: each row's real text tokens (EOS included); with CFG the null prompt's rows are rows of
    their own, at their own real length. executed_txt_tokens: the padded text length every row ran at.
    Useful: the sum over rows of the one-row count at that row's length. Executed: every row at
    executed_txt_tokens, linears and attention over the padding; an upper bound where an attention kernel
    skips padded keys (counted as run everywhere)."""
    lengths = list(txt_lengths)
    if not lengths:
        raise ValueError("txt_lengths must name at least one row")
    if not isinstance(executed_txt_tokens, int) or executed_txt_tokens < 0:
        raise ValueError(f"executed_txt_tokens must be an int >= 0, got {executed_txt_tokens!r}")
    for n in lengths:
        if not isinstance(n, int) or not 0 <= n <= executed_txt_tokens:
            raise ValueError(f"txt_lengths must be ints in [0, executed_txt_tokens={executed_txt_tokens}], got {n!r}")
    useful = sum(count * mmdit_forward_flops(config, 1, img_tokens, n) for n, count in Counter(lengths).items())
    return ForwardFlops(useful, mmdit_forward_flops(config, len(lengths), img_tokens, executed_txt_tokens))


def text_length_polynomial(config: MMDiTConfig, img_tokens: int) -> tuple[int, int, int]:
    """(a, b, c) with one row's forward FLOPs at n real text tokens = a + b*n + c*n^2, exactly: the
    linears are linear in n, attention over img_tokens + n quadratic."""
    f0, f1, f2 = (mmdit_forward_flops(config, 1, img_tokens, n) for n in (0, 1, 2))
    c = (f2 - 2 * f1 + f0) // 2
    return f0, f1 - f0 - c, c


def useful_forward_flops(config: MMDiTConfig, img_tokens: int, txt_mask: Tensor) -> Tensor:
    """`forward_flops(...).useful` from a (B, L) real-token mask, as an int64 tensor on the mask's device:
    no host sync (the trainer reads it when it logs)."""
    if txt_mask.dim() != 2:
        raise ValueError(f"txt_mask must be (B, L), got shape {tuple(txt_mask.shape)}")
    a, b, c = text_length_polynomial(config, img_tokens)
    n = txt_mask.sum(dim=1, dtype=torch.int64)
    return a * n.numel() + b * n.sum() + c * n.square().sum()


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
