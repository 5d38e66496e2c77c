"""The training engine behind ``ipex-lars train``."""
