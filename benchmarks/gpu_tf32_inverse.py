"""An image i-ResNet's fixed-point inverse on a GPU with TF32 on and off (needs CUDA).

    python benchmarks/gpu_tf32_inverse.py

flows' default 1x8x8 i-ResNet (``model=iresnet data=digits``) trains 100 Adam steps (lr
1e-4, TF32 off) on one batch of 64 digits, then inverts 64 draws of z ~ N(0, I) in eval
mode, alternately with TF32 matmuls and convolutions on and off (twice each): time, the
fixed-point iterations summed over blocks, the largest block residual
``max |x + g(x) - z|``, the round trip ``max |f(f^-1(z)) - z|`` and the mean log p of the
batch. Printed only; the README's GPU section quotes its 2026-11-24 H100 run.
"""

import argparse
import sys
import time

import torch
from compare_peers import image_batch
from peer_models import flows_image_model

from flows.runs import use_tf32


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_tf32_inverse.py needs a CUDA GPU; torch finds none here")
    torch.manual_seed(0)
    flow = flows_image_model("iresnet", "digits").cuda()
    x = image_batch("digits").cuda()
    optimizer = torch.optim.Adam(flow.parameters(), 1e-4)
    use_tf32(False)
    for _ in range(100):
        loss = -flow.log_prob(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    flow.eval()
    blocks = [m for m in flow.modules() if hasattr(m, "last_inverse_iterations")]
    for tf32 in (True, False, True, False):
        use_tf32(tf32)
        torch.manual_seed(1)
        z = torch.randn(64, 1, 8, 8, device="cuda")
        with torch.no_grad():
            torch.cuda.synchronize()
            start = time.perf_counter()
            samples, _ = flow.transform.inverse(z)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            back, _ = flow.transform(samples)
            log_p = flow.log_prob(x).mean()
        print(f"tf32={tf32}: inverse {seconds:.2f} s, iterations "
              f"{sum(b.last_inverse_iterations for b in blocks)}, max residual "
              f"{max(b.last_inverse_residual for b in blocks):.2e}, round trip "
              f"{float((back - z).abs().max()):.2e}, mean log p {float(log_p):.4f}", flush=True)


if __name__ == "__main__":
    main()
