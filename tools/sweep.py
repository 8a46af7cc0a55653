"""``alignclip-sweep`` from a checkout: see alignclip/commands/sweep.py."""

from alignclip.commands.sweep import main

raise SystemExit(main())
