"""The projection's vocabulary, torch-free: configs and the CLI parser import it without loading torch
(``spf --help`` must stay fast); :mod:`spf.core.optimizer` interprets it and re-exports it."""

from __future__ import annotations

from typing import Literal

__all__ = [
    "ConflictScope",
    "Directions",
    "EstimateRoute",
    "ProjectMode",
    "ProjectOn",
    "ProjectedChange",
    "Removal",
]

ProjectMode = Literal["conflict", "always"]  # conflict: project only when the update raises the safety loss
ProjectOn = Literal["update", "grad"]  # the optimizer's actual update (Adam-correct) or the raw gradient
ConflictScope = Literal["module", "global"]  # where conflict mode tests the sign of the inner product
# how a re-estimation gets the safety gradient: its own forward/backward of the sample (separate), or the
# sample riding along as extra rows of the training step's batch (fused: one forward, one backward)
EstimateRoute = Literal["separate", "fused"]
# what a projected step does with the safety component: remove it (SPF), or — a control — keep the
# update's direction and shrink it to the length removal would leave ("is SPF only a smaller step?")
Removal = Literal["project", "shrink"]
# where the subspace's directions come from: the safety gradient (SPF), or — a control — a random orthonormal
# subspace of the same per-module ranks, redrawn at every re-estimation ("does the safety direction matter?")
Directions = Literal["estimated", "random"]
# which change a projected step keeps off the subspace: this step's increment (the paper's; each step's
# first-order effect is bounded, their sum is not), or the total change since training began, re-projected
# against every new subspace (a lever for long exposure)
ProjectedChange = Literal["step", "total"]
