"""``python -m benchmarks`` = ``python -m benchmarks.run`` (the GPU runner; ``--list`` shows the suites)."""
import sys

from benchmarks.run import main

sys.exit(main())
