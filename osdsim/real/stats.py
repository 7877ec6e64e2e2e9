"""Acceptance statistics of real speculative steps, kept apart from decoding.

Definitions are those of `osdsim.specdec` (the one place they live): the accepted length of a step
is a ∈ [0, proposed]; α̂ = Σ a / (Σ a + #rejections), #rejections = steps with a < proposed, i.e.
accepted drafts over the drafted positions examined up to and including the first rejection. The
expected-overlap estimate α_β = Σ β_i / #positions uses β_i = Σ_v min(p_i(v), q_i(v)) over the same
positions (the OSD/Leviathan α; it equals α̂ in expectation when sampling at the same temperature).
Steps that drafted nothing (proposed = 0, at the token cap) carry no acceptance information.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from osdsim.real.specdec import StepRecord
from osdsim.specdec import alpha_from_counts


@dataclass(frozen=True)
class AcceptanceSummary:
    steps: int  # steps that drafted at least one token
    proposed: int
    accepted: int
    rejections: int
    alpha: float  # conditional α̂ (counts)
    alpha_beta: float  # expected-overlap α (Σ min(p, q))
    mean_accepted: float  # E[a] over full steps (proposed == k)
    tokens_per_step: float  # E[emitted] over all steps
    histogram: list[int]  # counts of a = 0..k over full steps (proposed == k)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def summarize(steps: Iterable[StepRecord], k: int) -> AcceptanceSummary:
    """Summarise steps of speculative decoding with draft length k."""
    steps = list(steps)
    drafted = [s for s in steps if s.proposed > 0]
    accepted = sum(s.accepted for s in drafted)
    rejections = sum(1 for s in drafted if s.accepted < s.proposed)
    beta_sum = sum(s.beta_sum for s in drafted)
    beta_n = sum(s.beta_n for s in drafted)
    full = np.array([s.accepted for s in drafted if s.proposed == k], dtype=int)
    hist = np.bincount(full, minlength=k + 1)[: k + 1] if full.size else np.zeros(k + 1, int)
    return AcceptanceSummary(
        steps=len(drafted),
        proposed=sum(s.proposed for s in drafted),
        accepted=accepted,
        rejections=rejections,
        alpha=alpha_from_counts(float(accepted), float(rejections)),
        alpha_beta=beta_sum / beta_n if beta_n else float("nan"),
        mean_accepted=float(full.mean()) if full.size else float("nan"),
        tokens_per_step=float(np.mean([s.emitted for s in steps])) if steps else float("nan"),
        histogram=[int(c) for c in hist],
    )
