"""The network interface ranks talk over: the one holding this host's address towards MASTER_ADDR,
or the one named; told to oneCCL, libfabric and gloo unless the user already did. (The
multi-node behaviour, with a decoy interface listed first, is in test_cluster.py.)"""

from __future__ import annotations

import socket

import pytest

from ipex_lars.distributed import interface
from ipex_lars.distributed.env import Launch


def launch(addr: str, world: int = 2, local_world: int | None = 2) -> Launch:
    return Launch("torchrun", 0, world, 0, local_world, addr, 29999)


def test_the_table_of_addresses_has_loopback_on_lo():
    assert interface.ipv4_addresses()["127.0.0.1"] == "lo"


def test_master_on_loopback_picks_lo_and_sets_all_three():
    env: dict[str, str] = {}
    choice = interface.apply(launch("127.0.0.1"), env)
    assert choice.name == "lo"
    assert env == {"CCL_KVS_IFACE": "lo", "FI_TCP_IFACE": "lo", "GLOO_SOCKET_IFNAME": "lo"}
    assert choice.line().startswith("network interface lo (holds 127.0.0.1")


def test_what_the_user_set_is_kept():
    env = {"FI_TCP_IFACE": "eth7"}
    interface.apply(launch("127.0.0.1"), env)
    assert env["FI_TCP_IFACE"] == "eth7" and env["CCL_KVS_IFACE"] == "lo"


def test_named_interface_wins_and_must_exist():
    name = socket.if_nameindex()[-1][1]
    env = {interface.IFACE_ENV: name}
    assert interface.apply(launch("127.0.0.1"), env).name == name
    with pytest.raises(
        interface.InterfaceError,
        match=r"IPEX_LARS_IFACE=nosuch0 \(lars-run --iface\) names no "
        r"interface of this host",
    ):
        interface.choose(launch("127.0.0.1"), {interface.IFACE_ENV: "nosuch0"})


def test_a_host_name_on_loopback_in_a_multi_node_job_chooses_nothing_and_says_so():
    env: dict[str, str] = {}
    choice = interface.apply(launch("localhost", world=4, local_world=2), env)
    assert choice.name is None and env == {}
    assert "resolves to the loopback address" in choice.line() and "IPEX_LARS_IFACE" in choice.line()


def test_unresolvable_master_is_one_line_error():
    with pytest.raises(interface.InterfaceError, match="cannot resolve MASTER_ADDR='no-such-host.invalid'"):
        interface.choose(launch("no-such-host.invalid"), {})


def test_single_process_sets_nothing():
    env: dict[str, str] = {}
    assert interface.apply(Launch("single", 0, 1, 0, 1, "127.0.0.1", 0), env).name is None and env == {}
