"""``alignclip-embed-captions`` from a checkout: see alignclip/commands/embed_captions.py."""

from alignclip.commands.embed_captions import main

raise SystemExit(main())
