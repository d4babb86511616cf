"""ShapesEval: a synthetic compositional text-to-image benchmark (a mini-GenEval) and its shipped model.

All of it here: scene (prompts and the images that match them), scorer (GenEval-style judging), text (its tiny
text encoders), data (`selfe data shapes`: manifest, images, cache), autoencoder (its tiny trained autoencoder)
and evaluate (`selfe eval shapes`). It sits above the trainer, whose cache and data code it uses; its training
presets and their two constants live with the other presets in selfe.train.config.
"""

from __future__ import annotations

from pathlib import Path

# The Self-E ShapesEval model shipped with the package (EMA weights, config, its two tiny text encoders).
SHIPPED_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "shapes-selfe"


def shipped_model_dir() -> Path | None:
    """The shipped model's pipeline directory, or None when this install lacks it."""
    return SHIPPED_MODEL_DIR if (SHIPPED_MODEL_DIR / "model.safetensors").is_file() else None
