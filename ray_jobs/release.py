"""Reveal (skipped when finished) and Release on Ray: replicas, Tune weight search, Ray Train PEMs.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python ray_jobs/release.py --config CONFIG [--output DIR]
"""

import sys

from rr.execution.entry import release_stage, main

if __name__ == "__main__":
    sys.exit(main(release_stage, sys.argv[1:], __doc__.splitlines()[0], None))
