"""Where a step's device time goes: one call under torch.profiler, its kernels summed by name and by kind.

The bench scripts' `--profile-kernels N` uses it to say what to tune next: the N kernels that take the most
time, and the share of GEMMs, attention, normalisation / modulation, elementwise and the rest. On CUDA the
rows are the GPU kernels (self device time); on a CPU they are the aten ops' self CPU time, which checks the
plumbing and shows the same split for the eager path. Kernels launched from a CUDA graph may not be seen
by every profiler build: profile the variant without the graph (the same kernels).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

# First match wins; checked against the lower-cased kernel (or op) name.
KINDS: tuple[tuple[str, re.Pattern], ...] = (
    ("attention", re.compile(r"flash|fmha|attention|sdpa|cudnn.*(mha|sdp)|_attn")),
    ("gemm", re.compile(r"gemm|matmul|cutlass|nvjet|xmma|cublas|aten::(mm|addmm|bmm|linear|baddbmm)\b")),
    ("norm / modulation", re.compile(r"layer_?norm|rms_?norm|group_?norm|_norm\b|norm_|modulat|energy_pres|rope")),
    ("elementwise", re.compile(r"elementwise|vectorized|pointwise|triton_poi|aten::(add|mul|sub|div|silu|gelu)")),
    ("reduction", re.compile(r"reduce|triton_red|triton_per|aten::(sum|mean)")),
    ("copy / cast", re.compile(r"copy|memcpy|memset|aten::(to|_to_copy|contiguous|clone|fill_|zero_)")),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, pattern in KINDS if pattern.search(lowered)), "other")


def profile_call(fn: Callable[[], Any], device: torch.device, top: int) -> dict:
    """Run fn once under the profiler and summarise it (see `summarise`); fn should already be warm."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return summarise(prof.key_averages(), device.type == "cuda", top)


def summarise(events, on_cuda: bool, top: int) -> dict:
    """{"timer", "total_ms", "kinds": [{kind, ms, share}], "top": [{name, kind, calls, ms, share}]}.

    `events` are torch.profiler's averages by name; on CUDA only kernels count (self device time),
    elsewhere only ops (self CPU time), each event's own time, so nothing is counted twice.
    """
    rows = []
    for evt in events:
        if getattr(evt, "is_user_annotation", False):
            continue
        if on_cuda:
            if str(evt.device_type).split(".")[-1] != "CUDA":
                continue
            us = evt.self_device_time_total
        else:
            us = evt.self_cpu_time_total
        if us > 0:
            rows.append({"name": evt.key, "kind": kind_of(evt.key), "calls": evt.count, "ms": us / 1e3})
    total = sum(r["ms"] for r in rows)
    kinds: dict[str, float] = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0.0) + r["ms"]
        r["share"] = r["ms"] / total
    rows.sort(key=lambda r: r["ms"], reverse=True)
    return {
        "timer": "GPU kernels (self device time)" if on_cuda else "CPU ops (self CPU time)",
        "total_ms": total,
        "kinds": [{"kind": k, "ms": ms, "share": ms / total} for k, ms in sorted(kinds.items(), key=lambda kv: -kv[1])],
        "top": rows[:top],
    }


def markdown(summary: dict, title: str, name_width: int = 90) -> str:
    """The kinds on one line, then the top kernels as a table (long C++ names cut to `name_width`)."""
    if not summary["top"]:
        return f"{title}: the profiler saw no {summary['timer'].split(' (')[0]}."
    kinds = ", ".join(f"{k['kind']} {100 * k['share']:.0f}%" for k in summary["kinds"])
    lines = [
        f"{title}: {summary['total_ms']:.2f} ms of {summary['timer']}; {kinds}",
        "",
        "| kernel | kind | calls | ms | share |",
        "|---|---|---|---|---|",
    ]
    for r in summary["top"]:
        name = r["name"] if len(r["name"]) <= name_width else r["name"][: name_width - 3] + "..."
        name = name.replace("|", "\\|")
        lines.append(f"| `{name}` | {r['kind']} | {r['calls']} | {r['ms']:.3f} | {100 * r['share']:.1f}% |")
    return "\n".join(lines)
