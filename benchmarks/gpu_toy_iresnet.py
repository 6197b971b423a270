"""Where the default toy i-ResNet's time goes on a GPU: compilation against steps.

    python benchmarks/gpu_toy_iresnet.py eager|compile

``model=iresnet data=moons`` (32 blocks, exact 2-D log-det) on CUDA, TF32 off, batch 1024
of N(0, I) points, Adam 5e-3: the first step (ActNorm's data-dependent initialisation), the
second (where ``torch.compile`` compiles), the mean of 50 more, and an eval log-density twice
(the first compiles the eval graph). Printed only; the README's GPU section quotes its
2026-11-24 H100 run.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from flows.runs import use_tf32


def timed(label: str, work, repeat: int = 1) -> None:
    start = time.perf_counter()
    for _ in range(repeat):
        work()
    torch.cuda.synchronize()
    print(f"{label}: {1000 * (time.perf_counter() - start) / repeat:.1f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["eager", "compile"])
    compiled = parser.parse_args().mode == "compile"
    if not torch.cuda.is_available():
        sys.exit("gpu_toy_iresnet.py needs a CUDA GPU; torch finds none here")
    use_tf32(False)
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=["model=iresnet", "data=moons",
                                          f"model.compile={compiled}"])
    torch.manual_seed(0)
    flow = instantiate(cfg.model).cuda()
    x = torch.randn(1024, 2, device="cuda")
    optimizer = torch.optim.Adam(flow.parameters(), 5e-3)

    def step() -> None:
        loss = -flow.log_prob(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    timed(f"compile={compiled} first step", step)
    timed("second step", step)
    timed("mean of 50 steps", step, 50)
    flow.eval()
    with torch.no_grad():
        timed("eval log_prob", lambda: flow.log_prob(x))
        timed("eval log_prob again", lambda: flow.log_prob(x))


if __name__ == "__main__":
    main()
