"""flows against peer libraries on the same architectures: step time, memory, NLL per second.

    pip install -e ".[bench]"          # normflows, nflows, zuko, FrEIA (this benchmark only)
    python benchmarks/compare_peers.py [--sections check steps memory budget sampling]
        [--cases ...] [--rounds 7] [--steps 20] [--budget-s 60] [--seeds 0 1 2] [--sets moons ...]
    python benchmarks/compare_peers.py --device cuda --sections steps sampling   # on a GPU

Architectures (``peer_models.py``): case 1, Real NVP 2-D (8 affine couplings, 1-128-128-2
ReLU conditioners); case 2, i-ResNet 2-D (10 blocks 2-128-128-2 ELU, c = 0.9; exact log-det
and 5-term series with one probe); case 3, flows' default image models, normflows' Glow
(2 levels x 8 blocks, 64 channels) and normflows' residual flow in the shape of flows' default
i-ResNet (2 scales x 6 blocks, 32 channels) at 1x8x8 (digits) and 1x28x28, batch 64. 2-D
batches are 512 points of moons; Adam 1e-3 everywhere (1e-4 for images), torch's fused
implementation for every library (flows' configs use it).

Sections, each written into ``benchmarks/results/compare_peers.json`` (merged, so sections can
run separately) and the Markdown table ``compare_peers.md`` regenerated from it:

- ``check`` (the 2-D cases): does each model train the likelihood? After ``--check-steps``
  training steps, its log-density and that log-density's gradient to the weights against the
  exact change of variables of its own map x -> z (``likelihood_check.py``): the gap to the
  exact log-density, the share of the exact log-det's gradient it carries, the gradient's
  error. A peer found not to train it does not count as the fastest peer in the targets
  table. Where a case was not checked (the images), the notes hold what was checked by hand,
  once: a peer's new release needs that again.
- ``steps``: forward + backward + ``optimizer.step()`` (and normflows' Lipschitz upkeep),
  every model of a case interleaved in rounds with 2 torch threads; the median over rounds
  of the mean step time, and the ratio to the fastest flows variant taken round by round
  (its median and quartiles over rounds: the machine's drift moves a ratio less than a time);
  and the minor page faults per step (the process's, over each timed block; Unix), where
  glibc has returned freed memory to the system and a step touches it again: how many depends
  on the process's allocation history, not only on the library.
- ``memory``: peak resident memory added by 5 training steps after 2 warm-up steps, each
  model alone in a fresh process (the peak RSS over the steps minus the RSS before them,
  Linux, with glibc returning freed tensors to the system); and the same for the i-ResNet
  series at 2, 5, 10 and 20 terms.
- ``budget``: test NLL (nats, 50,000 test points of flows' toy split, seed s) after
  ``--budget-s`` seconds of training on moons, 8gaussians and checkerboard (``--sets``: any
  of flows' toy sets; a run adds or replaces its own sets' cells; a run with another budget,
  seeds, decay or clip than the stored table's is refused unless ``--fresh-table``), mean
  over seeds; exact
  log-dets for every i-ResNet evaluated. The budget includes ``torch.compile``'s
  compilation, paid afresh by every run. ``budget-decay``: the same with the learning rate
  decayed linearly to 0 over the budget's wall-clock time. ``budget-ema``: the constant rate,
  evaluated at an exponential moving average of the weights (``--ema-decay``, updated after
  every step inside the budget), every library alike, as ``python -m flows.train
  ema_decay=...`` trains. ``--models``: only these candidates (the others' cells stay).
  ``--clip-grad-norm C``: every library's gradient clipped to total norm C before each update
  (``clip_grad_norm_``; flows' compiled step clips inside its graph), kept apart as
  ``"<section>, clip C"``.
- ``sampling``: samples per second at temperature 1 (batches of 10,000 for 2-D, 64 for
  images; a case's models interleaved, median of 5 rounds) after ``--sampling-train-s``
  seconds of training; for residual flows the
  inverse's iterations over all blocks (flows; Newton's for the 2-D i-ResNet, also drawn
  with the fixed-point inverse) and the round-trip error
  ``max |f(f^-1(z)) - z|`` of the samples, each library's own stopping rule.

``--device cuda`` runs the ``steps`` and ``sampling`` sections on a GPU (models and batches
moved there, timers read after ``torch.cuda.synchronize()``) into ``compare_peers_cuda.json``
and ``.md``, in full float32 (TF32 off, as flows' commands run; ``--tf32`` turns it on for
every library); its step table's memory column is the peak CUDA memory that 5 training steps
allocate above what is allocated before them (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np
import torch
from likelihood_check import SHARE_TOLERANCE, likelihood_check
from peer_models import Candidate, image_candidates, iresnet_candidates, realnvp_candidates

from flows.data.toy import TOY_DATASETS
from flows.lit.callbacks import warmed_up_decay
from flows.runs import use_tf32

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("check", "steps", "memory", "budget", "budget-decay", "budget-ema", "sampling")
CHECKED_CASES = ("Real NVP 2-D", "i-ResNet 2-D")  # 2-D: the exact log-det of every model
TOY_SETS = ("moons", "8gaussians", "checkerboard")
SERIES_SWEEP = "memory/i-ResNet 2-D series terms"  # its machine stamp's key


def toy_splits(name: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flows' own train (200,000) and test (50,000) points of ``name`` for ``seed``."""
    from flows.data.datamodules import ToyDataModule

    train, _, test = ToyDataModule(name, seed=seed).make_splits()
    return torch.from_numpy(train), torch.from_numpy(test)


def image_batch(data: str, seed: int = 0) -> torch.Tensor:
    """64 dequantised digits in [0, 1), upsampled to 28x28 for ``data="mnist"``."""
    from flows.data.datamodules import ImageDataModule
    from flows.data.images import dequantize

    module = ImageDataModule("digits", [1, 8, 8], num_val=150)
    module.setup()
    generator = torch.Generator().manual_seed(seed)
    images = module.splits["train"][torch.randint(1350, (64,), generator=generator)]
    batch = dequantize(images, 17, generator)
    if data == "mnist":
        batch = torch.nn.functional.interpolate(batch, size=(28, 28), mode="bilinear")
        batch = batch.clamp(0, 1 - 1e-4)
    return batch


CASES = {
    "Real NVP 2-D": (realnvp_candidates, lambda: toy_splits("moons", 0)[0][:512], 1e-3),
    "i-ResNet 2-D": (iresnet_candidates, lambda: toy_splits("moons", 0)[0][:512], 1e-3),
    "images 1x8x8": (lambda: image_candidates("digits"), lambda: image_batch("digits"), 1e-4),
    "images 1x28x28": (lambda: image_candidates("mnist"), lambda: image_batch("mnist"), 1e-4),
}

# The comparisons issue 5 sets targets for: per case, a flows model against the fastest (by
# median) of the peers listed, each of which trains the likelihood (FrEIA's IResNetLayer does
# not, see peer_models) and has the same architecture; with the target ratio.
PAIRS = {
    "Real NVP 2-D": [("flows compiled step", ["normflows", "nflows", "zuko", "FrEIA"], 0.5)],
    "i-ResNet 2-D": [("flows exact, compiled", ["normflows brute-force 2-D"], 0.5),
                     ("flows series 5 terms, neumann, compiled",
                      ["normflows brute-force 2-D", "normflows unbiased, memory-saving"], 0.5)],
    **{case: [("flows glow, compiled step", ["normflows Glow 2x8, 64 ch"], 0.67),
              ("flows iresnet", ["normflows i-ResNet 2x6, 32 ch"], 0.67)]
       for case in ("images 1x8x8", "images 1x28x28")},
}


def trainer(candidate: Candidate, lr: float, max_grad_norm: float | None = None):
    """A training step of ``candidate``: Adam (torch's fused implementation) at ``lr``, the
    gradient clipped to total norm ``max_grad_norm`` first (``clip_grad_norm_``) if given."""
    optimizer = torch.optim.Adam(candidate.model.parameters(), lr=lr, fused=True)
    own_step = candidate.make_step(optimizer, max_grad_norm) if candidate.make_step else None

    def step(x: torch.Tensor, lr: float | None = None) -> None:
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr
        if own_step is not None:
            own_step(x)
        else:
            loss = -candidate.log_prob(x).mean()
            optimizer.zero_grad()
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(candidate.model.parameters(), max_grad_norm)
            optimizer.step()
        candidate.after_step()
    return step


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels, so a host timer measures them (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_on(case: str, device: torch.device) -> tuple[dict[str, Candidate], torch.Tensor]:
    """The case's candidates (seed 0) and training batch, both moved to ``device``."""
    build, data, _ = CASES[case]
    torch.manual_seed(0)
    candidates = build()
    for candidate in candidates.values():
        candidate.model.to(device)
    return candidates, data().to(device)


def cuda_peak_mib(step: Callable[[torch.Tensor], None], x: torch.Tensor) -> float:
    """MiB of CUDA memory that 5 training steps allocate at peak above what they start with."""
    synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    before = torch.cuda.memory_allocated(x.device)
    for _ in range(5):
        step(x)
    synchronize(x.device)
    return (torch.cuda.max_memory_allocated(x.device) - before) / 2**20


def minor_faults() -> int | None:
    """The process's minor page faults so far (all threads), ``None`` without ``resource``."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_steps(case: str, rounds: int, steps: int, device: torch.device) -> list[dict]:
    """Median over rounds of the mean ms (and minor page faults) per step; every model runs
    once in each round."""
    candidates, x = build_on(case, device)
    steppers = {name: trainer(c, CASES[case][2]) for name, c in candidates.items()}
    for step in steppers.values():  # warm-up, compilation, data-dependent initialisation
        for _ in range(3):
            step(x)
    times: dict[str, list[float]] = {name: [] for name in steppers}
    faults: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(rounds):
        for name, step in steppers.items():
            synchronize(device)
            before, start = minor_faults(), time.perf_counter()
            for _ in range(steps):
                step(x)
            synchronize(device)
            times[name].append(1000 * (time.perf_counter() - start) / steps)
            if before is not None:
                faults[name].append((minor_faults() - before) / steps)
    ms = {name: float(np.median(t)) for name, t in times.items()}
    fastest = min((k for k in ms if k.startswith("flows")), key=ms.get)
    rows = []
    for name in candidates:
        low, median, high = paired_ratio_percentiles(times[name], times[fastest])
        rows.append({"library": name, "ms_per_step": ms[name], "ratio_to_flows": median,
                     "ratio_quartiles": [low, high], "ms_rounds": times[name],
                     "minor_faults_per_step": (float(np.median(faults[name]))
                                               if faults[name] else None),
                     "note": candidates[name].note})
    if device.type == "cuda":
        for row in rows:
            row["cuda_peak_mib"] = cuda_peak_mib(steppers[row["library"]], x)
    return rows


def check_section(cases: list[str], steps: int, draws: int) -> dict:
    """``likelihood_check`` of every model of the 2-D ``cases`` after ``steps`` training steps
    (the case's batches of 512 moons points and rate, from seed 0), on 256 test points: at
    initialisation most models are near the identity, where a missing log-det gradient
    hardly shows."""
    train, test = toy_splits("moons", 0)
    checked = {}
    for case in (c for c in cases if c in CHECKED_CASES):
        candidates, _ = build_on(case, torch.device("cpu"))
        checked[case] = {}
        for name, candidate in candidates.items():
            step = trainer(candidate, CASES[case][2])
            for i in range(steps):
                step(train[i * 512 % len(train):][:512])
            result = likelihood_check(candidate.log_prob, candidate.encode, candidate.model,
                                      test[:256], draws)
            print(f"check {case} | {name}: {result}", flush=True)
            checked[case][name] = {**result, "train_steps": steps, "points": 256}
    return checked


def trains_likelihood(report: dict, case: str, name: str) -> bool:
    """The ``check`` section's verdict on a model; ``True`` where it was not checked."""
    result = report.get("check", {}).get(case, {}).get(name)
    return result is None or result["trains_likelihood"]


def paired_ratio_percentiles(times: list[float], reference: list[float]) -> list[float]:
    """The 25th, 50th and 75th percentiles of ``times[r] / reference[r]`` over rounds ``r``:
    the ratio between two models timed in the same rounds, which the machine's drift from
    round to round moves less than either time."""
    ratios = np.asarray(times) / np.asarray(reference)
    return [float(q) for q in np.percentile(ratios, [25, 50, 75])]


def peak_memory_child(case: str, name: str, num_terms: int | None) -> None:
    """In a fresh process: MiB of peak resident memory added by 5 training steps.

    Two warm-up steps first (compilation, optimizer state, allocator pools), then the kernel's
    peak-RSS mark is reset (``/proc/self/clear_refs``) and the steps' peak read back.
    """
    build, data, lr = CASES[case]
    torch.manual_seed(0)
    if num_terms is None:
        candidate = build()[name]
    else:  # the series sweep
        from peer_models import _flows_iresnet

        gradient = name.rsplit(" ", 1)[-1]
        candidate = _flows_iresnet(logdet="series", num_terms=num_terms,
                                   series_gradient=gradient)
    x, step = data(), trainer(candidate, lr)
    for _ in range(2):
        step(x)
    before = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    for _ in range(5):
        step(x)
    print(json.dumps({"peak_added_mib": _status_mib("VmHWM") - before}))


def _status_mib(key: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak since the last reset) in MiB, Linux."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


def measure_memory(case: str, name: str, num_terms: int | None = None) -> float:
    command = [sys.executable, __file__, "--memory-child", case, name]
    if num_terms is not None:
        command += ["--num-terms", str(num_terms)]
    # Tensors of 64 KiB and more get their own mappings, returned to the system when freed,
    # so the resident size follows the live tensors instead of glibc's retained heap.
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_added_mib"]


def memory_section(cases: list[str]) -> dict:
    """Each case's models, and with the 2-D i-ResNet its series at 2 to 20 terms."""
    report = {}
    for case in cases:
        report[case] = {name: measure_memory(case, name) for name in CASES[case][0]()}
        print(case, report[case], flush=True)
    if "i-ResNet 2-D" in cases:
        sweep = {}
        for gradient in ("neumann", "backprop"):
            sweep[gradient] = {str(n): measure_memory("i-ResNet 2-D", f"series {gradient}", n)
                               for n in (2, 5, 10, 20)}
        report["i-ResNet 2-D series terms"] = sweep
        print(sweep, flush=True)
    return report


@torch.no_grad()
def test_nll(candidate: Candidate, test: torch.Tensor) -> float:
    return float(-torch.cat([candidate.log_prob(x) for x in test.split(10_000)]).mean())


def budget_builders(clamps: tuple[float, ...] = ()) -> dict:
    """The cases the budget sections train: ``{case: () -> {name: Candidate}}``."""
    return {"Real NVP 2-D": lambda: realnvp_candidates(clamps),
            "i-ResNet 2-D": lambda: iresnet_candidates(series=False)}


def check_budget_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace,
                           report: dict) -> None:
    """Refuse, before anything trains, cases without a budget builder, unknown ``--models``
    and a protocol (budget, seeds, decay, clip) other than that of a stored table, whose
    cells this run would otherwise drop (``--fresh-table`` starts those tables anew)."""
    builders = budget_builders()
    if not set(args.cases) & builders.keys():
        parser.error(f"the budget sections train only {sorted(builders)}; got --cases "
                     f"{args.cases}")
    names = {name for case in args.cases if case in builders for name in builders[case]()}
    unknown = sorted(set(args.models or ()) - names)
    if unknown:
        parser.error(f"--models {unknown}: no such candidate in {args.cases}; choose from "
                     f"{sorted(names)}")
    for section in (s for s in args.sections if s.startswith("budget")):
        key = budget_key(section, args.clip_grad_norm)
        before, now = report.get(key, {}), budget_protocol(section, args)
        differs = {k: (before.get(k), v) for k, v in now.items() if before.get(k) != v}
        if before.get("nll") and differs and not args.fresh_table:
            listed = ", ".join(f"{k}: {a} there, {b} here" for k, (a, b) in differs.items())
            parser.error(f"the stored {key!r} table was measured with another protocol "
                         f"({listed}); its cells cannot stand beside this run's. Rerun with "
                         f"its protocol, or pass --fresh-table to replace that table")


def budget_protocol(section: str, args: argparse.Namespace) -> dict:
    """What makes a budget table's cells comparable: stored beside them."""
    ema_decay = args.ema_decay if section == "budget-ema" else None
    return {"budget_s": args.budget_s, "seeds": args.seeds,
            **({"ema_decay": ema_decay} if ema_decay else {}),
            **({"clip_grad_norm": args.clip_grad_norm} if args.clip_grad_norm else {})}


def budget_section(budget_s: float, seeds: list[int], cases: list[str], sets: list[str],
                   decay: bool, models: list[str] | None = None,
                   ema_decay: float | None = None,
                   clip_grad_norm: float | None = None,
                   clamps: tuple[float, ...] = ()) -> dict:
    """Test NLL after ``budget_s`` seconds of training, per data set, model and seed.

    Adam at lr 1e-3 throughout, or with ``decay`` from 1e-3 linearly to 0 in wall-clock time,
    ``lr = 1e-3 (1 - elapsed / budget_s)`` set before every step: the schedule budgeted
    training recommends (Li, Yumer & Ramanan, ICLR 2020), under which the last iterate is
    not one noisy draw around a constant-lr optimum, so more steps in the budget can count.
    ``models``: the candidates' names to train (default: all but flows' eager i-ResNet).
    With ``ema_decay`` the test NLL is that of ``theta_ema <- d_n theta_ema + (1 - d_n)
    theta``, updated after every step from the first with ``flows.lit.callbacks.EMAWeights``'
    warmed-up decay ``d_n``, its cost inside the budget. With ``clip_grad_norm`` every
    library's gradient is clipped to that total norm before each update. ``clamps``: flows'
    compiled step with these log-scale clamps too (``peer_models.realnvp_candidates``).
    """
    builders = budget_builders(clamps)
    report: dict = {}
    for data_name in sets:
        for seed in seeds:
            train, test = toy_splits(data_name, seed)
            for case in (case for case in builders if case in cases):
                torch.manual_seed(seed)
                for name, candidate in builders[case]().items():
                    wanted = name != "flows exact, eager" if models is None else name in models
                    if not wanted:
                        continue
                    torch._dynamo.reset()  # a compiled model pays its compilation every run
                    generator = torch.Generator().manual_seed(seed)
                    step, steps = trainer(candidate, 1e-3, clip_grad_norm), 0
                    average: list[torch.Tensor] = []
                    start = time.perf_counter()
                    while (elapsed := time.perf_counter() - start) < budget_s:
                        lr = 1e-3 * (1 - elapsed / budget_s) if decay else None
                        step(train[torch.randint(len(train), (512,), generator=generator)], lr)
                        steps += 1
                        if ema_decay is not None:
                            average = update_average(average, candidate.model, ema_decay,
                                                     steps - 1)
                    row = report.setdefault(case, {}).setdefault(name, {}).setdefault(
                        data_name, {"nll": [], "steps": []})
                    if average:  # the same run's last iterate too, for the paired comparison
                        row.setdefault("last_iterate_nll", []).append(
                            test_nll(candidate, test))
                        with torch.no_grad():
                            torch._foreach_copy_(float_weights(candidate.model), average)
                    nll = test_nll(candidate, test)
                    row["nll"].append(nll)
                    row["steps"].append(steps)
                    print(data_name, seed, case, name, steps, round(nll, 4), flush=True)
    return report


def float_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The floating-point parameters (FrEIA keeps its permutations as int64 parameters)."""
    return [p for p in model.parameters() if p.is_floating_point()]


@torch.no_grad()
def update_average(average: list[torch.Tensor], model: torch.nn.Module, decay: float,
                   num_averaged: int) -> list[torch.Tensor]:
    """The weights' exponential moving average after one more step, ``num_averaged`` steps
    averaged before it (``EMAWeights``' update, warm-up included): a copy at the first."""
    weights = float_weights(model)  # after the first step: a compiled step's flat views
    if not average:
        return [w.detach().clone() for w in weights]
    torch._foreach_lerp_(average, weights, 1 - warmed_up_decay(decay, num_averaged))
    return average


@torch.no_grad()
def sample_rates(candidates: dict[str, Candidate], n: int, device: torch.device,
                 rounds: int = 5) -> dict[str, dict]:
    """Samples per second of each candidate (median over ``rounds`` of one draw of ``n``
    each, the candidates interleaved within a round, so the machine's drift moves them
    alike), its inverse iterations and round trip."""
    for candidate in candidates.values():
        candidate.sample(16)  # warm-up (compilation)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, candidate in candidates.items():
            synchronize(device)
            start = time.perf_counter()
            candidate.sample(n)
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    rows = {}
    for name, candidate in candidates.items():
        row = {"samples_per_s": n / float(np.median(times[name]))}
        if candidate.inverse_iterations() is not None:  # of its last draw of n
            row["inverse_iterations"] = candidate.inverse_iterations()
        if candidate.round_trip is not None:
            z = torch.randn(n, *candidate.sample(1).shape[1:], device=device)
            row["round_trip_error"] = float((candidate.round_trip(z) - z).abs().max())
        rows[name] = row
    return rows


def sampling_section(train_s: float, device: torch.device) -> dict:
    """Samples per second at temperature 1 of models trained for ``train_s`` seconds.

    Trained, because an i-ResNet near its identity initialisation inverts in a step or two;
    sampled in eval mode, as users do (in training mode a spectral-norm power step runs in
    every forward, so the map moves between a fixed-point inverse and its check).
    2-D models train on moons (batches of 512), image models on their one batch of 64; then
    a case's models draw interleaved (``sample_rates``). flows' exact 2-D i-ResNet (Newton
    inverse) is also drawn with the fixed-point inverse and at normflows' inverse accuracy
    (tolerance 3e-3), after the others.
    """
    report: dict = {}
    for case, (_, _, lr) in CASES.items():
        candidates, x = build_on(case, device)
        two_d = "2-D" in case
        train = toy_splits("moons", 0)[0].to(device) if two_d else None
        generator = torch.Generator().manual_seed(0)
        kept = {name: candidate for name, candidate in candidates.items()
                if not any(word in name for word in ("series", "eager", "unbiased",
                                                      "FrEIA IResNet"))}
        # the others have the same inverse as a variant kept, or no inverse of their own
        for candidate in kept.values():
            step, start = trainer(candidate, lr), time.perf_counter()
            while time.perf_counter() - start < train_s:
                step(train[torch.randint(len(train), (512,), generator=generator)]
                     if two_d else x)
            candidate.model.eval()  # as a user samples: fixed weights (spectral norms)
        n = 10_000 if two_d else 64
        rows = sample_rates(kept, n, device)
        for name, candidate in kept.items():
            if name.startswith("flows exact"):
                blocks = [b for b in candidate.model.modules() if hasattr(b, "inverse_method")]
                for block in blocks:
                    block.inverse_method = "fixed_point"
                rows |= sample_rates({name + ", fixed-point inverse": candidate}, n, device)
                for block in blocks:
                    block.inverse_method = "auto"
                    block.inverse_atol = block.inverse_rtol = 3e-3
                rows |= sample_rates({name + ", inverse tolerance 3e-3": candidate}, n, device)
        for name, row in rows.items():
            print(case, name, row, flush=True)
        report[case] = rows
    return report


def budget_cell(runs: dict) -> str:
    """Mean test NLL over seeds (mean steps); runs that ended in NaN are counted, not averaged."""
    nll = np.array(runs["nll"])
    finite = np.isfinite(nll)
    cell = f"{nll[finite].mean():.3f}" if finite.any() else "-"
    cell += f" ({np.mean(runs['steps']):.0f})"
    if not finite.all():
        cell += f", NaN in {(~finite).sum()} of {len(nll)} seeds"
    return cell


def machine_stamp(threads: int, device: torch.device) -> dict:
    """The date, the CPU (or GPU) model, the vector instructions torch's CPU kernels use
    (``AVX2``, ``AVX512``, ...) and the measured float32 matmul rate (2048^3, with ``threads``
    on a CPU, at the run's TF32 setting on a GPU)."""
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor() or platform.machine())
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    a @ b
    synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < 1.0:
        a @ b
        synchronize(device)
        count += 1
    gflops = 2 * 2048**3 * count / (time.perf_counter() - start) / 1e9
    stamp = {"date": str(date.today()), "cpu": cpu,
             "simd": torch.backends.cpu.get_cpu_capability(), "threads": threads,
             "matmul_gflops": gflops}
    if device.type == "cuda":
        stamp["gpu"] = torch.cuda.get_device_name(device)
        stamp["tf32"] = torch.backends.cudnn.allow_tf32
    return stamp


def budget_machine_lines(report: dict, key: str, nll: dict) -> list[str]:
    """One line per case of a budget section saying when and on what it was measured; where
    runs of different sets (``--sets``) were measured apart, one line per group of sets.
    A set's stamp is ``key/case/set``, else ``key/case``, else ``key`` (older reports)."""
    stamped = report.get("machines", {})
    lines = []
    for case, models in nll.items():
        measured = [d for d in TOY_DATASETS if any(d in sets for sets in models.values())]
        groups: dict[str, list[str]] = {}
        for d in measured:
            stamp_key = next(k for k in (f"{key}/{case}/{d}", f"{key}/{case}", key)
                             if k in stamped or k == key)
            groups.setdefault(machine_line(report, stamp_key)[0], []).append(d)
        lines += [f"- {case}: {line}" if len(groups) == 1 else
                  f"- {case}, {', '.join(sets)}: {line}" for line, sets in groups.items()]
    return lines


def machine_line(report: dict, key: str) -> list[str]:
    """The line under a section's heading that says when and on what it was measured."""
    stamp = report.get("machines", {}).get(key)
    if stamp is None:
        return ["Machine not recorded (measured before machines were recorded per section).", ""]
    if "gpu" in stamp:
        return [f"Measured {stamp['date']} on one {stamp['gpu']} (host {stamp['cpu']}), "
                f"TF32 {'on' if stamp.get('tf32') else 'off'}, float32 matmul "
                f"{stamp['matmul_gflops'] / 1000:.1f} TFLOP/s (2048^3).", ""]
    simd = f" ({stamp['simd']} kernels)" if "simd" in stamp else ""
    return [f"Measured {stamp['date']} on {stamp['cpu']}{simd}, {stamp['threads']} torch threads, "
            f"float32 matmul {stamp['matmul_gflops']:.0f} GFLOP/s (2048^3).", ""]


def target_table(report: dict) -> list[str]:
    """Markdown rows for ``PAIRS``: flows' step time over the fastest listed peer's, the median
    over rounds of the ratio and its quartiles, taken round by round (cases measured before
    per-round times were kept are left out). A peer the ``check`` section found not training
    the likelihood does not count."""
    lines = []
    steps = report.get("steps", {})
    for case, pairs in PAIRS.items():
        rows = {r["library"]: r for r in steps.get(case, []) if "ms_rounds" in r}
        for ours, peers, target in pairs:
            present = [p for p in peers if p in rows and trains_likelihood(report, case, p)]
            if ours not in rows or not present:
                continue
            peer = min(present, key=lambda p: rows[p]["ms_per_step"])
            low, median, high = paired_ratio_percentiles(rows[ours]["ms_rounds"],
                                                         rows[peer]["ms_rounds"])
            lines.append(f"| {case} | {ours} | {peer} | {median:.3f} ({low:.2f}-{high:.2f}) | "
                         f"{target} | {'yes' if median <= target else 'no'} |")
    if not lines:
        return []
    return ["## Against the targets: flows' step time over the fastest peer's", "",
            "Per round, flows' time over the peer's from the same round; the median and "
            "quartiles over rounds. Peers as in the tables below (the same architecture, "
            "training the likelihood).", "",
            "| case | flows | fastest peer | ratio (quartiles) | target | met (median) |",
            "|---|---|---|---|---|---|", *lines, ""]


def budget_key(section: str, clip_grad_norm: float | None) -> str:
    """Where a budget section's results are kept: apart for each clipping threshold."""
    return section if clip_grad_norm is None else f"{section}, clip {clip_grad_norm:g}"


def check_table(report: dict) -> list[str]:
    """The ``check`` section: each 2-D model's log-density and gradient against the exact."""
    check = report.get("check")
    if not check:
        return []
    protocols = {(r["train_steps"], r["points"], r["draws"]) for models in check.values()
                 for r in models.values()}
    protocol = "; ".join(f"{s} training steps, {p} test points, {d} draws"
                         for s, p, d in sorted(protocols))
    lines = [f"## Does each model train the likelihood? ({protocol})", "",
             *machine_line(report, "check"),
             "Against the exact change of variables of the model's own map x -> z "
             "(`likelihood_check.py`): the gap of its log-density to the exact one (nats per "
             "point; 0 where the loss is the NLL), the share of the exact log-det's gradient "
             "its gradient carries (1: the log-det trains the weights; 0: it passes them "
             "none), and the relative error of its mean gradient with that mean's standard "
             f"error. Counted as training the likelihood when the share is within "
             f"{SHARE_TOLERANCE} of 1.", "",
             "| case | library | log-density gap | log-det gradient share | gradient error "
             "(noise) | trains the likelihood |", "|---|---|---|---|---|---|"]
    for case, models in check.items():
        for name, r in models.items():
            lines.append(f"| {case} | {name} | {r['value_gap']:+.2g} | "
                         f"{r['logdet_gradient_share']:.3f} | {r['gradient_error']:.2g} "
                         f"({r['gradient_noise']:.2g}) | "
                         f"{'yes' if r['trains_likelihood'] else '**no**'} |")
    return [*lines, ""]


def write_markdown(report: dict, args: argparse.Namespace, path: Path) -> None:
    lines = [f"# flows against peer libraries ({date.today()})", "",
             f"torch {torch.__version__}; `python benchmarks/compare_peers.py` (sections as "
             f"below; the method is in the script's docstring). Compare ratios within a table: "
             f"tables measured on different machines differ in absolute times.", ""]
    lines += target_table(report)
    lines += check_table(report)
    for case, rows in report.get("steps", {}).items():
        lines += [f"## Step time: {case}", "", *machine_line(report, f"steps/{case}"),
                  "| library | ms/step | ratio to flows (per-round median, quartiles) | "
                  "peak memory added (MiB) | minor page faults/step | note |",
                  "|---|---|---|---|---|---|"]
        memory = report.get("memory", {}).get(case, {})
        for r in rows:
            mib = memory.get(r["library"], r.get("cuda_peak_mib"))
            mib = "" if mib is None else f"{mib:.0f}"
            spread = r.get("ratio_quartiles")
            spread = f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else ""
            faults = r.get("minor_faults_per_step")  # absent from runs before it was measured
            faults = "" if faults is None else f"{faults:,.0f}"
            lines.append(f"| {r['library']} | {r['ms_per_step']:.1f} | "
                         f"{r['ratio_to_flows']:.2f}{spread} | {mib} | {faults} | {r['note']} |")
        lines.append("")
    sweep = report.get("memory", {}).get("i-ResNet 2-D series terms")
    if sweep:
        terms = list(next(iter(sweep.values())))
        lines += ["## Peak memory added by the i-ResNet 2-D series (MiB) against its terms", "",
                  *machine_line(report, SERIES_SWEEP),
                  "| gradient | " + " | ".join(f"{n} terms" for n in terms) + " |",
                  "|---|" + "---|" * len(terms)]
        lines += [f"| {g} | " + " | ".join(f"{v:.0f}" for v in row.values()) + " |"
                  for g, row in sweep.items()]
        lines.append("")
    schedules = {"budget": "Adam lr 1e-3",
                 "budget-decay": "Adam lr 1e-3 decayed linearly to 0 in wall-clock time",
                 "budget-ema": "Adam lr 1e-3, evaluated at the weights' exponential moving "
                               "average (decay {ema_decay}, every library alike)"}
    for key, budget in report.items():
        section = key.split(",")[0]
        if section not in schedules:
            continue
        schedule = schedules[section].format(ema_decay=budget.get("ema_decay"))
        if budget.get("clip_grad_norm"):
            schedule += (f", every library's gradient clipped to norm "
                         f"{budget['clip_grad_norm']:g}")
        measured = {d for models in budget["nll"].values() for sets in models.values()
                    for d in sets}
        columns = [d for d in TOY_DATASETS if d in measured]
        lines += [f"## Test NLL (nats) after {budget['budget_s']:.0f} s of training, {schedule}, "
                  f"mean over seeds {budget['seeds']} (steps in brackets)", "",
                  *budget_machine_lines(report, key, budget["nll"]), "",
                  "| case | library | " + " | ".join(columns) + " |",
                  "|---|---|" + "---|" * len(columns)]
        for case, models in budget["nll"].items():
            for name, sets in models.items():
                cells = [budget_cell(sets[d]) if d in sets else "" for d in columns]
                lines.append(f"| {case} | {name} | " + " | ".join(cells) + " |")
        lines.append("")
    sampling = report.get("sampling")
    if sampling:
        lines += [f"## Sampling at temperature 1 after {sampling['train_s']:.0f} s of training",
                  "", *machine_line(report, "sampling"),
                  "| case | library | samples/s | inverse iterations (all blocks) | "
                  "max abs(f(f^-1(z)) - z) |", "|---|---|---|---|---|"]
        for case, rows in sampling["rates"].items():
            for name, r in rows.items():
                error = f"{r['round_trip_error']:.1e}" if "round_trip_error" in r else ""
                lines.append(f"| {case} | {name} | {r['samples_per_s']:,.0f} | "
                             f"{r.get('inverse_iterations', '')} | {error} |")
        lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES),
                        help="steps, memory and budget sections: the cases to run (the others' "
                             "rows stay)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=60.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sets", nargs="+", choices=TOY_DATASETS, default=list(TOY_SETS),
                        help="budget sections: the toy sets to train on (the others' cells stay)")
    parser.add_argument("--models", nargs="+",
                        help="budget sections: only these candidates (the others' cells stay)")
    parser.add_argument("--clip-grad-norm", type=float,
                        help="budget sections: clip every library's gradient to this total "
                             "norm before each update (results kept apart from unclipped ones)")
    parser.add_argument("--fresh-table", action="store_true",
                        help="budget sections: replace a stored table measured with another "
                             "budget, seeds, decay or clip (refused otherwise)")
    parser.add_argument("--ema-decay", type=float, default=0.999,
                        help="budget-ema: the moving average's decay per step")
    parser.add_argument("--sampling-train-s", type=float, default=20.0)
    parser.add_argument("--check-steps", type=int, default=100,
                        help="check: training steps before each model's likelihood check")
    parser.add_argument("--check-draws", type=int, default=16,
                        help="check: calls of each model's log_prob, averaged")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"),
                        help="cuda: the steps and sampling sections on a GPU, into "
                             "compare_peers_cuda.{json,md}")
    parser.add_argument("--tf32", action="store_true",
                        help="TF32 matmuls and convolutions on NVIDIA GPUs (default: off)")
    parser.add_argument("--memory-child", nargs=2, metavar=("CASE", "NAME"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--num-terms", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    use_tf32(args.tf32)
    if args.memory_child:
        peak_memory_child(*args.memory_child, args.num_terms)
        return
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch finds no CUDA GPU here")
    if args.device.type != "cpu" and not set(args.sections) <= {"steps", "sampling"}:
        parser.error(f"--device {args.device} runs only the steps and sampling sections; "
                     f"run check, memory and budget on the CPU")
    stem = "compare_peers" + ("" if args.device.type == "cpu" else f"_{args.device.type}")
    path = RESULTS / f"{stem}.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    if any(section.startswith("budget") for section in args.sections):
        check_budget_arguments(parser, args, report)
    RESULTS.mkdir(exist_ok=True)
    stamp = machine_stamp(args.threads, args.device)
    for section in args.sections:
        if section == "check":
            report["check"] = report.get("check", {}) | check_section(
                args.cases, args.check_steps, args.check_draws)
        elif section == "steps":
            report["steps"] = report.get("steps", {}) | {
                case: time_steps(case, args.rounds, args.steps, args.device)
                for case in args.cases}
        elif section == "memory":
            report["memory"] = report.get("memory", {}) | memory_section(args.cases)
        elif section.startswith("budget"):
            key = budget_key(section, args.clip_grad_norm)
            ema_decay = args.ema_decay if section == "budget-ema" else None
            protocol = budget_protocol(section, args)
            # the other cells stay (check_budget_arguments refused another protocol)
            nll = {} if args.fresh_table else report.get(key, {}).get("nll", {})
            for case, models in budget_section(args.budget_s, args.seeds, args.cases,
                                               args.sets, section == "budget-decay",
                                               args.models, ema_decay,
                                               args.clip_grad_norm).items():
                for name, sets in models.items():
                    nll.setdefault(case, {}).setdefault(name, {}).update(sets)
            report[key] = {**protocol, "nll": nll}
        else:
            report["sampling"] = {"train_s": args.sampling_train_s,
                                  "rates": sampling_section(args.sampling_train_s,
                                                            args.device)}
        stored = budget_key(section, args.clip_grad_norm) if section.startswith("budget") \
            else section
        keys = ([f"{stored}/{case}" for case in args.cases] if section == "steps" else
                [f"{stored}/{case}/{d}" for case in args.cases for d in args.sets]
                if section.startswith("budget") else [section])
        if section == "memory" and "i-ResNet 2-D" in args.cases:
            keys.append(SERIES_SWEEP)
        report.setdefault("machines", {}).update(dict.fromkeys(keys, stamp))
        path.write_text(json.dumps(report, indent=2) + "\n")
        write_markdown(report, args, RESULTS / f"{stem}.md")


if __name__ == "__main__":
    main()
