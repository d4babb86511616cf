"""Every Triton kernel compiles for sm_90, and every autotune list keeps a config that fits its shared memory.

Checked on CPU through Triton's own compiler (tests/kernels/triton_sm90_compile.py runs each op's forward
and backward through its real launcher and compiles every launch for an H100 target), so that a lent GPU
is not spent finding a kernel that does not build, or an autotune list with nothing that can run. Shapes:
the 2b model's (head dim 128), ragged ones (head dim 64, sizes off the block), and the widest head the
attention accepts (256), in bf16 (fp16 compiles as bf16 does), and the 2b shapes in fp32 (IEEE dots: the
largest tiles); attention with a key mask (the unmasked kernel is the same code less the mask branch).
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HARNESS = Path(__file__).with_name("triton_sm90_compile.py")
# fp32 at head dim 256 is left to the full sweep (`python tests/kernels/triton_sm90_compile.py`, ~20 CPU
# minutes, passed on 2026-12-01): its scalar-FMA tiles take 15 of them to compile.
ARGS = ["--cases", "2b:bf16,ragged:bf16,wide:bf16,2b:fp32", "--masks", "masked"]
TILE_CONSTEXPRS = ("BLOCK_M", "BLOCK_N")  # what an autotune config sets

pytestmark = pytest.mark.slow  # every kernel compiled to sm_90a cubins by ptxas: minutes on 2 cores


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))  # compile for real, not from a cache
    result = subprocess.run(
        [sys.executable, str(HARNESS), *ARGS], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200
    )
    if result.returncode == 3:
        pytest.skip(result.stderr.strip())
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert rows, f"the harness compiled nothing (exit {result.returncode}):\n{result.stderr[-4000:]}"
    launchers = [r for r in rows if r["kernel"] == "<launcher>"]
    assert not launchers, "a launcher failed before its kernel:\n" + "\n".join(r["error"] for r in launchers)
    return rows


def test_every_kernel_is_launched_and_compiles_for_sm90(reports: list[dict]) -> None:
    defined = set()
    for path in (REPO / "kernels").glob("*.py"):
        defined |= set(re.findall(r"^def (_\w+_kernel)\(", path.read_text(), re.MULTILINE))
    launched = {r["kernel"] for r in reports}
    assert defined and defined <= launched, f"never launched: {sorted(defined - launched)}"
    broken = [f"{r['kernel']} {r['signature']} {r['constexprs']}: {r['error']}" for r in reports if not r["ok"]]
    assert not broken, "Triton could not compile for sm_90:\n" + "\n".join(broken)


def test_every_kernel_variant_has_a_config_within_sm90_shared_memory(reports: list[dict]) -> None:
    variants = collections.defaultdict(list)
    for r in reports:
        fixed = {k: v for k, v in r["constexprs"].items() if k not in TILE_CONSTEXPRS}
        variants[(r["kernel"], json.dumps(r["signature"]), json.dumps(fixed))].append(r["fits"])
    nothing_fits = [f"{kernel} {signature} {fixed}" for (kernel, signature, fixed), fits in variants.items()
                    if not any(fits)]  # fmt: skip
    assert not nothing_fits, "no config fits sm_90's shared memory (the autotuner would have none to run):\n" + (
        "\n".join(nothing_fits)
    )
    # The attention kernels were swept: head dims 64, 128 and 256 in bf16, 128 in fp32, several tiles each.
    attention = [key for key in variants if key[0] == "_rope_attn_fwd_kernel"]
    assert len(attention) == 4 and all(len(variants[key]) > 1 for key in attention)
