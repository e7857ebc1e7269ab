"""Score base + the job's ledger on a split with the generator replicas.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python ray_jobs/evaluate.py --config CONFIG [--output DIR]
"""

import sys

from rr.execution.entry import evaluate_stage, main

if __name__ == "__main__":
    sys.exit(main(evaluate_stage, sys.argv[1:], __doc__.splitlines()[0], lambda parser: parser.add_argument("--split", default="test", help="reveal, validation or test")))
