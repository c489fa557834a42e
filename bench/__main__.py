"""``python -m bench`` (``just bench``): the benchmark harness; see bench/README.md."""

from bench.harness import main

raise SystemExit(main())
