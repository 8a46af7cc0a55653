"""Thin wrapper: alignclip-study (alignclip/commands/study.py)."""

from alignclip.commands.study import main

raise SystemExit(main())
