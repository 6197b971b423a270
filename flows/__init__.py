"""Normalizing flows trained by exact maximum likelihood.

The library (``flows.core``, ``flows.distributions``, ``flows.bijections``, ``flows.nn``,
``flows.models``, ``flows.metrics``, ``flows.data.toy``) imports only torch, numpy and scipy;
Lightning and Hydra live in ``flows.lit``, ``flows.data.datamodules`` and the entry points.
"""

from flows.core import Bijection, Compose, Inverse, NormalizingFlow
from flows.distributions import StandardNormal

__all__ = ["Bijection", "Compose", "Inverse", "NormalizingFlow", "StandardNormal"]
