"""Image I/O: header-only size reads, decoding, resize-to-cover + center crop, and [-1, 1] tensors.

Every PIL failure surfaces as ImageReadError so callers catch one type and count it.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112


class ImageReadError(OSError):
    """An image that cannot be opened or decoded (missing, not an image, truncated, corrupt)."""


def _orientation(img: Image.Image) -> int:
    """EXIF orientation (1 = upright) without decoding pixels. JPEG, WebP and TIFF keep EXIF in the
    header; PNG may keep it after the pixel data, and PIL would decode the whole image to find it,
    so a PNG without EXIF in its header counts as upright."""
    if img.format == "PNG" and "exif" not in img.info:
        return 1
    return int(img.getexif().get(_EXIF_ORIENTATION, 1))


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) as displayed, from the header only (no pixel decode), EXIF orientation applied."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                orientation = _orientation(img)
    except (
        Exception
    ) as err:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError)
        raise ImageReadError(f"cannot read image header of {path}: {type(err).__name__}: {err}") from err
    if orientation in _SWAPPING_ORIENTATIONS:
        width, height = height, width
    return width, height


def cover_size(width: int, height: int, target_height: int, target_width: int) -> tuple[int, int]:
    """(width, height) after scaling (width, height) so it covers the target, aspect ratio kept."""
    scale = max(target_width / width, target_height / height)
    # ceil with a small slack so float error never leaves a side one pixel short of the target.
    new_w = max(target_width, math.ceil(width * scale - 1e-6))
    new_h = max(target_height, math.ceil(height * scale - 1e-6))
    return new_w, new_h


def load_image(path: str | os.PathLike, target_hw: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image to RGB, EXIF orientation applied; transparent pixels composite onto white.

    target_hw: the size the image will be cropped to. JPEGs then decode at a reduced DCT scale that
    still covers it (`draft`), several times faster for large photos.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if target_hw is not None and img.format == "JPEG":
                    w, h = img.size
                    orientation = _orientation(img)
                    th, tw = target_hw
                    if orientation in _SWAPPING_ORIENTATIONS:
                        th, tw = tw, th
                    img.draft("RGB", cover_size(w, h, th, tw))
                img.load()
                img = ImageOps.exif_transpose(img)
                if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                    rgba = img.convert("RGBA")
                    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    img = Image.alpha_composite(background, rgba)
                return img.convert("RGB")
    except Exception as err:
        raise ImageReadError(f"cannot decode image {path}: {type(err).__name__}: {err}") from err


def resize_center_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    """Scale so the image covers (height, width) (shorter side to cover), then crop the center."""
    new_w, new_h = cover_size(img.width, img.height, height, width)
    if (new_w, new_h) != img.size:
        # reducing_gap: a fast integer pre-shrink for big downscales, then an exact bicubic pass.
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left = (new_w - width) // 2
    top = (new_h - height) // 2
    return img.crop((left, top, left + width, top + height))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> float32 tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def load_for_bucket(path: str | os.PathLike, height: int, width: int) -> torch.Tensor:
    """Decode, resize to cover, center crop: (3, height, width) float32 in [-1, 1]. Raises ImageReadError."""
    img = load_image(path, (height, width))
    return to_tensor(resize_center_crop(img, height, width))
