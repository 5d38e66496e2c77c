"""``ipex-lars plan``: the cost model against hand-worked values, and the command as users run it."""

from __future__ import annotations

import json
import math
import re

import pytest
from cli_runner import run_cli

from ipex_lars import cli
from ipex_lars.plan import calibrate
from ipex_lars.plan.cost import (
    Network,
    PlanInputs,
    allreduce_cost,
    choose_allreduce,
    coefficients,
    hiding_bandwidth,
    predict,
    scaling,
)
from ipex_lars.plan.inputs import read_bench_throughput
from ipex_lars.plan.presets import MODELS, SCENARIOS, cores_x_base_ghz

GB = 1e9


def _inputs(**overrides) -> PlanInputs:
    """4 ranks, 30 images each at 100 img/s (compute 0.3 s), 1e8-byte gradients, 10 GB/s, no latency."""
    base = dict(
        params=25_000_000,
        nodes=4,
        node_throughput=100.0,
        global_batch=120,
        epochs=1.0,
        network=Network(latency_s=0.0, bandwidth_bytes_s=10 * GB),
        dataset_size=1200,
        overlap=2 / 3,
    )
    return PlanInputs(**{**base, **overrides})


# ---------------------------------------------------------------- allreduce formulas


def test_one_rank_communicates_nothing():
    assert coefficients("ring", 1, 1e9) == (0.0, 0.0, 0.0)
    assert coefficients("rabenseifner", 1, 1e9) == (0.0, 0.0, 0.0)
    p = predict(_inputs(nodes=1, global_batch=30, network=None))
    assert p.allreduce is None and p.exposed_s == 0.0
    assert p.iteration_s == pytest.approx(0.3) and p.efficiency == 1.0


def test_ring_bandwidth_term_is_2_p_minus_1_over_p_n_over_b():
    net = Network(latency_s=0.0, bandwidth_bytes_s=10 * GB)
    cost = allreduce_cost("ring", 4, 1e8, net)
    assert cost.transfer_s == pytest.approx(2 * 3 / 4 * 1e8 / (10 * GB))  # 0.015 s
    assert cost.latency_s == 0.0 and cost.total_s == pytest.approx(0.015)
    # both algorithms move the same bytes
    assert allreduce_cost("rabenseifner", 4, 1e8, net).transfer_s == pytest.approx(cost.transfer_s)


@pytest.mark.parametrize(
    "ranks, ring_messages, rabenseifner_messages", [(2, 2, 2), (8, 14, 6), (6, 10, 6), (1024, 2046, 20)]
)
def test_latency_terms_ring_2_p_minus_1_vs_rabenseifner_2_log2_p(ranks, ring_messages, rabenseifner_messages):
    net = Network(latency_s=1e-6, bandwidth_bytes_s=math.inf)
    assert allreduce_cost("ring", ranks, 1e6, net).latency_s == pytest.approx(ring_messages * 1e-6)
    assert allreduce_cost("rabenseifner", ranks, 1e6, net).latency_s == pytest.approx(rabenseifner_messages * 1e-6)


def test_gamma_term_reduces_p_minus_1_over_p_of_the_bytes():
    net = Network(latency_s=0.0, bandwidth_bytes_s=math.inf, reduce_bytes_s=5 * GB)
    assert allreduce_cost("ring", 4, 1e8, net).reduce_s == pytest.approx(3 / 4 * 1e8 / (5 * GB))


def test_auto_picks_the_cheaper_algorithm():
    net = Network(latency_s=5e-6, bandwidth_bytes_s=12.5 * GB)
    auto = choose_allreduce("auto", 1024, 1e8, net)
    assert auto.algorithm == "rabenseifner"
    assert auto.total_s == min(allreduce_cost(a, 1024, 1e8, net).total_s for a in ("ring", "rabenseifner"))


# ---------------------------------------------------------------- overlap and time to train


def _net_for(allreduce_s: float) -> Network:
    """A 4-rank network on which the 1e8-byte allreduce takes ``allreduce_s``."""
    return Network(latency_s=0.0, bandwidth_bytes_s=2 * 3 / 4 * 1e8 / allreduce_s)


def test_overlap_hides_an_allreduce_shorter_than_its_share_of_compute():
    p = predict(_inputs(network=_net_for(0.1)))  # compute 0.3 s, hides up to 0.2 s
    assert p.compute_s == pytest.approx(0.3)
    assert p.hidden_s == pytest.approx(0.1) and p.exposed_s == pytest.approx(0.0)
    assert p.iteration_s == pytest.approx(0.3) and p.efficiency == pytest.approx(1.0)


@pytest.mark.parametrize("overlap, exposed", [(2 / 3, 0.3), (0.0, 0.5), (1.0, 0.2)])
def test_overlap_hides_the_stated_fraction_of_compute_and_no_more(overlap, exposed):
    p = predict(_inputs(network=_net_for(0.5), overlap=overlap))
    assert p.hidden_s == pytest.approx(overlap * 0.3)
    assert p.exposed_s == pytest.approx(exposed)
    assert p.iteration_s == pytest.approx(0.3 + exposed)
    assert p.efficiency == pytest.approx(0.3 / (0.3 + exposed))


def test_time_to_train_is_epochs_times_dataset_over_batch_iterations():
    p = predict(
        _inputs(
            network=_net_for(0.5),
            epochs=90,
            dataset_size=1_281_167,
            global_batch=32_768,
            nodes=1024,
            params=1,
            node_throughput=1000.0,
        )
    )
    assert p.iterations == pytest.approx(90 * 1_281_167 / 32_768)  # 3518.77
    assert p.time_to_train_s == pytest.approx(p.iterations * p.iteration_s)
    assert p.throughput == pytest.approx(32_768 / p.iteration_s)
    # ranks x per-rank rate if nothing is exposed; this network exposes nothing for 1-parameter gradients
    assert p.compute_s == pytest.approx(32 / 1000) and p.efficiency == pytest.approx(1.0)


def test_ranks_per_node_share_the_node_throughput_and_bandwidth():
    p = predict(_inputs(nodes=2, ranks_per_node=2, node_throughput=200.0))
    assert p.ranks == 4 and p.compute_s == pytest.approx(30 / 100)
    out = run_cli(
        "plan",
        "--nodes",
        "16",
        "--ranks-per-node",
        "2",
        "--throughput",
        "500",
        "--global-batch",
        "3200",
        "--latency-us",
        "5",
        "--bandwidth-gbps",
        "200",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)["predictions"][0]
    assert plan["ranks"] == 32 and plan["compute_s"] == pytest.approx(100 / 250)
    assert plan["inputs"]["network"]["bandwidth_bytes_s"] == pytest.approx(100e9 / 8)  # 200 Gbit/s over 2 ranks


def test_scaling_table_is_monotone_at_fixed_global_batch():
    base = _inputs(network=Network(latency_s=2e-6, bandwidth_bytes_s=1 * GB), global_batch=4096)
    counts = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    rows = scaling(base, counts)
    compute = [r.compute_s for r in rows]
    comm = [r.allreduce.total_s if r.allreduce else 0.0 for r in rows]
    efficiency = [r.efficiency for r in rows]
    assert all(a > b for a, b in zip(compute, compute[1:]))
    assert all(a <= b for a, b in zip(comm, comm[1:]))
    assert all(a >= b for a, b in zip(efficiency, efficiency[1:]))
    assert efficiency[0] == 1.0 and efficiency[-1] < 0.5  # the allreduce dominates at 1024 ranks


def test_hiding_bandwidth_is_where_the_allreduce_starts_to_show():
    inputs = _inputs(network=_net_for(0.5))
    edge = hiding_bandwidth(inputs)
    assert edge == pytest.approx(2 * 3 / 4 * 1e8 / 0.2)  # transfer fits exactly in 2/3 x 0.3 s
    at_edge = predict(_inputs(network=Network(0.0, edge)))
    below = predict(_inputs(network=Network(0.0, edge * 0.99)))
    assert at_edge.exposed_s == pytest.approx(0.0, abs=1e-12) and below.exposed_s > 0


# ---------------------------------------------------------------- calibration fit and input files


def test_fit_recovers_alpha_and_beta_from_exact_times():
    alpha, beta = 12e-6, 1 / (4 * GB)
    samples = {n: 2 * alpha + n * beta for n in (4096, 65536, 1 << 20, 1 << 24)}
    result = calibrate.fit(samples)
    assert result.alpha_s == pytest.approx(alpha, rel=1e-9)
    assert result.beta_s_per_byte == pytest.approx(beta, rel=1e-9)
    assert all(model == pytest.approx(measured) for _, measured, model in result.points)
    assert result.as_network_file()["bandwidth_gbps"] == pytest.approx(32.0)


def test_fit_keeps_latency_non_negative():
    result = calibrate.fit({1000: 1e-7, 1_000_000: 1e-3})  # a straight line through these has alpha < 0
    assert result.alpha_s == 0.0 and result.beta_s_per_byte > 0


def test_message_bytes_match_what_bench_comm_reduces():
    assert calibrate.message_bytes("4K") == 4096
    assert calibrate.message_bytes("1M") == 1 << 20


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_presets_are_the_real_models_parameter_counts(name):
    from ipex_lars.models import parameter_sizes

    assert MODELS[name].params == sum(parameter_sizes(name, num_classes=1000))


def test_from_bench_takes_the_best_rate_of_the_chosen_model(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(
        json.dumps(
            {
                "results": [
                    {"model": "resnet50", "images_per_second": 17.3, "ranks": 1},
                    {"model": "resnet50", "images_per_second": 18.1, "ranks": 2},
                    {"model": "alexnet_bn", "images_per_second": 90.0, "ranks": 1},
                ]
            }
        )
    )
    assert read_bench_throughput(str(path), "resnet50") == 18.1
    assert read_bench_throughput(str(path), "alexnet_bn") == 90.0


# ---------------------------------------------------------------- the command


SCENARIO_NAMES = ("paper-alexnet", "paper-resnet50", "mlperf-v3.0")


def test_check_prints_all_three_published_scenarios():
    out = run_cli("plan", "--check")
    assert out.returncode == 0, out.stderr
    for name in SCENARIO_NAMES:
        assert sum(line.startswith(name) for line in out.stdout.splitlines()) == 2  # table row + inputs block
    assert "published" in out.stdout and "predicted" in out.stdout
    assert "CIRCULAR" in out.stdout  # the throughputs lean on the published results, and it says so


def test_check_json_names_every_source_and_marks_circular_throughputs():
    out = run_cli("plan", "--check", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["scenario"]: r for r in json.loads(out.stdout)["scenarios"]}
    assert set(rows) == set(SCENARIO_NAMES)
    for r in rows.values():
        # the paper runs' circular throughput is the published time turned into images/s per node
        # (MLPerf's is its logged rate); the percentage compares the prediction with the published
        # time. The check against independent throughputs is below.
        given = r["inputs"]
        if "from the published" in given["node_throughput"]["source"]:
            implied = (
                given["epochs"]["value"]
                * given["dataset_size"]["value"]
                / (r["published_minutes"] * 60 * given["nodes"]["value"])
            )
            assert r["node_throughput"] == pytest.approx(implied)
        assert r["percent_off"] == pytest.approx(100 * (r["predicted_minutes"] / r["published_minutes"] - 1))
        assert r["circular"] is True and r["inputs"]["node_throughput"]["circular"] is True
        assert all(v["source"] for v in r["inputs"].values())
    assert rows["mlperf-v3.0"]["algorithm"] == "rabenseifner"


def _check_rows(*flags: str) -> dict:
    out = run_cli("plan", "--check", "--json", *flags)
    assert out.returncode == 0, out.stderr
    return {r["scenario"]: r for r in json.loads(out.stdout)["scenarios"]}


def test_independent_throughputs_are_the_published_figures_with_the_stated_scaling():
    # AlexNet: 399.00 img/s on 2 x Gold 6148 (40 cores, 2.4 GHz) carried to 2 x 8160 (48 cores, 2.1 GHz)
    assert cores_x_base_ghz(48, 2.1) / cores_x_base_ghz(40, 2.4) == pytest.approx(1.05)
    alexnet = SCENARIOS["paper-alexnet"].independent_throughput
    assert alexnet.value == pytest.approx(399.00 * 1.05) and not alexnet.circular and "6148" in alexnet.source
    # ResNet-50: 316 img/s on four Xeon Phi 7250, the record run's CPU, so no scaling
    knl = SCENARIOS["paper-resnet50"].independent_throughput
    assert knl.value == pytest.approx(79.0) and not knl.circular and "Nurion" in knl.source
    mlperf = SCENARIOS["mlperf-v3.0"]
    assert mlperf.independent_throughput is None and "16 nodes" in mlperf.independent_missing


def test_check_predicts_with_the_independent_throughput_next_to_the_circular_one():
    rows = _check_rows()
    # the allreduce hides under backward in both paper runs, so time = epochs x images / (nodes x rate)
    alexnet = rows["paper-alexnet"]["independent"]
    assert alexnet["exposed_ms"] == 0.0
    assert alexnet["predicted_minutes"] == pytest.approx(100 * 1_281_167 / (1024 * 418.95) / 60)  # 4.98 min
    assert alexnet["percent_off"] == pytest.approx(-54.75, abs=0.01)
    resnet = rows["paper-resnet50"]["independent"]
    assert resnet["predicted_minutes"] == pytest.approx(90 * 1_281_167 / (2048 * 79.0) / 60)  # 11.88 min
    assert resnet["percent_off"] == pytest.approx(-40.6, abs=0.1)
    assert all(rows[n]["independent"]["source"] for n in ("paper-alexnet", "paper-resnet50"))
    assert rows["mlperf-v3.0"]["independent"] is None and rows["mlperf-v3.0"]["independent_missing"]
    text = run_cli("plan", "--check")
    assert text.returncode == 0, text.stderr
    table = {
        line.split()[0]: line
        for line in text.stdout.splitlines()
        if line.split() and line.split()[0] in SCENARIO_NAMES and "min" in line
    }
    assert "+0.0%" in table["paper-resnet50"] and "-40.6%" in table["paper-resnet50"]  # circular, independent
    assert "+0.0%" in table["paper-alexnet"] and "-54.8%" in table["paper-alexnet"]
    assert "none found" in table["mlperf-v3.0"] and "-1.1%" in table["mlperf-v3.0"]


def test_check_flags_apply_to_the_independent_prediction_too():
    rows = _check_rows("--overlap", "0")
    alexnet = rows["paper-alexnet"]["independent"]  # nothing hidden: the whole 39.9 ms allreduce shows
    assert alexnet["exposed_ms"] == pytest.approx(alexnet["allreduce_ms"]) and alexnet["exposed_ms"] > 30
    assert alexnet["node_throughput"] == pytest.approx(418.95)


def test_plan_explains_every_term_on_its_own_line():
    out = run_cli("plan", "--scenario", "mlperf-v3.0", "--overlap", "0")
    assert out.returncode == 0, out.stderr
    for term in ("compute", "allreduce", "hidden", "exposed", "iteration", "time to train", "throughput", "efficiency"):
        assert any(line.strip().startswith(term) for line in out.stdout.splitlines()), term
    assert "published: 88 min" in out.stdout


def test_nodes_list_prints_a_scaling_table_and_json(tmp_path):
    net = tmp_path / "net.json"
    net.write_text(json.dumps({"latency_us": 20.0, "bandwidth_gbps": 30.0}))
    args = ("plan", "--throughput", "17", "--nodes", "1,2,4,8", "--global-batch", "256", "--network", str(net))
    table = run_cli(*args)
    assert table.returncode == 0, table.stderr
    rows = [line.split() for line in table.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [r[0] for r in rows] == ["1", "2", "4", "8"]
    data = json.loads(run_cli(*args, "--json").stdout)
    assert [p["ranks"] for p in data["predictions"]] == [1, 2, 4, 8]
    assert data["sources"]["latency_us"]["value"] == 20.0 and str(net) in data["sources"]["latency_us"]["source"]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            [
                "--nodes",
                "64",
                "--throughput",
                "10",
                "--global-batch",
                "32",
                "--latency-us",
                "1",
                "--bandwidth-gbps",
                "10",
            ],
            "global batch 32 is smaller than the 64 ranks, so some rank gets no image: "
            "raise --global-batch or lower --nodes",
        ),
        (
            ["--scenario", "imagenet-in-1s"],
            "unknown scenario 'imagenet-in-1s'; choose one of paper-alexnet, paper-resnet50, mlperf-v3.0",
        ),
        (
            ["--from-bench", "/no/such/bench.json", "--nodes", "2", "--global-batch", "64"],
            "cannot read benchmark file /no/such/bench.json: No such file or directory; pass a file written by "
            "`ipex-lars bench train` (its --out folder's results.json), or give --throughput IMG_S",
        ),
        (
            ["--network", "NOTJSON", "--nodes", "2", "--throughput", "1", "--global-batch", "8"],
            "cannot read network file NOTJSON: {json error}; pass a file written by `ipex-lars plan --calibrate --save "
            "FILE.json`",
        ),
        (
            ["--nodes", "4", "--throughput", "10", "--global-batch", "64"],
            "the network is unknown: give --latency-us and --bandwidth-gbps, "
            "--network FILE.json (written by --calibrate --save), or --scenario NAME",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line_naming_the_problem(args, message, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    args = [str(bad) if a == "NOTJSON" else a for a in args]
    assert cli.main(["plan", *args]) == 2
    out, err = capsys.readouterr()
    # the one varying part: the JSON parser's own words for what is wrong
    expected = re.escape("ipex-lars plan: error: " + message.replace("NOTJSON", str(bad))).replace(
        re.escape("{json error}"), "Expecting property name .*"
    )
    assert re.fullmatch(expected + "\n", err), err
    assert out == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--nodes", "0"],
            "argument --nodes: expected comma-separated node counts from 1 to 1000000, e.g. 16 or 1,2,4,8, got '0'",
        ),
        (
            ["--nodes", "1,,4"],
            "argument --nodes: expected comma-separated node counts from 1 to 1000000, e.g. 16 or 1,2,4,8, got '1,,4'",
        ),
        (["--throughput", "inf"], "argument --throughput: expected a number above 0 and at most 1e+09, got 'inf'"),
        (
            ["--bandwidth-gbps", "-5"],
            "argument --bandwidth-gbps: expected a number above 0 and at most 1e+09, got '-5'",
        ),
        (["--overlap", "1.5"], "argument --overlap: expected a number from 0 to 1, got '1.5'"),
        (
            ["--calibrate", "--calibrate-sizes", "4K,zz"],
            "argument --calibrate-sizes: expected comma-separated sizes from 1 byte to 1G, e.g. 4K,1M,16M, got '4K,zz'",
        ),
    ],
)
def test_a_bad_flag_value_is_named_before_anything_runs(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["plan", *args])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"ipex-lars plan: error: {message} (see ipex-lars plan --help)\n"


def test_bad_input_ends_the_installed_command_with_exit_2():
    out = run_cli("plan", "--scenario", "imagenet-in-1s")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == (
        "ipex-lars plan: error: unknown scenario 'imagenet-in-1s'; choose one of paper-alexnet, "
        "paper-resnet50, mlperf-v3.0\n"
    )


@pytest.mark.slow
def test_calibrate_fits_real_oneccl_allreduces_and_the_plan_reads_them_back(tmp_path):
    saved = tmp_path / "net.json"
    out = run_cli(
        "plan",
        "--calibrate",
        "--calibrate-sizes",
        "4K,1M,16M",
        "--calibrate-seconds",
        "0.1",
        "--save",
        str(saved),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "alpha =" in out.stdout and out.stdout.count("%") >= 3  # an error for each measured size
    network = json.loads(saved.read_text())
    assert network["latency_us"] >= 0 and network["bandwidth_gbps"] > 0
    assert network["fitted_on"]["bytes"] == [4096, 1 << 20, 1 << 24]
    assert all(t > 0 for t in network["fitted_on"]["measured_s"])
    assert "DDP step" in out.stdout and network["ddp_step"]["measured_s"] > 0  # the check the fit never saw
    plan = run_cli(
        "plan", "--network", str(saved), "--nodes", "2", "--throughput", "17", "--global-batch", "64", "--json"
    )
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["predictions"][0]["allreduce_s"] > 0
