from grozd.cli import main

raise SystemExit(main())
