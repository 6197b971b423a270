"""The same architectures built in flows and in each peer library, for compare_peers.py.

Every builder returns ``{name: Candidate}``: the model, a log-density to train, a sampler
(``z ~ N(0, I)`` decoded through the inverse), the note the results table carries, and for
normflows' residual flows the Lipschitz upkeep its users must call after each step. Builders
construct fresh models, so ``torch.manual_seed`` before a call fixes their initialisation.

Peers (the ``bench`` extra): normflows, nflows, zuko, FrEIA.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

LOG_2PI = math.log(2 * math.pi)


@dataclass
class Candidate:
    """One library's model: what a training step, a sampler and the table need."""

    log_prob: Callable[[Tensor], Tensor]
    model: nn.Module
    sample: Callable[[int], Tensor]
    note: str = ""
    after_step: Callable[[], None] = field(default=lambda: None)
    inverse_iterations: Callable[[], int | None] = field(default=lambda: None)
    round_trip: Callable[[Tensor], Tensor] | None = None  # z -> f(f^-1(z)), residual flows
    # (optimizer, max_grad_norm) -> x -> None: a training step the library runs itself (flows'
    # compiled step) in place of forward, backward, gradient clipping and optimizer.step()
    make_step: Callable[[torch.optim.Optimizer, float | None],
                        Callable[[Tensor], object]] | None = None
    # x -> z, the map whose change of variables log_prob claims (2-D cases): what
    # likelihood_check differentiates for the exact log-density
    encode: Callable[[Tensor], Tensor] | None = None


def mlp(n_in: int, n_out: int) -> nn.Module:
    """The conditioner every library gets: n_in-128-128-n_out with ReLU."""
    return nn.Sequential(nn.Linear(n_in, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, n_out))


def _flows(flow: nn.Module, note: str = "") -> Candidate:
    return Candidate(flow.log_prob, flow, flow.sample, note,
                     encode=lambda x: flow.transform(x)[0])


def _normflows(model: nn.Module, note: str, after_step=lambda: None) -> Candidate:
    """normflows lists its layers in the sampling direction: ``inverse`` maps x -> z."""
    return Candidate(model.log_prob, model, lambda n: model.sample(n)[0], note,
                     after_step, encode=model.inverse)


def _freia(inn: nn.Module, features: int, note: str) -> Candidate:
    def log_prob(x: Tensor) -> Tensor:
        z, log_jac = inn(x)
        return -0.5 * z.pow(2).sum(1) - 0.5 * features * LOG_2PI + log_jac

    def sample(n: int) -> Tensor:
        anchor = next(inn.parameters())
        return inn(torch.randn(n, features, device=anchor.device, dtype=anchor.dtype),
                   rev=True)[0]
    return Candidate(log_prob, inn, sample, note, encode=lambda x: inn(x)[0])


def clamp_variant(clamp: float) -> str:
    """The name of flows' compiled step with its log-scale soft clamp at ``clamp``."""
    return f"flows compiled step, clamp {clamp:g}"


def realnvp_candidates(clamps: tuple[float, ...] = ()) -> dict[str, Candidate]:
    """Case 1: 8 affine couplings, alternating masks, 1-128-128-2 ReLU conditioners.

    ``clamps``: besides flows' default log-scale clamp (2), its compiled step with each of
    these, named by ``clamp_variant`` and built right after the default one.
    """
    from flows.compiled_step import CompiledAdamStep
    from flows.models.realnvp import RealNVP

    def realnvp(compile: bool, **clamp: float) -> RealNVP:
        return RealNVP(2, num_layers=8, hidden_features=128, num_hidden=2, compile=compile,
                       **clamp)

    def compiled_step(note: str, **clamp: float) -> Candidate:
        fused = realnvp(False, **clamp)
        return Candidate(
            fused.log_prob, fused, fused.sample, note + "; loss, gradient and Adam in one graph",
            make_step=lambda optimizer, clip: CompiledAdamStep(fused, optimizer, clip),
            encode=lambda x: fused.transform(x)[0])

    note = "exp of soft-clamped s"
    cases = {"flows": _flows(realnvp(False), note),
             "flows compiled": _flows(realnvp(True), note),
             "flows compiled step": compiled_step(note)}
    for clamp in clamps:
        cases[clamp_variant(clamp)] = compiled_step(f"s soft-clamped to +-{clamp:g}",
                                                    log_scale_clamp=clamp)

    import normflows as nf

    layers = []
    for _ in range(8):
        layers += [nf.flows.AffineCouplingBlock(nf.nets.MLP([1, 128, 128, 2], init_zeros=True)),
                   nf.flows.Permute(2, mode="swap")]
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(2, trainable=False), layers)
    cases["normflows"] = _normflows(model, "exp scale")

    from nflows.distributions import StandardNormal
    from nflows.flows import Flow
    from nflows.transforms import AffineCouplingTransform, CompositeTransform
    from nflows.utils import create_alternating_binary_mask

    class ContextFree(nn.Module):
        """nflows calls conditioners as ``net(inputs, context)``."""

        def __init__(self, n_in: int, n_out: int) -> None:
            super().__init__()
            self.net = mlp(n_in, n_out)

        def forward(self, inputs: Tensor, context: object = None) -> Tensor:
            return self.net(inputs)

    transforms = [AffineCouplingTransform(create_alternating_binary_mask(2, even=i % 2 == 0),
                                          ContextFree) for i in range(8)]
    flow = Flow(CompositeTransform(transforms), StandardNormal([2]))
    cases["nflows"] = Candidate(flow.log_prob, flow, flow.sample,
                                "scale sigmoid(s + 2): can only shrink",
                                encode=flow.transform_to_noise)

    import zuko

    lazy = zuko.flows.RealNVP(2, transforms=8, hidden_features=(128, 128))
    cases["zuko"] = Candidate(lambda v: lazy().log_prob(v), lazy,
                              lambda n: lazy().sample((n,)), "exp of soft-clamped s",
                              encode=lambda v: lazy().transform(v))

    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    inn = Ff.SequenceINN(2)
    for i in range(8):
        inn.append(Fm.AffineCouplingOneSided, subnet_constructor=mlp)
        inn.append(Fm.PermuteRandom, seed=i)
    cases["FrEIA"] = _freia(inn, 2, "atan soft clamp; random permutations (a swap or the "
                                    "identity in 2-D)")
    return cases


def _flows_iresnet(**kwargs) -> Candidate:
    from flows.bijections.residual import ResidualBlock
    from flows.models.iresnet import IResNet

    flow = IResNet(2, num_blocks=10, hidden_features=128, num_hidden=2, activation="elu",
                   lipschitz_coeff=0.9, actnorm=False, **kwargs)
    blocks = [m for m in flow.modules() if isinstance(m, ResidualBlock)]
    candidate = _flows(flow)
    candidate.inverse_iterations = lambda: sum(b.last_inverse_iterations for b in blocks)
    candidate.round_trip = lambda z: flow.transform(flow.transform.inverse(z)[0])[0]
    return candidate


def iresnet_candidates(series: bool = True) -> dict[str, Candidate]:
    """Case 2: 10 residual blocks x + g(x), g = 2-128-128-2 ELU, c = 0.9, no ActNorm.

    flows: exact 2x2 log-det (compiled and eager) and, with ``series``, the 5-term power
    series with one Hutchinson probe (Neumann gradient compiled and eager, backprop);
    normflows' residual flow (Residual Flows' code: brute-force 2-D log-det, and its default
    unbiased memory-saving estimator); FrEIA's ``IResNetLayer``.
    """
    cases = {"flows exact, compiled": _flows_iresnet(logdet="exact", compile=True),
             "flows exact, eager": _flows_iresnet(logdet="exact")}
    if series:
        cases["flows series 5 terms, neumann, compiled"] = _flows_iresnet(
            logdet="series", num_terms=5, compile=True)
        cases["flows series 5 terms, neumann"] = _flows_iresnet(logdet="series", num_terms=5)
        cases["flows series 5 terms, backprop"] = _flows_iresnet(
            logdet="series", num_terms=5, series_gradient="backprop")

    import normflows as nf

    variants = [("normflows brute-force 2-D", dict(brute_force=True, reduce_memory=False),
                 "stops its inverse at |dx|^2 < 1e-5 (1 + |z|), i.e. |dx| ~ 3e-3")]
    if series:
        variants.append(("normflows unbiased, memory-saving", {},
                         "its training loss is a gradient surrogate, not the NLL"))
    for name, kwargs, note in variants:
        layers = [nf.flows.Residual(nf.nets.LipschitzMLP([2, 128, 128, 2], lipschitz_const=0.9,
                                                         init_zeros=True), **kwargs)
                  for _ in range(10)]
        model = nf.NormalizingFlow(nf.distributions.DiagGaussian(2, trainable=False), layers)
        cases[name] = _normflows(model, note,
                                 lambda model=model: nf.utils.update_lipschitz(model, 5))
        # x -> z by each block's x + g(x): its memory-saving estimator's autograd Function
        # modifies saved tensors in place, so ``inverse`` has no second-order backward
        cases[name].encode = lambda x, model=model: _normflows_residual_encode(model, x)
        cases[name].round_trip = lambda z, model=model: _normflows_round_trip(model, z)
    if series:
        import FrEIA.framework as Ff
        import FrEIA.modules as Fm

        inn = Ff.SequenceINN(2)
        for _ in range(10):
            inn.append(Fm.IResNetLayer, internal_size=128, n_internal_layers=2,
                       jacobian_iterations=5, hutchinson_samples=1, spectral_norm_max=0.9)
        cases["FrEIA IResNetLayer"] = _freia(
            inn, 2, "does not train the likelihood: its series log-det passes no gradient to "
                    "the weights")
    return cases


def _normflows_residual_encode(model: nn.Module, x: Tensor) -> Tensor:
    """x -> z through normflows' ``Residual`` layers (listed in the sampling direction, so
    the last first): each ``x + g(x)``, as its ``inverse`` computes it."""
    for flow in reversed(model.flows):
        x = x + flow.iresblock.nnet(x)
    return x


def _normflows_round_trip(model: nn.Module, z: Tensor) -> Tensor:
    """normflows' layers map z -> x in ``forward`` (sampling) and x -> z in ``inverse``."""
    x = z
    for flow in model.flows:
        x, _ = flow(x)
    for flow in reversed(model.flows):
        x, _ = flow.inverse(x)
    return x


def normflows_multiscale(shape: tuple[int, int, int],
                         level: Callable[[int], list[nn.Module]]) -> nn.Module:
    """normflows' Glow example layout (unconditional): 2 levels, each ``level(channels)``'s
    flows then a squeeze (normflows lists flows in the sampling direction), a learned
    Gaussian per level, half the channels factored out between levels."""
    import normflows as nf

    levels, channels = 2, shape[0]
    q0, merges, flows = [], [], []
    for i in range(levels):
        flows.append(level(channels * 2 ** (levels + 1 - i)) + [nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            size = 2 ** (levels - i)
            latent = (channels * size, shape[1] // size, shape[2] // size)
        else:
            size = 2 ** levels
            latent = (channels * 2 ** (levels + 1), shape[1] // size, shape[2] // size)
        q0.append(nf.distributions.DiagGaussian(latent))
    return nf.MultiscaleFlow(q0, flows, merges, class_cond=False)


def normflows_glow(shape: tuple[int, int, int]) -> nn.Module:
    """normflows' Glow example architecture: L = 2 levels, K = 8 blocks of 64 channels."""
    import normflows as nf

    return normflows_multiscale(shape, lambda width: [
        nf.flows.GlowBlock(width, 64, split_mode="channel", scale=True) for _ in range(8)])


def normflows_conv_iresnet(shape: tuple[int, int, int]) -> nn.Module:
    """normflows' residual flow built as flows' default image i-ResNet: 2 scales of 6 blocks
    ``x + g(x)``, ``g = conv3x3 -> ELU -> conv1x1 -> ELU -> conv3x3`` of 32 channels
    (``LipschitzCNN``, c = 0.98, 5 power iterations), ActNorm after each block, half the
    channels factored out between scales; the 5-term truncated power series with one
    Gaussian probe and the Neumann gradient computed in the forward pass (its memory-saving
    default)."""
    import normflows as nf

    def level(width: int) -> list[nn.Module]:
        flows: list[nn.Module] = []
        for _ in range(6):
            net = nf.nets.LipschitzCNN([width, 32, 32, width], [3, 1, 3],
                                       lipschitz_const=0.98, max_lipschitz_iter=5)
            # listed in the sampling direction: x -> z runs the residual block, then ActNorm
            flows += [nf.flows.ActNorm((width, 1, 1)),
                      nf.flows.Residual(net, n_power_series=5, n_samples=1)]
        return flows
    return normflows_multiscale(shape, level)


def flows_image_model(model: str, data: str, *overrides: str) -> nn.Module:
    """The default ``model=<model> data=<data>`` flow (with ``overrides``), built from the
    project's configs."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", f"data={data}", *overrides])
    return instantiate(cfg.model)


def image_candidates(data: str) -> dict[str, Candidate]:
    """Case 3: flows' default image models (``data`` = digits or mnist shapes), normflows'
    Glow (2 levels x 8 blocks, 64 channels; flows' glow default is the same size) and
    normflows' residual flow built as flows' default i-ResNet (``normflows_conv_iresnet``)."""
    from flows.compiled_step import CompiledAdamStep

    cases = {f"flows {m}": _flows(flows_image_model(m, data))
             for m in ("realnvp", "glow", "iresnet")}
    cases["flows iresnet, neumann_in_forward"] = _flows(flows_image_model(
        "iresnet", data, "model.series_gradient=neumann_in_forward"))
    glow = flows_image_model("glow", data)
    cases["flows glow, compiled step"] = Candidate(
        glow.log_prob, glow, glow.sample, "loss, gradient and Adam in one graph",
        make_step=lambda optimizer, clip: CompiledAdamStep(glow, optimizer, clip))
    shape = (1, 8, 8) if data == "digits" else (1, 28, 28)
    model = normflows_glow(shape)
    cases["normflows Glow 2x8, 64 ch"] = Candidate(
        lambda x: model.log_prob(x, None), model, lambda n: model.sample(n)[0])
    import normflows as nf

    residual = normflows_conv_iresnet(shape)
    cases["normflows i-ResNet 2x6, 32 ch"] = Candidate(
        lambda x: residual.log_prob(x, None), residual, lambda n: residual.sample(n)[0],
        "5-term series, 1 probe, Neumann gradient; its training loss is a gradient "
        "surrogate, not the NLL",
        lambda: nf.utils.update_lipschitz(residual, 5))
    return cases
