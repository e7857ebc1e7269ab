"""rr's leaf layer: shared primitives (the prompt type, ...) that import no other rr module."""
