"""How often a ShapesEval model draws each prompt right, over noise seeds: the table the README's main-job
prompts are chosen from (issue 33: a prompt the shipped model gets right in most draws).

    python bench/shapes_prompt_table.py --per-category 3 --seeds 8 --steps 1 2 4 8

Samples the first `--per-category` held-out evaluation prompts of every category as one batch, as
`selfe generate` samples its prompts, at seeds 0 .. seeds-1 and each step count, scores every image with
the ShapesEval scorer and prints, per prompt, the share of seeds it got right (a markdown table).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from selfe.shapes.scene import CATEGORIES, evaluation_prompts
from selfe.shapes.scorer import score_image


def prompt_table(pipe, prompts, steps: list[int], seeds: int) -> dict[str, dict[int, float]]:
    """{caption: {steps: share of seeds right}} with the model's default sampler; captions must be distinct."""
    if len({p.caption for p in prompts}) < len(prompts):
        raise ValueError("prompt_table: the prompts repeat a caption (a row per caption)")
    right = {p.caption: {n: 0 for n in steps} for p in prompts}
    captions = [p.caption for p in prompts]
    for n in steps:
        for seed in range(seeds):
            out = pipe(captions, steps=n, generator=torch.Generator().manual_seed(seed), output_type="np")
            for prompt, image in zip(prompts, out.images):
                right[prompt.caption][n] += bool(score_image(prompt, (image * 255).round().astype("uint8")))
    return {caption: {n: count / seeds for n, count in row.items()} for caption, row in right.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="exported model folder (default: the shipped one)")
    parser.add_argument("--per-category", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--out", type=Path, help="write the table as JSON here")
    args = parser.parse_args(argv)

    from selfe.sampling.pipeline import SelfEPipeline
    from selfe.shapes import shipped_model_dir

    pipe = SelfEPipeline.from_pretrained(args.model or shipped_model_dir(), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    held_out = evaluation_prompts(48)
    distinct = list(dict.fromkeys(held_out))  # a repeated caption is the same (frozen) Prompt: keep its first
    by_category = {c: [p for p in distinct if p.category == c][: args.per_category] for c in CATEGORIES}
    prompts = [p for category in CATEGORIES for p in by_category[category]]
    table = prompt_table(pipe, prompts, args.steps, args.seeds)
    print("| prompt | category | " + " | ".join(f"{n} step{'s' * (n > 1)}" for n in args.steps) + " |")
    print("|---|---|" + "---|" * len(args.steps))
    for prompt in prompts:
        shares = " | ".join(f"{table[prompt.caption][n]:.2f}" for n in args.steps)
        print(f"| {prompt.caption} | {prompt.category} | {shares} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(table, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
