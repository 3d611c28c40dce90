from kvhoist.tools.cli import main

raise SystemExit(main())
