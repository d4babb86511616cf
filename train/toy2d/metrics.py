"""Sample-quality metrics of the 2-D task.

With known modes: precision (samples within 3 sigma of a mode of their own condition), mode coverage
and a sliced Wasserstein distance to held-out data. With a user's data, where the modes are unknown:
k-NN precision and recall (Kynkaenniemi et al., 2019) against held-out data, and the same distance.
All per condition, then averaged over conditions weighted by sample count.
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfe.train.toy2d.data import RingMixture


def mode_precision(x: Tensor, y: Tensor, data: RingMixture, n_std: float = 3.0) -> float:
    """Fraction of samples within n_std * mode_std of any mode owned by their own condition."""
    dist = torch.cdist(x.double(), data.centers.double())  # (N, modes)
    own = data.owners[None, :] == y[:, None]
    dist = torch.where(own, dist, torch.full_like(dist, float("inf")))
    return (dist.min(dim=1).values <= n_std * data.mode_std).double().mean().item()


def mode_coverage(x: Tensor, y: Tensor, data: RingMixture, n_std: float = 3.0, min_share: float = 0.1) -> float:
    """Fraction of (condition, mode) pairs that receive at least `min_share` of their fair share of samples."""
    dist = torch.cdist(x.double(), data.centers.double())
    near = dist <= n_std * data.mode_std
    covered = []
    for mode, owner in enumerate(data.owners.tolist()):
        own = y == owner
        fair = own.sum().item() / data.modes_per_condition
        covered.append(bool(fair > 0 and (near[own, mode]).sum().item() >= max(1.0, min_share * fair)))
    return sum(covered) / len(covered)


def sliced_wasserstein(a: Tensor, b: Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between point sets a (N, d) and b (M, d), via quantiles."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], num_projections, generator=g, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    # Mid-point quantiles: the sample min and max (q = 0, 1) would dominate the distance with their noise.
    q = (torch.arange(256, dtype=torch.float64) + 0.5) / 256
    pa = torch.quantile(a.double() @ dirs, q, dim=0)
    pb = torch.quantile(b.double() @ dirs, q, dim=0)
    return (pa - pb).abs().mean().item()


def conditional_swd(x: Tensor, y: Tensor, x_ref: Tensor, y_ref: Tensor) -> float:
    """Sliced Wasserstein distance per condition, averaged weighted by sample count."""
    total, weight = 0.0, 0
    for c in torch.unique(y).tolist():
        gen, ref = x[y == c], x_ref[y_ref == c]
        if len(gen) and len(ref):
            total += sliced_wasserstein(gen, ref) * len(gen)
            weight += len(gen)
    return total / max(weight, 1)


def _kth_neighbour_radius(points: Tensor, k: int) -> Tensor:
    dist = torch.cdist(points, points)
    k = min(k, points.shape[0] - 1)
    return dist.kthvalue(k + 1, dim=1).values  # +1: the point itself is at distance 0


def _inside_manifold(queries: Tensor, support: Tensor, radii: Tensor) -> Tensor:
    return (torch.cdist(queries, support) <= radii[None, :]).any(dim=1)


def knn_precision_recall(x: Tensor, y: Tensor, x_ref: Tensor, y_ref: Tensor, k: int = 5) -> tuple[float, float]:
    """Improved precision/recall with k-NN balls, per condition, weighted by sample count."""
    prec_sum = rec_sum = 0.0
    n_gen = n_ref = 0
    for c in torch.unique(y_ref).tolist():
        gen, ref = x[y == c].double(), x_ref[y_ref == c].double()
        if len(ref) < 2:
            continue
        if len(gen) < 2:
            n_ref += len(ref)
            continue
        prec_sum += _inside_manifold(gen, ref, _kth_neighbour_radius(ref, k)).double().sum().item()
        rec_sum += _inside_manifold(ref, gen, _kth_neighbour_radius(gen, k)).double().sum().item()
        n_gen += len(gen)
        n_ref += len(ref)
    return prec_sum / max(n_gen, 1), rec_sum / max(n_ref, 1)


def evaluate_samples(x: Tensor, y: Tensor, x_ref: Tensor, y_ref: Tensor, data: RingMixture | None) -> dict[str, float]:
    """All metrics for one sample set. Non-finite samples count as misses and are excluded from distances."""
    finite = torch.isfinite(x).all(dim=1)
    result: dict[str, float] = {"finite_fraction": finite.double().mean().item()}
    xf, yf = x[finite], y[finite]
    share = result["finite_fraction"]
    if data is not None:
        result["precision"] = mode_precision(xf, yf, data) * share if len(xf) else 0.0
        result["coverage"] = mode_coverage(xf, yf, data) if len(xf) else 0.0
    else:
        precision, recall = knn_precision_recall(xf, yf, x_ref, y_ref) if len(xf) else (0.0, 0.0)
        result["precision"], result["recall"] = precision * share, recall
    result["swd"] = conditional_swd(xf, yf, x_ref, y_ref) if len(xf) else float("inf")
    return result
