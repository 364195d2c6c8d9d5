import itertools

import pytest
import torch

from wlora_dist.method.projections import project, project_simplex, project_topk, topk_mask


def test_topk_signed_keeps_largest_values_and_zeroes_rest():
    w = torch.tensor([0.5, -3.0, 2.0, 0.1, 1.0])
    out = project_topk(w, 2, "signed")
    assert out.tolist() == [0.0, 0.0, 2.0, 0.0, 1.0]


def test_topk_magnitude_keeps_large_negative():
    w = torch.tensor([0.5, -3.0, 2.0, 0.1, 1.0])
    out = project_topk(w, 2, "magnitude")
    assert out.tolist() == [0.0, -3.0, 2.0, 0.0, 0.0]


def test_topk_ties_break_by_lower_index():
    w = torch.ones(6)
    assert topk_mask(w, 3).tolist() == [True, True, True, False, False, False]
    w = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.0])
    assert topk_mask(w, 2).tolist() == [False, True, True, False, False]


def test_topk_no_renormalisation_and_rejects_bad_k():
    w = torch.tensor([3.0, 1.0, 2.0])
    assert project_topk(w, 3).tolist() == w.tolist()
    with pytest.raises(ValueError, match="k=0"):
        project_topk(w, 0)
    with pytest.raises(ValueError, match="k=4"):
        project_topk(w, 4)


def _simplex_by_bisection(v: torch.Tensor) -> torch.Tensor:
    """Reference: find theta with sum(max(v - theta, 0)) = 1 by bisection."""
    v = v.double()
    lo, hi = float(v.min()) - 1.0, float(v.max())
    for _ in range(200):
        mid = (lo + hi) / 2
        if torch.clamp(v - mid, min=0).sum() > 1:
            lo = mid
        else:
            hi = mid
    return torch.clamp(v - (lo + hi) / 2, min=0)


@pytest.mark.parametrize("seed", range(5))
def test_simplex_matches_reference_and_is_on_simplex(seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(37, generator=g, dtype=torch.float64) * 3
    p = project_simplex(v)
    assert torch.all(p >= 0)
    assert abs(float(p.sum()) - 1.0) < 1e-12
    assert torch.allclose(p, _simplex_by_bisection(v), atol=1e-10)
    assert torch.equal(project_simplex(p), p) or torch.allclose(project_simplex(p), p, atol=1e-15)  # idempotent


def test_simplex_of_all_ones_is_uniform():
    p = project_simplex(torch.ones(8))
    assert torch.allclose(p, torch.full((8,), 1 / 8))


def test_simplex_is_euclidean_closest_on_small_grid():
    # Among points of the simplex on a grid, none is closer to v than the projection.
    v = torch.tensor([0.9, -0.2, 0.6], dtype=torch.float64)
    p = project_simplex(v)
    d = float(torch.linalg.vector_norm(v - p))
    steps = [i / 20 for i in range(21)]
    for a, b in itertools.product(steps, steps):
        if a + b <= 1:
            q = torch.tensor([a, b, 1 - a - b], dtype=torch.float64)
            assert float(torch.linalg.vector_norm(v - q)) >= d - 1e-12


def test_project_dispatch():
    w = torch.tensor([1.0, 5.0, 3.0])
    assert project(w, "topk", 1).tolist() == [0.0, 5.0, 0.0]
    assert project(w, "none").tolist() == w.tolist()
    assert abs(float(project(w, "simplex").sum()) - 1) < 1e-6
    with pytest.raises(ValueError):
        project(w, "nope")
