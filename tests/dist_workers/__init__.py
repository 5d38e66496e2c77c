"""Scripts run by the rank processes of tests/test_distributed*.py, and the harness that launches them."""
