"""Losses of DESIGN.md section 5: the objective (``build_objective``), the dense reference terms (``dense``)."""

from alignclip.losses.objective import LossOutput, Objective, build_objective

__all__ = ["LossOutput", "Objective", "build_objective"]
