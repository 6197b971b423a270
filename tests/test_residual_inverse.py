"""Solvers of ``x + g(x) = z``: against the equation they solve, in float64."""

import math

import pytest
import torch

from flows.bijections.residual import ResidualBlock
from flows.bijections.residual_inverse import (
    fixed_point_solve,
    newton_solve,
    solve_identity_plus,
)
from tests.test_iresnet import TIGHT, make_net


def wobble(c: float, omega: float):
    """``g(x) = c sin(omega x) / omega`` elementwise over ``(B, D)`` (``Lip(g) = c``) and its
    Jacobian, counting the calls."""
    def g_and_jacobian(x):
        g_and_jacobian.calls += 1
        return c * torch.sin(omega * x) / omega, torch.diag_embed(c * torch.cos(omega * x))
    g_and_jacobian.calls = 0
    return g_and_jacobian


def max_residual(g_and_jacobian, x, z):
    return (x + g_and_jacobian(x)[0] - z).abs().max()


@pytest.mark.parametrize("features", [1, 2, 3])
def test_solve_identity_plus_solves_the_system(features):
    torch.manual_seed(0)
    jac = torch.randn(64, features, features, dtype=torch.float64)
    jac = 0.95 * jac / torch.linalg.matrix_norm(jac, ord=2)[:, None, None]  # |J| < 1
    rhs = torch.randn(64, features, dtype=torch.float64)
    x = solve_identity_plus(jac, rhs)
    identity = torch.eye(features, dtype=torch.float64)
    torch.testing.assert_close(torch.einsum("bij,bj->bi", identity + jac, x), rhs)


@pytest.mark.parametrize("features", [1, 2])
def test_newton_solves_a_near_critical_map(features):
    """``Lip(g) = 0.99``: ``1 + g'`` drops to 0.01, where a plain Newton step jumps far (from
    4 of these 4,001 starts in 1-D, plain Newton diverged when this test was written)."""
    g_and_jacobian = wobble(0.99, 3.0)
    z = torch.linspace(-10, 10, 4001, dtype=torch.float64).unsqueeze(1)
    z = torch.cat([z, z.flip(0)], 1)[:, :features]
    x, evaluations, converged = newton_solve(g_and_jacobian, z, 1e-12, 0.0, 500)
    assert converged and g_and_jacobian.calls == evaluations
    assert max_residual(g_and_jacobian, x, z) < 1e-11
    x_fixed, iterations, fixed_converged = fixed_point_solve(
        lambda x: g_and_jacobian(x)[0], z, 1e-12, 0.0, 20_000)
    assert fixed_converged and max_residual(g_and_jacobian, x_fixed, z) < 1e-11
    assert evaluations < iterations / 10  # quadratic against linear convergence


@pytest.mark.parametrize("rtol", [0.0, 1e-5])
def test_newton_with_a_singular_jacobian_falls_back_to_the_contraction(rtol):
    """A Jacobian reported as ``-I`` makes every Newton step ``F / 0`` (inf or NaN): each is
    rejected and the fixed-point steps still converge. With ``rtol > 0`` an infinite step to
    an infinite point passes ``|step| <= atol + rtol |x|`` (inf <= inf): it was taken as
    converged at inf."""
    g_and_jacobian = wobble(0.5, 3.0)
    z = torch.linspace(-3, 3, 11, dtype=torch.float64).unsqueeze(1)

    def minus_identity(x):
        return g_and_jacobian(x)[0], -torch.ones(len(x), 1, 1, dtype=x.dtype)

    x, evaluations, converged = newton_solve(minus_identity, z, 1e-12, rtol, 500)
    assert converged and torch.isfinite(x).all()
    assert max_residual(g_and_jacobian, x, z) < (1e-11 if rtol == 0 else 1e-4)


def test_newton_keeps_the_event_shape():
    """``(B, 1, 2, 2)`` events: ``J_g`` over the flattened 4 features."""
    inner = wobble(0.9, 2.0)

    def g_and_jacobian(x):
        gx, jac = inner(x.flatten(1))
        return gx.view_as(x), jac

    z = torch.randn(16, 1, 2, 2, dtype=torch.float64)
    x, _, converged = newton_solve(g_and_jacobian, z, 1e-12, 0.0, 100)
    assert converged and x.shape == z.shape
    assert max_residual(g_and_jacobian, x, z) < 1e-11


def test_newton_at_the_cap():
    z = torch.linspace(-10, 10, 101, dtype=torch.float64).unsqueeze(1)
    g_and_jacobian = wobble(0.99, 5.0)
    x, evaluations, converged = newton_solve(g_and_jacobian, z, 1e-12, 0.0, 3)
    assert not converged and evaluations == g_and_jacobian.calls == 3 and x.shape == z.shape
    g_and_jacobian = wobble(0.99, 5.0)  # one evaluation: the fixed point's first step
    x, evaluations, converged = newton_solve(g_and_jacobian, z, 1e-12, 0.0, 1)
    assert not converged and evaluations == g_and_jacobian.calls == 1
    torch.testing.assert_close(x, z - g_and_jacobian(z)[0])


def test_auto_inverse_is_newton_in_2d_and_fixed_point_above():
    block = ResidualBlock(make_net())
    assert block.newton_inverse(torch.zeros(1, 2))
    assert not block.newton_inverse(torch.zeros(1, 3))
    assert not ResidualBlock(make_net(), inverse_method="fixed_point").newton_inverse(
        torch.zeros(1, 2))


def test_unknown_inverse_method_raises():
    with pytest.raises(ValueError, match="inverse_method='bisection' must be one of"):
        ResidualBlock(make_net(), inverse_method="bisection")


@pytest.mark.parametrize("features", [2, 3])
def test_newton_and_fixed_point_blocks_agree(features):
    """Both methods reach the same root; Newton in fewer evaluations (``Lip(g) <= 0.97``)."""
    net = make_net(features=features, coeff=0.99)
    x = 3 * torch.randn(256, features, dtype=torch.float64)
    iterations = {}
    with torch.no_grad():
        z, _ = ResidualBlock(net, logdet="exact")(x)
        for method in ("newton", "fixed_point"):
            block = ResidualBlock(net, logdet="exact", inverse_method=method, **TIGHT)
            x_back, _ = block.inverse(z)
            torch.testing.assert_close(x_back, x, atol=1e-10, rtol=0)
            assert block.last_inverse_residual < 1e-10
            iterations[method] = block.last_inverse_iterations
    assert iterations["newton"] < iterations["fixed_point"]


@pytest.mark.parametrize("method", ["newton", "fixed_point"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_sample_stops_counting(method, bad):
    """One NaN or infinite sample neither holds the others to the iteration cap nor passes
    as converged: the finite samples invert as without it, and the warning names the count."""
    net = make_net(features=3, coeff=0.99)
    x = 3 * torch.randn(16, 3, dtype=torch.float64)
    block = ResidualBlock(net, logdet="exact", inverse_method=method, **TIGHT)
    with torch.no_grad():
        z, _ = block(x)
        block.inverse(z)
        clean_iterations = block.last_inverse_iterations
        z[5, 1] = bad
        with pytest.warns(RuntimeWarning, match=r"1 of 16 samples are not finite .*, 1 of "
                                                r"them already in its input z"):
            x_back, logdet = block.inverse(z)
    keep = torch.arange(16) != 5
    torch.testing.assert_close(x_back[keep], x[keep], atol=1e-10, rtol=0)
    assert block.last_inverse_iterations == clean_iterations
    assert not torch.isfinite(x_back[5]).all() and not torch.isfinite(logdet[5])
    assert torch.isfinite(logdet[keep]).all()


def test_a_non_finite_sample_does_not_hide_the_others_non_convergence():
    """With one NaN sample and too few iterations for the rest, both are reported, and the
    residual is the finite samples' (a NaN one would hide it)."""
    net = make_net(features=3, coeff=0.99)
    x = 3 * torch.randn(16, 3, dtype=torch.float64)
    block = ResidualBlock(net, logdet="exact", inverse_method="fixed_point",
                          inverse_max_iterations=2)
    with torch.no_grad():
        z, _ = block(x)
        z[5, 1] = float("nan")
        with pytest.warns(RuntimeWarning) as record:
            block.inverse(z)
    messages = " | ".join(str(w.message) for w in record)
    assert "1 of 16 samples are not finite" in messages
    assert "did not converge" in messages
    assert 1e-6 < block.last_inverse_residual < 1.0


def test_newton_stops_at_once_for_non_finite_weights():
    """NaN weights make every ``g(z)`` NaN: no sample can converge, none is waited for (it ran
    to the iteration cap)."""
    net = make_net(features=2)
    with torch.no_grad():
        net.linears[0].parametrizations.weight.original.fill_(float("nan"))
    block = ResidualBlock(net, logdet="exact", inverse_method="newton")
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="8 of 8 samples are not finite"):
        block.inverse(torch.randn(8, 2, dtype=torch.float64))
    assert block.last_inverse_iterations == 1
    assert math.isnan(block.last_inverse_residual)  # no finite sample: not 0
