"""Presets of ``ipex-lars plan`` as data: model sizes and the three published scenarios.

Every input carries its source. An input marked ``circular`` was derived from the very
result the scenario is checked against (its throughput, from the published time or the
run's own log): a prediction built on it can only test the communication part of the model,
and the command says so wherever it prints one.

So each scenario also carries, where one was found, an ``independent_throughput``: a
per-node training rate measured apart from the record run (one node or a few, another
paper or benchmark table), scaled to the scenario's CPU by a stated rule when the CPU
differs. ``plan --check`` predicts with both and prints them side by side; only the
independent one tests the compute side. Where none was found, ``independent_missing`` says
what was looked for. See docs/PLAN.md for every figure and how far it is from the run.
"""

from __future__ import annotations

from dataclasses import dataclass

from ipex_lars.plan.cost import IMAGENET_TRAIN_IMAGES


@dataclass(frozen=True)
class ModelPreset:
    params: int
    source: str


# Parameter counts at 1000 classes, written out because the planner runs without torch;
# tests/test_plan.py counts the real models (ipex_lars.models) and checks these equal them.
RESNET50_PARAMS = 25_557_032
ALEXNET_BN_PARAMS = 62_396_104

MODELS = {
    "resnet50": ModelPreset(RESNET50_PARAMS, "torchvision.models.resnet50(), 1000 classes: sum of parameter sizes"),
    "alexnet_bn": ModelPreset(
        ALEXNET_BN_PARAMS,
        "ipex_lars/models/alexnet_bn.py, 1000 classes: sum of parameter "
        "sizes (torchvision's AlexNet without BN has 61,100,840)",
    ),
}


@dataclass(frozen=True)
class Input:
    """One input value, where it comes from, and whether it leans on the published result."""

    value: float | str
    source: str
    circular: bool = False


@dataclass(frozen=True)
class Scenario:
    """A published training run with the hardware inputs the model needs to predict it."""

    title: str
    model: str
    nodes: Input
    ranks_per_node: Input
    node_throughput: Input  # images/s per node
    global_batch: Input
    epochs: Input
    latency_us: Input
    bandwidth_gbps: Input  # per node, shared by its ranks
    bytes_per_param: Input
    algorithm: Input  # "auto", "ring" or "rabenseifner"
    published_minutes: Input
    # images/s per node measured apart from the record run; None if no such figure was found
    independent_throughput: Input | None = None
    independent_missing: str = ""  # when None: what was searched, so the command can say so plainly


_PAPER = 'You et al., "ImageNet Training in Minutes", ICPP 2018 (arXiv 1709.05011)'
_PAPER_ABSTRACT = _PAPER + ", abstract"
_STAMPEDE2 = "TACC Stampede2 user guide (TACC-Docs docs/hpc/stampede2.md)"
_OPA_LINK = Input(100.0, _STAMPEDE2 + ": 100 Gb/s Intel Omni-Path, fat tree (28/20 oversubscribed at the leaves)")
_OPA_LATENCY = Input(
    1.0, "ASSUMPTION: ~1 us MPI latency, the class of figure Intel quotes for Omni-Path; recalled, not verified"
)
_FP32_GRADS = Input(4, "ASSUMPTION: fp32 gradients (Intel Caffe with MLSL, 2017)")
_AUTO = Input("auto", "ASSUMPTION: algorithm unknown (Intel MLSL); the model picks the cheaper")
_PAPER_BATCH = Input(32_768, "recalled from " + _PAPER + " (its 32K runs); not verified here")
_ONE_RANK = Input(1, "ASSUMPTION: one rank per node (rank placement not published)")


def _circular_throughput(epochs: float, minutes: float, nodes: int, where: str) -> Input:
    """Per-node images/s that reproduces the published time exactly if nothing else costs time."""
    value = epochs * IMAGENET_TRAIN_IMAGES / (minutes * 60) / nodes
    return Input(
        value,
        f"CIRCULAR: {epochs:g} epochs x {IMAGENET_TRAIN_IMAGES:,} images / "
        f"{minutes:g} min / {nodes:,} nodes, from {where}",
        circular=True,
    )


def cores_x_base_ghz(cores: int, base_ghz: float) -> float:
    """A node's cores times base clock: the rule used to carry a throughput to another CPU.

    It assumes training throughput is proportional to cores x frequency within one CPU
    generation (same AVX-512 units per core); it ignores memory bandwidth and AVX-512
    clock offsets, so a rate scaled with it is an estimate, marked as such.
    """
    return cores * base_ghz


# AlexNet on Skylake-SP: PaddlePaddle 0.11.0 with MKL-DNN v0.11 on 2 x Xeon Gold 6148 (20 cores,
# 2.4 GHz), training (forward, backward and update), batch 64: 399.00 img/s (benchmark/
# IntelOptimizedPaddle.md in PaddlePaddle/Paddle, commit ea46de65, Dec 2017; read, not recalled).
# Batch 64 is the smallest in that table, the nearest to the record run's 32 images per node.
_PADDLE_ALEXNET_B64 = 399.00
_SKX_8160_OVER_6148 = cores_x_base_ghz(2 * 24, 2.1) / cores_x_base_ghz(2 * 20, 2.4)  # 100.8 / 96 = 1.05
_ALEXNET_INDEPENDENT = Input(
    _PADDLE_ALEXNET_B64 * _SKX_8160_OVER_6148,
    "ESTIMATE, independent of the record: 399.00 img/s, AlexNet training at batch 64 on 2 x Xeon Gold 6148, "
    "PaddlePaddle 0.11.0 + MKL-DNN v0.11 (PaddlePaddle/Paddle benchmark/IntelOptimizedPaddle.md, Dec 2017), "
    "x 1.05 = (2 x 24 cores x 2.1 GHz) / (2 x 20 cores x 2.4 GHz), the cores x base-clock rule; not Intel Caffe, "
    "BN not stated, batch 64 where the record run has 32 per node",
)

# ResNet-50 on Xeon Phi 7250: Bae, Jeong, Yeo, Oh, Kwon, "I/O Performance Evaluation of Large-Scale
# Deep Learning on an HPC System" (KISTI Nurion, 2019), section III.A: Intel-Caffe on a 4-KNL
# testbed with the data in memory, mini-batch 512, ~1.620 s per iteration = ~316 img/s on four
# KNLs (read, not recalled). Same CPU as the record run, so no scaling: 316 / 4 per node.
_RESNET50_KNL_INDEPENDENT = Input(
    316 / 4,
    "MEASURED, independent of the record: 316 img/s on 4 Xeon Phi 7250 / 4, ResNet-50, Intel-Caffe, "
    "mini-batch 512 (128 per KNL), data in memory (Bae et al., I/O Performance Evaluation of Large-Scale Deep "
    "Learning on an HPC System, KISTI Nurion, 2019, sec. III.A); batch 128 per node where the record run has 16",
)

_MLPERF_MISSING = (
    "searched for a single-node (or other-size) ResNet-50 training rate on 2 x Xeon 8480+ with "
    "PyTorch/IPEX bf16: MLPerf v2.1 and v3.0 have Intel ResNet-50 only on 16 nodes, and the IPEX "
    "performance pages found give inference speed-ups, not training img/s (docs/PLAN.md)"
)


def _paper_scenario(
    title: str, model: str, nodes: int, cpus: str, per_node: str, epochs: int, minutes: int, independent: Input
) -> Scenario:
    """One of the paper's two record runs: both share its batch, network, precision and placement."""
    return Scenario(
        title=title,
        model=model,
        nodes=Input(nodes, f"{_PAPER_ABSTRACT}: {cpus}; {_STAMPEDE2}: {per_node}"),
        ranks_per_node=_ONE_RANK,
        node_throughput=_circular_throughput(epochs, minutes, nodes, f"the published {minutes} min"),
        global_batch=_PAPER_BATCH,
        epochs=Input(epochs, _PAPER_ABSTRACT),
        latency_us=_OPA_LATENCY,
        bandwidth_gbps=_OPA_LINK,
        bytes_per_param=_FP32_GRADS,
        algorithm=_AUTO,
        published_minutes=Input(minutes, _PAPER_ABSTRACT),
        independent_throughput=independent,
    )


_MLPERF = "MLPerf Training v3.0, Intel closed division (mlcommons/training_results_v3.0 Intel/"
_MLPERF_RUN = _MLPERF + "benchmarks/resnet/implementations/pytorch-cpu/run_benchmark.sh)"
_MLPERF_TRAIN = _MLPERF + "benchmarks/resnet/implementations/pytorch-cpu/train.py)"

SCENARIOS: dict[str, Scenario] = {
    "paper-alexnet": _paper_scenario(
        title="AlexNet-BN, 100 epochs in 11 min on 2,048 Xeon Platinum 8160 (1,024 Stampede2 SKX nodes)",
        model="alexnet_bn",
        nodes=1024,
        cpus="2,048 Xeon Platinum 8160",
        per_node="2 per SKX node",
        epochs=100,
        minutes=11,
        independent=_ALEXNET_INDEPENDENT,
    ),
    "paper-resnet50": _paper_scenario(
        title="ResNet-50, 90 epochs in 20 min on 2,048 Xeon Phi 7250 (2,048 Stampede2 KNL nodes)",
        model="resnet50",
        nodes=2048,
        cpus="2,048 Xeon Phi 7250",
        per_node="1 per KNL node",
        epochs=90,
        minutes=20,
        independent=_RESNET50_KNL_INDEPENDENT,
    ),
    "mlperf-v3.0": Scenario(
        title="ResNet-50 to 75.9%, MLPerf v3.0: 16 nodes x 2 Xeon Platinum 8480+ in 88 min",
        model="resnet50",
        nodes=Input(16, _MLPERF + "systems/16-nodes-SPR-pytorch.json): number_of_nodes 16"),
        ranks_per_node=Input(2, _MLPERF_RUN + ": mpiexec.hydra -np 32 -ppn 2, one rank per socket"),
        node_throughput=Input(
            8590 / 16,
            "CIRCULAR: ~8,590 img/s over 16 nodes, the run's own logged "
            "throughput as quoted in issue #6 (the v2.1 log of the same system, "
            "result_1.txt, shows 8,397-8,583 img/s in epochs 1-10)",
            circular=True,
        ),
        global_batch=Input(3264, _MLPERF_RUN + ": BATCH_SIZE=3264, a global batch (train.py)"),
        epochs=Input(
            35,
            _MLPERF_TRAIN + ": stops at the "
            "first eval >= 75.9% from epoch 35 on (evals at 3, 7, ..., 35); shared/FACTS.md: "
            "converged at 35",
        ),
        latency_us=Input(5.0, "ASSUMPTION: ~5 us for RoCE (PSM3 over E810 irdma); not published, not verified"),
        bandwidth_gbps=Input(
            200.0,
            _MLPERF_RUN + ": four E810 irdma ports, 2 per rank (CCL_MNIC=local); "
            "ASSUMPTION: 100 Gb/s per E810-C card, one card per socket (vendor figure, "
            "recalled)",
        ),
        bytes_per_param=Input(
            4, _MLPERF_TRAIN + ": bf16 autocast keeps fp32 parameters, so DDP reduces fp32 gradients"
        ),
        algorithm=Input("rabenseifner", _MLPERF_RUN + ": CCL_ALLREDUCE=rabenseifner"),
        published_minutes=Input(
            88,
            "MLPerf Training v3.0 results, Intel 16-nodes-SPR-pytorch, as quoted in "
            "issue #6 and shared/FACTS.md; not re-read here",
        ),
        independent_missing=_MLPERF_MISSING,
    ),
}
