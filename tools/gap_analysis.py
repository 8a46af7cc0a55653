"""Gap analysis of one or several models side by side (alignclip-gap); see alignclip/commands/gap_analysis.py."""
from alignclip.commands.gap_analysis import main

raise SystemExit(main())
