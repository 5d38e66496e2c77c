"""ipex-lars: large-batch CNN training on Intel Xeon clusters.

LARS with a fused multi-tensor kernel (``ipex_lars.optim``), a oneCCL backend for
torch.distributed, a NUMA-aware launcher (``lars-run``) and the training engine
of "ImageNet Training in Minutes" (You, Zhang, Hsieh, Demmel, Keutzer).
"""

__version__ = "0.1.0"
