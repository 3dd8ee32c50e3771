"""``python -m diffloop.tools.bench``: the same as ``diffloop bench``."""

from diffloop.tools.bench.main import bench_main

raise SystemExit(bench_main())
