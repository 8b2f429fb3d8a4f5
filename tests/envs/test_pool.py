"""The tool pool: calls bounded in time, the others running on; no network, an empty working directory."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from sapo_ray.envs.pool import ToolPool
from sapo_ray.envs.tools import TOOLS, BadCall, ToolCall, ToolContext

HOOKS = str(Path(__file__).with_name("tool_hooks.py"))
SPECS = tuple(f"{HOOKS}:{name}" for name in ("nap", "dial", "here", "peek", "vanish"))


@pytest.fixture(scope="module")
def pool():
    with ToolPool(num_workers=2, timeout_s=1.0, tool_files=SPECS) as tools:
        yield tools
    for name in ("nap", "dial", "here", "peek", "vanish"):
        TOOLS.pop(name, None)


def test_a_hung_call_times_out_and_the_others_finish(pool):
    context = ToolContext()
    calls = [ToolCall("nap", {"seconds": 30}), ToolCall("calculator", {"expression": "6 * 7"}),
             ToolCall("nap", {"seconds": 0.1}), BadCall("the tool call is not valid JSON")]
    start = time.monotonic()
    results = pool.run([(c, context) for c in calls])
    assert time.monotonic() - start < 10
    assert [r.error for r in results] == ["timeout", None, None, "malformed_call"]
    assert results[0].text == "Error: nap ran past its 1 s limit." and results[1].text == "42"
    assert pool.run([(ToolCall("calculator", {"expression": "1 + 1"}), context)])[0].text == "2"  # a fresh worker


def test_a_call_that_kills_its_worker_is_an_error_and_the_pool_goes_on(pool):
    (result,) = pool.run([(ToolCall("vanish", {}), ToolContext())])
    assert result.error == "tool_raised" and "exited with code 3" in result.text
    assert pool.run([(ToolCall("here", {}), ToolContext())])[0].error is None


def test_tools_see_no_network_and_no_files(pool):
    """A server listening on this machine's loopback and this very file are out of a tool's reach (where the
    kernel grants the worker namespaces: its root is an empty directory); elsewhere its working directory
    is an empty one."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    try:
        port = server.getsockname()[1]
        (dialled,) = pool.run([(ToolCall("dial", {"port": port}), ToolContext())])
        if pool.isolated:
            assert dialled.error == "tool_raised" and "dial failed: " in dialled.text
        else:
            assert dialled.text == "connected"
    finally:
        server.close()
    (where,) = pool.run([(ToolCall("here", {}), ToolContext())])
    (peeked,) = pool.run([(ToolCall("peek", {"path": __file__}), ToolContext())])
    if pool.isolated:  # the root is an empty directory: no file of the run, no file at all
        assert where.text == "/ []" and peeked.error == "tool_raised" and "FileNotFoundError" in peeked.text
    else:
        assert "sapo-tool-" in where.text and where.text.endswith("[]")


def test_a_user_tool_file_that_is_not_there_fails_before_any_worker(tmp_path):
    with pytest.raises(FileNotFoundError):
        ToolPool(num_workers=1, timeout_s=1.0, tool_files=(f"{tmp_path}/none.py:f",))
