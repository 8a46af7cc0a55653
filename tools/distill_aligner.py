"""Distil MLP aligners and compare them with post-hoc baselines (alignclip-distill); see
alignclip/commands/distill_aligner.py."""
from alignclip.commands.distill_aligner import main

raise SystemExit(main())
