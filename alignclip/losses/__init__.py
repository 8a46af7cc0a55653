"""Every loss term: the objective (``build_objective``), the dense reference terms (``dense``).

The terms are those of Eslami & de Melo, ICLR 2025, arXiv:2406.17639 (CLIP, CRSep, IMSep) and of Fahim, Murphy &
Fyshe 2024, arXiv:2405.18570 (uniformity, cross-modal uniformity, alignment); docs/losses.md lists them.
"""

from alignclip.losses.objective import LossOutput, Objective, build_objective

__all__ = ["LossOutput", "Objective", "build_objective"]
