"""i-ResNet: residual blocks ``x + g(x)``, Lipschitz MLPs for vectors, convolutions for images."""

from __future__ import annotations

from collections.abc import Sequence

from flows.bijections.elementwise import Logit
from flows.bijections.normalization import ActNorm
from flows.bijections.reshape import FactorOut, Squeeze, squeezed_shape
from flows.bijections.residual import ResidualBlock
from flows.bijections.residual_chain import MLPResidualChain
from flows.core import Bijection, Compose, Inverse, NormalizingFlow
from flows.distributions import StandardNormal
from flows.models.multiscale import image_shape
from flows.nn.lipschitz import LipschitzMLP
from flows.nn.lipschitz_conv import LipschitzConvNet


class IResNet(NormalizingFlow):
    """An invertible residual network ``f = (ActNorm o R_K) o ... o (ActNorm o R_1)``.

    Each ``R_k(x) = x + g_k(x)`` with ``g_k`` a ``LipschitzMLP`` of ``num_hidden`` hidden layers,
    ``Lip(g_k) <= c^(num_hidden + 1) < 1``; ``log p(x) = log N(f(x); 0, I) + sum_k log|det
    (I + J_{g_k})| + sum ActNorm log-dets``. The paper's 2-D setup is 100 blocks of 2-64-64-64-2
    ELU MLPs with ActNorm after each block and the exact log-det; the defaults here are a smaller
    placeholder (8 blocks, 2 hidden layers of 128, LipSwish).

    Args:
        features: data dimension ``D``.
        num_blocks: number of residual blocks ``K``.
        hidden_features: width of each MLP's hidden layers.
        num_hidden: hidden layers per MLP.
        activation: ``"elu"`` or ``"lipswish"``.
        lipschitz_coeff: spectral-norm target ``c`` of every linear, in (0, 1); 0.9 gives
            ``Lip(g) <= 0.73`` with 2 hidden layers, so each fixed-point step of the inverse
            shrinks its error at least 0.73-fold (at most ~40 steps to 1e-5; Newton's
            steps, the 2-D default, need fewer).
        actnorm: ActNorm after every block.
        logdet: ``"auto"`` (exact for ``D <= 2``), ``"exact"`` or ``"series"``.
        num_terms: power-series terms in training.
        num_probes: Hutchinson probes in training.
        eval_num_terms: power-series terms in eval mode.
        eval_num_probes: Hutchinson probes in eval mode.
        probe: ``"gaussian"`` or ``"rademacher"``.
        series_gradient: ``"neumann"`` or ``"backprop"``, how training differentiates the
            series (see ``ResidualBlock``; ``"neumann_in_forward"`` is for conv nets, whose
            products are autograd's).
        n_power_iterations: power-iteration steps per training forward of each linear.
        power_iteration_tol: ``None``, or continue each training forward's power iteration
            until a step moves ``u, v`` by at most it (``SpectralNormalization``; e.g. 1e-3).
        training_svd: take each training forward's singular vectors from the SVD of every
            weight instead of power steps: exact ``sigma`` in training.
        inverse_method: each block's inverse: ``"auto"`` (Newton's method for ``D <= 2``,
            else the fixed-point iteration), ``"newton"`` or ``"fixed_point"``.
        inverse_atol: absolute tolerance of each block's inverse.
        inverse_rtol: relative tolerance of each block's inverse.
        inverse_max_iterations: iteration cap of each block's inverse.
        compile: run the forward (exact or power series) through ``torch.compile``,
            ``blocks_per_call`` blocks (with their ActNorms) per compiled call
            (``MLPResidualChain``; the 32-block 2-D default: 32 ms per training step against
            48 ms eagerly on 2 CPU threads; eager with a warning if compiling fails).
        blocks_per_call: blocks per fused call of the forward.

    References:
        Behrmann et al., Invertible Residual Networks (2019), https://arxiv.org/abs/1811.00995
    """

    def __init__(
        self,
        features: int,
        num_blocks: int = 8,
        hidden_features: int = 128,
        num_hidden: int = 2,
        activation: str = "lipswish",
        lipschitz_coeff: float = 0.9,
        actnorm: bool = True,
        logdet: str = "auto",
        num_terms: int = 5,
        num_probes: int = 1,
        eval_num_terms: int = 20,
        eval_num_probes: int = 4,
        probe: str = "gaussian",
        series_gradient: str = "neumann",
        n_power_iterations: int = 1,
        power_iteration_tol: float | None = None,
        training_svd: bool = False,
        inverse_method: str = "auto",
        inverse_atol: float = 1e-5,
        inverse_rtol: float = 1e-5,
        inverse_max_iterations: int = 1000,
        compile: bool = False,
        blocks_per_call: int = 4,
    ) -> None:
        blocks = [
            ResidualBlock(
                LipschitzMLP(features, hidden_features, num_hidden, activation, lipschitz_coeff,
                             n_power_iterations, power_iteration_tol, training_svd),
                logdet=logdet,
                num_terms=num_terms,
                num_probes=num_probes,
                eval_num_terms=eval_num_terms,
                eval_num_probes=eval_num_probes,
                probe=probe,
                series_gradient=series_gradient,
                inverse_method=inverse_method,
                inverse_atol=inverse_atol,
                inverse_rtol=inverse_rtol,
                inverse_max_iterations=inverse_max_iterations,
            )
            for _ in range(num_blocks)
        ]
        actnorms = [ActNorm(features) for _ in range(num_blocks)] if actnorm else None
        super().__init__(MLPResidualChain(blocks, actnorms, blocks_per_call, compile),
                         StandardNormal((features,)))


class ConvIResNet(NormalizingFlow):
    """i-ResNet for images (Behrmann et al. 2019, App. C.3): multi-scale conv residual blocks.

    ``Logit`` first, then ``num_scales`` scales, each: squeeze ``(C, H, W) -> (4C, H/2, W/2)``,
    ``num_blocks`` residual blocks ``x + g(x)`` with ``g = conv3x3 -> act -> conv1x1 -> act ->
    conv3x3`` (``LipschitzConvNet``, every conv operator normalised to ``c``, so
    ``Lip(g) <= c^3``), each followed by ActNorm; between scales half the channels are factored
    out (``factor_out``) or all continue. Image dimensions are far above 2, so the log-det is
    the truncated power series with Hutchinson probes (``num_terms``/``num_probes`` in
    training, ``eval_*`` in eval mode; the paper used 10 terms on MNIST, 5 on CIFAR-10).

    Args:
        shape: ``(C, H, W)`` of the data; ``H, W`` divisible by ``2^num_scales``.
        num_scales: number of scales (the paper: 3).
        num_blocks: residual blocks per scale (the paper: 32).
        hidden_channels: width of ``g`` (the paper: 32 on MNIST, 512 on CIFAR-10).
        activation: ``"elu"`` or ``"lipswish"``.
        lipschitz_coeff: operator-norm target ``c`` of every convolution, in (0, 1).
        actnorm: ActNorm after every block.
        factor_out: factor out half the channels after each scale but the last.
        num_terms, num_probes, eval_num_terms, eval_num_probes, probe, series_gradient: the
            log-det series (see ``ResidualBlock``).
        n_power_iterations: power-iteration steps per training forward of each convolution.
        power_iteration_tol: ``None``, or continue each training forward's power iteration
            until a step moves ``u, v`` by at most it (``SpectralNormalization``; e.g. 1e-3).
        inverse_atol, inverse_rtol, inverse_max_iterations: each block's fixed-point inverse.
        alpha: the logit transform's ``alpha``.
        compile: run each block's series in training steps through ``torch.compile``
            (``LipschitzConvNet``): one graph per scale, compiled at the first step.

    References:
        Behrmann et al., Invertible Residual Networks (2019), https://arxiv.org/abs/1811.00995
    """

    def __init__(
        self,
        shape: Sequence[int],
        num_scales: int = 2,
        num_blocks: int = 4,
        hidden_channels: int = 32,
        activation: str = "elu",
        lipschitz_coeff: float = 0.9,
        actnorm: bool = True,
        factor_out: bool = True,
        num_terms: int = 5,
        num_probes: int = 1,
        eval_num_terms: int = 20,
        eval_num_probes: int = 4,
        probe: str = "gaussian",
        series_gradient: str = "neumann",
        n_power_iterations: int = 1,
        power_iteration_tol: float | None = None,
        inverse_atol: float = 1e-5,
        inverse_rtol: float = 1e-5,
        inverse_max_iterations: int = 1000,
        alpha: float = 0.05,
        compile: bool = False,
    ) -> None:
        shape = image_shape(shape, "ConvIResNet")
        if num_scales < 1 or num_blocks < 1:
            raise ValueError(f"need num_scales >= 1 and num_blocks >= 1, got {num_scales} and "
                             f"{num_blocks}")

        def block(block_shape: tuple[int, int, int]) -> list[Bijection]:
            net = LipschitzConvNet(block_shape, hidden_channels, activation, lipschitz_coeff,
                                   n_power_iterations, compile, power_iteration_tol)
            residual = ResidualBlock(
                net, logdet="series", num_terms=num_terms, num_probes=num_probes,
                eval_num_terms=eval_num_terms, eval_num_probes=eval_num_probes, probe=probe,
                series_gradient=series_gradient, inverse_atol=inverse_atol,
                inverse_rtol=inverse_rtol, inverse_max_iterations=inverse_max_iterations,
            )
            return [residual, ActNorm(block_shape[0])] if actnorm else [residual]

        def scale(scale_shape: tuple[int, int, int], remaining: int) -> Bijection:
            squeezed = squeezed_shape(scale_shape)
            layers: list[Bijection] = [Squeeze()]
            for _ in range(num_blocks):
                layers += block(squeezed)
            if remaining > 1 and factor_out:
                inner = scale((squeezed[0] // 2, *squeezed[1:]), remaining - 1)
                layers.append(FactorOut(inner, squeezed[0]))
            elif remaining > 1:
                layers.append(scale(squeezed, remaining - 1))
            return Compose(*layers, Inverse(Squeeze()))

        super().__init__(Compose(Logit(alpha), scale(shape, num_scales)), StandardNormal(shape))
