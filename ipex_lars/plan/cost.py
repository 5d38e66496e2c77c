"""The cost model of ``ipex-lars plan``: allreduce cost, overlap with backward, time to train.

Pure Python, no torch: a plan runs anywhere in milliseconds, and every number it prints
follows from the formulas below and the inputs, nothing measured behind the user's back.

Allreduce of n bytes over p ranks in the alpha-beta-gamma model (Thakur, Rabenseifner and
Gropp, "Optimization of Collective Communication Operations in MPICH", 2005):

    alpha  seconds per message (latency)
    beta   seconds per byte on one rank's link (1 / bandwidth)
    gamma  seconds per byte to add two buffers locally (0 = not modelled)

    ring          2(p-1)·alpha       + 2(p-1)/p·n·beta + (p-1)/p·n·gamma
    rabenseifner  2·ceil(log2 p)·alpha + 2(p-1)/p·n·beta + (p-1)/p·n·gamma

Both move the same bytes (a reduce-scatter then an allgather); Rabenseifner's recursive
halving and doubling needs log2(p) message rounds per phase where the ring needs p-1, so it
wins whenever latency matters. For p that is not a power of two real implementations add an
exchange step; the model only rounds log2 up.

One training iteration on one rank: compute = per-rank batch / per-rank throughput. DDP
reduces gradient buckets while backward still runs, so up to ``overlap`` x compute (backward
is about 2/3 of forward+backward FLOPs) can hide the allreduce; only the rest is exposed:

    exposed   = max(0, allreduce - overlap·compute)
    iteration = compute + exposed
    time to train = epochs · dataset / global batch · iteration
    efficiency    = compute / iteration   (throughput vs p ranks scaling perfectly)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from launchers.argtypes import UsageError

ALGORITHMS = ("ring", "rabenseifner")
IMAGENET_TRAIN_IMAGES = 1_281_167  # ILSVRC-2012 train split; also logged as train_samples by MLPerf runs
DEFAULT_OVERLAP = 2 / 3


class PlanError(UsageError):
    """An input the model cannot use; the message names the problem and the fix."""


@dataclass(frozen=True)
class Network:
    """The interconnect as one rank sees it."""

    latency_s: float  # alpha
    bandwidth_bytes_s: float  # 1 / beta, per rank
    reduce_bytes_s: float = 0.0  # 1 / gamma; 0 = local reduction not modelled


@dataclass(frozen=True)
class AllreduceCost:
    """One allreduce, split into its latency, transfer and reduction terms (seconds)."""

    algorithm: str
    latency_s: float
    transfer_s: float
    reduce_s: float

    @property
    def total_s(self) -> float:
        return self.latency_s + self.transfer_s + self.reduce_s


def coefficients(algorithm: str, ranks: int, n_bytes: float) -> tuple[float, float, float]:
    """(messages, bytes sent per rank, bytes reduced per rank): what alpha, beta, gamma multiply."""
    if ranks == 1:
        return 0.0, 0.0, 0.0
    share = (ranks - 1) / ranks * n_bytes
    if algorithm == "ring":
        return 2.0 * (ranks - 1), 2.0 * share, share
    if algorithm == "rabenseifner":
        return 2.0 * math.ceil(math.log2(ranks)), 2.0 * share, share
    raise PlanError(f"unknown allreduce algorithm {algorithm!r}; choose ring, rabenseifner or auto")


def allreduce_cost(algorithm: str, ranks: int, n_bytes: float, net: Network) -> AllreduceCost:
    """Cost of one allreduce of ``n_bytes`` over ``ranks`` ranks with ``algorithm``."""
    messages, sent, reduced = coefficients(algorithm, ranks, n_bytes)
    reduce_s = reduced / net.reduce_bytes_s if net.reduce_bytes_s > 0 else 0.0
    return AllreduceCost(algorithm, messages * net.latency_s, sent / net.bandwidth_bytes_s, reduce_s)


def choose_allreduce(algorithm: str, ranks: int, n_bytes: float, net: Network) -> AllreduceCost:
    """The named algorithm's cost, or with ``auto`` the cheaper of ring and Rabenseifner."""
    if algorithm != "auto":
        return allreduce_cost(algorithm, ranks, n_bytes, net)
    return min((allreduce_cost(a, ranks, n_bytes, net) for a in ALGORITHMS), key=lambda c: c.total_s)


@dataclass(frozen=True)
class PlanInputs:
    """Everything one prediction depends on."""

    params: int
    nodes: int
    node_throughput: float  # images/s of one node training alone
    global_batch: int
    epochs: float
    network: Network | None  # None is allowed for a single rank
    ranks_per_node: int = 1
    dataset_size: int = IMAGENET_TRAIN_IMAGES
    algorithm: str = "auto"
    overlap: float = DEFAULT_OVERLAP
    bytes_per_param: int = 4

    @property
    def ranks(self) -> int:
        return self.nodes * self.ranks_per_node

    def validate(self) -> None:
        """Raise PlanError naming the first input the model cannot use, and how to fix it."""
        checks = [
            (self.nodes >= 1, f"--nodes must be at least 1, got {self.nodes}: give the node count, e.g. --nodes 16"),
            (self.ranks_per_node >= 1, f"--ranks-per-node must be at least 1, got {self.ranks_per_node}"),
            (self.params > 0, f"--params must be positive, got {self.params}: give the model's parameter count"),
            (
                self.node_throughput > 0,
                f"throughput must be positive, got {self.node_throughput} img/s: give "
                "--throughput IMG_S per node or --from-bench FILE.json",
            ),
            (
                self.global_batch >= self.ranks,
                f"global batch {self.global_batch} is smaller than the {self.ranks} ranks, so some rank gets no "
                "image: raise --global-batch or lower --nodes",
            ),
            (self.epochs > 0, f"--epochs must be positive, got {self.epochs}"),
            (self.dataset_size > 0, f"--dataset-size must be positive, got {self.dataset_size}"),
            (
                0 <= self.overlap <= 1,
                f"--overlap is the fraction of compute that can hide the allreduce, so it must "
                f"be in [0, 1], got {self.overlap}",
            ),
            (self.bytes_per_param > 0, f"--bytes-per-param must be positive, got {self.bytes_per_param}"),
            (
                self.ranks == 1 or self.network is not None,
                "the network is unknown: give --latency-us and --bandwidth-gbps, --network FILE.json "
                "(written by --calibrate --save), or --scenario NAME",
            ),
        ]
        if self.network is not None:
            checks += [
                (
                    self.network.bandwidth_bytes_s > 0,
                    "--bandwidth-gbps must be positive: give the link speed in Gbit/s, e.g. --bandwidth-gbps 100",
                ),
                (self.network.latency_s >= 0, "--latency-us must be zero or positive, e.g. --latency-us 1.5"),
                (self.network.reduce_bytes_s >= 0, "--reduce-gbytes-s must be zero (not modelled) or positive"),
            ]
        for ok, message in checks:
            if not ok:
                raise PlanError(message)


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one set of inputs; times in seconds."""

    ranks: int
    per_rank_batch: float
    compute_s: float
    allreduce: AllreduceCost | None  # None for a single rank: nothing to reduce
    hidden_s: float
    exposed_s: float
    iteration_s: float
    iterations: float
    time_to_train_s: float
    throughput: float  # images/s of the whole job
    efficiency: float  # throughput / (ranks x per-rank throughput)


def gradient_bytes(inputs: PlanInputs) -> float:
    """Bytes every rank contributes to the allreduce each iteration."""
    return float(inputs.params * inputs.bytes_per_param)


def predict(inputs: PlanInputs) -> Prediction:
    """Iteration time, time to train, throughput and scaling efficiency for ``inputs``."""
    inputs.validate()
    per_rank_batch = inputs.global_batch / inputs.ranks
    compute = per_rank_batch / (inputs.node_throughput / inputs.ranks_per_node)
    cost = None
    if inputs.ranks > 1:
        cost = choose_allreduce(inputs.algorithm, inputs.ranks, gradient_bytes(inputs), inputs.network)
    total = cost.total_s if cost else 0.0
    hidden = min(total, inputs.overlap * compute)
    iteration = compute + (total - hidden)
    iterations = inputs.epochs * inputs.dataset_size / inputs.global_batch
    return Prediction(
        ranks=inputs.ranks,
        per_rank_batch=per_rank_batch,
        compute_s=compute,
        allreduce=cost,
        hidden_s=hidden,
        exposed_s=total - hidden,
        iteration_s=iteration,
        iterations=iterations,
        time_to_train_s=iterations * iteration,
        throughput=inputs.global_batch / iteration,
        efficiency=compute / iteration,
    )


def scaling(inputs: PlanInputs, node_counts: list[int]) -> list[Prediction]:
    """One prediction per node count, the global batch held fixed (strong scaling)."""
    return [predict(replace(inputs, nodes=n)) for n in node_counts]


def hiding_bandwidth(inputs: PlanInputs) -> float | None:
    """The lowest per-rank bandwidth (bytes/s) at which the allreduce still hides entirely.

    None when nothing needs hiding (one rank) or when latency and reduction alone already
    exceed what overlap can hide, so no bandwidth is enough.
    """
    if inputs.ranks == 1:
        return None
    compute = predict(inputs).compute_s
    cost = choose_allreduce(inputs.algorithm, inputs.ranks, gradient_bytes(inputs), inputs.network)
    room = inputs.overlap * compute - cost.latency_s - cost.reduce_s
    sent = cost.transfer_s * inputs.network.bandwidth_bytes_s
    return sent / room if room > 0 else None
