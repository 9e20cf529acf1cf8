"""Real models and texts for tests, examples and benchmarks, available without a model hub."""
