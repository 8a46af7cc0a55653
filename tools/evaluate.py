"""Evaluate a model as CLIP_benchmark does (alignclip-eval); see alignclip/commands/evaluate.py."""
from alignclip.commands.evaluate import main

raise SystemExit(main())
