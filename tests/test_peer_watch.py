"""The peer watch over real loopback sockets, its processes played by threads of this one; the
job-level kill -9 with real processes is in test_faults.py."""

import socket
import threading
import time

import pytest

from gptjax import peer_watch


class FakeClient:
    """The two calls of JAX's distributed client that the watch makes."""

    def __init__(self):
        self.values, self.ready = {}, threading.Condition()

    def key_value_set(self, key, value, allow_overwrite=False):
        with self.ready:
            self.values[key] = value
            self.ready.notify_all()

    def blocking_key_value_get(self, key, timeout_ms):
        with self.ready:
            assert self.ready.wait_for(lambda: key in self.values, timeout_ms / 1000)
            return self.values[key]


class Heard:
    def __init__(self):
        self.texts, self.event = [], threading.Event()

    def __call__(self, text):
        self.texts.append(text)
        self.event.set()


def _job(count):
    client = FakeClient()
    heard = [Heard() for _ in range(count)]
    hub = peer_watch._Hub(client, 0, count, "localhost", heard[0])
    spokes = [peer_watch._Spoke(client, i, count, "localhost", heard[i]) for i in range(1, count)]
    for watch in [hub, *spokes]:
        watch.start()
    deadline = time.monotonic() + 30
    while sum(p is not None for p in list(hub.peers.values())) < count - 1:  # every hello read
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return hub, spokes, heard


def test_a_peer_that_fails_stops_every_other_with_its_status():
    hub, spokes, heard = _job(3)
    spokes[0].leave(2)
    assert heard[0].event.wait(30) and heard[2].event.wait(30)
    assert heard[0].texts == heard[2].texts == ["process 1 of this 3-process job stopped with status 2"]
    assert heard[1].texts == []  # the failed process itself ends by its own error


def test_a_peer_gone_without_a_word_is_named():
    hub, spokes, heard = _job(3)
    # What the kernel does for a process killed with -9: its end of the connection closes, and
    # the process itself does nothing more.
    spokes[1].leaving.set()
    spokes[1].conn.shutdown(socket.SHUT_RDWR)
    assert heard[0].event.wait(30) and heard[1].event.wait(30)
    expected = ["process 2 of this 3-process job ended without a word (killed, or crashed)"]
    assert heard[0].texts == heard[1].texts == expected


@pytest.mark.parametrize("code", peer_watch.CLEAN_EXITS)
def test_clean_ends_are_no_failure(code):
    hub, spokes, heard = _job(2)
    spokes[0].leave(code)
    hub.leave(code)
    time.sleep(0.5)  # a failure would be heard within milliseconds; none must come
    assert heard[0].texts == heard[1].texts == []


def test_process_0_failing_tells_the_others_before_it_goes():
    hub, spokes, heard = _job(3)
    hub.fail("process 0 of this 3-process job stopped with status 1")
    assert heard[1].event.wait(30) and heard[2].event.wait(30)
    assert heard[1].texts == heard[2].texts == ["process 0 of this 3-process job stopped with status 1"]
