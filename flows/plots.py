"""2-D plots of a flow: samples over data, density heatmap, data in latent space.

Plain functions that take tensors/arrays and return matplotlib figures; callbacks and
commands decide where the figures go.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from flows.core import NormalizingFlow  # noqa: E402

Bounds = tuple[float, float]


def _scatter(ax: plt.Axes, points: np.ndarray, color: str, label: str, bounds: Bounds) -> None:
    ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.4, color=color, label=label,
               rasterized=True)
    ax.set_xlim(*bounds)
    ax.set_ylim(*bounds)
    ax.set_aspect("equal")


def plot_samples(data: np.ndarray, samples: np.ndarray, bounds: Bounds = (-4.0, 4.0),
                 title: str = "samples") -> Figure:
    """Data (grey) beside model samples decoded from ``z ~ N(0, T^2 I)`` (blue), ``(N, 2)``."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
    _scatter(axes[0], data, "0.4", "data", bounds)
    axes[0].set_title("data")
    _scatter(axes[1], samples, "tab:blue", "samples", bounds)
    axes[1].set_title(title)
    fig.tight_layout()
    return fig


@torch.no_grad()
def density_grid(flow: NormalizingFlow, bounds: Bounds = (-4.0, 4.0), num_points: int = 200,
                 batch_size: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    """``exp(log p(x))`` on a ``num_points x num_points`` grid over ``bounds^2``.

    Returns the grid axis ``(num_points,)`` and the density ``(num_points, num_points)``
    indexed ``[y, x]``. The flow should be in eval mode (exact log-det for 2-D i-ResNets).
    """
    anchor = next(flow.parameters())
    axis = torch.linspace(*bounds, num_points, dtype=anchor.dtype, device=anchor.device)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    grid = torch.stack([xx.flatten(), yy.flatten()], dim=1)
    log_prob = torch.cat([flow.log_prob(chunk) for chunk in grid.split(batch_size)])
    density = log_prob.exp().reshape(num_points, num_points)
    return axis.float().cpu().numpy(), density.float().cpu().numpy()  # NumPy has no bfloat16


def plot_density(axis: np.ndarray, density: np.ndarray, title: str = "model density") -> Figure:
    """Heatmap of ``exp(log p(x))`` from ``density_grid``; the title shows its grid integral."""
    step = float(axis[1] - axis[0])
    mass = float(density.sum()) * step * step
    fig, ax = plt.subplots(figsize=(4.5, 4))
    mesh = ax.pcolormesh(axis, axis, density, shading="auto", cmap="viridis")
    fig.colorbar(mesh, ax=ax)
    ax.set_aspect("equal")
    ax.set_title(f"{title} (mass in view {mass:.3f})")
    fig.tight_layout()
    return fig


def plot_latent(z: np.ndarray, bounds: Bounds = (-4.0, 4.0)) -> Figure:
    """Data mapped to latent space, ``z = f(x)``, over the standard normal's 1, 2, 3 sigma."""
    fig, ax = plt.subplots(figsize=(4, 4))
    _scatter(ax, z, "tab:orange", "z = f(x)", bounds)
    for radius in (1.0, 2.0, 3.0):
        ax.add_patch(plt.Circle((0, 0), radius, fill=False, ls="--", lw=0.8, color="k"))
    ax.set_title("data in latent space")
    fig.tight_layout()
    return fig


def image_grid(images: torch.Tensor, nrow: int = 8) -> np.ndarray:
    """A ``(H', W', C)`` array in [0, 1] tiling a batch ``(B, C, H, W)``; values are clipped.

    Model samples can leave ``[0, 1]`` slightly (the logit's ``alpha`` margin), hence the clip.
    """
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().float().cpu().clamp(0, 1), nrow=nrow, padding=1,
                     pad_value=1.0)
    return grid.permute(1, 2, 0).numpy()


def plot_image_grids(grids: dict[str, np.ndarray]) -> Figure:
    """Image grids side by side, one titled panel each (e.g. samples at several temperatures)."""
    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.4), squeeze=False)
    for ax, (title, grid) in zip(axes[0], grids.items(), strict=True):
        ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0,
                  vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    return fig
