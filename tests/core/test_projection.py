"""Math invariants of spf.core.projection on random tensors."""

from __future__ import annotations

import pytest
import torch

from spf.core import projection as P
from spf.core.gradients import _gram_factor, thin_svd_of_outer, topk_svds
from tests.helpers import orthonormal

M, N, K, R = 24, 40, 5, 3


@pytest.fixture
def uv():
    gen = torch.Generator().manual_seed(0)
    return orthonormal(M, K, gen), orthonormal(N, K, gen), torch.rand(K, generator=gen) + 0.1


def test_two_sided_projection_is_idempotent_and_removes_the_core(uv):
    u, v, _ = uv
    x = torch.randn(M, N)
    p = P.project_two_sided(x, u, v)
    torch.testing.assert_close(P.project_two_sided(p, u, v), p)
    r = P.remove_two_sided(x, u, v)
    torch.testing.assert_close(P.remove_two_sided(r, u, v), r)
    assert (u.T @ r @ v).abs().max() < 1e-5
    # orthogonal decomposition: ⟨X − P(X), P(X)⟩ = 0 and it is not the trivial zero map
    assert abs(float((r * p).sum())) < 1e-4
    assert p.norm() > 0.1


def test_one_sided_removals(uv):
    u, v, _ = uv
    b, a = torch.randn(M, R), torch.randn(R, N)
    assert (u.T @ P.remove_left(b, u)).abs().max() < 1e-5
    assert (P.remove_right(a, v) @ v).abs().max() < 1e-5
    torch.testing.assert_close(P.remove_left(P.remove_left(b, u), u), P.remove_left(b, u))


def test_lora_one_sided_removal_zeroes_the_effective_core_exactly(uv):
    u, v, _ = uv
    b, a = torch.randn(M, R), torch.randn(R, N)
    db, da = torch.randn(M, R), torch.randn(R, N)
    b2, a2 = b + P.remove_left(db, u), a + P.remove_right(da, v)
    delta = b2 @ a2 - b @ a  # includes the second-order ΔB ΔA term
    assert (u.T @ delta @ v).abs().max() < 1e-4
    # without the projection the core is clearly non-zero
    assert (u.T @ ((b + db) @ (a + da) - b @ a) @ v).abs().max() > 0.1


def test_factored_inner_and_norm_match_dense(uv):
    u, v, s = uv
    left, right = torch.randn(M, 2 * R), torch.randn(2 * R, N)
    dense = left @ right
    g = u @ torch.diag(s) @ v.T
    torch.testing.assert_close(
        P.factored_inner(left, right, u, s, v), (g * dense).sum(), rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(P.factored_sq_norm(left, right), dense.pow(2).sum(), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(P.safety_inner(dense, u, s, v), (g * dense).sum(), rtol=1e-4, atol=1e-4)


def test_lora_delta_factors_are_the_effective_change():
    b, a, b2, a2 = torch.randn(M, R), torch.randn(R, N), torch.randn(M, R), torch.randn(R, N)
    left, right = P.lora_delta_factors(b, a, b2, a2, scale=2.0)
    torch.testing.assert_close(left @ right, 2.0 * (b2 @ a2 - b @ a), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tokens", [7, 60])  # factored route (T < min(m, n)) and dense route
def test_svd_of_outer_product_is_exact(tokens):
    gen = torch.Generator().manual_seed(1)
    d, x = torch.randn(tokens, M, generator=gen), torch.randn(tokens, N, generator=gen)
    g = d.T @ x
    u, s, v = thin_svd_of_outer(d, x)
    assert s.numel() == min(tokens, M, N) and s.dtype == torch.float64
    s_ref = torch.linalg.svdvals(g.double())
    torch.testing.assert_close(s, s_ref[: s.numel()], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(u @ torch.diag(s.float()) @ v.T, g, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(u.T @ u, torch.eye(s.numel()), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v.T @ v, torch.eye(s.numel()), rtol=1e-4, atol=1e-4)


def _projector(a: torch.Tensor) -> torch.Tensor:
    return a.double() @ a.double().T


def test_gram_route_matches_the_dense_svd_with_shared_and_singular_inputs():
    """The factored route (Cholesky of X Xᵀ, the eigen-factor where X Xᵀ is singular, one factor for
    modules reading one input) gives the dense SVD's top directions, module by module."""
    gen = torch.Generator().manual_seed(3)
    t, k = 12, 4
    x_qkv = torch.randn(t, N, generator=gen)
    x_singular = torch.randn(t, N, generator=gen)
    x_singular[3] = x_singular[1]  # a repeated input (layer 0, a repeated token)
    x_singular[0] = 0.0  # an input of zeros: X Xᵀ has a zero first pivot, Cholesky fails
    xs = [x_qkv, x_qkv, x_qkv.clone(), torch.randn(t, N, generator=gen), x_singular, x_singular]
    ds = [torch.randn(t, m, generator=gen) for m in (M, M // 2, M // 2, M, M, 2 * M)]
    got = topk_svds(ds, xs, k, 8, "factored")
    want = topk_svds(ds, xs, k, 8, "dense")
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        ref = torch.linalg.svdvals(ds[i].double().T @ xs[i].double())
        torch.testing.assert_close(g.s[:k], ref[:k], rtol=1e-9, atol=0.0, msg=f"module {i}")
        assert (_projector(g.u) - _projector(w.u)).abs().max() < 1e-5, i
        assert (_projector(g.v) - _projector(w.v)).abs().max() < 1e-5, i
        assert g.energy == pytest.approx(float(ref.pow(2).sum()), rel=1e-9)


def test_gram_factor_falls_back_where_cholesky_fails():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, N, generator=gen, dtype=torch.float64)
    singular = x.clone()
    singular[2] = 0.0
    k = torch.stack([x @ x.T, singular @ singular.T])
    assert torch.linalg.cholesky_ex(k).info.tolist()[1] != 0  # the case the fallback exists for
    fac = _gram_factor(k)
    torch.testing.assert_close(fac @ fac.transpose(1, 2), k, rtol=1e-10, atol=1e-10)
    assert torch.equal(fac[0], torch.linalg.cholesky(k[0]))
