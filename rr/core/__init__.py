"""rr's leaf layer: shared primitives (the prompt type, tokenisation, atomic writes) that import no rr module
outside rr.core but rr.errors."""
