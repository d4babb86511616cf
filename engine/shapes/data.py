"""`selfe data shapes`: ShapesEval's training data as the ordinary pipeline takes it.

    selfe data shapes --out data/shapes --num 30000 --seed 0

writes into OUT:
    images/000000.png ...   32x32 RGB scenes (selfe.shapes.scene), one per manifest row
    train.tsv               image path <TAB> caption (the Self-E release's manifest format)
    text_encoder/, text_encoder_2/   the tiny T5 / CLIP snapshots (selfe.shapes.text) the captions are encoded by
  with --text-encoders pretrained, those snapshots pretrained on the captions (selfe.shapes.text_pretraining), and
    text_pretraining.json   its report: settings, losses, separation of swapped captions before and after
    cache/                  a `selfe cache` of it: space-to-depth latents (B, 48, 8, 8) and text states
  with --autoencoder trained, instead of cache/:
    ae.safetensors, ae.json a tiny FLUX-architecture autoencoder trained on the images, and its report
    cache-ae/               the cache in its latents (B, 8, 8, 8)
A run (`selfe train shapes-selfe` / `shapes-fm`, or `shapes-selfe-ae` / `shapes-fm-ae` in the trained
autoencoder's latents) reads its cache, or the images when the cache is absent.
Sample i is a pure function of (seed, i). The manifest is written last, atomically, after every image;
the cache resumes by itself. A rerun with the same arguments completes or repeats the folder (a trained
autoencoder or pretrained text encoders whose recorded training matches are reused, not retrained); a
folder made with another --num, --seed, --t5-order-bias (`8` writes a T5 whose states carry word order),
--text-encoders, --text-steps or --ae-steps is refused before anything is written, as mixing the two would
leave e.g. the old cache next to the new T5.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from selfe.shapes.autoencoder import AutoEncoderTraining
from selfe.shapes.scene import IMAGE_SIZE, random_prompt, render
from selfe.shapes.text import CLIP_DIR, T5_DIR, T5_MAX_LENGTH, T5_ORDER_BIAS, WORD_ORDER_BIAS, write_text_encoders
from selfe.shapes.text_pretraining import TextPretraining
from selfe.train.config import SHAPES_PIXEL_FACTOR
from selfe.utils.atomic import atomic_write_bytes, folder_problem

MANIFEST = "train.tsv"
IMAGES = "images"
CACHE = "cache"
AE_FILE = "ae.safetensors"
AE_REPORT = "ae.json"
AE_CACHE = "cache-ae"
AUTOENCODERS = ("pixels", "trained")  # --autoencoder: space-to-depth pixels, or the tiny trained autoencoder
TEXT_REPORT = "text_pretraining.json"
# --text-encoders: the random-init snapshots (the shipped model's), or them pretrained on the captions
TEXT_ENCODERS = ("random", "pretrained")


class ShapesMismatchError(ValueError):
    """The output folder holds a data set made with other settings; nothing of it was changed."""


def sample(seed: int, index: int, image_size: int = IMAGE_SIZE) -> tuple[str, np.ndarray]:
    """(caption, (H, W, 3) uint8 image) of sample `index` of the data set `seed`."""
    rng = np.random.default_rng([seed, index])
    prompt = random_prompt(rng)
    return prompt.caption, render(prompt, rng, image_size)


def write_images(out: Path, num: int, seed: int, image_size: int = IMAGE_SIZE, progress: bool = True) -> Path:
    """Write the images and then the manifest (atomically, last: its presence means the images are complete)."""
    from PIL import Image
    from tqdm import tqdm

    manifest = out / MANIFEST
    folder = out / IMAGES
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in tqdm(range(num), desc="shapes images", unit="img", disable=not progress, file=sys.stderr):
        caption, image = sample(seed, i, image_size)
        name = f"{IMAGES}/{i:06d}.png"
        path = out / name
        buffer = io.BytesIO()  # always written: a folder made with another seed must not leak old images
        Image.fromarray(image).save(buffer, format="PNG")
        atomic_write_bytes(path, buffer.getvalue())
        rows.append(f"{name}\t{caption}\n")
    atomic_write_bytes(manifest, "".join(rows).encode("utf-8"))
    return manifest


def manifest_bytes(num: int, seed: int) -> bytes:
    """The manifest write_images writes, without rendering: a caption is drawn before its image."""
    rows = (f"{IMAGES}/{i:06d}.png\t{random_prompt(np.random.default_rng([seed, i])).caption}\n" for i in range(num))
    return "".join(rows).encode("utf-8")


def check_existing(
    out: Path,
    num: int,
    seed: int,
    t5_order_bias: float,
    autoencoder: str,
    ae_training: AutoEncoderTraining,
    text_training: TextPretraining | None = None,
) -> tuple[bool, bool]:
    """Refuse (ShapesMismatchError) a folder whose manifest, text encoders or trained autoencoder came from
    other settings, before anything is written: rewriting part of it would leave the rest, e.g. its cache,
    inconsistent. text_training None: random-init text encoders. Returns whether out holds an autoencoder
    trained with `ae_training` and text encoders pretrained with `text_training` (to reuse)."""
    fix = f"use a new --out folder or delete {out}"
    manifest = out / MANIFEST
    if manifest.is_file():
        have, want = manifest.read_bytes(), manifest_bytes(num, seed)
        if have != want:
            rows = have.count(b"\n")
            setting = f"--num {rows}, not {num}" if rows != num else f"another --seed than {seed}"
            raise ShapesMismatchError(f"{out} holds a shapes data set made with {setting}; {fix}")
    reuse_text = check_text_encoders(out, t5_order_bias, text_training)
    return check_autoencoder(out, autoencoder, ae_training), reuse_text


def check_text_encoders(out: Path, t5_order_bias: float, text_training: TextPretraining | None) -> bool:
    """check_existing's part for the text encoders; returns whether out holds them pretrained as asked."""
    from selfe.train.data.cached import content_digest

    fix = f"use a new --out folder or delete {out}"
    weights = [out / folder / "model.safetensors" for folder in (T5_DIR, CLIP_DIR)]
    recorded = None
    if (out / TEXT_REPORT).is_file():
        recorded = json.loads((out / TEXT_REPORT).read_text(encoding="utf-8"))["training"]
    if text_training is not None:
        wanted = {**asdict(text_training), "t5_order_bias": t5_order_bias}
        if recorded is None:  # none made, or their pretraining did not finish: (re)made unless a cache read them
            caches = [out / folder / "index.json" for folder in (CACHE, AE_CACHE)]
            if any(path.is_file() for path in weights) and any(path.is_file() for path in caches):
                raise ShapesMismatchError(f"{out} holds random-init text encoders, not pretrained ones; {fix}")
            return False
        if recorded != wanted:
            setting = _changed_settings(recorded, wanted, "settings", "--text-steps")
            raise ShapesMismatchError(f"{out} holds text encoders pretrained with {setting}; {fix}")
        return True
    if recorded is not None:
        raise ShapesMismatchError(f"{out} holds text encoders made with --text-encoders pretrained; {fix}")
    if any(path.is_file() for path in weights):
        with tempfile.TemporaryDirectory() as tmp:  # deterministic and fast (tiny models): compare to a fresh copy
            write_text_encoders(tmp, t5_order_bias=t5_order_bias)
            fresh = [Path(tmp) / folder / "model.safetensors" for folder in (T5_DIR, CLIP_DIR)]
            same = all(a.is_file() and content_digest([a]) == content_digest([b]) for a, b in zip(weights, fresh))
        if not same:
            raise ShapesMismatchError(
                f"{out} holds text encoders made with another --t5-order-bias than {t5_order_bias}; {fix}"
            )
    return False


def _changed_settings(recorded: dict, wanted: dict, what: str, steps_flag: str) -> str:
    """How the settings a folder was made with differ from this command's, for an error message."""
    changed = sorted(k for k in wanted.keys() | recorded.keys() if recorded.get(k) != wanted.get(k))
    if changed == ["steps"]:  # the one the command line sets
        return f"{steps_flag} {recorded['steps']}, not {wanted['steps']}"
    return f"other {what} ({', '.join(changed)})"


def check_autoencoder(out: Path, autoencoder: str, ae_training: AutoEncoderTraining) -> bool:
    """check_existing's part for the autoencoder; returns whether out holds one trained with `ae_training`."""
    fix = f"use a new --out folder or delete {out}"
    if autoencoder != "trained" or not (out / AE_FILE).is_file() or not (out / AE_REPORT).is_file():
        return False
    recorded = json.loads((out / AE_REPORT).read_text(encoding="utf-8")).get("training")
    if recorded is None:  # written before the training was recorded: retraining would orphan a cache of it
        if (out / AE_CACHE / "index.json").is_file():
            raise ShapesMismatchError(f"{out} holds an autoencoder of unrecorded training settings; {fix}")
        return False
    wanted = asdict(ae_training)
    if recorded != wanted:
        setting = _changed_settings(recorded, wanted, "autoencoder training settings", "--ae-steps")
        raise ShapesMismatchError(f"{out} holds an autoencoder trained with {setting}; {fix}")
    return True


def build_shapes_cache(
    out: Path, image_size: int = IMAGE_SIZE, progress: bool = True, autoencoder: str = "pixels"
) -> dict:
    """The `selfe cache` of out/train.tsv with out's text encoders and the pixel autoencoder (in out/cache)
    or the trained one, out/ae.safetensors (in out/cache-ae)."""
    import torch

    from selfe.components.pixel_autoencoder import SpaceToDepthAutoEncoder, SpaceToDepthConfig
    from selfe.components.text_encoders import TextEncoders
    from selfe.train.cache import build_cache
    from selfe.train.cache_shards import CacheConfig
    from selfe.train.data.cached import content_digest
    from selfe.train.data.manifest import ManifestConfig

    # The encoders' weights are part of what the cache holds: another snapshot must not resume this cache.
    weights = [out / folder / "model.safetensors" for folder in ("text_encoder", "text_encoder_2")]
    text_digest = content_digest(weights)

    text = TextEncoders.from_snapshots(
        out / "text_encoder", out / "text_encoder_2", t5_max_length=T5_MAX_LENGTH, device="cpu", dtype=torch.float32
    )
    if autoencoder == "pixels":
        ae = SpaceToDepthAutoEncoder(SpaceToDepthConfig(downsample_factor=SHAPES_PIXEL_FACTOR))
        image_tag, cache_dir = str(ae.config.to_dict()), out / CACHE
    elif autoencoder == "trained":
        from selfe.components.autoencoder import load_autoencoder

        ae = load_autoencoder(out / AE_FILE)
        image_tag, cache_dir = f"ae={content_digest([out / AE_FILE])}", out / AE_CACHE
    else:
        raise ValueError(f"autoencoder must be one of {AUTOENCODERS}, got {autoencoder!r}")
    config = CacheConfig(
        resolutions=(image_size,),
        shard_size=4096,
        encode_batch_size=256,
        num_threads=2,
        # pixels * 2 in steps of 2/255, unit-variance latents and text states: fp16 loses nothing useful
        store_dtype="float16",
        encoder_tag=f"shapes;{image_tag};t5_max_length={T5_MAX_LENGTH};text={text_digest}",
        latent_factor=ae.downsample_factor,
        checks=ManifestConfig(min_side=image_size),
    )

    def encode(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return ae.encode(images)

    return build_cache(out / MANIFEST, cache_dir, encode, text.encode, config, progress=progress)


def prepare(
    out_dir: str | Path,
    num: int,
    seed: int = 0,
    cache: bool = True,
    progress: bool = True,
    t5_order_bias: float = T5_ORDER_BIAS,
    autoencoder: str = "pixels",
    ae_training: AutoEncoderTraining | None = None,
    device: str = "cpu",
    text_training: TextPretraining | None = None,
) -> Path:
    """Images + manifest, text encoders (pretrained with `text_training` unless it is None), (autoencoder=
    "trained") the autoencoder, and (cache=True) the cache under out_dir; returns out_dir. device: where the
    autoencoder trains (the text encoders pretrain on the CPU)."""
    if num < 1:
        raise ValueError(f"the number of samples must be >= 1, got {num}")
    if autoencoder not in AUTOENCODERS:
        raise ValueError(f"autoencoder must be one of {AUTOENCODERS}, got {autoencoder!r}")
    out = Path(out_dir)
    ae_training = ae_training or AutoEncoderTraining()
    reuse_ae, reuse_text = check_existing(out, num, seed, t5_order_bias, autoencoder, ae_training, text_training)
    write_images(out, num, seed, progress=progress)
    if not reuse_text:  # random-init ones are deterministic: the same bias rewrites the same bytes
        write_text_encoders(out, t5_order_bias=t5_order_bias)
    if text_training is not None and not reuse_text:
        from selfe.shapes.text_pretraining import pretrain_snapshots, separation_table
        from selfe.utils.atomic import atomic_write_json

        report = pretrain_snapshots(out / T5_DIR, out / CLIP_DIR, text_training, progress=progress)
        report["training"]["t5_order_bias"] = t5_order_bias
        atomic_write_json(out / TEXT_REPORT, report)  # last: its presence means the snapshots are pretrained
        if progress:
            print(separation_table(report))
    if autoencoder == "trained":
        from selfe.shapes.autoencoder import train_and_save
        from selfe.utils.atomic import atomic_write_json

        if reuse_ae:  # retraining need not give the same weights (threaded kernels): it would orphan cache-ae/
            report = json.loads((out / AE_REPORT).read_text(encoding="utf-8"))
        else:
            report = train_and_save(out / MANIFEST, out / AE_FILE, ae_training, progress=progress, device=device)
            atomic_write_json(out / AE_REPORT, {**report, "training": asdict(ae_training)})
        if progress:
            print(f"autoencoder round trip, ShapesEval overall: {report['reconstruction']['overall']:.3f}")
    if cache:
        index = build_shapes_cache(out, progress=progress, autoencoder=autoencoder)
        if not index["complete"]:
            raise RuntimeError(f"the cache in {out} is incomplete; run the command again to resume it")
    return out


def data_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `selfe data`."""
    parser = argparse.ArgumentParser(prog="selfe data", description="Make a built-in training data set.")
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    p = sub.add_parser("shapes", help="ShapesEval scenes: images + TSV manifest + text encoders + cache")
    p.add_argument("--out", type=Path, default=Path("data/shapes"), help="output folder (default data/shapes)")
    p.add_argument("--num", type=int, default=30_000, help="number of training images (default 30000)")
    p.add_argument("--seed", type=int, default=0, help="data set seed (the evaluation prompts use their own)")
    p.add_argument(
        "--t5-order-bias",
        type=float,
        default=T5_ORDER_BIAS,
        help=f"T5 position bias (default {T5_ORDER_BIAS}: random, a bag of words; {WORD_ORDER_BIAS}: word order)",
    )
    p.add_argument(
        "--autoencoder",
        choices=AUTOENCODERS,
        default="pixels",
        help=f"pixels (default): cache space-to-depth pixels ({CACHE}/); trained: train a tiny autoencoder on "
        f"the images ({AE_FILE}) and cache its latents ({AE_CACHE}/)",
    )
    p.add_argument("--ae-steps", type=int, default=AutoEncoderTraining.steps, help="autoencoder training steps")
    p.add_argument(
        "--text-encoders",
        choices=TEXT_ENCODERS,
        default="random",
        help=f"random (default, the shipped model's): random-init T5 and CLIP; pretrained: them pretrained on the "
        f"captions first (about a minute on the CPU; report in {TEXT_REPORT})",
    )
    p.add_argument("--text-steps", type=int, default=TextPretraining.steps, help="text encoder pretraining steps")
    p.add_argument("--device", default=None, help="where the autoencoder trains (default: cuda if available, else cpu)")
    p.add_argument("--no-cache", action="store_true", help="skip the cache (training then encodes on the fly)")
    p.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error(f"--num must be >= 1, got {args.num}")
    if args.seed < 0:  # numpy's seed sequences take no negative entropy
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if not (math.isfinite(args.t5_order_bias) and args.t5_order_bias >= 0):
        parser.error(f"--t5-order-bias must be finite and >= 0, got {args.t5_order_bias}")
    if args.ae_steps < 1:
        parser.error(f"--ae-steps must be >= 1, got {args.ae_steps}")
    if args.text_steps < 1:
        parser.error(f"--text-steps must be >= 1, got {args.text_steps}")
    if (problem := folder_problem(args.out)) is not None:
        parser.error(f"--out {args.out}: {problem}")
    import torch

    from selfe.train.cache import CacheMismatchError
    from selfe.utils.devices import device_problem

    if args.device is not None and (problem := device_problem(args.device)) is not None:
        parser.error(problem)
    start = time.perf_counter()
    try:
        prepare(
            args.out,
            args.num,
            args.seed,
            cache=not args.no_cache,
            progress=not args.no_progress,
            t5_order_bias=args.t5_order_bias,
            autoencoder=args.autoencoder,
            ae_training=AutoEncoderTraining(steps=args.ae_steps),
            device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
            text_training=TextPretraining(steps=args.text_steps) if args.text_encoders == "pretrained" else None,
        )
    except (ShapesMismatchError, CacheMismatchError) as err:  # the latter: its cache moved off its images
        p.exit(2, f"selfe data shapes: {err}\n")
    print(f"shapes data: {args.num} samples in {args.out} ({time.perf_counter() - start:.1f} s)")
    return 0
