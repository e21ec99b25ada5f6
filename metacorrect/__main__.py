from metacorrect.cli import main

raise SystemExit(main())
