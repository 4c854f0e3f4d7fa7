"""A TCP port nothing listens on, for the coordinator of a multi-process test: launch/local.sh's
random pick could meet another test's coordinator when test files run side by side."""

import socket


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return str(s.getsockname()[1])
