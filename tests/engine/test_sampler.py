"""The any-step sampler: grids, s-policies, the two updates by hand, exactness on a point mass, CFG batching,
determinism, and a step that traces as one graph (no data-dependent control flow, no host sync)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selfe.method.renorm import energy_preserving_cfg
from selfe.method.schedule import TimeShift, sampling_grid, shift_time
from selfe.sampling.sampler import SamplerConfig, denoise_step, draw_noise, guided_velocity, s_grid, sample

f64 = torch.float64


class PointMass(nn.Module):
    """The exact velocity field of a point mass at `target`: V(x, t) = (x - target) / t."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.target = target
        self.calls = 0

    def forward(self, x, t, s, cond):
        self.calls += 1
        return (x - self.target[: x.shape[0]]) / t.view(-1, *([1] * (x.dim() - 1)))


def test_grid_is_shifted_linspace():
    for steps in (1, 2, 5, 50):
        grid = sampling_grid(steps, 0.8)
        assert grid.shape == (steps + 1,) and grid[0] == 1.0 and grid[-1] == 0.0
        assert (grid[1:] < grid[:-1]).all()
        torch.testing.assert_close(
            grid.double(), shift_time(torch.linspace(1, 0, steps + 1, dtype=f64), 0.8), atol=1e-7, rtol=0
        )
    with pytest.raises(ValueError, match="steps"):
        sampling_grid(0, 0.0)


def test_s_policies():
    grid = torch.tensor([1.0, 0.6, 0.2, 0.0])
    assert s_grid(grid, "next").tolist() == pytest.approx([0.6, 0.2, 0.0])
    assert s_grid(grid, "current").tolist() == pytest.approx([1.0, 0.6, 0.2])
    assert s_grid(grid, "midpoint").tolist() == pytest.approx([0.8, 0.4, 0.1])
    assert s_grid(grid, "fixed", 0.5).tolist() == pytest.approx([0.6, 0.5, 0.2])  # clamped into [t_{k+1}, t_k]
    with pytest.raises(ValueError, match="s_policy"):
        s_grid(grid, "last")


@pytest.mark.parametrize("method", ["ddim", "euler"])
@pytest.mark.parametrize("steps", [1, 2, 3, 8])
def test_exact_field_lands_on_the_point_mass(method, steps):
    target = torch.randn(3, 4, 2, 2, dtype=f64)
    noise = torch.randn(3, 4, 2, 2, dtype=f64)
    cfg = SamplerConfig(steps=steps, method=method, guidance=None, time_shift=TimeShift(mu=0.6), kernel_backend="torch")
    out = sample(PointMass(target), noise, cond=None, config=cfg, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, target, rtol=1e-10, atol=1e-10)


def test_ddim_and_euler_steps_by_hand():
    g = torch.Generator().manual_seed(1)
    x, z, v = (torch.randn(2, 3, generator=g, dtype=f64) for _ in range(3))
    t_k, t_n, eta = 0.8, 0.3, 0.7

    def step(method):
        full = lambda value: torch.full((2,), value, dtype=f64)
        net = lambda x_, t, s, c: v
        return denoise_step(net, x, full(t_k), full(t_n), full(t_n), None, None, None, z,
                            torch.tensor(eta, dtype=f64), method)  # fmt: skip

    x0_hat, eps_hat = x - t_k * v, x + (1 - t_k) * v
    b = max(t_n - eta * (t_k - t_n) * t_n / t_k, 0.0)
    expected = (1 - t_n) * x0_hat + b * eps_hat + (t_n**2 - b**2) ** 0.5 * z
    torch.testing.assert_close(step("ddim"), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step("euler"), x - (t_k - t_n) * v)


def test_cfg_runs_one_batched_forward_per_step_and_preserves_the_norm():
    calls = []

    def net(x, t, s, cond):
        calls.append((x.shape[0], cond.clone()))
        return x * (1 + cond.view(-1, 1).to(x.dtype))

    x = torch.randn(3, 5, dtype=f64)
    cond, null = torch.tensor([1, 2, 3]), torch.zeros(3, dtype=torch.long)
    cfg = SamplerConfig(steps=4, guidance=3.0, time_shift=TimeShift(mu=0.0), kernel_backend="torch")
    sample(net, x, cond, null, cfg, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 4 and all(n == 6 for n, _ in calls)
    assert torch.equal(calls[0][1], torch.cat([cond, null]))
    v = guided_velocity(net, x, torch.ones(3), torch.ones(3), cond, null, torch.full((3,), 3.0), "torch")
    vc, vu = net(x, None, None, cond), net(x, None, None, null)
    torch.testing.assert_close(v, energy_preserving_cfg(vc, vu, 3.0))
    torch.testing.assert_close(v.norm(dim=1), vc.norm(dim=1))


def test_deterministic_for_a_generator():
    net = PointMass(torch.zeros(2, 3))
    noise = torch.randn(2, 3)
    cfg = SamplerConfig(steps=3, guidance=None, time_shift=TimeShift(mu=0.0), kernel_backend="torch")
    wobbly = lambda x, t, s, c: net(x, t, s, c) + 0.3  # not exact, so the injected noise shows
    a = sample(wobbly, noise, None, config=cfg, generator=torch.Generator().manual_seed(5))
    b = sample(wobbly, noise, None, config=cfg, generator=torch.Generator().manual_seed(5))
    c = sample(wobbly, noise, None, config=cfg, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_step_traces_as_one_graph():
    torch._dynamo.reset()  # denoise_step's code object may hold the pipeline tests' traces, up to dynamo's limit
    lin = nn.Linear(4, 4)
    net = lambda x, t, s, c: lin(x) * t[:, None] + (t - s)[:, None] + c
    step = torch.compile(denoise_step, backend="eager", fullgraph=True, dynamic=False)
    x, z = torch.randn(2, 4), torch.randn(2, 4)
    c, n = torch.randn(2, 4), torch.zeros(2, 4)
    args = (
        torch.full((2,), 0.7),
        torch.full((2,), 0.2),
        torch.full((2,), 0.2),
        c,
        n,
        torch.full((2,), 4.0),
        z,
        torch.tensor(1.0),
    )
    out = step(net, x, *args, "ddim", "torch")
    torch.testing.assert_close(out, denoise_step(net, x, *args, "ddim", "torch"))


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="steps"):
        SamplerConfig(steps=0)
    with pytest.raises(ValueError, match="method"):
        SamplerConfig(method="heun")
    with pytest.raises(ValueError, match="guidance"):
        SamplerConfig(guidance=float("nan"))
    with pytest.raises(ValueError, match="null"):
        sample(PointMass(torch.zeros(1, 2)), torch.randn(1, 2), None, None, SamplerConfig(guidance=2.0))


def test_draw_noise_takes_one_generator_per_sample() -> None:
    shape = (3, 4, 2, 2)
    got = draw_noise(shape, [torch.Generator().manual_seed(s) for s in (5, 6, 7)], "cpu")
    want = torch.cat([torch.randn((1, 4, 2, 2), generator=torch.Generator().manual_seed(s)) for s in (5, 6, 7)])
    assert torch.equal(got, want)
    one = draw_noise(shape, torch.Generator().manual_seed(5), "cpu")  # one generator: one draw for the batch
    assert torch.equal(one, torch.randn(shape, generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(one[1], got[1])
    with pytest.raises(ValueError, match="one per sample: got 2 for 3 samples"):
        draw_noise(shape, [torch.Generator(), torch.Generator()], "cpu")
