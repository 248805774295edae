"""Multi-process CLI runs started as ``torchrun`` starts them, from a process that imported the CLI once.

A child interpreter spends about 9 CPU-seconds importing Lightning, torch and transformers before it
runs anything, and a two-process fit started through Lightning's own launcher pays that twice, one rank
after the other. Here each rank is forked from one server process (multiprocessing's ``forkserver``)
that imported the CLI and has run nothing else, so a rank starts in a fraction of a second.

Each rank then runs as a rank of ``torchrun --nproc-per-node N -m ipo_lightning ARGS`` (torch's
elastic launcher, a launch path the project supports): its environment is replaced by the child
environment given plus torchrun's variables before anything of the run is built, and its run folder is
``torchrun-<run id>``. What Lightning derived from the server's environment at import time (the rank
``rank_zero_only`` knows) is derived again from the rank's own.

``IPO_TEST_RANKS=spawn`` starts every rank as a fresh interpreter instead (multiprocessing's ``spawn``):
the same runs without the shared imports, to check that none of them depends on the server.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PRELOAD = ["ipo_lightning.cli", "transformers.models.llama.modeling_llama"]
"""What the server imports once: what every rank imports before its run starts."""
METHOD_VAR = "IPO_TEST_RANKS"
"""``forkserver`` (default) or ``spawn``: how the ranks are started."""


@dataclass(frozen=True)
class Torchrun:
    """``torchrun --nproc-per-node NPROC --rdzv-id RUN_ID -m ipo_lightning ARGS``, a command for
    :func:`tests.helpers.run_clis`.

    Attributes:
        args: the CLI's arguments.
        nproc: processes on this one node.
        run_id: torchrun's ``--rdzv-id``: the run folder is ``torchrun-<run_id>``.
    """

    args: Sequence[str]
    nproc: int = 2
    run_id: str = "0"

    @property
    def folder(self) -> str:
        """The run folder's name, as the CLI derives it under torchrun."""
        return f"torchrun-{self.run_id}"

    def command_line(self) -> list[str]:
        """The command a user would type for this run."""
        return [
            *("torchrun", f"--nproc-per-node={self.nproc}", f"--rdzv-id={self.run_id}"),
            *("-m", "ipo_lightning", *self.args),
        ]


_PORTS = range(20000, 32768)
"""Where a run's ``MASTER_PORT`` is drawn from: below Linux's ephemeral range (32768-60999), so no
connection a running rank opens (gloo opens many) can take the port between its draw and rank 0's bind."""
_handed_out: set[int] = set()
_draw = random.SystemRandom()  # not the module's generator, which in-process fits seed


def free_port() -> int:
    """A port of :data:`_PORTS` that binds now and that no earlier run of this process was given."""
    for port in _draw.sample(_PORTS, 50):
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port among 50 drawn from {_PORTS}")


def rank_environments(base: Mapping[str, str], run: Torchrun) -> list[dict[str, str]]:
    """``base`` plus the variables torchrun sets in each of ``run``'s processes (one node)."""
    port = str(free_port())
    world = str(run.nproc)
    return [
        {
            **base,
            **{"RANK": str(rank), "LOCAL_RANK": str(rank), "ROLE_RANK": str(rank), "GROUP_RANK": "0"},
            **{"WORLD_SIZE": world, "LOCAL_WORLD_SIZE": world, "ROLE_WORLD_SIZE": world},
            **{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "TORCHELASTIC_RUN_ID": run.run_id},
            **{"TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0"},
        }
        for rank in range(run.nproc)
    ]


def exit_code(stop: SystemExit) -> int:
    """The exit status the interpreter gives ``raise SystemExit(code)`` (a message prints, status 1)."""
    if isinstance(stop.code, str):
        print(stop.code, file=sys.stderr)
    return stop.code if isinstance(stop.code, int) else int(stop.code is not None)


def _rank_main(args: list[str], env: dict[str, str], folder: str) -> None:
    """One rank: its environment and output files, then the CLI's entry point, then the interpreter's
    own ending."""
    os.setsid()  # its own session: a deadline kills it together with whatever it started
    os.environ.clear()
    os.environ.update(env)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    for fd, name in ((1, "stdout"), (2, "stderr")):  # the streams (and handlers bound to them) write here
        handle = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)

    import torch
    from lightning.fabric.utilities.rank_zero import _get_rank, rank_zero_only

    import ipo_lightning
    from ipo_lightning.entry import main

    sys.argv = [str(Path(ipo_lightning.__file__).with_name("__main__.py")), *args]  # as `-m` sets it
    if "OMP_NUM_THREADS" in env:  # what a fresh interpreter's torch takes from it
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    rank_zero_only.rank = _get_rank() or 0

    code = 0
    try:
        main(args)
    except SystemExit as stop:
        code = exit_code(stop)
    except BaseException:
        traceback.print_exc()
        code = 1
    # multiprocessing ends its children with os._exit after its own clean-up; an interpreter first
    # waits for its threads (stopping thread pools), then runs the exit handlers (W&B's among them).
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None:
            stream.flush()
    os._exit(code)


_CONTEXTS: dict[str, multiprocessing.context.BaseContext] = {}


def _context() -> multiprocessing.context.BaseContext:
    method = os.environ.get(METHOD_VAR, "forkserver")
    if method not in _CONTEXTS:
        if method not in ("forkserver", "spawn"):
            raise ValueError(f"{METHOD_VAR} must be forkserver or spawn, got {method!r}")
        context = multiprocessing.get_context(method)
        if method == "forkserver":
            context.set_forkserver_preload(PRELOAD)
        _CONTEXTS[method] = context
    return _CONTEXTS[method]


class TorchrunRanks:
    """The started processes of one :class:`Torchrun`, each writing its output to ``<folder>/<rank>/``.

    As torchrun does, a rank that fails stops the others: SIGTERM, then SIGKILL after a grace period.
    """

    GRACE_S = 30.0
    """How long the other ranks have to end after SIGTERM (torchrun's own default)."""

    def __init__(self, run: Torchrun, env: Mapping[str, str], folder: Path) -> None:
        """Start ``run``'s ranks with ``env`` (a child's environment) plus torchrun's variables."""
        self.run = run
        self._output = folder
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._first_failure: int | None = None
        context = _context()
        try:
            for rank, rank_env in enumerate(rank_environments(env, run)):
                (folder / str(rank)).mkdir(parents=True)
                target_args = (list(run.args), rank_env, str(folder / str(rank)))
                process = context.Process(target=_rank_main, args=target_args)
                process.start()
                self._processes.append(process)
        except BaseException:
            self.kill()
            raise

    def _running(self) -> list[multiprocessing.process.BaseProcess]:
        """The ranks still running; records the exit code of the first to fail."""
        running = []
        for process in self._processes:
            if process.exitcode is None:
                running.append(process)
            elif process.exitcode != 0 and self._first_failure is None:
                self._first_failure = process.exitcode
        return running

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every rank to end; False if one is still running."""
        deadline = time.monotonic() + timeout
        while running := self._running():
            if self._first_failure is not None:
                for process in running:
                    _signal(process, signal.SIGTERM)
                deadline = min(deadline, time.monotonic() + self.GRACE_S)
            left = deadline - time.monotonic()
            if left <= 0 or not multiprocessing.connection.wait([p.sentinel for p in running], left):
                return False
        return True

    def kill(self) -> None:
        """Kill every rank still running, with what it started."""
        for process in self._processes:
            if process.exitcode is None:
                _signal(process, signal.SIGKILL)
            process.join(timeout=30)

    def result(self) -> subprocess.CompletedProcess[str]:
        """Exit code (the first failed rank's own; torchrun itself exits 1), then every rank's stdout and
        every rank's stderr, rank 0 first."""
        self._running()
        streams = []
        for name in ("stdout", "stderr"):
            files = [self._output / str(rank) / name for rank in range(len(self._processes))]
            streams.append("".join(path.read_text() for path in files if path.exists()))
        code = self._first_failure or 0
        return subprocess.CompletedProcess(self.run.command_line(), code, *streams)


def _signal(process: multiprocessing.process.BaseProcess, signum: int) -> None:
    """Send ``signum`` to the rank's session (what it started too), or to the rank alone while it has
    not made its session yet."""
    if process.pid is None:
        return
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(process.pid, signum)
        except ProcessLookupError:
            pass
