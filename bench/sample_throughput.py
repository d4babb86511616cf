"""Sampling throughput per step count: eager, compiled, and compiled + CUDA graph, in one run.

For a preset with random weights, a resolution and some batch sizes: the denoiser's latency and
images/s at each step count (default 1, 2, 4, 8, 50), its MFU per step from the analytical FLOPs
(selfe.network.flops; with CFG one step is one forward of 2B samples), the text-encoder and autoencoder time
apart, and the warm-up (compile / capture) time apart from the steady state. Prints each row as it is
measured, then a markdown table, to stdout; --json PATH writes every number and --markdown PATH the table
(each written whole or not at all). Arguments are checked before any model is built. The defaults are
the 2b model's on a GPU (compiled+graph needs CUDA and is skipped without it); on CPU use the smoke run.
--profile-kernels N adds, per batch and variant, where one call's device time goes (bench/kernel_profile.py).

Text encoders: real local snapshots with --t5 / --clip, else random ones built in memory: T5-XXL- and
CLIP-L-shaped for the 0.5b / 2b presets (the width the model expects), tiny ones for the tiny preset
(tokenizers from tests/helpers_text, so nothing is downloaded).

    python bench/sample_throughput.py --preset tiny --resolution 64 --batch 1 2 --steps 1 2        # CPU smoke
    python bench/sample_throughput.py --preset 2b --resolution 512 --batch 1 16 --json bench/sample_2b.json
    python bench/sample_throughput.py --preset tiny --resolution 64 --batch 1 --steps 1 2 --fp8 torchao

--fp8 torchao|te also samples with an FP8 copy of the same model (its large linears converted for
inference, selfe.components.fp8), every variant and step count, and reports it against the high-precision model
of the same run: images/s ratio per point, and the relative error of one denoiser forward on the same
inputs (bench/fp8.py `relative_error`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/helpers_text for the offline tokenizers

from bench import kernel_profile  # noqa: E402
from bench.fp8 import RECIPE_LIBRARIES, relative_error  # noqa: E402
from selfe.components.autoencoder import AUTOENCODER_PRESETS, AutoEncoder  # noqa: E402
from selfe.components.fp8 import FP8Config, converted_modules, fp8_autocast_context, fp8_copy  # noqa: E402
from selfe.components.text_encoders import CLIPTextEncoder, T5TextEncoder, TextEncoders  # noqa: E402
from selfe.network.config import PRESETS, mmdit_preset  # noqa: E402
from selfe.network.flops import device_peak_flops, mmdit_forward_flops  # noqa: E402
from selfe.network.model import MMDiT  # noqa: E402
from selfe.sampling.fast_path import FastPathConfig, FastSampler  # noqa: E402
from selfe.sampling.sampler import SamplerConfig  # noqa: E402
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, iters: int) -> tuple[float, object]:
    """Median wall seconds of `iters` calls (device synchronised), and the last result."""
    times, out = [], None
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


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
    f = ae_config.downsample_factor
    latent = args.resolution // f
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
    model.eval().requires_grad_(False)
    if args.t5 is not None and args.clip is not None:
        text = TextEncoders.from_snapshots(args.t5, args.clip, t5_max_length=txt_tokens, device=device, dtype=dtype)
    else:
        text = random_text_encoders(config.txt_dim, config.vec_dim, txt_tokens, device, dtype, real_shape=not tiny)
    fp8_config = FP8Config(recipe=args.fp8, scaling=args.fp8_scaling, fsdp_float8_all_gather=False)
    nets: dict[str, nn.Module] = {"none": model}
    if fp8_config.enabled:
        nets[args.fp8] = fp8_copy(model, fp8_config, training=False)  # same weights, large linears in FP8
    fp8_errors = []

    rows, stages, profiles = [], [], []
    for batch in args.batch:
        prompts = ["a photo of a cat on the table"] * batch
        # Text encoder and autoencoder: once to warm, then timed.
        # With a text bucket T5 runs on the bucket's tokens only, as in the pipeline.
        text.encode(prompts, bucket=args.text_bucket)
        enc_s, cond = timed(lambda p=prompts: text.encode(p, bucket=args.text_bucket), device, args.iters)
        null = text.null_condition(batch, cond["txt"].shape[1]) if guidance is not None else None
        denoiser_txt = cond["txt"].shape[1]
        noise = torch.randn(batch, config.in_channels, latent, latent, device=device)
        with torch.no_grad():
            autoencoder.decode(noise.to(dtype))
            dec_s, _ = timed(lambda z=noise: autoencoder.decode(z.to(dtype)), device, args.iters)
        stages.append(
            {
                "batch": batch,
                "text_encoder_ms": enc_s * 1e3,
                "decode_ms": dec_s * 1e3,
                "denoiser_txt_tokens": denoiser_txt,
            }
        )

        if fp8_config.enabled:
            fp8_errors.append({"batch": batch, "relative_error": denoiser_error(nets, fp8_config, noise, cond)})

        flops_step = mmdit_forward_flops(config, batch * (2 if guidance is not None else 1), img_tokens, denoiser_txt)
        for variant in variants:
            for fp8, net in nets.items():
                fast = FastSampler(
                    net,
                    FastPathConfig(
                        compile=variant != "eager",
                        cuda_graph="on" if variant == "compiled+graph" else "off",
                        compile_backend=args.compile_backend,
                        compile_mode=args.compile_mode,
                        compile_regions=args.compile_regions == "on",
                    ),
                )
                if variant != "eager":
                    torch._dynamo.reset()  # each variant's warm-up pays its own compile
                on = fp8 != "none"
                with fp8_autocast_context(fp8_config) if on else nullcontext():
                    warm_s = fast.warmup(noise, cond, null, args.sampler, args.kernel_backend)
                for steps in args.steps:
                    sampler = SamplerConfig(
                        steps=steps, method=args.sampler, guidance=guidance, kernel_backend=args.kernel_backend
                    )
                    gen = torch.Generator(device=device).manual_seed(args.seed)

                    def run(f=fast, c=sampler, g=gen, on=on):
                        with fp8_autocast_context(fp8_config) if on else nullcontext():
                            return f.sample(noise, cond, null, c, img_tokens, g)  # noqa: B023

                    run()  # the first call of a step count builds its grid tables; not a compile
                    seconds, _ = timed(run, device, args.iters)
                    per_step = seconds / steps
                    row = {
                        "batch": batch,
                        "variant": variant,
                        "fp8": fp8,
                        "steps": steps,
                        "latency_ms": seconds * 1e3,
                        "step_ms": per_step * 1e3,
                        "images_per_s": batch / seconds,
                        "e2e_images_per_s": batch / (seconds + enc_s + dec_s),
                        "tflops_per_s": flops_step / per_step / 1e12,
                        "mfu": flops_step / per_step / peak,
                        "warmup_s": warm_s,
                    }
                    if on:  # against the high-precision row of the same point
                        point = (batch, variant, steps, "none")
                        base = next(r for r in rows if (r["batch"], r["variant"], r["steps"], r["fp8"]) == point)
                        row["speedup_vs_high_precision"] = row["images_per_s"] / base["images_per_s"]
                    rows.append(row)
                    print(_row_md(rows[-1]), flush=True)
                    if args.profile_kernels and not on and steps == min(args.steps):
                        summary = kernel_profile.profile_call(run, device, args.profile_kernels)
                        profiles.append({"batch": batch, "variant": variant, "steps": steps, **summary})

    result = {
        "preset": args.preset,
        "params": config.num_parameters(),
        "resolution": args.resolution,
        "img_tokens": img_tokens,
        "txt_tokens": txt_tokens,
        "text_bucket": args.text_bucket,
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
        "stages": stages,
        "rows": rows,
    }
    if args.profile_kernels:
        result["kernel_profiles"] = profiles
    if fp8_config.enabled:
        result["fp8"] = {
            **fp8_config.to_dict(),
            "converted_linears": len(converted_modules(nets[args.fp8])),
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


HEADER = "| batch | variant | steps | latency ms | ms/step | images/s | MFU | warm-up s |"


@torch.no_grad()
def denoiser_error(nets: dict[str, nn.Module], config: FP8Config, x: torch.Tensor, cond: dict) -> float:
    """Relative error of the FP8 model's denoiser output against the high-precision one: same weights,
    same inputs (x, one t and s per sample, the prompt's condition)."""
    b = x.shape[0]
    g = torch.Generator().manual_seed(0)
    t = (torch.rand(b, generator=g) * 0.8 + 0.1).to(x.device)
    s = t * torch.rand(b, generator=g).to(x.device)
    dtype = next(nets["none"].parameters()).dtype
    reference = nets["none"](x.to(dtype), t, s, cond)
    with fp8_autocast_context(config):
        out = nets[config.recipe](x.to(dtype), t, s, cond)
    return relative_error(out, reference)


def _row_md(r: dict) -> str:
    return (
        f"| {r['batch']} | {_label(r)} | {r['steps']} | {r['latency_ms']:.2f} | {r['step_ms']:.2f} | "
        f"{r['images_per_s']:.2f} | {100 * r['mfu']:.1f}% | {r['warmup_s']:.1f} |"
    )


def _label(r: dict) -> str:
    if r.get("fp8", "none") == "none":
        return r["variant"]
    return f"{r['variant']} fp8={r['fp8']} (x{r['speedup_vs_high_precision']:.2f})"


def _text_tokens(result: dict) -> str:
    """The denoiser's text tokens: T5's padded length, or what the text bucket cut it to."""
    used = sorted({stage["denoiser_txt_tokens"] for stage in result["stages"]})
    if used == [result["txt_tokens"]]:
        return str(result["txt_tokens"])
    return f"{'/'.join(map(str, used))} (T5 pads to {result['txt_tokens']}; text bucket {result['text_bucket']})"


def markdown(result: dict) -> str:
    lines = [
        f"{result['preset']} ({result['params'] / 1e6:.1f}M params), {result['resolution']}², "
        f"{result['img_tokens']} image + {_text_tokens(result)} text tokens, {result['dtype']}, "
        f"CFG {result['guidance']}, {result['sampler']}, {result['device']}, torch {result['torch']}. "
        "Denoiser only; MFU over peak "
        f"{result['peak_flops'] / 1e12:.0f} TFLOP/s; warm-up = compile (+ capture), paid once per shape"
        f"{' (blocks compiled as nested regions)' if result['compile_regions'] else ''}.",
        "",
        HEADER,
        "|---|---|---|---|---|---|---|---|",
        *(_row_md(r) for r in result["rows"]),
        "",
        "| batch | text encoder ms | autoencoder decode ms |",
        "|---|---|---|",
        *(f"| {s['batch']} | {s['text_encoder_ms']:.2f} | {s['decode_ms']:.2f} |" for s in result["stages"]),
    ]
    if "fp8" in result:
        fp8 = result["fp8"]
        errors = ", ".join(f"batch {e['batch']}: {e['relative_error']:.3e}" for e in fp8["denoiser_relative_error"])
        lines += [
            "",
            f"FP8 {fp8['recipe']}/{fp8['scaling']}: {fp8['converted_linears']} linears converted; (xN) = images/s "
            f"against the high-precision row of the same point; denoiser output relative error {errors}.",
        ]
    if result["skipped_variants"]:
        lines += ["", f"Skipped (needs CUDA): {', '.join(result['skipped_variants'])}."]
    for p in result.get("kernel_profiles", []):
        title = f"Profile, batch {p['batch']}, {p['variant']}, {p['steps']} step{'s' * (p['steps'] > 1)}"
        lines += ["", kernel_profile.markdown(p, title)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
