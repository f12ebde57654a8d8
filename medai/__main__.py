from medai.cli import main

raise SystemExit(main())
