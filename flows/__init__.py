"""Normalizing flows trained by exact maximum likelihood.

The library (``flows.core``, ``flows.distributions``, ``flows.bijections``, ``flows.nn``,
``flows.models``, ``flows.metrics``, ``flows.evaluation``, ``flows.compiled_step``,
``flows.flat_adam_state``, ``flows.data.toy``, ``flows.data.images``) imports only torch, numpy
and scipy (torchvision and scikit-learn for image data); Lightning and Hydra live in
``flows.lit``, ``flows.data.datamodules`` and the entry points.
"""

from flows.core import Bijection, Compose, Inverse, NormalizingFlow
from flows.distributions import StandardNormal

__all__ = ["Bijection", "Compose", "Inverse", "NormalizingFlow", "StandardNormal"]
