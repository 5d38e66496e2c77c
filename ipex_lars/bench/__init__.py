"""Benchmarks behind ``ipex-lars bench``: each prints ratios measured side by side in one run."""
