"""Training-step time of flows against peer libraries on the same architectures, one process.

    pip install -e ".[bench]"          # normflows, nflows, zuko, FrEIA (this benchmark only)
    python benchmarks/compare_peers.py [--rounds 7] [--steps 20]

Case 1, Real NVP 2-D: 8 affine couplings with alternating masks, conditioners 1-128-128-2
(ReLU), batch 512, Adam 1e-3, moons. Case 2, i-ResNet 2-D: 10 residual blocks x + g(x) with
g = 2-128-128-2 (c = 0.9), batch 512; flows with the exact 2x2 log-det (compiled and eager)
and the 5-term series with one Hutchinson probe, normflows' residual flow (Residual Flows'
code: brute-force 2-D log-det, and its default unbiased memory-saving estimator) and FrEIA's
``IResNetLayer``. A training step is forward, backward and ``optimizer.step()``. Every model's
steps run interleaved in rounds with 2 torch threads; the table has the median over rounds
of the mean step time in each round, and each peer's ratio to the fastest flows variant.
Writes ``benchmarks/results/compare_peers.{json,md}``.

Checks made on each peer (stated in the table): does its log-density train (gradient reaches
the weights), and is its reported loss the negative log-likelihood.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flows.data.toy import sample_toy

RESULTS = Path(__file__).resolve().parent / "results"
Step = Callable[[], None]


def moons(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(sample_toy("moons", batch, np.random.default_rng(seed)))


def trainer(log_prob: Callable[[torch.Tensor], torch.Tensor], params, x: torch.Tensor) -> Step:
    optimizer = torch.optim.Adam(params, lr=1e-3)

    def step() -> None:
        loss = -log_prob(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step


def mlp(n_in: int, n_out: int) -> nn.Module:
    """The conditioner every library gets: n_in-128-128-n_out with ReLU."""
    return nn.Sequential(nn.Linear(n_in, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, n_out))


def realnvp_cases(x: torch.Tensor) -> dict[str, tuple[Step, str]]:
    """Case 1: the same 8-coupling Real NVP in each library."""
    cases: dict[str, tuple[Step, str]] = {}
    from flows.models.realnvp import RealNVP

    flow = RealNVP(2, num_layers=8, hidden_features=128, num_hidden=2)
    cases["flows"] = (trainer(flow.log_prob, flow.parameters(), x), "exp of soft-clamped s")

    import normflows as nf

    layers = []
    for _ in range(8):
        layers += [nf.flows.AffineCouplingBlock(nf.nets.MLP([1, 128, 128, 2], init_zeros=True)),
                   nf.flows.Permute(2, mode="swap")]
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(2, trainable=False), layers)
    cases["normflows"] = (trainer(model.log_prob, model.parameters(), x), "exp scale")

    from nflows.distributions import StandardNormal
    from nflows.flows import Flow
    from nflows.transforms import AffineCouplingTransform, CompositeTransform
    from nflows.utils import create_alternating_binary_mask

    class ContextFree(nn.Module):
        """nflows calls conditioners as ``net(inputs, context)``."""

        def __init__(self, n_in: int, n_out: int) -> None:
            super().__init__()
            self.net = mlp(n_in, n_out)

        def forward(self, inputs: torch.Tensor, context: object = None) -> torch.Tensor:
            return self.net(inputs)

    transforms = [AffineCouplingTransform(create_alternating_binary_mask(2, even=i % 2 == 0),
                                          ContextFree) for i in range(8)]
    model = Flow(CompositeTransform(transforms), StandardNormal([2]))
    cases["nflows"] = (trainer(model.log_prob, model.parameters(), x),
                       "scale sigmoid(s + 2): can only shrink")

    import zuko

    lazy = zuko.flows.RealNVP(2, transforms=8, hidden_features=(128, 128))
    cases["zuko"] = (trainer(lambda v: lazy().log_prob(v), lazy.parameters(), x),
                     "exp of soft-clamped s")

    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    inn = Ff.SequenceINN(2)
    for i in range(8):
        inn.append(Fm.AffineCouplingOneSided, subnet_constructor=mlp)
        inn.append(Fm.PermuteRandom, seed=i)

    def freia_log_prob(v: torch.Tensor) -> torch.Tensor:
        z, log_jac = inn(v)
        return -0.5 * z.pow(2).sum(1) - np.log(2 * np.pi) + log_jac
    cases["FrEIA"] = (trainer(freia_log_prob, inn.parameters(), x),
                      "atan soft clamp; random permutations (a swap or the identity in 2-D)")
    return cases


def iresnet_cases(x: torch.Tensor) -> dict[str, tuple[Step, str]]:
    """Case 2: 10 residual blocks 2-128-128-2, c = 0.9."""
    from flows.models.iresnet import IResNet

    cases: dict[str, tuple[Step, str]] = {}
    common = dict(num_blocks=10, hidden_features=128, num_hidden=2, activation="elu",
                  lipschitz_coeff=0.9, actnorm=False)
    for name, kwargs in (("flows exact, compiled", dict(logdet="exact", compile=True)),
                         ("flows exact, eager", dict(logdet="exact")),
                         ("flows series 5 terms", dict(logdet="series", num_terms=5))):
        flow = IResNet(2, **common, **kwargs)
        cases[name] = (trainer(flow.log_prob, flow.parameters(), x), "")

    import normflows as nf

    for name, kwargs, note in (
            ("normflows brute-force 2-D", dict(brute_force=True, reduce_memory=False), ""),
            ("normflows unbiased, memory-saving", {},
             "its training loss is a gradient surrogate, not the NLL")):
        layers = [nf.flows.Residual(nf.nets.LipschitzMLP([2, 128, 128, 2], lipschitz_const=0.9,
                                                         init_zeros=True), **kwargs)
                  for _ in range(10)]
        model = nf.NormalizingFlow(nf.distributions.DiagGaussian(2, trainable=False), layers)

        def step(model: nn.Module = model) -> Callable[[], None]:
            inner = trainer(model.log_prob, model.parameters(), x)

            def run() -> None:
                inner()
                nf.utils.update_lipschitz(model, 5)  # normflows' user must call this
            return run
        cases[name] = (step(), note)

    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    inn = Ff.SequenceINN(2)
    for _ in range(10):
        inn.append(Fm.IResNetLayer, internal_size=128, n_internal_layers=2,
                   jacobian_iterations=5, hutchinson_samples=1, spectral_norm_max=0.9)

    def freia_log_prob(v: torch.Tensor) -> torch.Tensor:
        z, log_jac = inn(v)
        return -0.5 * z.pow(2).sum(1) - np.log(2 * np.pi) + log_jac
    cases["FrEIA IResNetLayer"] = (trainer(freia_log_prob, inn.parameters(), x),
                                   "does not train the likelihood: its series log-det passes "
                                   "no gradient to the weights")
    return cases


def time_cases(cases: dict[str, tuple[Step, str]], rounds: int, steps: int) -> dict[str, float]:
    """Median over rounds of the mean ms per step; every case runs once in each round."""
    for step, _ in cases.values():  # warm-up, compilation, data-dependent initialisation
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (step, _) in cases.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            times[name].append(1000 * (time.perf_counter() - start) / steps)
    return {name: float(np.median(t)) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    x = moons(512)
    report = {}
    for case, build in (("Real NVP 2-D", realnvp_cases), ("i-ResNet 2-D", iresnet_cases)):
        cases = build(x)
        ms = time_cases(cases, args.rounds, args.steps)
        fastest_flows = min(v for k, v in ms.items() if k.startswith("flows"))
        report[case] = [{"library": name, "ms_per_step": ms[name],
                         "ratio_to_flows": ms[name] / fastest_flows, "note": note}
                        for name, (_, note) in cases.items()]
        print(case, json.dumps(report[case], indent=1), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compare_peers.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Training-step time against peers ({date.today()})", "",
             f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch "
             f"{torch.__version__}; `python benchmarks/compare_peers.py --rounds {args.rounds} "
             f"--steps {args.steps}`; batch 512 of moons, Adam 1e-3; median over rounds of the "
             f"mean step time, all cases interleaved in one process.", ""]
    for case, rows in report.items():
        lines += [f"## {case}", "", "| library | ms/step | ratio to flows | note |",
                  "|---|---|---|---|"]
        lines += [f"| {r['library']} | {r['ms_per_step']:.1f} | {r['ratio_to_flows']:.2f} | "
                  f"{r['note']} |" for r in rows]
        lines.append("")
    (RESULTS / "compare_peers.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
