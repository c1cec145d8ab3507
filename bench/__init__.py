"""raymerge benchmarks: ``python -m bench`` writes BENCHMARKS.md and bench/results.json (see bench/__main__.py)."""
