"""Numerical core of the paper's analyses: representation alignment, compression, linear probes.

Library code only: functions take tensors / arrays already in memory and return plain Python
numbers, lists and dicts; no file I/O and no orchestration dependencies.
"""

from .alignment import cknna, cosine_similarity_curve, layerwise_alignment, linear_cka, pool_activations
from .compression import (
    GROUPS,
    compare_description_lengths,
    description_length,
    histogram_entropy_bits,
    latent_rate,
    tensor_group,
)
from .probe import layerwise_probe, linear_probe

__all__ = [
    "GROUPS",
    "cknna",
    "compare_description_lengths",
    "cosine_similarity_curve",
    "description_length",
    "histogram_entropy_bits",
    "latent_rate",
    "layerwise_alignment",
    "layerwise_probe",
    "linear_cka",
    "linear_probe",
    "pool_activations",
    "tensor_group",
]
