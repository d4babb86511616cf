"""ShapesEval: a synthetic compositional text-to-image benchmark (a mini-GenEval) and its shipped model.

scene: prompts and the images that match them; scorer: GenEval-style judging of generated images;
data: the TSV manifest + images + cache a run trains on; evaluate / cli: `selfe eval shapes`.
"""

from __future__ import annotations

from pathlib import Path

# Space-to-depth factor of ShapesEval's pixel autoencoder: a token is a 4x4 RGB patch, 48 values, 64 tokens
# at 32^2. (8x8 patches, 192 values, are more than a width-128 network can carry: with velocity targets its
# samples kept the noise.)
PIXEL_FACTOR = 4

# Latent channels of the tiny trained autoencoder (`selfe data shapes --autoencoder trained`): 8x8x8 latents,
# 512 values per scene against the pixels' 3072, at the same 64 tokens.
SHAPES_AE_CHANNELS = 8

# The Self-E ShapesEval model shipped with the package (EMA weights, config, its two tiny text encoders).
SHIPPED_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "shapes-selfe"


def shipped_model_dir() -> Path | None:
    """The shipped model's pipeline directory, or None when this install lacks it."""
    return SHIPPED_MODEL_DIR if (SHIPPED_MODEL_DIR / "model.safetensors").is_file() else None
