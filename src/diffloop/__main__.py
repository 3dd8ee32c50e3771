from diffloop.cli import main

raise SystemExit(main())
