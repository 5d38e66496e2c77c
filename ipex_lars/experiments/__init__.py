"""Experiments behind ``ipex-lars experiment``: evidence, written to docs/."""
