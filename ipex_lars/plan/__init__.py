"""``ipex-lars plan``: a scaling planner for data-parallel training with an allreduce cost model.

``cost`` holds the model (pure Python), ``presets`` the model sizes and published scenarios
with their sources, ``inputs`` turns flags and files into model inputs, ``calibrate`` fits
latency and bandwidth to real oneccl allreduces, ``report`` formats, ``command`` is the CLI.
"""
