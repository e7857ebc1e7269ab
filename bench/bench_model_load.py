"""Model load time: the embedded GGUF file parsed and de-quantized by transformers, against its HF directory in the
model cache (rr.models.hf_model_dir, what load_model_and_tokenizer reads), in one run; the weights compared.

Prints one JSON line. The cache directory is written first if missing (its time is reported apart).

    python bench/bench_model_load.py
"""

from __future__ import annotations

import json
import time

import torch


def main() -> None:
    from rr import models

    torch.set_num_threads(2)
    start = time.perf_counter()
    directory = models.hf_model_dir("embedded:smollm2")
    written_s = time.perf_counter() - start
    start = time.perf_counter()
    parsed, _ = models._load(models.resolve_model("embedded:smollm2"), "float32", "cpu", None, "HF_TOKEN",
                             "embedded:smollm2")
    gguf_s = time.perf_counter() - start
    start = time.perf_counter()
    cached, _ = models.load_model_and_tokenizer("embedded:smollm2")
    cached_s = time.perf_counter() - start
    expected = parsed.state_dict()
    print(json.dumps({
        "benchmark": "model_load", "model": "SmolLM2-135M-Instruct (embedded, GGUF Q4_1)", "cache_dir": directory,
        "cache_lookup_or_write_s": round(written_s, 2), "gguf_parse_s": round(gguf_s, 2),
        "cached_hf_dir_s": round(cached_s, 2), "speedup": round(gguf_s / cached_s, 1),
        "same_weights": all(torch.equal(t, expected[n]) for n, t in cached.state_dict().items())}))


if __name__ == "__main__":
    main()
