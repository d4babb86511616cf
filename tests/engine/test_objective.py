"""The Self-E objective: every pure function against a float64 hand computation, the loss against the
literal formulas of docs/method.md §3, and the stop-gradients."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from selfe.method import condition_tree
from selfe.method.objective import (
    ObjectiveConfig,
    SelfELoss,
    clean_estimate,
    loss_weight,
    self_eval_lambda,
)
from selfe.method.renorm import energy_preserving_cfg, energy_preserving_target
from selfe.method.schedule import TimeShift, sample_s, sample_t, shift_time, tau_at

f64 = torch.float64


def test_shift_time_matches_formula_and_fixes_endpoints():
    t = torch.rand(100, dtype=f64)
    for mu in (-0.3, 0.0, 0.5, 1.15):
        expected = torch.tensor([math.exp(mu) / (math.exp(mu) + 1 / v - 1) for v in t.tolist()], dtype=f64)
        torch.testing.assert_close(shift_time(t, mu), expected, rtol=1e-12, atol=1e-12)
    ends = shift_time(torch.tensor([0.0, 1.0], dtype=f64), 0.8)
    assert ends.tolist() == [0.0, 1.0]


def test_mu_is_linear_in_tokens_through_the_paper_anchors():
    shift = TimeShift()
    assert shift.mu_for(512) == pytest.approx(0.5)
    assert shift.mu_for(4096) == pytest.approx(1.15)
    assert shift.mu_for(1024) == pytest.approx(0.5 + 512 * 0.65 / 3584)
    assert TimeShift(mu=0.25).mu_for(None) == 0.25
    with pytest.raises(ValueError, match="token count"):
        shift.mu_for(None)


def test_sample_t_is_shifted_logit_normal():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    t = sample_t(1000, 0.7, g1)
    z = torch.randn(1000, generator=g2).double()
    expected = math.exp(0.7) / (math.exp(0.7) + 1 / torch.sigmoid(z) - 1)
    torch.testing.assert_close(t.double(), expected, rtol=1e-5, atol=1e-6)
    assert ((t > 0) & (t < 1)).all()


def test_tau_warmup_is_linear_then_one():
    assert tau_at(0, 100) == 0.0
    assert tau_at(25, 100) == 0.25
    assert tau_at(100, 100) == 1.0
    assert tau_at(10_000, 100) == 1.0
    assert tau_at(5, 0) == 1.0


@pytest.mark.parametrize("tau", [0.0, 0.3, 1.0])
def test_sample_s_half_split_and_range(tau):
    g = torch.Generator().manual_seed(0)
    t = torch.rand(1001, generator=g) * 0.98 + 0.01
    s, self_mask = sample_s(t, tau, "half", generator=g)
    assert self_mask.sum().item() == 500 and self_mask[:500].all()
    assert torch.equal(s[~self_mask], t[~self_mask])
    lo = (1 - tau) * t[self_mask]
    assert (s[self_mask] <= t[self_mask]).all()
    assert (s[self_mask] >= lo - 1e-6).all()
    if tau == 0.0:
        assert torch.equal(s, t)
    if tau == 1.0:  # uniform on (0, t): mean ratio s / t near 1/2
        assert abs((s[self_mask] / t[self_mask]).mean().item() - 0.5) < 0.05


def test_sample_s_bernoulli_rate():
    g = torch.Generator().manual_seed(1)
    t = torch.rand(20_000, generator=g) * 0.9 + 0.05
    s, self_mask = sample_s(t, 1.0, "bernoulli", 0.5, generator=g)
    assert abs(self_mask.float().mean().item() - 0.5) < 0.02
    assert torch.equal(s[~self_mask], t[~self_mask])
    with pytest.raises(ValueError, match="split"):
        sample_s(t, 1.0, "thirds")
    with pytest.raises(ValueError, match="tau"):
        sample_s(t, 1.5)


def test_lambda_and_loss_weight_by_hand():
    t = torch.tensor([0.9, 0.5, 0.3, 0.2], dtype=f64)
    s = torch.tensor([0.1, 0.25, 0.3, 0.0], dtype=f64)
    expected = torch.tensor([0.9 / 0.1 - 0.1 / 0.9, 1.0 - 0.25 / 0.75, 0.0, 0.25], dtype=f64)
    torch.testing.assert_close(self_eval_lambda(t, s), expected, rtol=1e-12, atol=1e-12)
    assert self_eval_lambda(t, t).abs().max().item() == 0.0
    torch.testing.assert_close(loss_weight(t), 1 / t**2)


def test_energy_preserving_target_by_hand():
    g = torch.Generator().manual_seed(2)
    x0, x_self = torch.randn(3, 4, 5, 6, generator=g, dtype=f64), torch.randn(3, 4, 5, 6, generator=g, dtype=f64)
    lam = torch.tensor([0.0, 0.7, 12.0], dtype=f64)
    out = energy_preserving_target(x0, x_self, lam)
    for i in range(3):
        y = x0[i] + lam[i] * x_self[i]
        torch.testing.assert_close(out[i], y * x0[i].norm() / y.norm(), rtol=1e-12, atol=1e-12)
        assert out[i].norm().item() == pytest.approx(x0[i].norm().item(), rel=1e-12)
    assert torch.equal(out[0], x0[0])  # lambda = 0: exactly x0
    ablation = energy_preserving_target(x0, x_self, lam, renorm=False)
    torch.testing.assert_close(ablation[2], (x0[2] + 12.0 * x_self[2]) / 13.0)
    torch.testing.assert_close(ablation[0], x0[0])


def test_energy_preserving_cfg_by_hand():
    g = torch.Generator().manual_seed(4)
    vc, vu = torch.randn(2, 16, 4, 4, generator=g, dtype=f64), torch.randn(2, 16, 4, 4, generator=g, dtype=f64)
    out = energy_preserving_cfg(vc, vu, 5.0)
    for i in range(2):
        vg = vc[i] + 4.0 * (vc[i] - vu[i])
        torch.testing.assert_close(out[i], vg * vc[i].norm() / vg.norm(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(energy_preserving_cfg(vc, vu, 1.0), vc, rtol=1e-12, atol=1e-12)
    per_sample = energy_preserving_cfg(vc, vu, torch.tensor([1.0, 3.0], dtype=f64))
    torch.testing.assert_close(per_sample[0], vc[0], rtol=1e-12, atol=1e-12)


class RecordingNet(nn.Module):
    """A small dual-time network on (B, 2, 3, 3) inputs that records every call."""

    def __init__(self, seed: int = 0, num_labels: int = 10):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = nn.Linear(18 + 3, 18, dtype=f64)
        self.emb = nn.Embedding(num_labels, 3, dtype=f64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=f64) * 0.3)
        self.calls: list[dict] = []

    def forward(self, x, t, s, labels):
        h = torch.cat([x.flatten(1), self.emb(labels) * (1 + t[:, None]) + (t - s)[:, None]], dim=1)
        v = torch.tanh(self.lin(h)).view_as(x)
        self.calls.append(
            dict(
                x=x.detach().clone(),
                t=t.clone(),
                s=s.clone(),
                c=labels.clone(),
                v=v.detach().clone(),
                grad=torch.is_grad_enabled(),
            )
        )
        return v


def make_batch(b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (b,), generator=g)
    return {
        "x0": torch.randn(b, 2, 3, 3, generator=g, dtype=f64),
        "cond": labels,
        "null_cond": torch.full_like(labels, 4),
        "fake_cond": labels + 5,
        "fake_null_cond": torch.full_like(labels, 9),  # c_fake of a dropped caption
    }


def literal_loss(calls, batch, cfg: ObjectiveConfig, live: nn.Module | None = None):
    """docs/method.md §3 written out term by term from the recorded network calls (float64)."""
    main, rest = calls[0], calls[1:]
    x0, t = batch["x0"], main["t"].double()
    bshape = (-1, 1, 1, 1)
    v = live(main["x"], main["t"], main["s"], main["c"]) if live is not None else main["v"]  # grad if live
    x0_hat = main["x"] - t.view(bshape) * v
    target = x0.clone()
    if cfg.self_eval:
        ema_c, live_u = rest[0], rest[1]
        n = ema_c["x"].shape[0]
        s_i, t_i, xs = ema_c["s"].double(), t[:n], ema_c["x"]
        g_c = xs - s_i.view(bshape) * ema_c["v"]
        g_u = xs - s_i.view(bshape) * live_u["v"]
        d = g_u - g_c
        if cfg.aux_on(10**9) and len(rest) >= 3:
            g_f = xs - s_i.view(bshape) * rest[2]["v"]
            d = cfg.aux_k * d + (1 - cfg.aux_k) * (g_f - g_c)
        x_self = x0_hat[:n].detach() - cfg.self_eval_guidance * d
        lam = t_i / (1 - t_i) - s_i / (1 - s_i)
        if not cfg.self_eval_dropped:  # a dropped row is conditioned on the null label (4): lambda = 0
            lam = torch.where(main["c"][:n] == batch["null_cond"][:n], 0.0, lam)
        for i in range(n):
            y = x0[i] + lam[i] * x_self[i]
            target[i] = y * x0[i].norm() / y.norm()
    per_sample = (1 / t**2) * ((x0_hat - target) ** 2).flatten(1).mean(1)
    return per_sample.mean(), x0_hat


@pytest.mark.parametrize("self_eval", [False, True])
def test_loss_equals_the_literal_formulas(self_eval):
    net, ema = RecordingNet(0), RecordingNet(1)
    cfg = ObjectiveConfig(
        self_eval=self_eval,
        caption_dropout=0.0,
        time_shift=TimeShift(mu=0.3),
        tau_warmup=10,
        aux_start=None,
        kernel_backend="torch",
    )
    batch = make_batch()
    loss, metrics = SelfELoss(cfg)(net, ema, batch, iteration=5, generator=torch.Generator().manual_seed(7))
    calls = [net.calls[0]] + ([ema.calls[0], net.calls[1]] if self_eval else [])
    expected, _ = literal_loss(calls, batch, cfg)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    # The main pass is the noised data: eps = (x_t - (1 - t) x0) / t must be a standard normal draw.
    main = net.calls[0]
    assert main["grad"] and all(not c["grad"] for c in net.calls[1:] + ema.calls)
    if self_eval:
        assert len(net.calls) == 2 and len(ema.calls) == 1
        assert ema.calls[0]["x"].shape[0] == 4  # exact half
        assert torch.equal(ema.calls[0]["t"], ema.calls[0]["s"])  # self-eval at (s, s)
        assert torch.equal(net.calls[1]["c"], batch["null_cond"][:4])
        assert torch.equal(ema.calls[0]["c"], batch["cond"][:4])
        t_i, s_i = main["t"][:4].double(), ema.calls[0]["s"].double()
        lam = t_i / (1 - t_i) - s_i / (1 - s_i)  # the mean over the self-evaluated half, not the batch
        assert metrics["lambda_mean"].item() == pytest.approx(lam.mean().item(), rel=1e-6) and lam.min() > 0
        assert metrics["frac_self"].item() == pytest.approx(0.5)
    else:
        assert len(net.calls) == 1 and not ema.calls
        assert torch.equal(main["t"], main["s"]) and metrics["frac_self"].item() == 0.0


@pytest.mark.parametrize("guidance", [0.0, 2.5])
def test_the_self_eval_guidance_scales_the_direction(guidance):
    cfg = ObjectiveConfig(
        caption_dropout=0.0, time_shift=TimeShift(mu=0.3), tau_warmup=0, aux_start=None, kernel_backend="torch"
    )
    scaled = dataclasses.replace(cfg, self_eval_guidance=guidance)
    losses = []
    for c in (cfg, scaled):
        net, ema = RecordingNet(0), RecordingNet(1)
        loss, _ = SelfELoss(c)(net, ema, make_batch(), iteration=5, generator=torch.Generator().manual_seed(7))
        expected, _ = literal_loss([net.calls[0], ema.calls[0], net.calls[1]], make_batch(), c)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
        losses.append(loss.item())
    assert losses[0] != pytest.approx(losses[1], rel=1e-6)  # the knob changes the target


def test_dropped_rows_can_be_plain_flow_matching():
    """self_eval_dropped=False: a row whose caption was dropped gets lambda = 0, so its target is x0."""
    base = ObjectiveConfig(
        caption_dropout=0.5, time_shift=TimeShift(mu=0.3), tau_warmup=0, aux_start=None, kernel_backend="torch"
    )
    cfg = dataclasses.replace(base, self_eval_dropped=False)
    net, ema = RecordingNet(0), RecordingNet(1)
    batch = make_batch()
    loss, metrics = SelfELoss(cfg)(net, ema, batch, iteration=5, generator=torch.Generator().manual_seed(2))
    dropped = net.calls[0]["c"][:4] == batch["null_cond"][:4]
    assert 0 < int(dropped.sum()) < 4  # the seed drops some self-evaluated rows and keeps others
    expected, _ = literal_loss([net.calls[0], ema.calls[0], net.calls[1]], batch, cfg)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    paper, _ = literal_loss([net.calls[0], ema.calls[0], net.calls[1]], batch, base)
    assert loss.item() != pytest.approx(paper.item(), rel=1e-6)
    t_i, s_i = net.calls[0]["t"][:4].double(), ema.calls[0]["s"].double()
    lam = torch.where(dropped, 0.0, t_i / (1 - t_i) - s_i / (1 - s_i))
    assert metrics["lambda_mean"].item() == pytest.approx(lam.mean().item(), rel=1e-6)


def test_flow_matching_is_velocity_mse():
    net = RecordingNet(0)
    cfg = ObjectiveConfig(self_eval=False, caption_dropout=0.0, time_shift=TimeShift(mu=0.0), kernel_backend="torch")
    batch = make_batch()
    g = torch.Generator().manual_seed(11)
    loss, _ = SelfELoss(cfg)(net, net, batch, 0, g)
    # Replay the draws: t (randn), s split draws are skipped for flow matching, then eps.
    g = torch.Generator().manual_seed(11)
    t = torch.sigmoid(torch.randn(8, generator=g))
    eps = torch.randn(batch["x0"].shape, generator=g, dtype=f64)
    v_target = eps - batch["x0"]
    expected = ((net.calls[0]["v"] - v_target) ** 2).mean()
    torch.testing.assert_close(net.calls[0]["t"], t)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)


def test_aux_term_switches_on_and_enters_the_direction():
    cfg = ObjectiveConfig(
        self_eval=True,
        caption_dropout=0.0,
        time_shift=TimeShift(mu=0.0),
        tau_warmup=0,
        aux_start=100,
        aux_k=0.9,
        kernel_backend="torch",
    )
    net, ema = RecordingNet(0), RecordingNet(1)
    batch = make_batch()
    _, m_off = SelfELoss(cfg)(net, ema, batch, 99, torch.Generator().manual_seed(1))
    assert m_off["aux_on"].item() == 0.0 and m_off["loss_fake"].item() == 0.0 and len(net.calls) == 2
    net.calls.clear(), ema.calls.clear()
    loss, m_on = SelfELoss(cfg)(net, ema, batch, 100, torch.Generator().manual_seed(1))
    assert m_on["aux_on"].item() == 1.0
    # live main (grad), live fake (grad; detached, it is also g_f), live uncond (no grad): one fake pass
    assert [c["grad"] for c in net.calls] == [True, True, False]
    assert torch.equal(net.calls[1]["c"], batch["fake_cond"][:4])
    main_loss, _ = literal_loss([net.calls[0], ema.calls[0], net.calls[2], net.calls[1]], batch, cfg)
    fake = net.calls[1]
    x0_hat = net.calls[0]["x"] - net.calls[0]["t"].view(-1, 1, 1, 1) * net.calls[0]["v"]
    g_fake = fake["x"] - fake["s"].view(-1, 1, 1, 1) * fake["v"]
    l_fake = ((1 / fake["s"].double() ** 2) * ((g_fake - x0_hat[:4]) ** 2).flatten(1).mean(1)).mean()
    assert loss.item() == pytest.approx((main_loss + l_fake).item(), rel=1e-9)
    assert m_on["loss_fake"].item() == pytest.approx(l_fake.item(), rel=1e-9)
    with pytest.raises(ValueError, match="fake_cond"):
        SelfELoss(cfg)(net, ema, {k: v for k, v in batch.items() if k != "fake_cond"}, 100)


def test_a_bernoulli_draw_without_self_evaluated_samples_is_a_flow_matching_step():
    """self_eval_prob 0 under "bernoulli": no sample has s < t (at batch 8 that is 1 draw in 256 at 0.5).
    The passes still run on a stand-in row, so every rank runs the same forwards, and drop out."""
    cfg = ObjectiveConfig(
        self_eval=True,
        s_split="bernoulli",
        self_eval_prob=0.0,
        caption_dropout=0.0,
        time_shift=TimeShift(mu=0.0),
        tau_warmup=0,
        aux_start=0,
        kernel_backend="torch",
    )
    net, ema = RecordingNet(0), RecordingNet(1)
    batch = make_batch()
    loss, metrics = SelfELoss(cfg)(net, ema, batch, 5, torch.Generator().manual_seed(3))
    assert [c["x"].shape[0] for c in net.calls] == [8, 1, 1] and ema.calls[0]["x"].shape[0] == 1
    flow_matching, _ = literal_loss([net.calls[0]], batch, dataclasses.replace(cfg, self_eval=False))
    assert loss.item() == pytest.approx(flow_matching.item(), rel=1e-9)
    assert metrics["lambda_mean"].item() == 0.0 and metrics["loss_fake"].item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_a_dropped_caption_gets_the_bare_fake_prompt():
    """Caption dropout swaps c for phi, and c_fake for the fake prompt of the empty caption: x0_hat of a
    dropped sample was drawn under phi, so the fake score must not see its caption either."""
    cfg = ObjectiveConfig(caption_dropout=0.5, time_shift=TimeShift(mu=0.0), tau_warmup=0, aux_start=0)
    net, ema = RecordingNet(0), RecordingNet(1)
    batch = make_batch(b=16, seed=3)
    SelfELoss(cfg)(net, ema, batch, 1, torch.Generator().manual_seed(5))
    main, fake, uncond = net.calls  # the live network's passes: main, fake, unconditional
    dropped = main["c"] == 4
    assert 0 < dropped.sum() < 16  # both kinds in the batch
    half = dropped[:8]  # the self-evaluated rows
    torch.testing.assert_close(fake["c"], torch.where(half, 9, batch["fake_cond"][:8]))
    assert torch.equal(ema.calls[0]["c"], main["c"][:8]) and torch.equal(uncond["c"], torch.full((8,), 4))
    with pytest.raises(ValueError, match="fake_null_cond"):
        SelfELoss(cfg)(net, ema, {k: v for k, v in batch.items() if k != "fake_null_cond"}, 1)
    no_dropout = ObjectiveConfig(caption_dropout=0.0, time_shift=TimeShift(mu=0.0), aux_start=0)  # bare prompt unused
    SelfELoss(no_dropout)(net, ema, {k: v for k, v in batch.items() if k != "fake_null_cond"}, 1)


@pytest.mark.parametrize("aux", [False, True])
def test_gradients_flow_only_through_x0_hat_and_the_fake_branch(aux):
    cfg = ObjectiveConfig(
        self_eval=True,
        caption_dropout=0.0,
        time_shift=TimeShift(mu=0.0),
        tau_warmup=0,
        aux_start=0 if aux else None,
        kernel_backend="torch",
    )
    net, ema = RecordingNet(0), RecordingNet(1)
    batch = make_batch()
    loss, _ = SelfELoss(cfg)(net, ema, batch, 10, torch.Generator().manual_seed(5))
    loss.backward()
    assert all(p.grad is None for p in ema.parameters())
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    recorded = list(net.calls)
    # the live passes: main, (fake,) unconditional
    calls = [recorded[0], ema.calls[0], recorded[-1]] + ([recorded[1]] if aux else [])
    # Surrogate: the same loss with every target detached and the gradient entering only via x0_hat
    # (and via the fake branch's G when aux is on).
    surrogate, x0_hat = literal_loss(calls, batch, cfg, live=net)
    if aux:
        fake = recorded[1]
        v_f = net(fake["x"], fake["s"], fake["s"], fake["c"])
        g_f = fake["x"] - fake["s"].view(-1, 1, 1, 1) * v_f
        surrogate = (
            surrogate + ((1 / fake["s"].double() ** 2) * ((g_f - x0_hat[:4].detach()) ** 2).flatten(1).mean(1)).mean()
        )
    surrogate.backward()
    for name, p in net.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-8, atol=1e-12, msg=name)


def test_caption_dropout_swaps_in_the_null_condition():
    cfg = ObjectiveConfig(self_eval=False, caption_dropout=0.5, time_shift=TimeShift(mu=0.0), kernel_backend="torch")
    net = RecordingNet(0)
    batch = make_batch(b=4000)
    SelfELoss(cfg)(net, net, batch, 0, torch.Generator().manual_seed(0))
    seen = net.calls[0]["c"]
    dropped = seen == 4
    assert torch.equal(seen[~dropped], batch["cond"][~dropped])
    assert abs(dropped.float().mean().item() - 0.5) < 0.03


def test_condition_tree_helpers():
    cond = {"txt": torch.arange(12.0).view(3, 2, 2), "txt_mask": None, "pooled": torch.arange(3.0)[:, None]}
    null = {"txt": torch.zeros(3, 2, 2), "txt_mask": None, "pooled": torch.zeros(3, 1)}
    picked = condition_tree.where(torch.tensor([True, False, True]), null, cond)
    assert picked["txt"][1].equal(cond["txt"][1]) and picked["txt"][0].abs().sum() == 0
    assert condition_tree.select(cond, slice(0, 2))["pooled"].shape == (2, 1)
    assert condition_tree.concat(cond, null)["txt"].shape == (6, 2, 2)
    assert condition_tree.batch_size(cond) == 3
    with pytest.raises(ValueError, match="padded length"):
        condition_tree.where(torch.tensor([True] * 3), {"txt": torch.zeros(3, 5)}, {"txt": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match="different entries"):
        condition_tree.concat({"a": torch.zeros(1)}, {"b": torch.zeros(1)})


def test_clean_estimate():
    x, v, t = torch.randn(2, 3, dtype=f64), torch.randn(2, 3, dtype=f64), torch.tensor([0.2, 0.9], dtype=f64)
    torch.testing.assert_close(clean_estimate(v, x, t), x - t[:, None] * v)


def test_config_validation():
    with pytest.raises(ValueError, match="caption_dropout"):
        ObjectiveConfig(caption_dropout=1.0)
    with pytest.raises(ValueError, match="s_split"):
        ObjectiveConfig(s_split="thirds")
    with pytest.raises(ValueError, match="aux_k"):
        ObjectiveConfig(aux_k=1.5)
    with pytest.raises(ValueError, match="self_eval_guidance"):
        ObjectiveConfig(self_eval_guidance=-1.0)
    assert ObjectiveConfig(time_shift={"mu": 0.5}).time_shift.mu == 0.5


def test_the_mmdit_runs_the_same_objective():
    from selfe.network.config import mmdit_preset
    from selfe.network.model import MMDiT

    torch.manual_seed(0)
    model, ema = MMDiT(mmdit_preset("tiny")), MMDiT(mmdit_preset("tiny"))
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    c = model.config
    mask = torch.tensor([[True] * 5 + [False] * 3, [True] * 8, [True] * 2 + [False] * 6, [True] * 8])
    cond = {"txt": torch.randn(4, 8, c.txt_dim), "txt_mask": mask, "pooled": torch.randn(4, c.vec_dim)}
    null = {"txt": torch.zeros(4, 8, c.txt_dim), "txt_mask": mask.clone(), "pooled": torch.zeros(4, c.vec_dim)}
    fake = {"txt": torch.randn(4, 8, c.txt_dim), "txt_mask": mask.clone(), "pooled": torch.randn(4, c.vec_dim)}
    fake_null = {"txt": torch.randn(4, 8, c.txt_dim), "txt_mask": mask.clone(), "pooled": torch.randn(4, c.vec_dim)}
    batch = {"x0": torch.randn(4, 16, 8, 8), "cond": cond, "null_cond": null, "fake_cond": fake, "num_tokens": 16}
    batch["fake_null_cond"] = fake_null
    cfg = ObjectiveConfig(tau_warmup=0, aux_start=0, caption_dropout=0.5, kernel_backend="torch")
    loss, metrics = SelfELoss(cfg)(model, ema, batch, iteration=1, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and metrics["frac_self"].item() == 0.5 and metrics["loss_fake"].item() > 0
    assert all(p.grad is None for p in ema.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
