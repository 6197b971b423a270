"""Independent seeds for each step of each rank, and for each use within a step."""

from __future__ import annotations

import numpy as np

# Streams drawn within one training step: each needs its own seed, or two consumers of random
# numbers (say dequantisation noise and Hutchinson probes of the same size) read the same bits.
MODEL_STREAM = 0
DATA_STREAM = 1
# Evaluation batches (Hutchinson probes of an i-ResNet's series), seeded by (seed, batch,
# rank): every validation draws the same probes, and a resumed run tests as an uninterrupted one
VAL_STREAM = 2
TEST_STREAM = 3


def step_seed(seed: int, step: int, rank: int, stream: int = MODEL_STREAM) -> int:
    """A 64-bit seed for one stream of one training step on one rank, independent across all."""
    state = np.random.SeedSequence([seed, step, rank, stream]).generate_state(1, np.uint64)
    return int(state[0])
