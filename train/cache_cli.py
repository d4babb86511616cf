"""`selfe cache`: precompute latents and text states for a TSV manifest (see selfe.train.cache).

    selfe cache --manifest data.tsv --out cache/ --resolution 256 512 \
        --ae ae.safetensors --t5 t5-snapshot/ --clip clip-snapshot/
    selfe cache --manifest data.tsv --out cache/ --smoke      # random stand-ins: a pipeline check only

Run the same command again to resume after a kill: finished shards are kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from selfe.train.cache import CacheMismatchError, build_cache
from selfe.train.cache_shards import STORE_DTYPES, CacheConfig, ImageEncoder, TextEncoder
from selfe.train.data.cached import content_digest
from selfe.train.data.manifest import EmptyManifestError, ManifestConfig
from selfe.train.smoke_encoders import SmokeImageEncoder, SmokeTextEncoder
from selfe.utils.atomic import folder_problem


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="selfe cache", description="Precompute latents and text states into shards.")
    p.add_argument("--manifest", required=True, help="TSV manifest: image path<TAB>prompt")
    p.add_argument(
        "--base-dir", default=None, help="where relative image paths resolve (default: the manifest's folder)"
    )
    p.add_argument("--out", required=True, help="output folder (resumes a cache already there)")
    p.add_argument("--resolution", type=int, nargs="+", default=[256], help="base resolution(s) to cache")
    p.add_argument("--shard-size", type=int, default=CacheConfig.shard_size, help="samples per shard")
    p.add_argument("--batch-size", type=int, default=CacheConfig.encode_batch_size, help="images / prompts per call")
    p.add_argument("--num-threads", type=int, default=CacheConfig.num_threads, help="image decode threads")
    p.add_argument("--min-side", type=int, default=ManifestConfig.min_side, help="skip images with a shorter side")
    p.add_argument("--max-caption-chars", type=int, default=ManifestConfig.max_caption_chars)
    p.add_argument("--store-dtype", choices=sorted(STORE_DTYPES), default=None, help="default: as encoded")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="encoder dtype (bf16, fp16, fp32); default bf16 on cuda, fp32 on cpu")
    p.add_argument("--t5-max-length", type=int, default=512)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--ae", help="FLUX.1 autoencoder weights (ae.safetensors)")
    p.add_argument("--t5", help="local T5 encoder snapshot folder (FLUX layout: text_encoder_2)")
    p.add_argument("--t5-tokenizer", default=None, help="T5 tokenizer folder (default: --t5; FLUX: tokenizer_2)")
    p.add_argument("--clip", help="local CLIP text model snapshot folder (FLUX layout: text_encoder)")
    p.add_argument("--clip-tokenizer", default=None, help="CLIP tokenizer folder (default: --clip; FLUX: tokenizer)")
    p.add_argument("--smoke", action="store_true", help="random-init tiny stand-in encoders (pipeline check only)")
    return p


class InputError(Exception):
    """A missing, wrong or corrupt input (manifest, encoder weights, --out): one line and exit status 2."""


def _check_inputs(args: argparse.Namespace) -> None:
    """Cheap checks of every path, before an encoder is loaded or --out created: a typo costs no loading time."""
    manifest = Path(args.manifest)
    if not manifest.is_file():
        raise InputError(f"manifest {manifest} does not exist" + (" (it is a folder)" if manifest.is_dir() else ""))
    try:
        with open(manifest, "rb") as f:
            f.read(1)
    except OSError as err:
        raise InputError(f"manifest {manifest} is not readable: {err}") from err
    if args.base_dir is not None and not Path(args.base_dir).is_dir():
        raise InputError(f"--base-dir {args.base_dir} is not a folder")
    if not args.smoke:
        if not Path(args.ae).is_file():
            raise InputError(f"--ae {args.ae}: no such file (expected the autoencoder's .safetensors weights)")
        folders = {"--t5": args.t5, "--t5-tokenizer": args.t5_tokenizer}
        folders |= {"--clip": args.clip, "--clip-tokenizer": args.clip_tokenizer}
        for flag, path in folders.items():
            # expanduser: the loaders (selfe.components.text_encoders) expand a quoted ~ too.
            if path is not None and not Path(path).expanduser().is_dir():
                raise InputError(f"{flag} {path}: no such folder (expected a local snapshot folder)")
    problem = folder_problem(args.out)
    if problem:
        raise InputError(f"--out {args.out}: {problem}")


def _real_encoders(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, latent_factor: int
) -> tuple[ImageEncoder, TextEncoder, str]:
    # Imported here: the real models need transformers and weights, the smoke path neither.
    from safetensors import SafetensorError

    from selfe.components.autoencoder import load_autoencoder
    from selfe.components.text_encoders import TextEncoders

    # What a missing, truncated or foreign weight file raises (TypeError: a tokenizer file of another model).
    load_errors = (OSError, ValueError, TypeError, SafetensorError)
    try:
        autoencoder = load_autoencoder(args.ae, device=device, dtype=dtype)
    except load_errors as err:
        raise InputError(f"cannot load the autoencoder --ae {args.ae}: {err}") from err
    factor = getattr(autoencoder, "downsample_factor", latent_factor)  # stand-in encoders may not say
    if factor != latent_factor:
        raise InputError(
            f"the autoencoder --ae {args.ae} downsamples by {factor}; the cache stores {latent_factor}x latents "
            "(the FLUX.1 autoencoder's)"
        )
    try:
        encoders = TextEncoders.from_snapshots(
            args.t5,
            args.clip,
            t5_tokenizer_path=args.t5_tokenizer,
            clip_tokenizer_path=args.clip_tokenizer,
            t5_max_length=args.t5_max_length,
            device=device,
            dtype=dtype,
        )
    except load_errors as err:
        raise InputError(f"cannot load the text encoders --t5 {args.t5} / --clip {args.clip}: {err}") from err
    # The weights and tokenizers by content, not path: a resume with another snapshot is refused, one with
    # the same snapshot moved is not. Hashing a 10 GB T5 takes tens of seconds next to hours of encoding.
    sources = {"ae": [args.ae], "t5": [args.t5, args.t5_tokenizer], "clip": [args.clip, args.clip_tokenizer]}
    try:
        digests = ";".join(f"{k}={content_digest(p for p in v if p is not None)}" for k, v in sources.items())
    except OSError as err:
        raise InputError(f"cannot read the encoder files: {err}") from err
    return autoencoder.encode, encoders.encode, f"{digests};t5_max_length={args.t5_max_length};dtype={dtype}"


def _device(parser: argparse.ArgumentParser, name: str | None) -> torch.device:
    from selfe.utils.devices import device_problem  # the one --device check the commands share

    if name is not None and (problem := device_problem(name)) is not None:
        parser.error(problem)
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def cache_main(argv: Sequence[str] | None = None) -> int:
    """Build (or resume) a cache; 0 when every shard is written, 1 otherwise, 2 for bad arguments or input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    real = [args.ae, args.t5, args.clip]
    if args.smoke == any(real) or (not args.smoke and not all(real)):
        parser.error("give either --smoke or all of --ae, --t5 and --clip")
    # Every argument is checked before an encoder is loaded (minutes for a real T5) or --out is created.
    device = _device(parser, args.device)
    dtype = torch.float32  # the real encoders' is resolved below; the smoke ones take none
    if not args.smoke:
        from selfe.components.text_encoders import resolve_dtype

        try:
            dtype = resolve_dtype(args.dtype, device)
        except ValueError as err:
            parser.error(f"--dtype: {err}")
        if args.t5_max_length < 1:
            parser.error(f"--t5-max-length must be >= 1, got {args.t5_max_length}")
    try:
        config = CacheConfig(
            resolutions=tuple(args.resolution),
            shard_size=args.shard_size,
            encode_batch_size=args.batch_size,
            num_threads=args.num_threads,
            store_dtype=args.store_dtype,
            encoder_tag="smoke",
            checks=ManifestConfig(min_side=args.min_side, max_caption_chars=args.max_caption_chars),
        )
    except ValueError as err:
        parser.error(str(err))
    try:
        _check_inputs(args)
        if args.smoke:
            image_encoder: ImageEncoder = SmokeImageEncoder()
            text_encoder: TextEncoder = SmokeTextEncoder()
        else:
            image_encoder, text_encoder, tag = _real_encoders(args, device, dtype, config.latent_factor)
            config = dataclasses.replace(config, encoder_tag=tag)
    except InputError as err:
        print(f"selfe cache: error: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        index = build_cache(
            args.manifest,
            args.out,
            image_encoder,
            text_encoder,
            config,
            base_dir=args.base_dir,
            device=device,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, EmptyManifestError, CacheMismatchError) as err:
        print(f"selfe cache: error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    counts = ", ".join(f"{k}={v}" for k, v in index["stats"].items() if v)
    print(f"cache {args.out}: {len(index['shards'])}/{index['total_shards']} shards in {seconds:.1f} s; {counts}")
    return 0 if index["complete"] else 1
