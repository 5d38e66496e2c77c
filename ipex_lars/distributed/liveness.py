"""Every rank ends within moments of another rank's death, with one line naming it.

Rank 0 runs a small hub: a TCP listener on the rendezvous store's interface (under torchrun,
whose store may be on another node, on the interface rank 0 reaches it through), whose
address it publishes in the store. Every other rank connects to it once, says which rank it is, and
from then on both ends send a heartbeat every ``timeout / 6`` seconds. So:

- A rank that dies, on any host, is seen at once: the kernel closes its sockets and the
  other end reads end-of-file. Rank 0 sees every other rank; the others see rank 0, which
  also hosts the store.
- A rank that is alive but silent (stopped, hung holding the GIL, its host or network
  down) is declared dead after ``IPEX_LARS_HEARTBEAT_TIMEOUT`` seconds (default 30;
  0 turns the watch off).
- Rank 0 forwards its verdict to every other rank. Each prints one line naming the rank,
  its host and pid and how it was noticed, and ends with exit code 1 through ``os._exit``:
  a rank blocked inside oneCCL or gloo cannot be unwound any other way.
- A rank that leaves through ``shutdown()`` says goodbye first, so a finished rank is not
  a dead one; one that leaves on an uncaught exception says it failed, and why. The others
  end at once when rank 0 failed; when another rank failed, rank 0 ends (and with it the
  others) once that rank has ended, up to 5 s later: rank 0 hosts oneCCL's key-value
  store, which the failing rank still needs to tear its communicator down.
- An uncaught exception in the main thread waits up to a second for the watcher's verdict:
  gloo raises "Connection closed by peer" the moment a peer dies, and the one line naming
  the dead rank replaces that traceback.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, NoReturn

from ipex_lars.distributed import rendezvous
from ipex_lars.distributed.env import Launch, agent_store_prefix

HEARTBEAT_ENV = "IPEX_LARS_HEARTBEAT_TIMEOUT"
DEFAULT_HEARTBEAT_TIMEOUT_S = 30.0
EXIT_CODE = 1
_HUB_KEY = f"{rendezvous.PREFIX}/liveness"
_VERDICT_GRACE_S = 1.0  # how long an uncaught exception waits for the watcher to name a dead peer
_FAILED_EXIT_GRACE_S = 5.0  # how long the others wait for a failed rank to end before they do


def heartbeat_timeout(env: dict[str, str] | None = None) -> float:
    """Seconds of silence after which a rank is declared dead (``IPEX_LARS_HEARTBEAT_TIMEOUT``); 0: no watch."""
    raw = (os.environ if env is None else env).get(HEARTBEAT_ENV, "")
    if raw == "":
        return DEFAULT_HEARTBEAT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < math.inf:
        raise ValueError(f"{HEARTBEAT_ENV}={raw!r} is not a number of seconds >= 0 (0 turns the liveness watch off)")
    return value


@dataclass
class _Peer:
    """A watched rank: rank 0 for the others, every other rank for rank 0."""

    rank: int
    who: str  # "host H, pid P"
    sock: socket.socket
    pending: bytes = b""
    last_seen: float = field(default_factory=time.monotonic)

    def describe(self) -> str:
        return f"rank {self.rank} ({self.who})"


class Watcher:
    """The liveness thread of one rank; see the module doc."""

    def __init__(
        self, rank: int, world: int, job: str, timeout_s: float, peers: list[_Peer], listener: socket.socket | None
    ) -> None:
        self.rank, self.job, self.timeout_s = rank, job, timeout_s
        self.failure: str | None = None  # set by the excepthook: this rank is ending on an exception
        self._interval = timeout_s / 6
        self._listener = listener  # rank 0 only
        self._unconnected = set(range(1, world)) if listener else set()
        self._started = time.monotonic()
        self._failed: tuple[float, str] | None = None  # (when to end, why): a peer said it failed
        self._peers = {p.sock: p for p in peers}
        self._hellos: dict[socket.socket, bytes] = {}  # accepted by rank 0, not yet introduced
        self._wake_read, self._wake_write = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._thread = threading.Thread(target=self._run, name="ipex-lars-liveness", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Leave the job: say goodbye and end the watch.

        After a failure (``failure`` set) say so instead, and keep watching until this process
        ends: the others end when they see it end, and a teardown that hangs is ended too."""
        if self._thread.is_alive():
            try:
                self._wake_write.send(b"f" if self.failure else b"x")
            except OSError:
                return  # the watch ended by itself meanwhile (rank 0 left)
            if not self.failure:
                self._thread.join(timeout=5)

    def await_verdict(self, seconds: float) -> None:
        """Give the watcher up to `seconds` to notice a dead peer (it then ends this process); a peer
        that said it failed, which is why this process fails too, ends it at once."""
        if not self._failed:
            self._thread.join(timeout=seconds)
        if self._failed:
            self._end(self._failed[1])

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        for sock in [self._wake_read, self._listener, *self._peers]:
            if sock is not None:
                self._selector.register(sock, selectors.EVENT_READ)
        next_beat = 0.0
        while self._listener or self._peers:
            for key, _ in self._selector.select(timeout=self._interval / 2):
                if key.fileobj is self._wake_read:
                    if self._wake_read.recv(1) == b"x":
                        self._leave()
                        return
                    for sock in self._peers:
                        _send(sock, f"fail {self.failure}", wait_s=1.0)
                elif key.fileobj is self._listener:
                    self._accept()
                else:
                    self._receive(key.fileobj)
            now = time.monotonic()
            if now >= next_beat:
                for sock in self._peers:
                    _send(sock, "hb")
                next_beat = now + self._interval
            self._check_deadlines(now)
        self._close()

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except OSError:
            return
        sock.setblocking(False)
        self._hellos[sock] = b""
        self._selector.register(sock, selectors.EVENT_READ)

    def _drop(self, sock: socket.socket) -> None:
        self._selector.unregister(sock)
        self._peers.pop(sock, None)
        self._hellos.pop(sock, None)
        sock.close()

    def _receive(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if sock in self._hellos:
            self._introduce(sock, data)
            return
        peer = self._peers[sock]
        if not data:
            self._end(
                self._failed[1]
                if self._failed
                else f"{peer.describe()} died: {self._noticed(peer)} saw its liveness connection close without a "
                "goodbye (its process ended)"
            )
        peer.last_seen = time.monotonic()
        *lines, peer.pending = (peer.pending + data).split(b"\n")
        for line in lines:
            verb, _, rest = line.decode(errors="replace").partition(" ")
            if verb == "bye":
                self._drop(sock)
                return
            if verb == "fail" and peer.rank == 0:
                self._end(f"{peer.describe()} failed: {rest}")
            if verb == "fail" and not self._failed:
                self._failed = (time.monotonic() + _FAILED_EXIT_GRACE_S, f"{peer.describe()} failed: {rest}")
            if verb == "end":
                self._end(rest)

    def _introduce(self, sock: socket.socket, data: bytes) -> None:
        """Rank 0: read a new connection's hello; keep it if it is a rank of this job not yet connected."""
        buffered = self._hellos[sock] + data
        line, newline, rest = buffered.partition(b"\n")
        if not newline:
            if data and len(buffered) < 4096:
                self._hellos[sock] = buffered
                return
            hello = {}
        else:
            try:
                hello = json.loads(line)
            except ValueError:
                hello = {}
        if not isinstance(hello, dict) or hello.get("job") != self.job or hello.get("rank") not in self._unconnected:
            self._drop(sock)
            return
        del self._hellos[sock]
        self._unconnected.discard(hello["rank"])
        self._peers[sock] = _Peer(hello["rank"], str(hello.get("who")), sock, rest)

    def _check_deadlines(self, now: float) -> None:
        if self._failed and now > self._failed[0]:
            self._end(self._failed[1])
        for peer in self._peers.values():
            if now - peer.last_seen > self.timeout_s:
                self._end(
                    f"{peer.describe()} is silent: {self._noticed(peer)} had no heartbeat from it for "
                    f"{now - peer.last_seen:.1f} s (stopped, hung holding the GIL, or its host or network is "
                    "down)"
                )
        if self._unconnected and now - self._started > self.timeout_s:
            ranks = ",".join(str(r) for r in sorted(self._unconnected))
            self._end(
                f"rank(s) {ranks} never connected to rank 0's liveness watcher within {self.timeout_s:g} s "
                "after joining the store (they ended or hung while starting)"
            )
        for sock in [s for s in self._hellos if now - self._started > self.timeout_s]:
            self._drop(sock)  # a stranger that never said hello

    def _noticed(self, peer: _Peer) -> str:
        return "rank 0" if peer.rank != 0 else f"rank {self.rank}"

    def _leave(self) -> None:
        for sock in self._peers:
            _send(sock, "bye", wait_s=1.0)
        self._close()

    def _close(self) -> None:
        for sock in [*self._peers, *self._hellos, self._wake_read, self._wake_write]:
            sock.close()
        if self._listener:
            self._listener.close()
        self._selector.close()
        self._peers.clear()
        self._hellos.clear()

    def _end(self, what: str) -> NoReturn:
        """Tell the other ranks (rank 0), say in one line why, and end this process now.

        A rank ending on its own exception is already explained by its traceback, and the
        others end because of it: it ends without a line."""
        if self.failure:
            os._exit(EXIT_CODE)
        for sock in list(self._peers) if self.rank == 0 else []:  # also runs on the main thread
            _send(sock, f"end {what}", wait_s=0.2)
        # On a line of its own, also after a progress bar's carriage return.
        line = (
            f"\n[ipex-lars] rank {self.rank} ({rendezvous.identity()}): {what}. Ending this rank (exit code "
            f"{EXIT_CODE}) so the job does not hang. A rank that ends is noticed at once, a silent one after "
            f"{HEARTBEAT_ENV}={self.timeout_s:g} s (0 turns this watch off).\n"
        )
        os.write(2, line.encode())
        # Flush what the program printed, unless another thread holds the stream's lock for ever.
        threading.Timer(1.0, os._exit, (EXIT_CODE,)).start()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(EXIT_CODE)


def _send(sock: socket.socket, words: str, wait_s: float = 0.0) -> None:
    """Send one line; a heartbeat (wait_s 0) is dropped rather than wait for a full buffer."""
    data = (words.replace("\n", " ") + "\n").encode()
    try:
        if wait_s:
            sock.settimeout(wait_s)
            sock.sendall(data)
            sock.setblocking(False)
        else:
            sock.send(data)
    except OSError:
        pass  # the peer is gone or its buffer is full: its own end, or silence, tells the story


# ---------------------------------------------------------------- starting and stopping

_active: Watcher | None = None
_previous_hook = sys.excepthook


def start(store: Any, launch: Launch, job: str, timeout_s: float) -> Watcher | None:
    """Start this rank's watcher once every rank has joined the store; None when there is nothing to watch."""
    global _active
    if launch.world_size == 1 or timeout_s == 0:
        return None
    if launch.rank == 0:
        bind, address = _hub_address(launch)
        listener = rendezvous.listen(bind, 0)
        listener.setblocking(False)
        hub = {"address": address, "port": listener.getsockname()[1], "who": rendezvous.identity()}
        store.set(_HUB_KEY, json.dumps(hub))
        watcher = Watcher(0, launch.world_size, job, timeout_s, [], listener)
    else:
        watcher = Watcher(
            launch.rank, launch.world_size, job, timeout_s, [_connect(store, launch, job, timeout_s)], None
        )
    watcher.start()
    _active = watcher
    if sys.excepthook is not _excepthook:
        _install_hook()
    return watcher


def _hub_address(launch: Launch) -> tuple[str, str]:
    """Where rank 0's hub listens, and the address the other ranks connect to.

    Rank 0 serves the store at MASTER_ADDR, so the hub does too. Under torchrun the store
    may be on another node: the hub listens on the address rank 0 reaches it from."""
    if agent_store_prefix() is None:
        return rendezvous.bind_address(launch), launch.master_addr
    family, _, _, _, peer = socket.getaddrinfo(launch.master_addr, launch.master_port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(peer)  # sends nothing: picks the route, and so this host's address on it
        local = probe.getsockname()[0]
    return local, local


def _connect(store: Any, launch: Launch, job: str, timeout_s: float) -> _Peer:
    """Connect to rank 0's hub and say which rank this is."""
    try:
        store.wait([_HUB_KEY])
        hub = json.loads(store.get(_HUB_KEY))
        sock = socket.create_connection((hub["address"], hub["port"]), timeout=timeout_s)
        sock.sendall((json.dumps({"job": job, "rank": launch.rank, "who": rendezvous.identity()}) + "\n").encode())
    except (RuntimeError, OSError, ValueError) as exc:
        raise rendezvous.RendezvousError(
            f"rank {launch.rank} could not connect to rank 0's liveness watcher "
            f"({rendezvous.first_line(exc)}): rank 0 probably ended; see its error"
        ) from None
    sock.setblocking(False)
    return _Peer(0, hub["who"], sock)


def stop(watcher: Watcher) -> None:
    """Say goodbye (or that this rank failed) to the watched ranks and restore the excepthook."""
    global _active
    watcher.stop()
    if _active is watcher:
        _active = None
        if sys.excepthook is _excepthook:
            sys.excepthook = _previous_hook


def fail(reason: str) -> None:
    """Mark this rank as failing for ``reason`` when it ends on an error it handled itself (a one-line
    message and exit code 2, say) rather than an uncaught exception: the other ranks then end at once,
    naming it, instead of meeting a closed connection in their next collective."""
    if _active is not None:
        _active.failure = reason


def _install_hook() -> None:
    global _previous_hook
    _previous_hook = sys.excepthook
    sys.excepthook = _excepthook


def _excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    """Let the watcher name a dead peer instead of this traceback; else note the failure for the peers."""
    watcher = _active
    if watcher is not None:
        watcher.await_verdict(_VERDICT_GRACE_S)
        watcher.failure = f"{kind.__name__}: {rendezvous.first_line(exc)}"
    _previous_hook(kind, exc, tb)
