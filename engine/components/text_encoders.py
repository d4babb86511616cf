"""Text encoders: T5 token states (the text stream) and the pooled CLIP text vector (into `vec`).

Both load from LOCAL Hugging Face snapshot directories (config.json, *.safetensors, tokenizer files)
with `local_files_only=True`; a path that is not a local directory is an error, never a hub id. For
a FLUX-style snapshot pass the sub-folders: `text_encoder_2` + `tokenizer_2` (T5), `text_encoder` +
`tokenizer` (CLIP). transformers is imported inside the loaders only, so `import selfe` stays light.

Outputs of `TextEncoders.encode(prompts)`, B prompts:
    txt:      (B, Lt, d_t5)  T5 last hidden states, zero at padding positions
    txt_mask: (B, Lt) bool   True on real tokens (EOS included), False on padding
    pooled:   (B, d_clip)    CLIP pooled output (final-norm state at the first EOS)
Lt is `t5_max_length` (static shapes, default) or the longest prompt of the batch.

Everything runs under torch.no_grad, not inference_mode: the outputs feed layers that train, and an
inference tensor cannot be saved for backward.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from selfe.components.encoding_cache import PromptEncodingCache

CONDITION_KEYS = ("txt", "txt_mask", "pooled")
# Distinct negative prompts whose encodings a TextEncoders keeps (a server usually has one or two).
NEGATIVE_CACHE_SIZE = 8

# Any one group of files is enough for the tokenizer of that family.
T5_TOKENIZER_FILES = (("tokenizer.json",), ("spiece.model",))
CLIP_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))

DTYPE_NAMES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


class PromptEncoder(Protocol):
    """What the conditioner needs: prompts in, {"txt", "txt_mask", "pooled"} out (shapes above)."""

    def encode(self, prompts: Sequence[str]) -> dict[str, Tensor]: ...


# ----------------------------------------------------------------------------------------------
# Devices, dtypes, snapshot checks


def resolve_device(device: torch.device | str | None) -> torch.device:
    """The given device, else CUDA when present, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    """The given dtype (a torch.dtype or a name such as "bf16"), else bf16 on GPU and fp32 on CPU."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, str):
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)} or a torch.dtype, got {dtype!r}")
        return DTYPE_NAMES[dtype]
    if dtype not in DTYPE_NAMES.values():
        raise ValueError(f"text encoders run in bfloat16, float16 or float32, got {dtype}")
    return dtype


# config.json model_type prefixes of each encoder (T5EncoderModel also loads UMT5/mT5 snapshots).
T5_MODEL_TYPES = ("t5", "umt5", "mt5")
CLIP_MODEL_TYPES = ("clip",)


def snapshot_model_type(folder: str | Path) -> str:
    """config.json's model_type; "" without a readable config.json. One that is there but broken is a
    ValueError naming it."""
    path = Path(folder) / "config.json"
    try:
        text = path.read_text()
    except OSError:
        return ""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return str(data.get("model_type", ""))


def check_model_dir(path: str | Path, what: str, model_types: tuple[str, ...] = ()) -> Path:
    """A local snapshot folder with config.json and safetensors weights (whose model_type, where it says
    one, starts with one of `model_types`: a CLIP folder passed as T5 fails here, not inside encode)."""
    expected = "a local directory with config.json and *.safetensors weights"
    path = Path(path).expanduser()
    if not path.is_dir():
        hint = " (hub ids are not fetched: download the snapshot and pass its folder)" if not path.exists() else ""
        raise FileNotFoundError(f"{what} snapshot {str(path)!r} is not a directory{hint}; expected {expected}")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors weights (.bin checkpoints are not loaded)")
    if missing:
        raise FileNotFoundError(f"{what} snapshot {str(path)!r} lacks {', '.join(missing)}; expected {expected}")
    kind = snapshot_model_type(path)
    if kind and model_types and not kind.startswith(model_types):
        raise ValueError(f"{what} snapshot {str(path)!r} holds a {kind!r} model (config.json model_type)")
    return path


def check_tokenizer_dir(path: str | Path, what: str, alternatives: tuple[tuple[str, ...], ...]) -> Path:
    """A local folder holding one complete group of tokenizer files, or a clear error."""
    options = " or ".join(" + ".join(group) for group in alternatives)
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{what} tokenizer folder {str(path)!r} is not a directory; expected {options}")
    if not any(all((path / name).is_file() for name in group) for group in alternatives):
        raise FileNotFoundError(f"{what} tokenizer folder {str(path)!r} lacks tokenizer files; expected {options}")
    return path


# Loggers that speak when transformers' loading code first imports an optional package it found installed
# (torchao, from the `fp8`/`dev` extras): its native libraries built for another Python or CUDA fail to load
# and its enums hit a torch deprecation, none of which concerns a text encoder. Their own imports elsewhere
# (selfe.components.fp8) are not quieted.
_INCIDENTAL_IMPORT_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' progress bars ("Loading weights", "Writing model shards") off and the incidental import
    warnings above held back, for one load or save; both restored after, so an embedding application keeps
    its own settings. Also a decorator."""
    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger(name) for name in _INCIDENTAL_IMPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    bar_was_on = hf_logging.is_progress_bar_enabled()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if bar_was_on:
            hf_logging.enable_progress_bar()


def _from_pretrained(class_name: str, path: Path, what: str, **kwargs: Any) -> Any:
    """transformers.<class_name>.from_pretrained on a checked local folder; never touches a hub. The class
    is looked up inside the quiet block: that lookup is what imports transformers' modelling code."""
    import transformers
    from safetensors import SafetensorError

    try:
        with quiet_transformers():
            return getattr(transformers, class_name).from_pretrained(str(path), local_files_only=True, **kwargs)
    except (OSError, ValueError, SafetensorError) as err:  # SafetensorError: a truncated or corrupt weight file
        raise OSError(f"could not load the {what} from {str(path)!r}: {err}") from err


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    # transformers 4.56 renamed `torch_dtype` to `dtype`; older releases only know the old name.
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _load_model(class_name: str, path: Path, what: str, device: torch.device, dtype: torch.dtype) -> Any:
    model = _from_pretrained(class_name, path, what, use_safetensors=True, **_dtype_kwarg(dtype))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# The two encoders


class T5TextEncoder:
    """T5 encoder token states with an attention mask.

    `attention_mask=True` [ours] passes the mask into T5, so the states of real tokens do not depend
    on how much padding follows, and zeroes the padded states; FLUX passes no mask (set False for that).
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_length: int = 512, attention_mask: bool = True):
        if max_length < 1:
            raise ValueError(f"T5 max_length must be >= 1, got {max_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.attention_mask = attention_mask
        # The model compiled per shape (selfe.utils.compiling.CompiledPerShape), set by the pipeline's fast path.
        self.compiled_model: Callable[..., Any] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def width(self) -> int:
        return int(self.model.config.d_model)

    @torch.no_grad()
    def encode(
        self, prompts: Sequence[str], *, length: int | None = None, bucket: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Token states (B, L, d) and mask (B, L) bool.

        L = `length` when given (pad or truncate to exactly it), else the longest prompt (at most
        max_length), padded up to its text bucket when `bucket` is given (`text_bucket_length`). The EOS
        token survives truncation.
        """
        prompts = check_prompts(prompts)
        if length is not None and not 1 <= length <= self.max_length:
            raise ValueError(f"T5 length must be in [1, {self.max_length}], got {length}")
        if length is not None and bucket is not None:
            raise ValueError("pass a T5 length or a bucket, not both")
        tokens = self.tokenizer(
            prompts,
            padding="max_length" if length is not None else "longest",
            max_length=length or self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        if bucket is not None:
            extra = text_bucket_length(ids.shape[1], bucket, self.max_length) - ids.shape[1]
            ids = torch.nn.functional.pad(ids, (0, extra), value=self.tokenizer.pad_token_id)
            mask = torch.nn.functional.pad(mask, (0, extra), value=0)
        ids = ids.to(self.device)
        mask = mask.to(self.device).bool()
        model = self.model if self.compiled_model is None else self.compiled_model
        states = model(input_ids=ids, attention_mask=mask.long() if self.attention_mask else None)
        states = states.last_hidden_state
        if self.attention_mask:
            states = states.masked_fill(~mask[..., None], 0.0)
        return states, mask


class CLIPTextEncoder:
    """The pooled CLIP text output. Always padded to max_length: CLIP's causal attention makes the
    pooled (first-EOS) state independent of the padding, and a fixed shape keeps one compiled graph."""

    def __init__(self, model: Any, tokenizer: Any, *, max_length: int = 77):
        limit = int(model.config.max_position_embeddings)
        if not 2 <= max_length <= limit:
            raise ValueError(f"CLIP max_length must be in [2, {limit}] (the model's positions), got {max_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.compiled_model: Callable[..., Any] | None = None  # as T5TextEncoder's

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Tensor:
        """Pooled output (B, d_clip)."""
        prompts = check_prompts(prompts)
        tokens = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        model = self.model if self.compiled_model is None else self.compiled_model
        return model(input_ids=tokens["input_ids"].to(self.device)).pooler_output


def load_t5_encoder(
    path: str | Path,
    *,
    tokenizer_path: str | Path | None = None,
    max_length: int = 512,
    attention_mask: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> T5TextEncoder:
    """A T5 encoder (`T5EncoderModel`) and its tokenizer from local folders (tokenizer: path if not given)."""
    model_dir = check_model_dir(path, "T5 encoder", T5_MODEL_TYPES)
    tok_dir = check_tokenizer_dir(tokenizer_path or model_dir, "T5", T5_TOKENIZER_FILES)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    tokenizer = _from_pretrained("T5TokenizerFast", tok_dir, "T5 tokenizer")
    model = _load_model("T5EncoderModel", model_dir, "T5 encoder", device, dtype)
    return T5TextEncoder(model, tokenizer, max_length=max_length, attention_mask=attention_mask)


def load_clip_encoder(
    path: str | Path,
    *,
    tokenizer_path: str | Path | None = None,
    max_length: int = 77,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> CLIPTextEncoder:
    """A CLIP text model (`CLIPTextModel`; a full CLIPModel snapshot works too) and its tokenizer."""
    model_dir = check_model_dir(path, "CLIP text", CLIP_MODEL_TYPES)
    tok_dir = check_tokenizer_dir(tokenizer_path or model_dir, "CLIP", CLIP_TOKENIZER_FILES)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    tokenizer = _from_pretrained("CLIPTokenizerFast", tok_dir, "CLIP tokenizer")
    model = _load_model("CLIPTextModel", model_dir, "CLIP text model", device, dtype)
    return CLIPTextEncoder(model, tokenizer, max_length=max_length)


# ----------------------------------------------------------------------------------------------
# Both together, and the null prompt


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """A non-empty list of strings, or an error naming the bad entry."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError('prompts is empty; pass at least one string ("" is the null prompt)')
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{i}] must be a string, got {type(prompt).__name__}")
    return list(prompts)


def expand_condition(cond: dict[str, Tensor], batch: int) -> dict[str, Tensor]:
    """A batch-1 condition broadcast to `batch` rows (views: no copy; do not write into them)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return {key: value.expand(batch, *value.shape[1:]) for key, value in cond.items()}


def fit_condition_length(cond: dict[str, Tensor], length: int) -> dict[str, Tensor]:
    """Pad (zero states, False mask) or cut the token axis of a condition to `length`.

    Exact only for an encoder whose real-token states do not depend on the padding, which holds for
    `T5TextEncoder(attention_mask=True)`; cutting real tokens is an error.
    """
    txt, mask = cond["txt"], cond["txt_mask"]
    current = txt.shape[1]
    if length < current:
        if mask[:, length:].any():
            raise ValueError(f"cannot cut the condition to {length} tokens: it has real tokens beyond that")
        txt, mask = txt[:, :length], mask[:, :length]
    elif length > current:
        extra = length - current
        txt = torch.cat([txt, txt.new_zeros(txt.shape[0], extra, *txt.shape[2:])], dim=1)
        mask = torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1)
    return {**cond, "txt": txt, "txt_mask": mask}


def text_bucket_length(tokens: int, bucket: int, full: int) -> int:
    """The smallest of bucket, 2 * bucket, 4 * bucket, ... that holds `tokens`, at most `full`."""
    length = bucket
    while length < tokens:
        length *= 2
    return min(length, full)


def fit_to_text_bucket(
    conds: Sequence[dict[str, Tensor] | None], bucket: int | None, text_tokens: int | None = None
) -> list[dict[str, Tensor] | None]:
    """The conditions (None entries kept) fitted to one token length: the text bucket of their longest real
    text, or of `text_tokens` real tokens when given (`selfe.sampling.fast_path.FastPathConfig.text_bucket`,
    `data.text_bucket`). Each is cut or padded (`fit_condition_length`). Exact for the MMDiT, which masks
    padded text out as attention keys; without a bucket or a mask, unchanged."""
    present = [c for c in conds if c is not None]
    if bucket is None or any(c.get("txt_mask") is None for c in present):
        return list(conds)
    full = max(c["txt"].shape[1] for c in present)
    if text_tokens is None:  # one host sync where the masks live on the GPU
        text_tokens = max(int(c["txt_mask"].sum(dim=1).max()) for c in present)
    elif text_tokens > full:
        raise ValueError(f"text_tokens must be at most the text encoder's padded length {full}, got {text_tokens}")
    length = text_bucket_length(max(text_tokens, 1), bucket, full)
    return [c if c is None or c["txt"].shape[1] == length else fit_condition_length(c, length) for c in conds]


class NullConditionCache:
    """The null condition (the encoding of "") for any PromptEncoder: encoded once, then fitted to
    the requested token length and expanded to the batch."""

    def __init__(self, encoder: PromptEncoder):
        self.encoder = encoder
        self._encoded: dict[str, Tensor] | None = None
        self._fitted: dict[int, dict[str, Tensor]] = {}  # token length -> batch-1 condition

    def __call__(self, batch: int, length: int | None = None) -> dict[str, Tensor]:
        if self._encoded is None:
            self._encoded = self.encoder.encode([""])
        if length is None:
            return expand_condition(self._encoded, batch)
        if length not in self._fitted:
            self._fitted[length] = fit_condition_length(self._encoded, length)
        return expand_condition(self._fitted[length], batch)


class TextEncoders:
    """T5 + CLIP behind one `encode(prompts) -> {"txt", "txt_mask", "pooled"}` (a PromptEncoder).

    prompt_cache_size: how many recent prompts' encodings `encode` keeps (0: none, the default; see
    `selfe.components.encoding_cache`). Negative prompts (`encode_negative`) and the null prompt
    (`null_condition`) are always kept: a few distinct ones serve every call."""

    def __init__(
        self, t5: T5TextEncoder, clip: CLIPTextEncoder, *, pad_to_max_length: bool = True, prompt_cache_size: int = 0
    ):
        self.t5 = t5
        self.clip = clip
        self.pad_to_max_length = pad_to_max_length
        # padded length -> the encoding of "" at that length, batch 1
        self._null: dict[int, dict[str, Tensor]] = {}
        self.prompt_cache = PromptEncodingCache(prompt_cache_size)
        self.negative_cache = PromptEncodingCache(NEGATIVE_CACHE_SIZE)

    @classmethod
    def from_snapshots(
        cls,
        t5_path: str | Path,
        clip_path: str | Path,
        *,
        t5_tokenizer_path: str | Path | None = None,
        clip_tokenizer_path: str | Path | None = None,
        t5_max_length: int = 512,
        clip_max_length: int = 77,
        pad_to_max_length: bool = True,
        t5_attention_mask: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        prompt_cache_size: int = 0,
    ) -> TextEncoders:
        """Both encoders from local snapshot folders, on one device and dtype."""
        t5 = load_t5_encoder(
            t5_path,
            tokenizer_path=t5_tokenizer_path,
            max_length=t5_max_length,
            attention_mask=t5_attention_mask,
            device=device,
            dtype=dtype,
        )
        clip = load_clip_encoder(
            clip_path,
            tokenizer_path=clip_tokenizer_path,
            max_length=clip_max_length,
            device=device,
            dtype=dtype,
        )
        return cls(t5, clip, pad_to_max_length=pad_to_max_length, prompt_cache_size=prompt_cache_size)

    def encode(
        self, prompts: Sequence[str], *, length: int | None = None, bucket: int | None = None
    ) -> dict[str, Tensor]:
        """{"txt": (B, Lt, d_t5), "txt_mask": (B, Lt) bool, "pooled": (B, d_clip)}.

        Lt = `length` if given; else, with a `bucket`, the text bucket of the longest prompt
        (`text_bucket_length`: T5 then runs on those tokens only, exact when T5 takes the attention mask;
        without it the real tokens' states depend on the padding, so T5 runs at max_length and the bucket
        is left to `fit_to_text_bucket`); else t5 max_length (pad_to_max_length) or the longest prompt.
        Prompts held by `prompt_cache` are not encoded again.
        """
        return self._encode_through(self.prompt_cache, prompts, length, bucket)

    def encode_negative(
        self, prompts: Sequence[str], *, length: int | None = None, bucket: int | None = None
    ) -> dict[str, Tensor]:
        """As `encode`, for negative prompts: their encodings are kept (NEGATIVE_CACHE_SIZE distinct
        prompts), so a server's fixed negative prompt runs through T5 once."""
        return self._encode_through(self.negative_cache, prompts, length, bucket)

    def _encode_through(
        self, cache: PromptEncodingCache, prompts: Sequence[str], length: int | None, bucket: int | None
    ) -> dict[str, Tensor]:
        prompts = check_prompts(prompts)
        if length is not None or not self.t5.attention_mask:
            bucket = None
        if length is None and bucket is None and self.pad_to_max_length:
            length = self.t5.max_length
        if cache.capacity == 0 or (length is None and not self.t5.attention_mask):
            # Nothing kept, or rows whose states depend on the batch's padding (T5 without its mask, unpadded).
            return self._encode_now(prompts, length, bucket)
        full = self.t5.max_length

        def row_length(tokens: int) -> int:  # a prompt's own length: what encoding it alone would give
            if length is not None:
                return length
            tokens = max(tokens, 1)
            return min(tokens, full) if bucket is None else text_bucket_length(tokens, bucket, full)

        t5_weight, clip_weight = next(self.t5.model.parameters()), next(self.clip.model.parameters())
        setting = (length, bucket, t5_weight.dtype, t5_weight.device, clip_weight.dtype, clip_weight.device)
        return cache.encode(
            prompts, lambda missing: self._encode_now(missing, length, bucket), setting=setting, row_length=row_length
        )

    def _encode_now(self, prompts: list[str], length: int | None, bucket: int | None) -> dict[str, Tensor]:
        txt, txt_mask = self.t5.encode(prompts, length=length, bucket=bucket)
        return {"txt": txt, "txt_mask": txt_mask, "pooled": self.clip.encode(prompts)}

    def to(self, device: torch.device | str) -> TextEncoders:
        """Both encoders on `device` (their dtype kept); the cached encodings are made anew there."""
        self.t5.model.to(device)
        self.clip.model.to(device)
        self._null.clear()
        self.prompt_cache.clear()
        self.negative_cache.clear()
        return self

    def null_condition(self, batch: int, length: int | None = None) -> dict[str, Tensor]:
        """The encoding of "" expanded to `batch` rows, padded to `length` tokens (default: the length
        `encode` pads to under pad_to_max_length). Encoded once per length, then served from the cache."""
        if length is None:
            length = self.t5.max_length if self.pad_to_max_length else 1
        if length not in self._null:
            self._null[length] = self.encode([""], length=length)
        return expand_condition(self._null[length], batch)
