"""User tools for the tool pool's tests (loaded as `tool_hooks.py:name`)."""

import os
import socket
import time


def nap(context, seconds):
    """Sleep, then say so."""
    time.sleep(float(seconds))
    return f"slept {seconds}"


def dial(context, port):
    """Open a TCP connection to 127.0.0.1:port."""
    socket.create_connection(("127.0.0.1", int(port)), timeout=2).close()
    return "connected"


def here(context):
    """The working directory and what it holds."""
    return f"{os.getcwd()} {sorted(os.listdir('.'))}"


def peek(context, path):
    """Read a file."""
    with open(path) as f:
        return f.read()[:20]


def vanish(context):
    """End the worker process outright."""
    os._exit(3)


here.parameters = {"type": "object", "properties": {}}
