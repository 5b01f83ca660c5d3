"""Sparsity inside experts: per-weight masks (magnitude, Wanda, N:M, OWL ratios) and exact accounting."""

from moeshrink.sparsity.accounting import (
    DENSE_NOTE,
    SparsityReport,
    SparsityTotals,
    TensorSparsity,
    bitmask_bytes,
    compressed_bytes,
    count_sparsity,
    is_expert_parameter,
    layer_of,
)
from moeshrink.sparsity.masks import (
    input_sq_norm,
    linear_view,
    magnitude_scores,
    nm_mask,
    outlier_fraction,
    owl_ratios,
    unstructured_mask,
    validate_sparsity,
    wanda_scores,
)

__all__ = [
    "DENSE_NOTE",
    "SparsityReport",
    "SparsityTotals",
    "TensorSparsity",
    "bitmask_bytes",
    "compressed_bytes",
    "count_sparsity",
    "input_sq_norm",
    "is_expert_parameter",
    "layer_of",
    "linear_view",
    "magnitude_scores",
    "nm_mask",
    "outlier_fraction",
    "owl_ratios",
    "unstructured_mask",
    "validate_sparsity",
    "wanda_scores",
]
