"""Attack a finished job's models (relearning, membership inference, probes) on the Ray executor; JOB/audit/.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python ray_jobs/audit.py --config CONFIG [--output DIR]
"""

import sys

from rr.execution.entry import audit_stage, main

if __name__ == "__main__":
    sys.exit(main(audit_stage, sys.argv[1:], __doc__.splitlines()[0]))
