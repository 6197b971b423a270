"""A fixed permutation of the features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from flows.core import Bijection


class Permutation(Bijection):
    """``z_i = x_{p(i)}`` along dim 1 of ``(B, D)`` or ``(B, C, *spatial)``; ``log|det| = 0``.

    The permutation ``p`` is a fixed buffer (saved in checkpoints, follows ``.to(device)``):
    the given ``permutation``, else a random one drawn from ``seed``, else the reversal
    ``p = (D-1, ..., 0)`` used between NICE / Real NVP couplings.

    Args:
        features: ``D``, the size of dim 1.
        permutation: an explicit ordering of ``range(features)``.
        seed: draw a random permutation with this seed (exclusive with ``permutation``).

    References:
        Dinh, Krueger & Bengio, NICE (2015), https://arxiv.org/abs/1410.8516
    """

    def __init__(
        self,
        features: int,
        permutation: Tensor | Sequence[int] | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if permutation is not None and seed is not None:
            raise ValueError("give either an explicit permutation or a seed, not both")
        if permutation is not None:
            perm = torch.as_tensor(permutation, dtype=torch.long)
        elif seed is not None:
            perm = torch.randperm(features, generator=torch.Generator().manual_seed(seed))
        else:
            perm = torch.arange(features - 1, -1, -1)
        if perm.shape != (features,) or not perm.sort().values.equal(torch.arange(features)):
            raise ValueError(
                f"permutation must be an ordering of range({features}), got {perm.tolist()}"
            )
        self.register_buffer("permutation", perm)
        self.register_buffer("inverse_permutation", torch.argsort(perm))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x.index_select(1, self.permutation), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z.index_select(1, self.inverse_permutation), z.new_zeros(z.shape[0])
