"""Helpers of the examples, benchmarks and tests (not part of the library): the
SmolLM2-135M test model, the WikiText-2 data, perplexity, exact-arithmetic evaluation."""
