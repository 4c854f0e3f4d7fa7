"""Every process of a multi-process job learns at once when another one dies.

JAX's coordination service declares a process dead only after its heartbeat timeout, and then
ends the survivors itself with a C++ abort; a survivor waiting in one of its barriers (a
checkpoint's) hears nothing before that. So beside it each process keeps one TCP connection to
process 0. The kernel closes a dead process's sockets, so the other end reads end-of-file within
milliseconds however the process died (kill -9, out of memory, a crash), and nothing depends on
the dead process having run any code. Process 0 passes the news on to every other process and
waits for them to go before it goes itself (it hosts the coordination service, whose end would
otherwise abort them first). A host that vanishes without closing anything (power, network) is
caught by TCP keepalive after about 25 s.

Each process says how it leaves ("exit C"). A clean end (0, or 75 / 130 after saving, which every
process reaches at the same step) is no failure; any other status stops the job.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time
from typing import Callable

_KEY = "gptjax/peer_watch"
CLEAN_EXITS = (0, 75, 130)
_KEEPALIVE = {"TCP_KEEPIDLE": 10, "TCP_KEEPINTVL": 5, "TCP_KEEPCNT": 3}  # ~25 s for a vanished host

_watch: "_Watch | None" = None


def start(on_failure: Callable[[str], None]) -> None:
    """Watches the job's other processes; `on_failure(text)` is called once, from a background
    thread, with what happened ("process 1 of this 2-process job ended (killed, or crashed)").
    A lone process does nothing."""
    global _watch
    from jax._src import distributed as jax_distributed
    state = jax_distributed.global_state
    if state.client is None or (state.num_processes or 1) < 2:
        return
    host = (state.coordinator_address or "").rpartition(":")[0].strip("[]") or socket.gethostname()
    kind = _Hub if state.process_id == 0 else _Spoke
    _watch = kind(state.client, state.process_id, state.num_processes, host, on_failure)
    _watch.start()


def watching() -> bool:
    return _watch is not None


def stop_all(text: str) -> None:
    """From the main thread, which heard first (a collective failed): tells the others as the
    watch would, and returns once they have heard."""
    watch = _watch
    if watch is None:
        return
    if watch._failed.acquire(blocking=False):
        watch.leaving.set()
        watch.pass_on(text)
        watch.told.set()
    else:  # the watch thread is telling them already
        watch.told.wait(6)


def leave(code: int) -> None:
    """Tells the other processes how this one ends and stops watching them."""
    global _watch
    if _watch is not None:
        _watch.leave(code)
        _watch = None


def _keepalive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in _KEEPALIVE.items():
        if hasattr(socket, name):  # Linux; elsewhere the system's keepalive timing applies
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _status_text(process: int, code: int, count: int) -> str:
    return f"process {process} of this {count}-process job stopped with status {code}"


def _ended_text(process: int, count: int) -> str:
    return f"process {process} of this {count}-process job ended without a word (killed, or crashed)"


class _Watch:
    def __init__(self, client, process_id: int, count: int, host: str, on_failure: Callable[[str], None]):
        self.client, self.me, self.count, self.host = client, process_id, count, host
        self.on_failure = on_failure
        self.leaving = threading.Event()  # from here on, a peer's end is no failure of this job
        self._failed = threading.Lock()
        self.told = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="gptjax-peer-watch", daemon=True).start()

    def _run(self) -> None:
        try:
            self.watch()
        except Exception as e:  # noqa: BLE001 -- JAX's own heartbeats still stand behind the watch
            if not self.leaving.is_set():
                from gptjax import distributed
                distributed.log(f"warning: the watch on the job's other processes stopped ({e}); a failed "
                                f"process is noticed only after the heartbeat timeout")

    def fail(self, text: str) -> None:
        """From the watch thread: the job is over."""
        if self.leaving.is_set() or not self._failed.acquire(blocking=False):
            return
        self.leaving.set()  # the others' ends, which this causes, are not news
        self.pass_on(text)
        self.told.set()
        self.on_failure(text)

    def pass_on(self, text: str) -> None:
        """Tells the others that the job is over, where this process is the one that tells."""


class _Hub(_Watch):
    """Process 0: one connection from each other process."""

    def __init__(self, *args):
        super().__init__(*args)
        self.peers: dict[socket.socket, int | None] = {}
        self.clean: set[int] = set()
        self.lock = threading.Lock()

    def watch(self) -> None:
        selector = selectors.DefaultSelector()
        if socket.has_dualstack_ipv6():
            server = socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
        else:
            server = socket.create_server(("", 0))
        server.setblocking(False)
        selector.register(server, selectors.EVENT_READ)
        self.client.key_value_set(_KEY, f"{self.host}:{server.getsockname()[1]}", allow_overwrite=True)
        buffers: dict[socket.socket, bytes] = {}
        while True:
            for key, _ in selector.select(timeout=0.5):
                sock = key.fileobj
                if sock is server:
                    conn, _ = server.accept()
                    _keepalive(conn)
                    with self.lock:
                        self.peers[conn] = None
                    buffers[conn] = b""
                    selector.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                peer = self.peers.get(sock)
                if not data:
                    selector.unregister(sock)
                    with self.lock:
                        self.peers.pop(sock, None)
                    if peer is not None and peer not in self.clean:
                        self.fail(_ended_text(peer, self.count))
                    continue
                buffers[sock] += data
                *lines, buffers[sock] = buffers[sock].split(b"\n")
                for line in lines:
                    word, _, value = line.decode().partition(" ")
                    if word == "hello":
                        self.peers[sock] = int(value)
                    elif word == "exit" and int(value) in CLEAN_EXITS:
                        self.clean.add(self.peers[sock])
                    elif word == "exit":
                        self.fail(_status_text(self.peers[sock], int(value), self.count))

    def _tell_all(self, line: str) -> None:
        with self.lock:
            conns = list(self.peers)
        for conn in conns:
            try:
                conn.sendall(line.encode() + b"\n")
            except OSError:
                pass

    def pass_on(self, text: str) -> None:
        self._tell_all(f"failed {text}")
        # This process hosts the coordination service: were it to go first, JAX would abort the
        # others before they read the news. Their ends are read here, whichever thread calls.
        deadline = time.monotonic() + 5
        with self.lock:
            conns = list(self.peers)
        for conn in conns:
            try:
                conn.settimeout(max(0.01, deadline - time.monotonic()))
                while conn.recv(4096):
                    pass
            except OSError:
                pass

    def leave(self, code: int) -> None:
        if self._failed.locked():
            return
        self.leaving.set()
        self._tell_all(f"exit {code}")
        if code not in CLEAN_EXITS:  # the others stop on this news; the watch thread sees them go
            deadline = time.monotonic() + 5
            while self.peers and time.monotonic() < deadline:
                time.sleep(0.02)


class _Spoke(_Watch):
    """Every other process: one connection to process 0."""

    conn: socket.socket | None = None

    def watch(self) -> None:
        address = self.client.blocking_key_value_get(_KEY, 300_000)
        host, _, port = address.rpartition(":")
        self.conn = socket.create_connection((host.strip("[]"), int(port)))
        _keepalive(self.conn)
        self.conn.sendall(f"hello {self.me}\n".encode())
        buffer, clean = b"", False
        while True:
            try:
                data = self.conn.recv(4096)
            except OSError:
                data = b""
            if not data:
                if not clean:
                    self.fail(_ended_text(0, self.count))
                return
            buffer += data
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                word, _, value = line.decode().partition(" ")
                if word == "failed":
                    self.fail(value)
                elif word == "exit" and int(value) in CLEAN_EXITS:
                    clean = True
                elif word == "exit":
                    self.fail(_status_text(0, int(value), self.count))

    def leave(self, code: int) -> None:
        self.leaving.set()
        if self.conn is not None:
            try:
                self.conn.sendall(f"exit {code}\n".encode())
                self.conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def exit_now(code: int) -> None:
    """Leaves at once: JAX's shutdown would wait at a barrier for processes that are still running."""
    os._exit(code)
