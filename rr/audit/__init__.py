"""`rr audit`: relearning, membership-inference and probe attacks on a finished job's models, with a verdict."""
