"""Stage 1 on Ray: search instructions with NeuralUCB on generator replicas and write the forget set.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python ray_jobs/reveal.py --config CONFIG [--output DIR]
"""

import sys

from rr.execution.entry import reveal_stage, main

if __name__ == "__main__":
    sys.exit(main(reveal_stage, sys.argv[1:], __doc__.splitlines()[0], None))
