"""Tool calls in worker processes: each bounded by a timeout, none with the network or the run's files.

A call runs in a `sapo_ray.workers.WorkerPool` process, so one that hangs costs its worker `timeout_s` and
the episode an error observation, and the other calls run on. Each worker loads the tools (theirs and the
user's files, with everything they import), then cuts itself off: namespaces of its own (an unprivileged
user namespace where the kernel allows one) with no network but a down loopback, and an empty directory as
its root, so a tool sees what its `ToolContext` holds and no more (`isolated` says whether it could; where
it could not, a tool still runs in its own process, in an empty working directory). A tool cannot import
modules at call time after that: its file imports what it needs at the top.
"""

from __future__ import annotations

import ctypes
import logging
import os
import tempfile
from typing import Callable

from sapo_ray.envs.tools import BadCall, ToolCall, ToolContext, ToolResult, load_tool, run_call
from sapo_ray.workers import WorkerPool

log = logging.getLogger(__name__)
_CLONE_NEWUSER, _CLONE_NEWNET, _CLONE_NEWNS = 0x10000000, 0x40000000, 0x00020000


def cut_off() -> bool:
    """This process without network (a network namespace of its own) and with an empty directory as its
    root; returns whether it could (False where the kernel refuses the namespaces: then only the working
    directory is an empty one)."""
    empty = tempfile.mkdtemp(prefix="sapo-tool-")
    os.chdir(empty)
    try:
        unshare = ctypes.CDLL(None, use_errno=True).unshare
    except (OSError, AttributeError):
        return False
    if unshare(_CLONE_NEWUSER | _CLONE_NEWNET | _CLONE_NEWNS) != 0 and unshare(_CLONE_NEWNET | _CLONE_NEWNS) != 0:
        return False
    try:
        os.chroot(empty)
    except OSError:
        return False
    os.chdir("/")
    return True


def _runner(max_chars: int, tool_files: tuple[str, ...]) -> Callable:
    """In a worker: load the user's tools, cut off, then run `(call, context)` payloads (None asks whether
    the network is cut)."""
    for spec in tool_files:
        load_tool(spec)
    isolated = cut_off()
    return lambda payload: isolated if payload is None else run_call(*payload, max_chars=max_chars)


class ToolPool:
    """Runs calls with `run_call` in `num_workers` processes, each call at most `timeout_s` seconds, each
    result at most `max_chars` characters; a call past its time is an error observation of kind `timeout`.
    `tool_files`: the user's tools (`"file.py:function"`, `load_tool`), loaded here and in every worker."""

    def __init__(self, num_workers: int, timeout_s: float, max_chars: int = 1000, tool_files: tuple[str, ...] = (),
                 allowed: tuple[str, ...] | None = None):
        self.timeout_s = timeout_s
        self.names = [load_tool(spec) for spec in tool_files]  # here too: a bad file fails before any worker starts
        # The tools a turn may call (the configured and the user's); None: every registered tool.
        self.allowed = None if allowed is None else set(allowed) | set(self.names)
        self._workers = WorkerPool(num_workers, timeout_s, _runner, (max_chars, tuple(tool_files)),
                                   preload=("sapo_ray.envs.tools",), name="ToolWorker")
        (probe,) = self._workers.map([None])
        self.isolated = bool(probe.value)
        if not self.isolated:
            log.warning("tool workers could not leave the network and the file system (the kernel refuses the "
                        "namespaces); tools still run in their own processes, in an empty working directory")

    def run(self, calls: list[tuple[ToolCall | BadCall, ToolContext]]) -> list[ToolResult]:
        """One result per call, in order; a malformed call or one to a tool not allowed answers at once, without
        a worker."""
        results: list[ToolResult | None] = [None] * len(calls)
        sent = [i for i, (call, _) in enumerate(calls)
                if isinstance(call, ToolCall) and (self.allowed is None or call.name in self.allowed)]
        for i, (call, context) in enumerate(calls):
            if i not in sent:
                results[i] = run_call(call, context, allowed=self.allowed)
        for i, outcome in zip(sent, self._workers.map([calls[i] for i in sent])):
            name = calls[i][0].name
            if outcome.timed_out:
                results[i] = ToolResult(f"Error: {name} ran past its {self.timeout_s:g} s limit.", "timeout")
            elif outcome.error is not None:
                results[i] = ToolResult(f"Error: {name} failed: {outcome.error}.", "tool_raised")
            else:
                results[i] = outcome.value
        return results

    def close(self) -> None:
        self._workers.close()

    def __enter__(self) -> "ToolPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class InlineTools:
    """Runs calls in this process, without time limits or isolation: for calls this project writes itself
    (a teacher's solutions replayed for a warm start), never for a model's."""

    def run(self, calls: list[tuple[ToolCall | BadCall, ToolContext]]) -> list[ToolResult]:
        return [run_call(call, context) for call, context in calls]
