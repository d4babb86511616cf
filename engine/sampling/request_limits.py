"""How much one pipeline call may ask for, checked before any work: a request past a limit is a ValueError naming
the argument, the limit and why it exists, not an out-of-memory kill or an hours-long run.

The defaults admit every ordinary use with room to spare: the 2b model at 1024² to 2048² (FLUX's autoencoder 8x
down, 2x2 patches: 4096 to 16384 tokens an image), 64 images of 1024² in one call, ShapesEval's batches of 96, and
step counts far past where Self-E's images stop changing. Someone who means more raises a limit (or lifts it: None)
on the pipeline: `SelfEPipeline.from_pretrained(..., limits=RequestLimits(max_steps=5000))` or
`pipe.limits = RequestLimits.none()`; `selfe generate --no-limits` does the latter. CFG's omega has a fixed
bound of its own (MAX_GUIDANCE, `guidance_problem`): past it a value is a typo, whatever the machine.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

# CFG's omega: EP-CFG rescales the guided velocity to ||V_c||, so a larger omega only turns it further towards
# V_c - V_u (the paper samples at 5); past this it is a typo, and near 3.4e38 it overflows float32. Not a limit
# of resources, so RequestLimits does not lift it.
MAX_GUIDANCE = 1000.0
HOW_TO_RAISE = "raise it (pipe.limits = RequestLimits(...); None lifts it) or, in selfe generate, pass --no-limits"


@dataclass(frozen=True)
class RequestLimits:
    """max_images: images in one call (prompts x num_images_per_prompt): they are one batch in memory.
    max_image_tokens: image tokens of one image, (height / m) x (width / m) with m the pipeline's size_multiple:
        attention's time and memory grow with their square (2b at 2048²: 16384; ShapesEval's model: 512²).
    max_call_tokens: image tokens of a whole call (images x tokens each): activations grow with them
        (64 images of 1024² or 16 of 2048² on the 2b).
    max_steps: denoising steps of one call: each is a full network pass (Self-E is made for 1 to 8).
    Each is an integer >= 1, or None for no limit."""

    max_images: int | None = 256
    max_image_tokens: int | None = 16384
    max_call_tokens: int | None = 262144
    max_steps: int | None = 1000

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"RequestLimits.{field.name} must be an integer >= 1 or None, got {value!r}")

    @classmethod
    def none(cls) -> RequestLimits:
        """No limits at all: every request runs, however large."""
        return cls(**{field.name: None for field in fields(cls)})

    def check_images(self, images: int, what: str) -> None:
        """`images` in one call, counted as `what` says (e.g. "2 prompts x 500 num_images_per_prompt")."""
        if self.max_images is not None and images > self.max_images:
            raise ValueError(
                f"{what} means {images} images in one call, over RequestLimits.max_images={self.max_images} "
                f"(one batch, held in memory at once): split the call, or {HOW_TO_RAISE}"
            )

    def check_steps(self, steps: int) -> None:
        if self.max_steps is not None and steps > self.max_steps:
            raise ValueError(
                f"steps={steps} is over RequestLimits.max_steps={self.max_steps} (each step is a full network "
                f"pass; Self-E's images stop changing long before): {HOW_TO_RAISE}"
            )

    def check_tokens(self, images: int, height: int, width: int, size_multiple: int) -> None:
        """height x width images (sides multiples of `size_multiple`, one token per size_multiple² pixels)."""
        tokens = (height // size_multiple) * (width // size_multiple)
        if self.max_image_tokens is not None and tokens > self.max_image_tokens:
            raise ValueError(
                f"height x width = {height} x {width} is {tokens} image tokens ({height // size_multiple} x "
                f"{width // size_multiple}, one per {size_multiple}x{size_multiple} pixels), over "
                f"RequestLimits.max_image_tokens={self.max_image_tokens} (attention's time and memory grow with "
                f"their square): ask for a smaller size, or {HOW_TO_RAISE}"
            )
        if self.max_call_tokens is not None and images * tokens > self.max_call_tokens:
            raise ValueError(
                f"{images} images of {height} x {width} are {images * tokens} image tokens in one call, over "
                f"RequestLimits.max_call_tokens={self.max_call_tokens} (activation memory grows with them): "
                f"split the call, or {HOW_TO_RAISE}"
            )


def checked_limits(value: object) -> RequestLimits:
    """`limits=` / `pipe.limits = ...` as a RequestLimits, or a TypeError naming `limits`."""
    if not isinstance(value, RequestLimits):
        raise TypeError(
            f"limits must be a RequestLimits (RequestLimits.none() lifts every limit), got {type(value).__name__}"
        )
    return value


def guidance_problem(value: object) -> str | None:
    """Why `value` is not a CFG omega (a finite number in [0, MAX_GUIDANCE]), as "must be ...", or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_GUIDANCE:  # NaN too
        return f"must be a finite number >= 0 and <= {MAX_GUIDANCE:g}"
    return None
