"""``lars-run``: start pinned instances locally, or ranks across nodes (Intel MPI, Slurm,
torchrun-style env), from plans computed by :mod:`affinity`."""
