"""Sampling latency end to end, per step count: eager, compiled, and compiled + CUDA graph, in one run.

For a preset with random weights, a resolution, a prompt and some batch sizes, every point times the
pipeline's whole call (`SelfEPipeline.__call__`, output_type "pt"), from the prompts to the decoded
images, and its stages from the call's own timings (`selfe.sampling.stage_timings`: CUDA events, no
sync on the way): the text encoder split into tokenize (and copies), T5 and CLIP (hooks on the two
models), the denoiser alone, and the decode. The median call of `--iters` is reported whole, so its
stages add up to at most its end to end. MFU per denoiser step is taken on useful FLOPs (each row's real
text tokens: the prompt's and, with CFG, the null prompt's; selfe.network.flops.forward_flops), and the
executed FLOPs (every row at the text length the step runs, the text bucket) are shown apart. The warm-up
(compile / capture) is reported apart from the steady state. Prints each row as it is measured, then a
markdown table, to stdout; --json PATH writes every number (per row `end_to_end_ms` and the stage times;
per batch `useful_flops_per_step` and `executed_flops_per_step`) and --markdown PATH the table (each
written whole or not at all). Arguments are checked before any model is built. The defaults are the 2b
model's on a GPU (compiled+graph needs CUDA and is skipped without it); on CPU use the smoke run.
--profile-kernels N adds, per batch and variant, where one whole call's device time goes
(bench/kernel_profile.py).

Text encoders: real local snapshots with --t5 / --clip, else random ones built in memory: T5-XXL- and
CLIP-L-shaped for the 0.5b / 2b presets (the width the model expects), tiny ones for the tiny preset
(tokenizers from tests/helpers_text, so nothing is downloaded).

    python bench/sample_throughput.py --preset tiny --resolution 64 --batch 1 2 --steps 1 2        # CPU smoke
    python bench/sample_throughput.py --preset 2b --resolution 512 --batch 1 16 --json bench/sample_2b.json
    python bench/sample_throughput.py --preset tiny --resolution 64 --batch 1 --steps 1 2 --fp8 torchao

--fp8 torchao|te also samples with an FP8 copy of the same model (its large linears converted for
inference, selfe.components.fp8), every variant and step count, and reports it against the high-precision model
of the same run: the denoiser's images/s ratio per point, and the relative error of one denoiser forward on
the same inputs (bench/fp8.py `relative_error`; bench/fp8_sampling.py measures the images' quality).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/helpers_text for the offline tokenizers

from bench import kernel_profile  # noqa: E402
from bench.fp8 import RECIPE_LIBRARIES, relative_error  # noqa: E402
from selfe.components.autoencoder import AUTOENCODER_PRESETS, AutoEncoder  # noqa: E402
from selfe.components.fp8 import FP8Config, converted_modules, fp8_autocast_context  # noqa: E402
from selfe.components.text_encoders import CLIPTextEncoder, T5TextEncoder, TextEncoders  # noqa: E402
from selfe.network.config import PRESETS, mmdit_preset  # noqa: E402
from selfe.network.flops import ForwardFlops, device_peak_flops, forward_flops  # noqa: E402
from selfe.network.model import MMDiT  # noqa: E402
from selfe.sampling.fast_path import FastPathConfig, FastSampler  # noqa: E402
from selfe.sampling.pipeline import SelfEPipeline  # noqa: E402
from selfe.sampling.sampler import SamplerConfig  # noqa: E402
from selfe.sampling.stage_timings import StageTimings  # noqa: E402
from selfe.utils.atomic import atomic_write_bytes, folder_problem  # noqa: E402
from selfe.utils.devices import device_problem  # noqa: E402
from selfe.utils.optional import probe, unavailable_reason  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VARIANTS = ("eager", "compiled", "compiled+graph")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="2b", help="MMDiT preset (default %(default)s)")
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (default %(default)s)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes (default 1 16)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 50], help="(default 1 2 4 8 50)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="(default: all)")
    parser.add_argument(
        "--guidance", type=float, default=5.0, help="CFG omega (default %(default)s); --no-cfg for one forward per step"
    )
    parser.add_argument("--no-cfg", action="store_true", help="no CFG: one forward per step")
    parser.add_argument("--sampler", choices=("ddim", "euler"), default="ddim", help="(default %(default)s)")
    parser.add_argument(
        "--prompt", default="a photo of a cat on the table", help="the prompt of every image (default %(default)r)"
    )
    parser.add_argument("--txt-tokens", type=int, default=None, help="T5 padded length (default 512; tiny: 64)")
    parser.add_argument(
        "--text-bucket",
        type=_bucket,
        default=FastPathConfig().text_bucket,
        help="cut the denoiser's text tokens to the smallest of N, 2N, 4N, ... that holds the prompt, as the "
        "pipeline does (FastPathConfig.text_bucket, default %(default)s); 'none': the padded length",
    )
    parser.add_argument(
        "--autoencoder",
        choices=sorted(AUTOENCODER_PRESETS),
        default=None,
        help="default: tiny for the tiny preset, else flux1",
    )
    parser.add_argument("--t5", type=Path, default=None, help="local T5 snapshot, with --clip (default: random)")
    parser.add_argument("--clip", type=Path, default=None, help="local CLIP text snapshot, with --t5 (default: random)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--attention-backend", default="auto", help="(default %(default)s)")
    parser.add_argument("--kernel-backend", default="auto", help="(default %(default)s)")
    parser.add_argument(
        "--compile-backend", default="inductor", help="(default inductor); aot_eager skips inductor's C++ build on CPU"
    )
    parser.add_argument("--compile-mode", default=None, help="e.g. max-autotune-no-cudagraphs")
    parser.add_argument(
        "--compile-regions",
        choices=("on", "off"),
        default="on",
        help="each block a nested compile region, compiled once per kind (FastPathConfig.compile_regions; "
        "default %(default)s): the warm-up column shows the compile time it saves",
    )
    parser.add_argument("--iters", type=int, default=5, help="timed repeats per point, median (default %(default)s)")
    parser.add_argument(
        "--peak-flops", type=float, default=None,
        help="device peak FLOP/s (default: the GPU's dense bf16, selfe.network.flops)",
    )
    parser.add_argument("--fp8", choices=("none", "torchao", "te"), default="none", help="also sample in FP8, compared")
    parser.add_argument("--fp8-scaling", choices=("tensorwise", "rowwise"), default="tensorwise", help="torchao only")
    parser.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    parser.add_argument(
        "--profile-kernels",
        type=int,
        default=0,
        metavar="N",
        help="also profile one call per batch and variant (fewest steps): the N longest kernels and the "
        "share of each kind (bench/kernel_profile.py; default 0: off)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    # Checked before any model is built: a bad value should cost a second, not a traceback mid-run.
    for name in ("batch", "steps"):
        if min(getattr(args, name)) < 1:
            parser.error(f"--{name} values must be >= 1, got {' '.join(map(str, getattr(args, name)))}")
    if args.profile_kernels < 0:
        parser.error(f"--profile-kernels must be >= 0, got {args.profile_kernels}")
    for name in ("resolution", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.txt_tokens is not None and args.txt_tokens < 1:  # 0 would silently mean the default
        parser.error(f"--txt-tokens must be >= 1, got {args.txt_tokens}")
    if not args.no_cfg and not (math.isfinite(args.guidance) and args.guidance >= 0):
        parser.error(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if args.peak_flops is not None and not (math.isfinite(args.peak_flops) and args.peak_flops > 0):
        parser.error(f"--peak-flops must be a finite number > 0, got {args.peak_flops}")
    try:
        config = mmdit_preset(args.preset, attention_backend=args.attention_backend, kernel_backend=args.kernel_backend)
    except ValueError as err:
        parser.error(str(err))
    f = AUTOENCODER_PRESETS[args.autoencoder or ("tiny" if args.preset == "tiny" else "flux1")]().downsample_factor
    if args.resolution % (f * config.patch_size):
        parser.error(f"--resolution must be a multiple of {f * config.patch_size}, got {args.resolution}")
    if (args.t5 is None) != (args.clip is None):  # one alone used to be ignored, random encoders labelled snapshots
        parser.error("--t5 and --clip go together: pass both snapshots or neither")
    for name in ("t5", "clip"):
        if getattr(args, name) is not None and not getattr(args, name).is_dir():
            parser.error(f"--{name} {getattr(args, name)}: not a directory (a local snapshot folder)")
    if args.device is not None and (problem := device_problem(args.device)):
        parser.error(problem)
    if args.fp8 != "none" and not probe(RECIPE_LIBRARIES[args.fp8]).available:
        parser.error(f"--fp8 {args.fp8}: {unavailable_reason(RECIPE_LIBRARIES[args.fp8])}")
    for name in ("json", "markdown"):
        path = getattr(args, name)
        if path is not None:
            problem = "is a directory" if path.is_dir() else folder_problem(path.parent)
            if problem:
                parser.error(f"--{name} {path}: {problem}")
    return args


def _bucket(value: str) -> int | None:
    if value == "none":
        return None
    try:
        bucket = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or 'none', got {value!r}") from None
    if bucket < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or 'none', got {value!r}")
    return bucket


def random_text_encoders(txt_dim: int, vec_dim: int, txt_tokens: int, device, dtype, real_shape: bool):
    """T5 and CLIP with random weights at the widths the model expects; real depths when real_shape."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from selfe.components.text_snapshots import DEFAULT_WORDS, clip_tokenizer, t5_tokenizer

    t5_tok, clip_tok = t5_tokenizer(DEFAULT_WORDS), clip_tokenizer()
    layers, heads = (24, 64) if real_shape else (2, 4)  # T5-XXL: 24 layers, 64 heads of 64, d_ff 10240
    t5_config = T5Config(
        vocab_size=len(t5_tok),
        d_model=txt_dim,
        d_kv=txt_dim // heads,
        d_ff=(10240 if real_shape else 2 * txt_dim),
        num_layers=layers,
        num_heads=heads,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    clip_layers, clip_heads = (12, 12) if real_shape else (2, 4)  # CLIP ViT-L/14 text: 12 layers, 12 heads
    clip_config = CLIPTextConfig(
        vocab_size=len(clip_tok),
        hidden_size=vec_dim,
        intermediate_size=4 * vec_dim,
        num_hidden_layers=clip_layers,
        num_attention_heads=clip_heads,
        max_position_embeddings=77,
        bos_token_id=clip_tok.bos_token_id,
        eos_token_id=clip_tok.eos_token_id,
        pad_token_id=clip_tok.pad_token_id,
    )
    with torch.device(device):
        t5 = T5EncoderModel(t5_config).to(dtype).eval().requires_grad_(False)
        clip = CLIPTextModel(clip_config).to(dtype).eval().requires_grad_(False)
    return TextEncoders(T5TextEncoder(t5, t5_tok, max_length=txt_tokens), CLIPTextEncoder(clip, clip_tok))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    peak = args.peak_flops or device_peak_flops(device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    config = mmdit_preset(args.preset, attention_backend=args.attention_backend, kernel_backend=args.kernel_backend)
    tiny = args.preset == "tiny"
    ae_config = AUTOENCODER_PRESETS[args.autoencoder or ("tiny" if tiny else "flux1")]()
    txt_tokens = args.txt_tokens or (64 if tiny else 512)
    latent = args.resolution // ae_config.downsample_factor
    img_tokens = (latent // config.patch_size) ** 2
    variants = [v for v in args.variants if v != "compiled+graph" or device.type == "cuda"]
    skipped = sorted(set(args.variants) - set(variants))
    guidance = None if args.no_cfg else args.guidance

    torch.manual_seed(args.seed)
    with torch.device(device):
        model = MMDiT(config).to(dtype)
        autoencoder = AutoEncoder(ae_config).to(dtype).eval()
    with torch.no_grad():  # adaLN-Zero zeros the gates at init; random everywhere makes the timing honest
        for param in model.parameters():
            param.normal_(0, 0.02)
    if args.t5 is not None and args.clip is not None:
        text = TextEncoders.from_snapshots(args.t5, args.clip, t5_max_length=txt_tokens, device=device, dtype=dtype)
    else:
        text = random_text_encoders(config.txt_dim, config.vec_dim, txt_tokens, device, dtype, real_shape=not tiny)
    split = TextSplit(text, device)
    fp8_config = FP8Config(recipe=args.fp8, scaling=args.fp8_scaling, fsdp_float8_all_gather=False)
    defaults = SamplerConfig(method=args.sampler, guidance=guidance, kernel_backend=args.kernel_backend)
    # each variant below gives them a fresh step of its own; this one's text bucket is what the FLOPs see
    kwargs = {"sampler_defaults": defaults, "fast_path": FastPathConfig(text_bucket=args.text_bucket)}
    pipes = {"none": SelfEPipeline.from_components(model, autoencoder, text, **kwargs)}
    if fp8_config.enabled:  # the same weights, its large linears converted for FP8 sampling
        fp8_model = copy.deepcopy(model)
        pipes[args.fp8] = SelfEPipeline.from_components(fp8_model, autoencoder, text, fp8=fp8_config, **kwargs)

    rows, profiles, fp8_errors, flop_counts = [], [], [], []
    for batch in args.batch:
        prompts = [args.prompt] * batch
        lengths, run_length = text_lengths(pipes["none"], prompts, guidance is not None)
        flops = forward_flops(config, img_tokens=img_tokens, txt_lengths=lengths, executed_txt_tokens=run_length)
        flop_counts.append(
            {
                "batch": batch,
                "txt_lengths": lengths,  # each row's real T5 tokens: the prompts', then the null prompt's
                "denoiser_txt_tokens": run_length,  # what the step runs: the text bucket, or T5's padding
                "useful_flops_per_step": flops.useful,
                "executed_flops_per_step": flops.executed,
            }
        )
        if fp8_config.enabled:
            fp8_errors.append({"batch": batch, "relative_error": denoiser_error(pipes, fp8_config, prompts, latent)})
        for variant in variants:
            fast_path = FastPathConfig(
                compile=variant != "eager",
                cuda_graph="on" if variant == "compiled+graph" else "off",
                compile_backend=args.compile_backend,
                compile_mode=args.compile_mode,
                compile_regions=args.compile_regions == "on",
                text_bucket=args.text_bucket,
            )
            if variant != "eager":
                torch._dynamo.reset()  # each variant's warm-up pays its own compile
            for fp8, pipe in pipes.items():
                pipe.fast = FastSampler(pipe.model, fast_path)  # a fresh step: its warm-up is this variant's

                def call(steps: int, p=pipe, prompts=prompts) -> dict[str, float]:
                    size = {"height": args.resolution, "width": args.resolution}
                    with split.timing() as stages:
                        out = p(prompts, steps=steps, seed=args.seed, output_type="pt", **size)
                        return {**out.timings, **stages(out.timings)}

                warm_s = call(min(args.steps)).get("warmup", 0.0)  # the first call of a shape compiles (+ captures)
                for steps in args.steps:
                    call(steps)  # the first call of a step count builds its grid tables; not a compile
                    timings = median_call([call(steps) for _ in range(args.iters)])
                    rows.append(result_row(batch, variant, fp8, steps, timings, flops, peak, warm_s))
                    if fp8 != "none":  # against the high-precision row of the same point
                        point = (batch, variant, steps, "none")
                        base = next(r for r in rows if (r["batch"], r["variant"], r["steps"], r["fp8"]) == point)
                        rows[-1]["speedup_vs_high_precision"] = rows[-1]["images_per_s"] / base["images_per_s"]
                    print(_row_md(rows[-1]), flush=True)
                    if args.profile_kernels and fp8 == "none" and steps == min(args.steps):
                        summary = kernel_profile.profile_call(lambda s=steps: call(s), device, args.profile_kernels)
                        profiles.append({"batch": batch, "variant": variant, "steps": steps, **summary})
            for pipe in pipes.values():  # the captured graphs and compiled step of this variant go
                pipe.fast = FastSampler(pipe.model, fast_path)

    result = {
        "preset": args.preset,
        "params": config.num_parameters(),
        "resolution": args.resolution,
        "img_tokens": img_tokens,
        "txt_tokens": txt_tokens,
        "text_bucket": args.text_bucket,
        "prompt": args.prompt,
        "guidance": guidance,
        "sampler": args.sampler,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "attention_backend": args.attention_backend,
        "kernel_backend": args.kernel_backend,
        "compile_backend": args.compile_backend,
        "compile_mode": args.compile_mode,
        "compile_regions": args.compile_regions == "on",
        "iters": args.iters,
        "peak_flops": peak,
        "skipped_variants": skipped,
        "text_encoders": "snapshots" if args.t5 else ("random, real shapes" if not tiny else "random, tiny"),
        "flops": flop_counts,
        "rows": rows,
    }
    if args.profile_kernels:
        result["kernel_profiles"] = profiles
    if fp8_config.enabled:
        result["fp8"] = {
            **fp8_config.to_dict(),
            "converted_linears": len(converted_modules(pipes[args.fp8].model)),
            "denoiser_relative_error": fp8_errors,
        }
    table = markdown(result)
    print(table)
    # temp file then rename: an interrupted run leaves no half-written file
    if args.markdown:
        atomic_write_bytes(args.markdown, (table + "\n").encode())
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(result, indent=2) + "\n").encode())
    return result


class TextSplit:
    """The text stage of a call split into the T5 and CLIP forwards and the rest (tokenising, copies,
    masking), timed by hooks on the two models (StageTimings: CUDA events, no sync)."""

    def __init__(self, text: TextEncoders, device: torch.device):
        self.device = device
        self.current: StageTimings | None = None
        for name, module in (("t5", text.t5.model), ("clip", text.clip.model)):
            module.register_forward_pre_hook(lambda *_, n=name: self._edge(n, "start"))
            module.register_forward_hook(lambda *_, n=name: self._edge(n, "stop"))

    def _edge(self, name: str, which: str) -> None:
        if self.current is not None:  # outside a timed call (the FLOP count's encoding) nothing is timed
            getattr(self.current, which)(name)

    @contextmanager
    def timing(self):
        """`with split.timing() as stages:` a call; then stages(call_timings) -> {"tokenize", "t5", "clip"}."""
        self.current = StageTimings(self.device)
        timings = self.current
        try:
            yield lambda call: split_text_stage(call, timings)
        finally:
            self.current = None


def split_text_stage(call: Mapping[str, float], models: Mapping[str, float]) -> dict[str, float]:
    """T5's and CLIP's forwards, and the rest of the text stage (tokenising, copies, masking)."""
    t5, clip = models.get("t5", 0.0), models.get("clip", 0.0)
    return {"t5": t5, "clip": clip, "tokenize": max(0.0, call["text_encoder"] - t5 - clip)}


def text_lengths(pipe: SelfEPipeline, prompts: list[str], guided: bool) -> tuple[list[int], int]:
    """The denoiser's rows' real text tokens in a call (each prompt's, then with CFG the null prompt's)
    and the text length its step runs at (the text bucket), from the pipeline's own encoding."""
    cond, null = pipe.encode_prompts(prompts, guided)
    masks = [cond["txt_mask"]] + ([null["txt_mask"]] if null is not None else [])
    return [int(n) for mask in masks for n in mask.sum(dim=1)], cond["txt"].shape[1]


def median_call(calls: list[dict[str, float]]) -> dict[str, float]:
    """The call of median end-to-end time, whole: its stages then add up to at most its end to end."""
    return sorted(calls, key=lambda c: c["end_to_end"])[len(calls) // 2]


STAGES = ("tokenize", "t5", "clip", "denoise", "decode")


def result_row(
    batch: int, variant: str, fp8: str, steps: int, timings: dict, flops: ForwardFlops, peak: float, warm_s: float
) -> dict:
    denoise = timings["denoise"]
    per_step = denoise / steps
    return {
        "batch": batch,
        "variant": variant,
        "fp8": fp8,
        "steps": steps,
        "end_to_end_ms": timings["end_to_end"] * 1e3,
        "text_encoder_ms": timings["text_encoder"] * 1e3,
        **{f"{stage}_ms": timings[stage] * 1e3 for stage in STAGES},
        "latency_ms": denoise * 1e3,  # the denoiser alone
        "step_ms": per_step * 1e3,
        "images_per_s": batch / denoise,
        "e2e_images_per_s": batch / timings["end_to_end"],
        "useful_flops_per_step": flops.useful,
        "executed_flops_per_step": flops.executed,
        "tflops_per_s": flops.useful / per_step / 1e12,
        "mfu": flops.useful / per_step / peak,
        "executed_mfu": flops.executed / per_step / peak,
        "warmup_s": warm_s,
    }


HEADER = (
    "| batch | variant | steps | end to end ms | tokenize | T5 | CLIP | denoise | decode | ms/step | MFU "
    "| images/s | warm-up s |"
)


@torch.no_grad()
def denoiser_error(pipes: dict[str, SelfEPipeline], config: FP8Config, prompts: list[str], latent: int) -> float:
    """Relative error of the FP8 model's denoiser output against the high-precision one: same weights,
    same inputs (noise, one t and s per sample, the prompts' condition)."""
    base = pipes["none"]
    cond, _ = base.encode_prompts(prompts, guided=False)
    g = torch.Generator().manual_seed(0)
    b = len(prompts)
    x = torch.randn(b, base.model.config.in_channels, latent, latent, generator=g).to(base.device, base.dtype)
    t = (torch.rand(b, generator=g) * 0.8 + 0.1).to(base.device)
    s = t * torch.rand(b, generator=g).to(base.device)
    reference = base.model(x, t, s, cond)
    with fp8_autocast_context(config):
        out = pipes[config.recipe].model(x, t, s, cond)
    return relative_error(out, reference)


def _row_md(r: dict) -> str:
    stages = " | ".join(f"{r[f'{stage}_ms']:.2f}" for stage in STAGES)
    return (
        f"| {r['batch']} | {_label(r)} | {r['steps']} | **{r['end_to_end_ms']:.2f}** | {stages} | {r['step_ms']:.2f} | "
        f"{100 * r['mfu']:.1f}% | {r['e2e_images_per_s']:.2f} | {r['warmup_s']:.1f} |"
    )


def _label(r: dict) -> str:
    if r.get("fp8", "none") == "none":
        return r["variant"]
    return f"{r['variant']} fp8={r['fp8']} (x{r['speedup_vs_high_precision']:.2f})"


def _flops_line(result: dict) -> str:
    """Useful against executed FLOPs per step, per batch."""
    parts = [
        f"batch {f['batch']}: {f['useful_flops_per_step'] / 1e12:.4g} useful / "
        f"{f['executed_flops_per_step'] / 1e12:.4g} executed TFLOP "
        f"({100 * f['useful_flops_per_step'] / f['executed_flops_per_step']:.0f}%; real text tokens per row "
        f"{'/'.join(map(str, sorted(set(f['txt_lengths']), reverse=True)))} of {f['denoiser_txt_tokens']} run)"
        for f in result["flops"]
    ]
    return "FLOPs per denoiser step, " + "; ".join(parts) + "."


def markdown(result: dict) -> str:
    lines = [
        f"{result['preset']} ({result['params'] / 1e6:.1f}M params), {result['resolution']}², "
        f"{result['img_tokens']} image tokens, T5 padding to {result['txt_tokens']} (text bucket "
        f"{result['text_bucket']}), prompt {result['prompt']!r}, {result['dtype']}, CFG {result['guidance']}, "
        f"{result['sampler']}, {result['device']}, torch {result['torch']}. End to end: the pipeline's call "
        "from the prompts to the decoded images (median of the timed calls); stages in ms, the text encoder "
        "split into tokenize (and copies), T5 and CLIP; denoise is the denoiser alone. MFU of useful FLOPs "
        f"(real text tokens only) over peak {result['peak_flops'] / 1e12:.0f} TFLOP/s; images/s end to end; "
        "warm-up = compile (+ capture), paid once per shape"
        f"{' (blocks compiled as nested regions)' if result['compile_regions'] else ''}.",
        "",
        HEADER,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_row_md(r) for r in result["rows"]),
    ]
    if result["flops"]:
        lines += ["", _flops_line(result)]
    if "fp8" in result:
        fp8 = result["fp8"]
        errors = ", ".join(f"batch {e['batch']}: {e['relative_error']:.3e}" for e in fp8["denoiser_relative_error"])
        lines += [
            "",
            f"FP8 {fp8['recipe']}/{fp8['scaling']}: {fp8['converted_linears']} linears converted; (xN) = denoiser "
            f"images/s against the high-precision row of the same point; denoiser output relative error {errors}.",
        ]
    if result["skipped_variants"]:
        lines += ["", f"Skipped (needs CUDA): {', '.join(result['skipped_variants'])}."]
    for p in result.get("kernel_profiles", []):
        title = f"Profile, batch {p['batch']}, {p['variant']}, {p['steps']} step{'s' * (p['steps'] > 1)}, end to end"
        lines += ["", kernel_profile.markdown(p, title)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
