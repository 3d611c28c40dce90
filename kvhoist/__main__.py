from kvhoist.cli import main

raise SystemExit(main())
