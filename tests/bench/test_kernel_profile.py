"""bench/kernel_profile.py: kernels sorted into kinds by name, each kernel's own time counted once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bench import kernel_profile


@pytest.mark.parametrize(
    "name, kind",
    [
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>", "attention"),
        ("_rope_attention_fwd_kernel", "attention"),
        ("nvjet_tst_192x192_64x3_2x1_v_bz_coopB_TNT", "gemm"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "gemm"),
        ("aten::addmm", "gemm"),
        ("_layer_norm_modulate_fwd_kernel", "norm / modulation"),
        ("_gated_residual_modulate_fwd_kernel", "norm / modulation"),
        ("triton_red_fused_native_layer_norm_0", "norm / modulation"),
        ("_qk_norm_rope_fwd_kernel", "norm / modulation"),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>",
            "elementwise",
        ),
        ("triton_poi_fused_add_mul_3", "elementwise"),
        ("aten::normal_", "other"),  # "normal" is no norm
        ("Memcpy DtoD (Device -> Device)", "copy / cast"),
        ("some_unknown_kernel", "other"),
    ],
)
def test_kernels_are_sorted_into_kinds_by_name(name: str, kind: str) -> None:
    assert kernel_profile.kind_of(name) == kind


def event(key: str, device: str, cpu_us: int, device_us: int, count: int = 1, annotation: bool = False):
    return SimpleNamespace(
        key=key,
        count=count,
        device_type=f"DeviceType.{device}",
        self_cpu_time_total=cpu_us,
        self_device_time_total=device_us,
        is_user_annotation=annotation,
    )


def test_on_cuda_only_kernels_count_and_shares_add_up() -> None:
    events = [
        event("aten::mm", "CPU", 900, 0),  # the op's host time: not device time
        event("nvjet_gemm_kernel", "CUDA", 0, 3000, count=4),
        event("flash_fwd_kernel", "CUDA", 0, 1000),
        event("triton_poi_fused_mul_0", "CUDA", 0, 500),
        event("triton_poi_fused_mul_1", "CUDA", 0, 500),
        event("ProfilerStep#1", "CUDA", 0, 5000, annotation=True),  # a range over the kernels above
    ]
    summary = kernel_profile.summarise(events, on_cuda=True, top=3)
    assert summary["total_ms"] == pytest.approx(5.0)
    assert [r["name"] for r in summary["top"]] == ["nvjet_gemm_kernel", "flash_fwd_kernel", "triton_poi_fused_mul_0"]
    assert summary["top"][0] == {"name": "nvjet_gemm_kernel", "kind": "gemm", "calls": 4, "ms": 3.0, "share": 0.6}
    assert [(k["kind"], k["share"]) for k in summary["kinds"]] == [
        ("gemm", pytest.approx(0.6)),
        ("attention", pytest.approx(0.2)),
        ("elementwise", pytest.approx(0.2)),
    ]


def test_on_cpu_the_ops_own_time_counts() -> None:
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    summary = kernel_profile.profile_call(lambda: torch.relu(a @ b), torch.device("cpu"), top=10)
    names = {r["name"]: r for r in summary["top"]}
    assert names["aten::mm"]["kind"] == "gemm" and names["aten::mm"]["calls"] == 1
    assert summary["total_ms"] == pytest.approx(sum(r["ms"] for r in summary["top"]))  # all rows shown


def test_markdown_is_a_caption_and_a_table() -> None:
    summary = kernel_profile.summarise([event("a|b" + "x" * 200, "CUDA", 0, 10)], on_cuda=True, top=5)
    lines = kernel_profile.markdown(summary, "Profile, test").splitlines()
    assert lines[0].startswith("Profile, test: 0.01 ms of GPU kernels") and lines[0].endswith("other 100%")
    assert lines[2] == "| kernel | kind | calls | ms | share |"
    assert lines[4].startswith("| `a\\|bxxx") and "...`" in lines[4]  # the pipe escaped, the name cut
    empty = kernel_profile.summarise([], on_cuda=True, top=5)
    assert kernel_profile.markdown(empty, "Profile, test") == "Profile, test: the profiler saw no GPU kernels."
