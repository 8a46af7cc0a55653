from .factory import main

raise SystemExit(main())
