"""The [img; txt] layout and the padded rows' attention: exact against the masked reference, no mask when
every key is valid, no recompile for a new prompt length inside a text bucket.

The oracles: `flux_formula_forward` (tests/engine/test_model.py: the network written out with plain ops, text
first, padding masked explicitly) and each sample run alone on its real text only (exact length, no mask).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from selfe.kernels import reference
from selfe.method.renorm import energy_preserving_cfg
from selfe.network import attention as attention_module
from selfe.network.attention import padded_attention, prefix_key_mask
from selfe.network.model import MMDiT
from selfe.network.varlen import (
    pack_keys,
    padded_queries,
    varlen_attention_reference,
    varlen_padded_attention,
)
from selfe.sampling.sampler import guided_velocity
from tests.engine.test_model import flux_formula_forward, make_inputs, make_model

PADDED_BACKENDS = ("auto", "sdpa", "math", "varlen")


def text_lengths(cond: dict) -> list[int]:
    return cond["txt_mask"].sum(dim=1).tolist()


def exact_length_rows(model: MMDiT, x: Tensor, t: Tensor, s: Tensor, cond: dict) -> Tensor:
    """Each sample alone, its text cut to its real tokens, no mask: what padding must not change."""
    rows = []
    for i, n in enumerate(text_lengths(cond)):
        one = {"txt": cond["txt"][i : i + 1, :n], "txt_mask": None, "pooled": cond["pooled"][i : i + 1]}
        rows.append(model(x[i : i + 1], t[i : i + 1], s[i : i + 1], one))
    return torch.cat(rows)


def grads_of(out: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    return list(torch.autograd.grad((out * weight).sum(), tensors))


def model_and_inputs(backend: str, lengths: list[int], txt_len: int):
    model = make_model(attention_backend=backend).double()
    x, t, s, cond = make_inputs(batch=len(lengths), txt_len=txt_len, lengths=lengths, dtype=torch.float64)
    x.requires_grad_(True)
    cond["txt"].requires_grad_(True)
    cond["pooled"].requires_grad_(True)
    return model, (x, t, s, cond), [x, cond["txt"], cond["pooled"], *model.parameters()]


# ---------------------------------------------------------------- the attention function


@pytest.mark.parametrize("backend", PADDED_BACKENDS)
def test_padded_attention_is_the_masked_reference_in_float64(backend: str) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 2, 9, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    lengths = torch.tensor([9, 5, 1, 7], dtype=torch.int32)
    got = padded_attention(q, k, v, lengths, backend)
    want = reference.masked_softmax_attention(q, k, v, prefix_key_mask(lengths, 9)).transpose(1, 2).flatten(2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads_of(got, [q, k, v]), grads_of(want, [q, k, v]), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    # the padding keys are really out: anything there changes nothing
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[1, :, 5:], v2[2, :, 1:] = 1e3, -1e3
    torch.testing.assert_close(padded_attention(q, k2, v2, lengths, backend), got, rtol=1e-12, atol=1e-12)


def test_pack_keys_puts_each_rows_valid_keys_end_to_end() -> None:
    x = torch.arange(3 * 1 * 4 * 2, dtype=torch.float64).view(3, 1, 4, 2)
    packed, cu_seq_k = pack_keys(x, torch.tensor([4, 1, 2]))
    assert cu_seq_k.tolist() == [0, 4, 5, 7] and cu_seq_k.dtype == torch.int32
    assert packed.shape == (12, 1, 2)
    want = torch.cat((x[0, 0, :4], x[1, 0, :1], x[2, 0, :2]))
    assert torch.equal(packed[:7, 0], want) and torch.count_nonzero(packed[7:]) == 0  # an unread tail
    # whatever a kernel leaves in the tail's gradient (garbage, NaN) never reaches a real token's
    leaf = x.clone().requires_grad_()
    packed, _ = pack_keys(leaf, torch.tensor([4, 1, 2]))
    grad = torch.ones_like(packed)
    grad[7:] = float("nan")
    packed.backward(grad)
    assert torch.equal(
        leaf.grad, (torch.arange(4) < torch.tensor([[4], [1], [2]]))[:, None, :, None].expand_as(x).double()
    )
    queries, cu_seq_q = padded_queries(x)
    assert cu_seq_q.tolist() == [0, 4, 8, 12] and torch.equal(queries[:, 0], x[:, 0].flatten(0, 1))


def test_varlen_reference_with_query_segments_of_any_length() -> None:
    """The reference op's contract beyond the model's use (uneven query segments, a tail of unused slots)."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(10, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    cu_q, cu_k = torch.tensor([0, 3, 8], dtype=torch.int32), torch.tensor([0, 6, 9], dtype=torch.int32)
    out = varlen_attention_reference(q, k, v, cu_q, cu_k, 5, 6)
    for b in range(2):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        want = F.scaled_dot_product_attention(*(u.transpose(0, 1) for u in (q[qs], k[ks], v[ks])))
        torch.testing.assert_close(out[qs], want.transpose(0, 1), rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(out[8:]) == 0


def test_key_lengths_are_checked() -> None:
    q = torch.randn(2, 1, 3, 4)
    with pytest.raises(ValueError, match=r"key_lengths must be an integer tensor of shape \(B,\)"):
        padded_attention(q, q, q, torch.tensor([3.0, 2.0]))
    with pytest.raises(ValueError, match=r"key_lengths must be an integer tensor of shape \(B,\)"):
        padded_attention(q, q, q, torch.tensor([3]))


# ---------------------------------------------------------------- the model, float64


@pytest.mark.parametrize("backend", ["auto", "varlen"])
def test_model_matches_the_masked_reference_outputs_and_gradients(backend: str) -> None:
    """A batch of prompts of different lengths (one fills the bucket): V and its gradients w.r.t. the
    latents, the text, the pooled vector and every parameter, against the text-first masked formulas and
    against each sample run alone on its real text."""
    model, (x, t, s, cond), wrt = model_and_inputs(backend, lengths=[3, 6, 1], txt_len=6)
    got = model(x, t, s, cond)
    oracle = flux_formula_forward(model, x, t, s, cond)
    alone = exact_length_rows(model, x, t, s, cond)
    assert oracle.abs().mean() > 0.1
    torch.testing.assert_close(got, oracle, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got, alone, rtol=1e-9, atol=1e-9)
    for g, w_oracle, w_alone in zip(grads_of(got, wrt), grads_of(oracle, wrt), grads_of(alone, wrt), strict=True):
        assert w_oracle.abs().max() > 0
        torch.testing.assert_close(g, w_oracle, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(g, w_alone, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", ["auto", "varlen"])
def test_cfg_pair_of_different_lengths_is_exact(backend: str) -> None:
    """The sampler's batched CFG forward (prompt rows and null rows, different real lengths, one bucket)
    equals the two branches run apart on their real text; gradients too."""
    model, (x, t, s, cond), wrt = model_and_inputs(backend, lengths=[5, 2], txt_len=8)
    null = {
        "txt": torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64),
        "txt_mask": torch.arange(8)[None, :] < torch.tensor([[1], [1]]),  # the null prompt: EOS only
        "pooled": torch.zeros(2, 16, dtype=torch.float64),
    }
    guidance = torch.full((2,), 5.0, dtype=torch.float64)
    got = guided_velocity(model, x, t, s, cond, null, guidance, "torch")
    want = energy_preserving_cfg(
        exact_length_rows(model, x, t, s, cond), exact_length_rows(model, x, t, s, null), guidance, "torch"
    )
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    for g, w in zip(grads_of(got, wrt), grads_of(want, wrt), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_training_batch_of_mixed_caption_lengths_has_exact_gradients() -> None:
    """A micro-batch's loss gradient (the trainer calls the same forward) is the sum of its samples' own."""
    model, (x, t, s, cond), _ = model_and_inputs("auto", lengths=[2, 7, 4, 1], txt_len=8)
    params = list(model.parameters())
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    loss = (model(x, t, s, cond) - target).square().mean(dim=(1, 2, 3))
    grads = torch.autograd.grad(loss.sum(), params)
    alone = (exact_length_rows(model, x, t, s, cond) - target).square().mean(dim=(1, 2, 3))
    want = torch.autograd.grad(alone.sum(), params)
    torch.testing.assert_close(loss, alone, rtol=1e-10, atol=1e-12)
    for g, w in zip(grads, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_txt_mask_must_hold_real_tokens_first() -> None:
    model = make_model()
    x, t, s, cond = make_inputs(lengths=[3, 5])
    cond["txt_mask"] = cond["txt_mask"].flip(1)  # padding first
    with pytest.raises(ValueError, match="real tokens first, then its padding"):
        model(x, t, s, cond)


# ---------------------------------------------------------------- no mask on the hot path


class AttentionSpy:
    """Records every prefix mask built and every SDPA call's attn_mask (None or a tensor)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.masks_built, self.sdpa_masks = 0, []
        real_mask, real_sdpa = attention_module.prefix_key_mask, F.scaled_dot_product_attention

        def mask(*args, **kwargs):
            self.masks_built += 1
            return real_mask(*args, **kwargs)

        def sdpa(*args, attn_mask=None, **kwargs):
            self.sdpa_masks.append(attn_mask)
            return real_sdpa(*args, attn_mask=attn_mask, **kwargs)

        monkeypatch.setattr(attention_module, "prefix_key_mask", mask)
        monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", sdpa)


@pytest.mark.parametrize("how", ["no txt_mask", "every token real"])
def test_no_mask_is_built_when_every_key_is_valid(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(attention_backend="auto")
    lengths = None if how == "no txt_mask" else [5, 5]
    x, t, s, cond = make_inputs(lengths=lengths, txt_len=5)
    spy = AttentionSpy(monkeypatch)
    with torch.no_grad():
        model(x, t, s, cond)
    blocks = len(model.double_blocks) + len(model.single_blocks)
    assert spy.masks_built == 0 and spy.sdpa_masks == [None] * blocks


def test_padded_rows_build_a_mask_only_on_the_masked_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The spy sees masks where there are some: auto with padding builds the prefix mask (the reference
    path); varlen never does."""
    x, t, s, cond = make_inputs(lengths=[2, 5], txt_len=5)
    blocks = 2
    spy = AttentionSpy(monkeypatch)
    with torch.no_grad():
        make_model(attention_backend="auto")(x, t, s, cond)
    assert spy.masks_built == blocks and all(m is not None for m in spy.sdpa_masks)
    spy.masks_built, spy.sdpa_masks = 0, []
    with torch.no_grad():
        make_model(attention_backend="varlen")(x, t, s, cond)
    assert spy.masks_built == 0 and spy.sdpa_masks == []


# ---------------------------------------------------------------- compile: lengths are data


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", "varlen"])
def test_a_new_prompt_length_in_the_bucket_does_not_recompile(backend: str) -> None:
    """The compiled forward (validation off, as the fast path calls it) of two prompts of different lengths
    in one 8-token bucket: one compile, and the eager outputs."""
    from torch._dynamo.testing import CompileCounter

    model = make_model(attention_backend=backend)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(lambda *args: model(*args, validate=False), backend=counter, fullgraph=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for lengths in ([3, 1], [6, 1]):
            x, t, s, cond = make_inputs(lengths=lengths, txt_len=8)
            torch.testing.assert_close(compiled(x, t, s, cond), model(x, t, s, cond), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
    torch._dynamo.reset()


# ---------------------------------------------------------------- CUDA: torch's varlen kernel


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_kernel_is_as_accurate_as_masked_sdpa(dtype: torch.dtype) -> None:
    """torch's FlashAttention varlen through the packed keys, forward and backward, against float64; its
    error at most about twice masked SDPA's in the same dtype (the flash-attention rule)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (3, 4, 300, 64)
    q, k, v = (torch.randn(shape, generator=gen, device="cuda", dtype=torch.float64) for _ in range(3))
    lengths = torch.tensor([300, 257, 129], dtype=torch.int32, device="cuda")
    grad_out = torch.randn(shape, generator=gen, device="cuda", dtype=torch.float64)
    mask = prefix_key_mask(lengths, shape[2])[:, None, None, :]

    def run(fn, precision):
        inputs = [u.to(precision).requires_grad_() for u in (q, k, v)]
        out = fn(*inputs)
        out.backward(grad_out.to(precision))
        return [out.double()] + [u.grad.double() for u in inputs]

    got = run(lambda *a: varlen_padded_attention(*a, lengths), dtype)
    sdpa = run(lambda *a: F.scaled_dot_product_attention(*a, attn_mask=mask), dtype)
    oracle = run(lambda *a: reference.masked_softmax_attention(*a, mask[:, 0, 0]), torch.float64)
    eps = torch.finfo(dtype).eps
    for name, g, r, o in zip(("out", "dq", "dk", "dv"), got, sdpa, oracle, strict=True):
        err, ref_err = (g - o).abs().max().item(), (r - o).abs().max().item()
        assert err <= 2 * ref_err + 4 * eps * o.abs().max().item(), f"{name}: {err:.3g} vs SDPA's {ref_err:.3g}"


@pytest.mark.gpu
def test_model_on_cuda_through_varlen_matches_the_masked_path_without_recompiling() -> None:
    """The tiny model in bf16 on CUDA, compiled (inductor), through varlen and through auto's masked
    cuDNN-first SDPA, two prompt lengths in one bucket: one compile each, outputs within bf16 rounding."""
    from torch._dynamo.testing import CompileCounterWithBackend

    outputs = {}
    for backend in ("auto", "varlen"):
        model = make_model(attention_backend=backend).to("cuda", torch.bfloat16)
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("inductor")
        compiled = torch.compile(lambda *a, m=model: m(*a, validate=False), backend=counter, fullgraph=True)
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
            for lengths in ([3, 1], [6, 1]):
                x, t, s, cond = make_inputs(lengths=lengths, txt_len=8)
                cond = {k: v.cuda() if v.dtype == torch.bool else v.to("cuda", torch.bfloat16) for k, v in cond.items()}
                outputs[backend, lengths[0]] = compiled(x.to("cuda", torch.bfloat16), t.cuda(), s.cuda(), cond).float()
        assert counter.frame_count == 1
    torch._dynamo.reset()
    for n in (3, 6):
        torch.testing.assert_close(outputs["varlen", n], outputs["auto", n], rtol=0.05, atol=0.05)
