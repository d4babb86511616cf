"""Ours beside diffusers' FLUX at the same sizes, in one process: sampling and training (issue 34).

Sampling: our fast path (selfe.sampling.fast_path) and diffusers' FluxTransformer2DModel + AutoencoderKL
(bench/peer_flux.py), random weights, the same tokens (image tokens of --resolution, --txt-tokens of text,
no padding mask on either side), CFG as two batched rows, one dtype. Rows: one denoising step (the
denoiser alone), then an image of each --steps count, end to end (the steps and the autoencoder decode;
text encoding is left out: both would run the same T5 and CLIP). The peer runs eager, compiled whole
(`torch.compile(transformer, fullgraph=True)`) and compiled regionally (`compile_repeated_blocks(
fullgraph=True)`), as diffusers documents; ours eager against its eager, our default fast path (compiled,
and captured in a CUDA graph on CUDA) against both compiled ones. The decodes run eager on both sides.

Training: the peer's flow-matching step as torchtitan's FLUX trainer runs it (full activation
checkpointing and compile per block, FSDP2, AdamW, grad clipping; bench/peer_flux.py) against our
trainer's step with the self-evaluation passes off (`objective.self_eval=false`: plain flow matching, the
same work), and our full Self-E step beside them with its extra passes counted (the FLOPs ratio of the two
steps of ours). Ours runs through bench/train_mfu.py (the real trainer, synthetic latents, with its EMA).

ratio = peer ms / ours ms: how many times faster ours is (> 1: ours faster). The peer's warm-up (its
compile) is printed per variant. Parameter counts of the two models are printed and must agree within 1%
(bench/peer_flux.py says where they differ). diffusers is optional (`pip install -e '.[bench]'`).

    python bench/peers.py --preset tiny --resolution 32 --txt-tokens 16 --compile-backend aot_eager  # CPU smoke
    python bench/peers.py --preset 2b --resolution 512 --batch 1 --steps 2 --train-batch 4 --json bench/peers.json

On the device machine (no network, no diffusers) this is the engine profile's `peers` step; its wheels travel
in .whl (ignored by git), fetched here once:
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0
    python3 bench/device_session.py --profile engine --only peers --out "$OUT" --budget 540   # carry: [".whl"]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `bench` as a package from a checkout

from bench import peer_flux, train_mfu  # noqa: E402
from bench.fp8 import median_seconds  # noqa: E402
from selfe.components.autoencoder import AUTOENCODER_PRESETS, AutoEncoder  # noqa: E402
from selfe.network.config import PRESETS  # noqa: E402
from selfe.network.model import MMDiT, patchify  # noqa: E402
from selfe.sampling.fast_path import FastPathConfig, FastSampler  # noqa: E402
from selfe.sampling.sampler import SamplerConfig  # noqa: E402
from selfe.utils.atomic import atomic_write_bytes, folder_problem  # noqa: E402
from selfe.utils.devices import device_problem  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PEER_VARIANTS = ("eager", "compiled", "regional")  # whole-model fullgraph compile; compile_repeated_blocks
MAX_PARAM_GAP = 0.01


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="2b", help="MMDiT preset (default %(default)s)")
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (default %(default)s)")
    parser.add_argument("--txt-tokens", type=int, default=None, help="text tokens (default 512; tiny: 16)")
    parser.add_argument("--batch", type=int, default=1, help="images per sampling call (default %(default)s)")
    parser.add_argument("--steps", type=int, nargs="+", default=[2], help="image step counts (default 2)")
    parser.add_argument("--guidance", type=float, default=5.0, help="CFG scale, two batched rows (default 5)")
    parser.add_argument("--variants", nargs="+", choices=PEER_VARIANTS, default=list(PEER_VARIANTS), help="peer's")
    parser.add_argument(
        "--no-guidance-embeds",
        action="store_true",
        help="the peer without FLUX.1-dev's guidance embedder (schnell's layout; MLP_s then has no twin)",
    )
    parser.add_argument("--compile-backend", default="inductor", help="both sides (default inductor; CPU: aot_eager)")
    parser.add_argument("--peer-compile-mode", default=None, help="the peer's torch.compile mode, e.g. max-autotune")
    parser.add_argument("--train-batch", type=int, default=None, help="per step (default 4 on CUDA, 2 on CPU)")
    parser.add_argument("--train-steps", type=int, default=5, help="timed training steps (default %(default)s)")
    parser.add_argument("--train-warmup", type=int, default=None, help="untimed first (default 3 on CUDA, 1 on CPU)")
    parser.add_argument(
        "--train-compile", choices=("on", "off"), default="on", help="compile per block in training (default on)"
    )
    parser.add_argument("--no-train", action="store_true", help="sampling only")
    parser.add_argument("--no-sample", action="store_true", help="training only")
    parser.add_argument("--iters", type=int, default=3, help="timed repeats per sampling point, median (default 3)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    args = parser.parse_args(argv)
    # Checked before any model is built: a bad value should cost a second, not a traceback mid-run.
    for name in ("batch", "iters", "train_steps", "resolution"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("txt_tokens", "train_batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.train_warmup is not None and args.train_warmup < 0:
        parser.error(f"--train-warmup must be >= 0, got {args.train_warmup}")
    if min(args.steps) < 1:
        parser.error(f"--steps values must be >= 1, got {' '.join(map(str, args.steps))}")
    if not (math.isfinite(args.guidance) and args.guidance >= 0):
        parser.error(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if args.no_train and args.no_sample:
        parser.error("--no-train and --no-sample together leave nothing to run")
    if (problem := peer_flux.diffusers_problem()) is not None:
        parser.error(f"the peer needs diffusers: {problem}")
    if args.resolution % 16:  # the FLUX autoencoder's 8x (the trainer's latents) and the 2x2 patches
        parser.error(f"--resolution must be a multiple of 16, got {args.resolution}")
    if args.device is not None and (problem := device_problem(args.device)):
        parser.error(problem)
    if args.json is not None:
        problem = "is a directory" if args.json.is_dir() else folder_problem(args.json.parent)
        if problem:
            parser.error(f"--json {args.json}: {problem}")
    config = peer_flux.peer_config(args.preset)
    with torch.device("meta"):  # counted before anything is built for real
        peer = peer_flux.flux_transformer(config, guidance_embeds=not args.no_guidance_embeds)
    args.params = {"ours": config.num_parameters(), "peer": peer_flux.num_parameters(peer)}
    gap = abs(args.params["ours"] - args.params["peer"]) / args.params["peer"]
    if gap > MAX_PARAM_GAP:
        counts = f"ours {args.params['ours']:,}, peer {args.params['peer']:,}"
        parser.error(f"parameter counts differ by {100 * gap:.2f}% ({counts}): the comparison would not be fair")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sampling_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[list[dict], dict]:
    """Both models at the same tokens: one denoising step, then an image per step count."""
    config = peer_flux.peer_config(args.preset)
    ae_config = AUTOENCODER_PRESETS["tiny" if args.preset == "tiny" else "flux1"]()
    latent = args.resolution // ae_config.downsample_factor
    h = w = latent // config.patch_size
    txt_tokens = args.txt_tokens or (16 if args.preset == "tiny" else 512)
    b, omega = args.batch, args.guidance

    torch.manual_seed(args.seed)
    with torch.device(device):
        ours = peer_flux.randomize(MMDiT(config)).to(dtype).eval().requires_grad_(False)
        ours_ae = peer_flux.randomize(AutoEncoder(ae_config)).to(dtype).eval().requires_grad_(False)
        peer = peer_flux.flux_transformer(config, guidance_embeds=not args.no_guidance_embeds)
        if args.no_guidance_embeds:
            peer_flux.randomize(peer)
        else:  # our weights: the same function (guidance = t - s), so the same numbers flow through both
            peer.load_state_dict(peer_flux.peer_state_dict(ours.state_dict(), config))
        peer = peer.to(dtype).eval().requires_grad_(False)
        peer_ae = peer_flux.randomize(peer_flux.flux_autoencoder(ae_config)).to(dtype).eval().requires_grad_(False)
        noise = torch.randn(b, config.in_channels, latent, latent, dtype=dtype)
        cond = {"txt": torch.randn(b, txt_tokens, config.txt_dim, dtype=dtype), "txt_mask": None,
                "pooled": torch.randn(b, config.vec_dim, dtype=dtype)}  # fmt: skip
        null = {"txt": torch.zeros_like(cond["txt"]), "txt_mask": None, "pooled": torch.zeros_like(cond["pooled"])}
    txt_ids, img_ids = peer_flux.position_ids(txt_tokens, h, w, device)
    batch = peer_flux.PeerBatch(
        patchify(noise, config.patch_size), cond["txt"], cond["pooled"], null["txt"], null["pooled"], txt_ids, img_ids
    )
    info = {
        "params": {"ours": config.num_parameters(), "peer": peer_flux.num_parameters(peer),
                   "ours_autoencoder": peer_flux.num_parameters(ours_ae),
                   "peer_autoencoder": peer_flux.num_parameters(peer_ae)},
        "img_tokens": h * w,
    }  # fmt: skip
    points = [("denoiser step", 1, False)] + [(f"image, {k} step{'s' * (k > 1)}", k, True) for k in args.steps]

    def ours_run(fast: FastSampler, steps: int, decode: bool):
        def run():
            x = fast.sample(noise, cond, null, SamplerConfig(steps=steps, guidance=omega), h * w)
            return ours_ae.decode(x) if decode else x

        return run

    def peer_run(model, steps: int, decode: bool):
        grid = torch.linspace(1.0, 0.0, steps + 1, device=device)
        return lambda: peer_flux.flux_image(model, peer_ae if decode else None, batch, grid, omega, (h, w))

    ours_ms: dict[tuple[str, str], float] = {}
    ours_warm: dict[str, float] = {}
    needed = {"eager" if v == "eager" else "fast path" for v in args.variants}
    for variant in [v for v in ("eager", "fast path") if v in needed]:
        compiled = variant != "eager"
        fast = FastSampler(
            ours,
            FastPathConfig(compile=compiled, cuda_graph="auto" if compiled else "off",
                           compile_backend=args.compile_backend),
        )  # fmt: skip
        torch._dynamo.reset()
        with torch.no_grad():
            ours_warm[variant] = fast.warmup(noise, cond, null)
            for label, steps, decode in points:
                run = ours_run(fast, steps, decode)
                run()  # the first call of a step count builds its grid tables
                ours_ms[(variant, label)] = median_seconds(run, device, 0, args.iters) * 1e3
        print(f"# ours {variant}: warm-up {ours_warm[variant]:.1f} s", file=sys.stderr, flush=True)
        del fast
        _free(device)

    rows = []
    for variant in args.variants:
        torch._dynamo.reset()
        model = peer
        if variant == "compiled":
            model = torch.compile(peer, fullgraph=True, backend=args.compile_backend, mode=args.peer_compile_mode)
        elif variant == "regional":
            peer.compile_repeated_blocks(fullgraph=True, backend=args.compile_backend, mode=args.peer_compile_mode)
        with torch.no_grad():
            _sync(device)
            start = time.perf_counter()
            peer_run(model, 1, False)()  # the first forward compiles
            _sync(device)
            warm = time.perf_counter() - start
            for label, steps, decode in points:
                run = peer_run(model, steps, decode)
                run()
                peer_ms = median_seconds(run, device, 0, args.iters) * 1e3
                mine = "eager" if variant == "eager" else "fast path"
                row = {"part": "sample", "what": label, "steps": steps, "decode": decode, "peer_variant": variant,
                       "ours_variant": mine, "peer_ms": peer_ms, "ours_ms": ours_ms[(mine, label)],
                       "ratio": peer_ms / ours_ms[(mine, label)], "peer_warmup_s": warm,
                       "ours_warmup_s": ours_warm[mine]}  # fmt: skip
                rows.append(row)
                print(_row_md(row), flush=True)
        if variant == "regional":  # undo the in-place compile (Module.compile) for whatever comes next
            for block in [*peer.transformer_blocks, *peer.single_transformer_blocks]:
                block._compiled_call_impl = None
    torch._dynamo.reset()  # the compiled code holds the models: free them for the training part
    return rows, info


def training_rows(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """The peer's FM step (torchtitan's way) against our trainer's FM step and full Self-E step."""
    from torch.distributed.device_mesh import init_device_mesh

    from selfe.train.config import OptimConfig, ParallelConfig, apply_overrides, preset
    from selfe.train.lr import build_optimizer
    from selfe.train.parallelize import param_dtype_for

    cuda = device.type == "cuda"
    variant = "compile+ac" if args.train_compile == "on" else "ac"
    txt = args.txt_tokens or (16 if args.preset == "tiny" else 512)
    warmup = args.train_warmup if args.train_warmup is not None else (3 if cuda else 1)
    batch_size = args.train_batch or (4 if cuda else 2)
    overrides = [
        f"model.time_embed_dim={peer_flux.PEER_TIME_EMBED_DIM}",
        f"parallel.compile_backend={args.compile_backend}",
    ]
    argv = ["--preset", args.preset, "--resolution", str(args.resolution), "--batch", str(batch_size),
            "--txt-tokens", str(txt), "--steps", str(args.train_steps), "--warmup", str(warmup),
            "--variants", variant, *overrides]  # fmt: skip
    mfu_args = {"fm": train_mfu.parse_args([*argv, "objective.self_eval=false"]), "selfe": train_mfu.parse_args(argv)}
    for a in mfu_args.values():
        a.peak_flops = a.peak_flops or 1e15  # MFU is not reported here; run_variant needs a number

    owns_group = not dist.is_initialized()
    if owns_group:  # a world of one, as the trainer makes; the trainer then joins it and leaves it to us
        backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        model_config = apply_overrides(preset(train_mfu.MODEL_PRESETS[args.preset]), overrides).model
        torch.manual_seed(args.seed)
        with torch.device(device):
            peer = peer_flux.randomize(
                peer_flux.flux_transformer(model_config, guidance_embeds=not args.no_guidance_embeds)
            )
        mesh = init_device_mesh(device.type, (1,))
        param_dtype = param_dtype_for(ParallelConfig(), device)
        peer_flux.parallelize_peer(peer, mesh, param_dtype, args.train_compile == "on", True, args.compile_backend)
        optimizer = build_optimizer(peer.parameters(), OptimConfig(), device)  # our trainer's AdamW
        latent = args.resolution // 8
        h = latent // model_config.patch_size
        g = torch.Generator(device=device).manual_seed(args.seed)
        with torch.device(device):
            txt_ids, img_ids = peer_flux.position_ids(txt, h, h, device)
            batch = peer_flux.PeerBatch(
                torch.randn(batch_size, h * h, model_config.patch_dim),
                torch.randn(batch_size, txt, model_config.txt_dim),
                torch.randn(batch_size, model_config.vec_dim),
                None, None, txt_ids, img_ids,
            )  # fmt: skip
        print(f"# peer: {warmup} warm-up + {args.train_steps} timed steps", file=sys.stderr, flush=True)
        _sync(device)
        start = time.perf_counter()
        for _ in range(warmup):
            peer_flux.flux_train_step(peer, optimizer, batch, g)
        _sync(device)
        peer_warm = time.perf_counter() - start
        times = []
        for _ in range(args.train_steps):
            _sync(device)
            start = time.perf_counter()
            peer_flux.flux_train_step(peer, optimizer, batch, g)
            _sync(device)
            times.append(time.perf_counter() - start)
        peer_ms = statistics.median(times) * 1e3
        del peer, optimizer, batch
        _free(device)
        ours = {}
        with tempfile.TemporaryDirectory(prefix="selfe-peers-") as tmp:
            for name, a in mfu_args.items():
                print(f"# ours {name}: training {args.train_steps} timed steps", file=sys.stderr, flush=True)
                ours[name] = train_mfu.run_variant(a, variant, Path(tmp) / name)
                _free(device)
    finally:
        if owns_group:
            dist.destroy_process_group()
    work = ours["selfe"]["tflops_per_step"] / ours["fm"]["tflops_per_step"]
    common = {"part": "train", "batch": batch_size, "img_tokens": h * h, "txt_tokens": txt, "variant": variant,
              "peer_ms": peer_ms, "peer_warmup_s": peer_warm}  # fmt: skip
    rows = [
        {**common, "what": "flow matching step", "ours_ms": ours["fm"]["step_time_s"] * 1e3, "work": 1.0},
        {
            **common,
            "what": "Self-E step (ours: + self-eval passes)",
            "ours_ms": ours["selfe"]["step_time_s"] * 1e3,
            "work": work,
        },
    ]
    for row in rows:
        row["ratio"] = row["peer_ms"] / row["ours_ms"]
        print(_row_md(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    gap = args.params["ours"] - args.params["peer"]
    print(f"parameters: ours {args.params['ours']:,}, diffusers' FLUX {args.params['peer']:,} "
          f"(difference {gap:+,}, {100 * gap / args.params['peer']:+.3f}%)", flush=True)  # fmt: skip
    print(HEADER, flush=True)
    rows, info = ([], {}) if args.no_sample else sampling_rows(args, device, dtype)
    if not args.no_train:
        rows += training_rows(args, device)
    result = {
        "preset": args.preset,
        "params": {**args.params, **info.get("params", {})},
        "guidance_embeds": not args.no_guidance_embeds,
        "resolution": args.resolution,
        "img_tokens": info.get("img_tokens"),
        "txt_tokens": args.txt_tokens or (16 if args.preset == "tiny" else 512),
        "batch": args.batch,
        "guidance": args.guidance,
        "compile_backend": args.compile_backend,
        "peer_compile_mode": args.peer_compile_mode,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "diffusers": _diffusers_version(),
        "iters": args.iters,
        "rows": rows,
    }
    table = markdown(result)
    print(table)
    if args.json:  # temp file then rename: an interrupted run leaves no half-written file
        atomic_write_bytes(args.json, (json.dumps(result, indent=2) + "\n").encode())
    return result


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


HEADER = "| part | what | peer (diffusers) | ours | peer ms | ours ms | ratio | peer warm-up s |"


def _row_md(r: dict) -> str:
    if r["part"] == "train":
        peer, ours = f"torchtitan-style {r['variant']}, batch {r['batch']}", f"trainer {r['variant']}"
        if r["work"] != 1.0:
            ours += f" (x{r['work']:.2f} the FLOPs)"
    else:
        peer, ours = r["peer_variant"], r["ours_variant"]
    return (
        f"| {r['part']} | {r['what']} | {peer} | {ours} | {r['peer_ms']:.2f} | {r['ours_ms']:.2f} | "
        f"x{r['ratio']:.2f} | {r['peer_warmup_s']:.1f} |"
    )


def markdown(result: dict) -> str:
    p = result["params"]
    sampling = "not run"
    if result["img_tokens"] is not None:
        sampling = (
            f"{result['img_tokens']} image tokens, batch {result['batch']}, CFG {result['guidance']} as two batched "
            f"rows, {result['dtype']}"
        )
    return "\n".join(
        [
            f"{result['preset']} vs diffusers {result['diffusers']} FLUX at the same sizes (params: ours "
            f"{p['ours'] / 1e6:.2f}M, peer {p['peer'] / 1e6:.2f}M; guidance embedder "
            f"{'on' if result['guidance_embeds'] else 'off'}), {result['resolution']}², {result['txt_tokens']} text "
            f"tokens; sampling: {sampling}; {result['device']}, torch "
            f"{result['torch']}, compile backend {result['compile_backend']}. ratio = peer ms / ours ms "
            "(> 1: ours faster); images end to end = steps + decode, text encoders excluded; training: fp32 "
            "weights, bf16 compute on CUDA, ours with its EMA and text mask, the peer without either.",
            "",
            HEADER,
            "|---|---|---|---|---|---|---|---|",
            *(_row_md(r) for r in result["rows"]),
        ]
    )


if __name__ == "__main__":
    main()
