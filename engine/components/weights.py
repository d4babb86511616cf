"""Loading released .safetensors checkpoints into our modules, with every key and shape checked.

Generic on purpose: the autoencoder, the transformer and the text encoders all load through here.
The pattern (FLUX's): build the module on the meta device, read the file tensor by tensor (cast on
the way, so peak host memory is the result plus one tensor), check the names and shapes against
what the module expects, then `load_state_dict(assign=True)`. A materialised module is copied
into instead. Nothing here unpickles: only safetensors files are read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

# How many names per category an error message spells out before summarising the rest.
_MAX_NAMES_SHOWN = 30


class StateDictMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the module it is loaded into.

    Attributes hold the full lists; the message names them (the first few per category).
    """

    def __init__(self, mismatch: StateDictMismatch, source: str):
        self.missing = list(mismatch.missing)
        self.unexpected = list(mismatch.unexpected)
        self.shape_mismatched = dict(mismatch.shape_mismatched)
        self.dtype_mismatched = dict(mismatch.dtype_mismatched)
        super().__init__(mismatch.describe(source))


@dataclass
class StateDictMismatch:
    """Differences between a state dict and a module's expected tensors, key by key."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    # name -> (shape in the checkpoint, shape the module expects)
    shape_mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    # name -> (dtype in the checkpoint, dtype the module expects), where one is floating point and the
    # other is not (an int or bool tensor for a weight): no cast makes such a tensor the right one
    dtype_mismatched: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatched or self.dtype_mismatched)

    def describe(self, source: str) -> str:
        lines = [f"state dict from {source} does not match the module:"]

        def names(title: str, items: list[str]) -> None:
            if not items:
                return
            shown = items[:_MAX_NAMES_SHOWN]
            more = f" ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
            lines.append(f"  {title} ({len(items)}): {', '.join(shown)}{more}")

        names("missing from the checkpoint", self.missing)
        names("unexpected in the checkpoint", self.unexpected)
        names(
            "shape mismatched (checkpoint vs module)",
            [f"{k} {list(a)} vs {list(b)}" for k, (a, b) in self.shape_mismatched.items()],
        )
        names(
            "dtype mismatched, floating point vs not (checkpoint vs module)",
            [f"{k} {a} vs {b}" for k, (a, b) in self.dtype_mismatched.items()],
        )
        return "\n".join(lines)


def expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor `module.state_dict()` holds (parameters and persistent buffers).

    Works on a meta-device module: only shapes are read.
    """
    return {name: tuple(t.shape) for name, t in module.state_dict(keep_vars=True).items()}


def compare_shapes(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]
) -> StateDictMismatch:
    """Key-by-key comparison of found shapes (a checkpoint's) with expected ones (a module's)."""
    mismatch = StateDictMismatch()
    mismatch.missing = sorted(k for k in expected if k not in found)
    mismatch.unexpected = sorted(k for k in found if k not in expected)
    for name in sorted(expected.keys() & found.keys()):
        got = tuple(found[name])
        if got != tuple(expected[name]):
            mismatch.shape_mismatched[name] = (got, tuple(expected[name]))
    return mismatch


def check_state_dict(
    module: nn.Module, state_dict: Mapping[str, Tensor], source: str = "<state dict>"
) -> None:
    """Raise `StateDictMismatchError` naming every missing, unexpected and mis-shaped key."""
    mismatch = compare_shapes(expected_shapes(module), {k: tuple(v.shape) for k, v in state_dict.items()})
    mismatch.dtype_mismatched = compare_dtype_kinds(
        expected_floating(module), {k: (v.is_floating_point(), str(v.dtype)) for k, v in state_dict.items()}
    )
    if not mismatch.ok:
        raise StateDictMismatchError(mismatch, source)


def expected_floating(module: nn.Module) -> dict[str, tuple[bool, str]]:
    """Name -> (floating point?, dtype name) of every tensor `module.state_dict()` holds (meta modules too)."""
    return {name: (t.is_floating_point(), str(t.dtype)) for name, t in module.state_dict(keep_vars=True).items()}


def compare_dtype_kinds(
    expected: Mapping[str, tuple[bool, str]], found: Mapping[str, tuple[bool, str]]
) -> dict[str, tuple[str, str]]:
    """Names present in both whose tensors differ in kind (floating point or not): name -> (found, expected)."""
    return {
        name: (found[name][1], expected[name][1])
        for name in sorted(expected.keys() & found.keys())
        if found[name][0] != expected[name][0]
    }


def check_load_dtype(dtype: object) -> None:
    """`dtype=` of the loaders: None (keep the stored dtypes) or a floating-point torch.dtype."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be None or a floating-point torch.dtype, got {dtype!r}")


def _checked_device(device: object) -> torch.device:
    try:
        return torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"device={device!r} is not a torch device: {err}") from err


def load_safetensors(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    key_map: Callable[[str], str | None] | None = None,
) -> dict[str, Tensor]:
    """Read a .safetensors file into a dict of tensors, one tensor at a time.

    dtype: floating-point tensors are cast to it as they are read (integer ones are left alone);
        None keeps the stored dtype.
    key_map: optional renaming, `stored name -> our name`, or None to drop the tensor; for
        checkpoints whose layout differs from ours (the FLUX autoencoder needs none).
    """
    path = _checked_path(path)
    device = _checked_device(device)
    check_load_dtype(dtype)
    tensors: dict[str, Tensor] = {}
    try:
        # Read on the CPU and move each tensor ourselves: safe_open's device argument does not
        # accept every torch device spelling, and a per-tensor move keeps the peak at one tensor.
        with safe_open(path, framework="pt", device="cpu") as handle:
            for stored in handle.keys():
                name = key_map(stored) if key_map is not None else stored
                if name is None:
                    continue
                if name in tensors:
                    raise ValueError(f"{path}: key_map maps two stored tensors to the same name {name!r}")
                tensor = handle.get_tensor(stored)
                cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
                tensors[name] = tensor.to(device=device, dtype=cast)
    except SafetensorError as err:
        raise ValueError(f"cannot read {path} as safetensors: {err}") from err
    return tensors


def _checked_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"safetensors file not found: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"expected a .safetensors file, got a directory: {path}")
    return path


def _has_meta_tensors(module: nn.Module) -> bool:
    return any(t.is_meta for t in module.state_dict(keep_vars=True).values())


def load_state_dict_into(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    source: str = "<state dict>",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load a complete, checked state dict into `module` and return it.

    A module with tensors on the meta device takes the given tensors as they are
    (`assign=True`: their device and dtype become the module's, so pass them already where they
    belong; `dtype` casts floating-point ones first). A materialised module is copied into: its
    own devices and dtypes win. Raises `StateDictMismatchError` before touching the module if any
    key is missing, unexpected or mis-shaped.
    """
    check_load_dtype(dtype)
    check_state_dict(module, state_dict, source)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    if _has_meta_tensors(module):
        module.load_state_dict(state_dict, strict=True, assign=True)
        leftover = [name for name, t in _named_tensors(module) if t.is_meta]
        if leftover:
            # Non-persistent buffers are not in a state dict, so assign=True cannot fill them.
            raise RuntimeError(
                f"after loading {source}, tensors still on the meta device (non-persistent buffers "
                f"must be initialised by the module itself): {', '.join(leftover)}"
            )
    else:
        with torch.no_grad():
            module.load_state_dict(state_dict, strict=True)
    return module


def _named_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    return list(module.named_parameters()) + list(module.named_buffers())


def safetensors_shapes(
    path: str | os.PathLike, key_map: Callable[[str], str | None] | None = None
) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a .safetensors file, read from its header only (no data)."""
    return {name: shape for name, (shape, _) in _safetensors_header(path, key_map).items()}


def _safetensors_header(
    path: str | os.PathLike, key_map: Callable[[str], str | None] | None = None
) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, safetensors dtype name such as "F32", "BF16", "I64") from the header only."""
    path = _checked_path(path)
    header: dict[str, tuple[tuple[int, ...], str]] = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            for stored in handle.keys():
                name = key_map(stored) if key_map is not None else stored
                if name is not None:
                    tensor_slice = handle.get_slice(stored)
                    header[name] = (tuple(tensor_slice.get_shape()), str(tensor_slice.get_dtype()))
    except SafetensorError as err:
        raise ValueError(f"cannot read {path} as safetensors: {err}") from err
    return header


def _is_floating_name(name: str) -> bool:
    """Whether a safetensors dtype name ("F32", "BF16", "F8_E4M3", "I8", "BOOL", ...) is floating point."""
    return name.startswith(("F", "BF"))


def check_safetensors_file(
    module: nn.Module, path: str | os.PathLike, key_map: Callable[[str], str | None] | None = None
) -> None:
    """Check a file's names, shapes and dtype kinds against `module` (a meta-device one will do) from the
    header alone; raise `StateDictMismatchError` naming every mismatch. No tensor data is read."""
    header = _safetensors_header(path, key_map)
    mismatch = compare_shapes(expected_shapes(module), {name: shape for name, (shape, _) in header.items()})
    mismatch.dtype_mismatched = compare_dtype_kinds(
        expected_floating(module), {name: (_is_floating_name(kind), kind) for name, (_, kind) in header.items()}
    )
    if not mismatch.ok:
        raise StateDictMismatchError(mismatch, os.fspath(path))


def load_safetensors_into(
    module: nn.Module,
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    key_map: Callable[[str], str | None] | None = None,
) -> nn.Module:
    """Check a file's header against `module`, then load it: the one call a model loader needs.

    The names, shapes and dtype kinds (an integer tensor for a floating-point weight) are checked
    before any tensor data is read, so a wrong file fails fast with every mismatch named. dtype: None
    or a floating-point torch.dtype (floating tensors are cast to it).
    """
    source = os.fspath(path)
    _checked_device(device)
    check_load_dtype(dtype)
    check_safetensors_file(module, path, key_map)
    state_dict = load_safetensors(path, device=device, dtype=dtype, key_map=key_map)
    return load_state_dict_into(module, state_dict, source=source)
