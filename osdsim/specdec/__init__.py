"""Speculative-decoding math shared by the simulator and the real side (α defined once)."""

from osdsim.specdec.acceptance import (
    EmpiricalLaw,
    GeometricLaw,
    accepted_length_pmf,
    alpha_from_accepted_lengths,
    alpha_from_counts,
    bootstrap_ratio_ci,
    expected_accepted,
    expected_tokens_per_step,
    optimal_k,
    sample_geometric,
    speedup,
    windowed_alpha,
)

__all__ = [
    "EmpiricalLaw",
    "GeometricLaw",
    "accepted_length_pmf",
    "alpha_from_accepted_lengths",
    "alpha_from_counts",
    "bootstrap_ratio_ci",
    "expected_accepted",
    "expected_tokens_per_step",
    "optimal_k",
    "sample_geometric",
    "speedup",
    "windowed_alpha",
]
