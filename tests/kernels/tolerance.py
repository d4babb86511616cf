"""The kernel tolerance rule, the flash-attention way: a kernel's error against a float64 reference may be at
most twice PyTorch's own error in the same dtype, plus half an ulp at the output's scale."""

from __future__ import annotations

import torch


def assert_within_torch_error(kernel, torch_same, ref64, names: list[str], dtype: torch.dtype) -> None:
    for name, k, t, r in zip(names, kernel, torch_same, ref64):
        assert k.dtype == t.dtype and k.shape == t.shape, f"{name}: {k.dtype} {k.shape} vs {t.dtype} {t.shape}"
        assert torch.isfinite(k).all(), f"{name}: non-finite values"
        err_kernel = (k.double() - r).abs().max().item()
        err_torch = (t.double() - r).abs().max().item()
        atol = 0.5 * torch.finfo(dtype).eps * max(1.0, r.abs().max().item())
        assert err_kernel <= 2 * err_torch + atol, (
            f"{name} ({dtype}): kernel error {err_kernel:.3e} > 2 x torch error {err_torch:.3e} + {atol:.1e}"
        )
