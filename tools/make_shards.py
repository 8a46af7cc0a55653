"""Write or check webdataset shards (see ``alignclip-make-shards --help``; the code is alignclip.commands.make_shards)."""

from alignclip.commands.make_shards import main

raise SystemExit(main())
