"""T5 + CLIP text encoders loaded from tiny random local snapshots (built offline in tests/helpers_text)."""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from selfe.components.text_encoders import (
    T5TextEncoder,
    TextEncoders,
    check_model_dir,
    fit_condition_length,
    load_clip_encoder,
    load_t5_encoder,
    resolve_dtype,
    text_bucket_length,
)

pytestmark = pytest.mark.usefixtures("no_network")  # the whole module offline, no unpickling
L = 64
PROMPTS = ["a photo of a cat", "", "a red dog on the table, photo of the dog", "zebra!"]


@pytest.fixture(scope="module")
def encoders(snapshots: tuple[Path, Path]) -> TextEncoders:
    # 64 tokens instead of the default 512 keeps the tests fast; test_default_lengths covers 512.
    return TextEncoders.from_snapshots(*snapshots, t5_max_length=L)


def token_counts(encoders: TextEncoders, prompts: list[str]) -> list[int]:
    return [len(ids) for ids in encoders.t5.tokenizer(prompts)["input_ids"]]


def test_shapes_dtypes_and_mask(encoders: TextEncoders) -> None:
    out = encoders.encode(PROMPTS)
    assert set(out) == {"txt", "txt_mask", "pooled"}
    assert out["txt"].shape == (4, L, 32) and out["txt"].dtype == torch.float32
    assert out["txt_mask"].shape == (4, L) and out["txt_mask"].dtype == torch.bool
    assert out["pooled"].shape == (4, 32) and out["pooled"].dtype == torch.float32
    counts = token_counts(encoders, PROMPTS)
    assert counts[1] == 1  # "" is the EOS token alone
    positions = torch.arange(L)
    for row, count in enumerate(counts):
        assert torch.equal(out["txt_mask"][row], positions < count)  # real tokens first, then padding
        assert out["txt"][row, count:].abs().max() == 0  # padded states zeroed
        assert out["txt"][row, :count].abs().sum(dim=-1).gt(0).all()
    assert torch.isfinite(out["txt"]).all() and torch.isfinite(out["pooled"]).all()


def test_matches_transformers_directly(encoders: TextEncoders) -> None:
    out = encoders.encode(PROMPTS)
    tokens = encoders.t5.tokenizer(PROMPTS, padding="longest", return_tensors="pt")
    with torch.no_grad():
        ref = encoders.t5.model(**tokens).last_hidden_state
        clip_ids = encoders.clip.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")
        hidden = encoders.clip.model(input_ids=clip_ids["input_ids"]).last_hidden_state
    mask = tokens["attention_mask"].bool()
    length = mask.shape[1]
    torch.testing.assert_close(out["txt"][:, :length][mask], ref[mask])
    # The pooled vector is the final state at the first EOS (pad is EOS in CLIP: the first one counts).
    first_eos = (clip_ids["input_ids"] == encoders.clip.tokenizer.eos_token_id).int().argmax(dim=1)
    torch.testing.assert_close(out["pooled"], hidden[torch.arange(len(PROMPTS)), first_eos])


def test_deterministic_and_batch_independent(encoders: TextEncoders) -> None:
    first, second = encoders.encode(PROMPTS), encoders.encode(PROMPTS)
    alone = encoders.encode(PROMPTS[2:3])
    for key in first:
        assert torch.equal(first[key], second[key])
        torch.testing.assert_close(alone[key][0], first[key][2])


def test_pad_to_longest_equals_max_cut(encoders: TextEncoders) -> None:
    longest = TextEncoders(encoders.t5, encoders.clip, pad_to_max_length=False)
    short, full = longest.encode(PROMPTS), encoders.encode(PROMPTS)
    length = max(token_counts(encoders, PROMPTS))
    assert short["txt"].shape == (4, length, 32)
    torch.testing.assert_close(short["txt"], full["txt"][:, :length])
    assert torch.equal(short["txt_mask"], full["txt_mask"][:, :length])
    torch.testing.assert_close(short["pooled"], full["pooled"])
    # Cut or padded back, a condition is the same (the mask keeps padding out of T5).
    torch.testing.assert_close(fit_condition_length(short, L)["txt"], full["txt"])
    with pytest.raises(ValueError, match="real tokens"):
        fit_condition_length(short, length - 1)


def test_a_bucket_runs_t5_on_the_bucket_and_equals_max_cut(encoders: TextEncoders) -> None:
    longest = max(token_counts(encoders, PROMPTS))
    bucketed, full = encoders.encode(PROMPTS, bucket=4), encoders.encode(PROMPTS)
    length = text_bucket_length(longest, 4, L)
    assert longest < length < L and bucketed["txt"].shape == (4, length, 32)
    torch.testing.assert_close(bucketed["txt"], full["txt"][:, :length])
    assert torch.equal(bucketed["txt_mask"], full["txt_mask"][:, :length])
    # Without its mask T5's real states depend on the padding: it runs at max_length, the bucket ignored.
    unmasked = TextEncoders(
        T5TextEncoder(encoders.t5.model, encoders.t5.tokenizer, max_length=L, attention_mask=False), encoders.clip
    )
    assert unmasked.encode(PROMPTS, bucket=4)["txt"].shape == (4, L, 32)
    with pytest.raises(ValueError, match="not both"):
        encoders.t5.encode(PROMPTS, length=8, bucket=4)


def test_text_buckets_double_up_to_the_full_length() -> None:
    assert [text_bucket_length(n, 64, 512) for n in (1, 64, 65, 200, 257, 512)] == [64, 64, 128, 256, 512, 512]
    assert text_bucket_length(9, 64, 16) == 16  # never past the encoder's length


def test_truncation_keeps_eos(snapshots: tuple[Path, Path]) -> None:
    t5 = load_t5_encoder(snapshots[0], max_length=4)
    states, mask = t5.encode(["a photo of a red cat on the table"])
    assert states.shape == (1, 4, 32) and mask.all()
    tokens = t5.tokenizer(["a photo of a red cat"], max_length=4, truncation=True)["input_ids"][0]
    assert tokens[-1] == t5.tokenizer.eos_token_id
    with pytest.raises(ValueError, match="length must be in"):
        t5.encode(["a"], length=5)


def test_null_condition_encoded_once(encoders: TextEncoders, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = TextEncoders(encoders.t5, encoders.clip)  # an empty cache
    calls: list[list[str]] = []
    real_encode = fresh.t5.encode
    monkeypatch.setattr(
        fresh.t5, "encode", lambda prompts, **kw: calls.append(list(prompts)) or real_encode(prompts, **kw)
    )
    null4, null2 = fresh.null_condition(4), fresh.null_condition(2)
    assert calls == [[""]]
    assert null4["txt"].shape == (4, L, 32) and null2["pooled"].shape == (2, 32)
    assert null4["txt_mask"].sum(dim=1).tolist() == [1, 1, 1, 1]
    direct = fresh.encode(["", "a cat"])
    for key in direct:  # same padded length as a conditional batch, so rows mix with torch.where
        assert null4[key].shape[1:] == direct[key].shape[1:]
        torch.testing.assert_close(null2[key][1], direct[key][0])
    # Padded to the longest prompt, the null is cached per length.
    longest = TextEncoders(encoders.t5, encoders.clip, pad_to_max_length=False)
    calls.clear()
    a, b, c = longest.null_condition(3, 7), longest.null_condition(2, 7), longest.null_condition(1, 9)
    assert len(calls) == 2 and a["txt"].shape == (3, 7, 32) and c["txt"].shape == (1, 9, 32)
    assert torch.equal(a["txt"][0], b["txt"][1])


def test_outputs_can_feed_training(encoders: TextEncoders) -> None:
    out = encoders.encode(PROMPTS[:2])
    assert not out["txt"].requires_grad and not out["txt"].is_inference()
    proj = torch.nn.Linear(32, 8)
    (proj(out["txt"]).sum() + proj(out["pooled"]).sum()).backward()  # an inference tensor would raise here
    assert proj.weight.grad is not None


def test_dtype_argument(snapshots: tuple[Path, Path]) -> None:
    enc = TextEncoders.from_snapshots(*snapshots, dtype="bf16", t5_max_length=16, device="cpu")
    out = enc.encode(PROMPTS[:2])
    assert out["txt"].dtype == torch.bfloat16 and out["pooled"].dtype == torch.bfloat16
    assert out["txt"].shape == (2, 16, 32)
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("half-ish", torch.device("cpu"))
    with pytest.raises(ValueError, match="int64"):
        resolve_dtype(torch.int64, torch.device("cpu"))


def test_clip_length_limited_by_positions(snapshots: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match="CLIP max_length must be in"):
        load_clip_encoder(snapshots[1], max_length=78)


def test_missing_snapshot_errors(snapshots: tuple[Path, Path], tmp_path: Path) -> None:
    t5_dir, clip_dir = snapshots
    with pytest.raises(FileNotFoundError, match="nowhere.*config.json"):
        load_t5_encoder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="hub ids are not fetched"):
        load_t5_encoder("google/t5-v1_1-xxl")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"lacks config\.json, \*\.safetensors"):
        load_clip_encoder(empty)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(t5_dir / "config.json", no_weights / "config.json")
    with pytest.raises(FileNotFoundError, match="no_weights.*safetensors"):
        check_model_dir(no_weights, "T5 encoder")
    # Weights but no tokenizer: the error names the files a tokenizer needs.
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(clip_dir / name, no_tok / name)
    with pytest.raises(FileNotFoundError, match=r"no_tok.*vocab\.json \+ merges\.txt"):
        load_clip_encoder(no_tok)
    # A separate tokenizer folder (the FLUX layout: text_encoder_2 + tokenizer_2) works.
    clip = load_clip_encoder(no_tok, tokenizer_path=clip_dir)
    assert clip.encode(["a cat"]).shape == (1, 32)
    with pytest.raises(FileNotFoundError, match="T5 tokenizer folder"):
        load_t5_encoder(t5_dir, tokenizer_path=tmp_path / "missing_tok")


def test_default_lengths(snapshots: tuple[Path, Path]) -> None:
    enc = TextEncoders.from_snapshots(*snapshots)
    assert (enc.t5.max_length, enc.clip.max_length, enc.pad_to_max_length) == (512, 77, True)
    out = enc.encode(["a cat"])
    assert out["txt"].shape == (1, 512, 32) and out["txt_mask"].sum() == 3
    assert enc.null_condition(2)["txt"].shape == (2, 512, 32)


@pytest.mark.parametrize("module", ["selfe.components.text_encoders", "selfe.method.conditioning"])
def test_transformers_imported_lazily(module: str) -> None:
    """No module-level import of transformers or tokenizers, so `import selfe` stays light."""
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
    assert top_level.isdisjoint({"transformers", "tokenizers", "huggingface_hub"}), top_level


def test_loading_is_quiet_and_restores_settings(snapshots: tuple[Path, Path], tmp_path: Path) -> None:
    """In a fresh process (where transformers first imports its modelling code and, if installed, torchao),
    loading the encoders writes nothing to stderr: no "Loading weights" bar, no warnings from packages
    transformers imports on the way. The caller's logger levels and transformers' bar setting come back."""
    script = f"""
import logging
from transformers.utils import logging as hf_logging
from selfe.components.text_encoders import TextEncoders
for name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(name).setLevel(logging.INFO)
TextEncoders.from_snapshots({str(snapshots[0])!r}, {str(snapshots[1])!r}, t5_max_length=8, device="cpu")
assert [logging.getLogger(n).level for n in ("torchao", "torch.utils._pytree")] == [logging.INFO] * 2
assert hf_logging.is_progress_bar_enabled()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr


@pytest.mark.gpu
def test_defaults_on_gpu_are_bf16(snapshots: tuple[Path, Path]) -> None:
    enc = TextEncoders.from_snapshots(*snapshots, t5_max_length=L)
    out = enc.encode(PROMPTS)
    assert out["txt"].device.type == "cuda" and out["txt_mask"].device.type == "cuda"
    assert out["txt"].dtype == torch.bfloat16 and out["pooled"].dtype == torch.bfloat16
    reference = TextEncoders.from_snapshots(*snapshots, t5_max_length=L, device="cpu").encode(PROMPTS)
    assert torch.equal(out["txt_mask"].cpu(), reference["txt_mask"])
    torch.testing.assert_close(out["pooled"].float().cpu(), reference["pooled"], atol=0.05, rtol=0.05)


LOADING_MODULES = [
    "selfe.components.weights",
    "selfe.components.autoencoder",
    "selfe.components.text_encoders",
    "selfe.method.conditioning",
    "selfe.train.cache",
    "selfe.train.cache_cli",
    "selfe.train.cache_shards",
    "selfe.train.smoke_encoders",
    "selfe.train.data.cached",
    "selfe.train.data.images",
    "selfe.train.data.manifest",
    "selfe.train.data.loader",
]


def _keyword_is(call: ast.Call, name: str, value: bool) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


@pytest.mark.parametrize("module", LOADING_MODULES)
def test_loaders_never_unpickle(module: str) -> None:
    """No pickle-family import; torch.load only with weights_only=True, np.load only with allow_pickle=False;
    transformers models only from safetensors."""
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            problems += [n for n in names if n.split(".")[0] in {"pickle", "dill", "joblib", "cloudpickle", "marshal"}]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            if node.func.attr == "load" and owner == "torch" and not _keyword_is(node, "weights_only", True):
                problems.append(f"torch.load without weights_only=True at line {node.lineno}")
            if node.func.attr == "load" and owner in {"np", "numpy"} and not _keyword_is(node, "allow_pickle", False):
                problems.append(f"np.load without allow_pickle=False at line {node.lineno}")
    assert not problems, problems
    if module == "selfe.components.text_encoders":  # the one place transformers models are loaded
        assert "use_safetensors=True" in Path(importlib.util.find_spec(module).origin).read_text()


def test_guard_refuses_network_and_unpickling(tmp_path: Path) -> None:
    """The module's autouse guard is live: these would pass silently without it."""
    import pickle
    import socket

    with pytest.raises(AssertionError, match="network"):
        socket.create_connection(("127.0.0.1", 9))
    with pytest.raises(AssertionError, match="torch.load"):
        torch.load(tmp_path / "x.pt", weights_only=True)
    with pytest.raises(AssertionError, match="unpickling"):
        pickle.loads(b"")


@pytest.mark.parametrize("load, which, what", [(load_t5_encoder, 0, "T5 encoder"), (load_clip_encoder, 1, "CLIP")])
def test_truncated_weights_are_an_oserror_naming_the_folder(
    load, which: int, what: str, snapshots: tuple[Path, Path], tmp_path: Path
) -> None:
    """safetensors' own SafetensorError (not an OSError) becomes the loaders' OSError, like a missing file."""
    broken = Path(shutil.copytree(snapshots[which], tmp_path / "cut"))
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=f"could not load the {what}.*'{broken}'.*deserializing header"):
        load(broken)


def test_a_snapshot_of_the_other_encoder_is_refused_before_loading(snapshots: tuple[Path, Path]) -> None:
    """A CLIP folder passed as T5 (or the reverse) loaded without complaint and failed inside encode."""
    t5, clip = snapshots
    with pytest.raises(ValueError, match=f"T5 encoder snapshot '{clip}' holds a 'clip.*' model"):
        load_t5_encoder(clip, tokenizer_path=t5)
    with pytest.raises(ValueError, match=f"CLIP text snapshot '{t5}' holds a 't5' model"):
        load_clip_encoder(t5, tokenizer_path=clip)
