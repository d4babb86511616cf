"""A small procedural image-text data set made by the tests themselves (no downloads).

Each image is a coloured background with a few filled shapes; the caption names them, so captions
and images agree. Sizes cover aspect ratios from about 1:3 to 3:1, written as PNG and JPEG with a
TSV manifest (relative path<TAB>caption) beside them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 50, 170),
    "orange": (250, 140, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "bar")
# (width, height): square, portrait and landscape, from ~1:3 to ~3:1.
SIZES = ((96, 96), (128, 96), (96, 128), (160, 80), (80, 160), (192, 64), (64, 192), (120, 90), (72, 144))


@dataclass
class ProceduralDataset:
    root: Path
    manifest: Path
    paths: list[str]  # relative to root, in manifest order
    captions: list[str]
    sizes: list[tuple[int, int]]  # (width, height)


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, colour: tuple[int, int, int], w: int, h: int, rng: random.Random
):
    size = rng.randint(max(8, min(w, h) // 5), max(9, min(w, h) // 2))
    x, y = rng.randint(0, max(0, w - size)), rng.randint(0, max(0, h - size))
    box = (x, y, x + size, y + size)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(x, y + size), (x + size, y + size), (x + size // 2, y)], fill=colour)
    else:
        draw.rectangle((x, y + size // 3, x + size, y + 2 * size // 3), fill=colour)


def make_image(width: int, height: int, seed: int) -> tuple[Image.Image, str]:
    """One procedural RGB image and its caption."""
    rng = random.Random(seed)
    names = list(COLOURS)
    background = rng.choice(names)
    img = Image.new("RGB", (width, height), COLOURS[background])
    draw = ImageDraw.Draw(img)
    parts = []
    for _ in range(rng.randint(1, 3)):
        colour = rng.choice([c for c in names if c != background])
        shape = rng.choice(SHAPES)
        _draw_shape(draw, shape, COLOURS[colour], width, height, rng)
        parts.append(f"a {colour} {shape}")
    return img, " and ".join(parts) + f" on a {background} background"


def make_procedural_dataset(
    directory: str | Path,
    n: int,
    seed: int = 0,
    sizes: tuple[tuple[int, int], ...] = SIZES,
    jpeg_every: int = 3,
    manifest_name: str = "manifest.tsv",
) -> ProceduralDataset:
    """Write n images under directory/images and directory/manifest_name; every jpeg_every-th is a JPEG.

    Sizes cycle through `sizes`, so every aspect ratio there appears about n / len(sizes) times.
    """
    root = Path(directory)
    (root / "images").mkdir(parents=True, exist_ok=True)
    paths, captions, out_sizes = [], [], []
    for i in range(n):
        width, height = sizes[i % len(sizes)]
        img, caption = make_image(width, height, seed * 1_000_003 + i)
        ext = "jpg" if jpeg_every and i % jpeg_every == jpeg_every - 1 else "png"
        rel = f"images/{i:05d}.{ext}"
        img.save(root / rel, quality=90) if ext == "jpg" else img.save(root / rel)
        paths.append(rel)
        captions.append(caption)
        out_sizes.append((width, height))
    manifest = root / manifest_name
    manifest.write_text("".join(f"{p}\t{c}\n" for p, c in zip(paths, captions)), encoding="utf-8")
    return ProceduralDataset(root, manifest, paths, captions, out_sizes)


# Bad rows for ManifestConfig(min_side=32, max_caption_chars=200): one line per kind, the reason each
# is skipped for. The two truncated images pass the header scan and fail only when decoded.
BAD_ROWS = (
    (b"images/00000.png no tab here", "malformed_line"),
    (b"\tcaption without a path", "malformed_line"),
    (b"images/00001.png\t\xff\xfe not utf-8", "non_utf8_caption"),
    (b"images/00002.png\t   ", "empty_caption"),
    (b"images/00003.png\t" + b"x" * 201, "overlong_caption"),
    (b"images/does_not_exist.png\ta missing file", "missing_file"),
    (b"bad/not_an_image.png\ttext pretending", "unreadable_image"),
    (b"bad/empty.jpg\tzero bytes", "unreadable_image"),
    (b"bad/tiny.png\ta tiny image", "tiny_image"),
    (b"bad/truncated.png\ta truncated png", "undecodable_image"),
    (b"bad/truncated.jpg\ta truncated jpeg", "undecodable_image"),
)
BAD_MIN_SIDE, BAD_MAX_CAPTION_CHARS = 32, 200


def _write_bad_files(root: Path) -> None:
    """Files behind the bad rows: a non-image, an empty file, a tiny image, truncated PNG and JPEG."""
    (root / "bad").mkdir()
    (root / "bad/not_an_image.png").write_text("this is text, not a PNG")
    (root / "bad/empty.jpg").write_bytes(b"")
    img, _ = make_image(24, 100, seed=7)  # shorter side 24 < min_side 32
    img.save(root / "bad/tiny.png")
    for ext in ("png", "jpg"):
        img, _ = make_image(120, 96, seed=11)
        img.save(root / f"bad/full.{ext}")
        data = (root / f"bad/full.{ext}").read_bytes()
        # Header intact, pixel data cut: passes the scan, fails to decode.
        (root / f"bad/truncated.{ext}").write_bytes(data[: len(data) // 2])


def make_bad_manifest(directory: str | Path, n_good: int = 12, seed: int = 1) -> tuple[ProceduralDataset, Path]:
    """A procedural data set of n_good (>= 4) images with every kind of bad row of BAD_ROWS interleaved;
    an extra column on good rows, CRLF on some lines and a blank line (ignored, not counted).
    Returns (the good data set, the manifest path directory/manifest.tsv)."""
    root = Path(directory)
    data = make_procedural_dataset(root, n_good, seed=seed)
    _write_bad_files(root)
    good = [f"{p}\t{c}\textra column ignored".encode() for p, c in zip(data.paths, data.captions)]
    lines = []
    for i, row in enumerate(good):
        lines.append(row + (b"\r\n" if i % 2 else b"\n"))
        if i < len(BAD_ROWS):
            lines.append(BAD_ROWS[i][0] + b"\n")
    lines += [row + b"\n" for row, _ in BAD_ROWS[len(good) :]]
    lines.insert(3, b"\n")
    (root / "manifest.tsv").write_bytes(b"".join(lines))
    return data, root / "manifest.tsv"
