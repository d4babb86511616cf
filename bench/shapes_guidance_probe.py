"""How much classifier-free guidance a model's own few-step jump already carries (ShapesEval, issue 33).

    python bench/shapes_guidance_probe.py --model runs/shapes-selfe-ae/export runs/shapes-fm-ae/export

Self-E trains its jump V(x, t, s, c) toward a target that moves each prediction along the model's own
conditional-minus-unconditional direction (docs/method.md §3.5-3.7), so the jump may already be a guided
velocity; EP-CFG on top would then guide twice. This measures it at the first step of an N-step sample
(x = noise at t = 1, s = the grid's next time), on the held-out evaluation captions:

    V_j = V(x, 1, s, c),  V_c = V(x, 1, 1, c),  V_u = V(x, 1, 1, phi),  u = V_c - V_u
    alpha = <V_j - V_c, u> / <u, u>  per sample: V_j ~ V_c + alpha u is CFG at omega = 1 + alpha

and prints, per step count, the mean implicit omega, how much of V_j - V_c that direction explains
(R^2), and |u| / |V_c| (how far apart conditional and unconditional are). A flow-matching model is
probed at s = t only (its s input is untrained), where the jump is V_c and alpha is 0 by definition.
Writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from selfe.sampling.sampler import sampling_grid
from selfe.shapes.scene import evaluation_prompts


def _flat_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.flatten(1).double() * b.flatten(1).double()).sum(1)


def probe(pipe, captions: list[str], step_counts: list[int], seed: int) -> dict:
    cond, null = pipe.encode_prompts(captions, guided=True)
    shape = (len(captions), *pipe._latent_shape(*pipe.default_size))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(pipe.device, pipe.dtype)
    num_tokens = (shape[2] // pipe.model.config.patch_size) * (shape[3] // pipe.model.config.patch_size)
    ones = torch.ones(len(captions), device=pipe.device, dtype=pipe.dtype)
    with torch.no_grad():
        v_c = pipe.model(noise, ones, ones, cond)
        v_u = pipe.model(noise, ones, ones, null)
        u = v_c - v_u
        out = {"cfg_gap": (u.flatten(1).norm(dim=1) / v_c.flatten(1).norm(dim=1)).mean().item(), "steps": {}}
        mu = pipe.sampler_defaults.time_shift.mu_for(num_tokens)
        for n in step_counts:
            s = sampling_grid(n, mu, device=pipe.device)[1].to(pipe.dtype).expand(len(captions))
            v_j = pipe.model(noise, ones, s, cond)
            d = v_j - v_c
            alpha = _flat_dot(d, u) / _flat_dot(u, u)
            residual = d - alpha.view(-1, *[1] * (d.dim() - 1)).to(d.dtype) * u
            explained = 1 - _flat_dot(residual, residual).sum() / _flat_dot(d, d).sum().clamp_min(1e-30)
            out["steps"][str(n)] = {
                "s": round(float(s[0]), 4),
                "implicit_omega": round(1 + alpha.mean().item(), 3),
                "r2": round(explained.item(), 3),
                "jump_change": round((d.flatten(1).norm(dim=1) / v_c.flatten(1).norm(dim=1)).mean().item(), 4),
            }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", required=True, help="exported ShapesEval model folders")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 50])
    parser.add_argument("--images-per-category", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    from selfe.sampling.pipeline import SelfEPipeline

    captions = [p.caption for p in evaluation_prompts(args.images_per_category)]
    results = {}
    print("| model | steps | s | implicit omega | R^2 of the CFG direction | abs(V_j - V_c) / abs(V_c) |")
    print("|---|---|---|---|---|---|")
    for path in args.model:
        pipe = SelfEPipeline.from_pretrained(path, device="cpu")
        self_eval = _trained_with_self_eval(Path(path))
        result = probe(pipe, captions, args.steps if self_eval else [], args.seed)
        result["self_eval"] = self_eval
        results[str(path)] = result
        for n, row in result["steps"].items():
            print(f"| {path} | {n} | {row['s']} | {row['implicit_omega']} | {row['r2']} | {row['jump_change']} |")
        print(f"| {path} | abs(V_c - V_u) / abs(V_c) at t = 1 | | {result['cfg_gap']:.3f} | | |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _trained_with_self_eval(path: Path) -> bool:
    """From the export's train_config.json (absent: assume Self-E, whose s input is then probed)."""
    config = path / "train_config.json"
    if not config.is_file():
        return True
    return bool(json.loads(config.read_text()).get("objective", {}).get("self_eval", True))


if __name__ == "__main__":
    sys.exit(main())
