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
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
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


def _free_port() -> int:
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
    port = str(_free_port())
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


def _exit_code(stop: SystemExit) -> int:
    """The exit status the interpreter gives ``raise SystemExit(code)`` (a message prints, status 1)."""
    if isinstance(stop.code, str):
        print(stop.code, file=sys.stderr)
    return stop.code if isinstance(stop.code, int) else int(stop.code is not None)


def _rank_main(args: list[str], env: dict[str, str], folder: str) -> None:
    """One rank: its environment and output files, then the CLI's entry point, then its exit."""
    os.setsid()  # its own session: a deadline kills it together with whatever it started
    os.environ.clear()
    os.environ.update(env)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        handle = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - open while the rank lives
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.argv = [sys.executable, "-m", "ipo_lightning", *args]

    import torch
    from lightning.fabric.utilities.rank_zero import _get_rank, rank_zero_only

    torch.set_num_threads(1)  # what OMP_NUM_THREADS=1 in the child environment gives a fresh one
    rank_zero_only.rank = _get_rank() or 0

    from ipo_lightning.entry import main

    code = 0
    try:
        main(args)
    except SystemExit as stop:
        code = _exit_code(stop)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    # multiprocessing ends its children with os._exit, which skips what an interpreter does at its
    # end: wait for its non-daemon threads, then run the exit handlers (W&B's and logging's among them).
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
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
    """The started processes of one :class:`Torchrun`; each writes its output to its own folder."""

    def __init__(self, run: Torchrun, env: Mapping[str, str]) -> None:
        """Start ``run``'s ranks with ``env`` (a child's environment) plus torchrun's variables."""
        self.run = run
        self._output = Path(tempfile.mkdtemp(prefix="ranks-"))
        self._processes: list[multiprocessing.process.BaseProcess] = []
        context = _context()
        for rank, rank_env in enumerate(rank_environments(env, run)):
            folder = self._output / str(rank)
            folder.mkdir()
            process = context.Process(target=_rank_main, args=(list(run.args), rank_env, str(folder)))
            process.start()
            self._processes.append(process)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every rank to end; False if one is still running."""
        deadline = time.monotonic() + timeout
        for process in self._processes:
            process.join(timeout=max(deadline - time.monotonic(), 0.1))
        return all(process.exitcode is not None for process in self._processes)

    def kill(self) -> None:
        """Kill every rank still running, with what it started."""
        for process in self._processes:
            if process.exitcode is None and process.pid is not None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.join(timeout=30)

    def result(self) -> subprocess.CompletedProcess[str]:
        """Exit code (the first failed rank's, as torchrun reports it; else 0), then every rank's stdout
        and every rank's stderr, rank 0 first. Removes the output files."""
        codes = [process.exitcode for process in self._processes]
        code = next((code for code in codes if code), 0)
        streams = [
            "".join((self._output / str(rank) / name).read_text() for rank in range(self.run.nproc))
            for name in ("stdout", "stderr")
        ]
        shutil.rmtree(self._output, ignore_errors=True)
        return subprocess.CompletedProcess(self.run.command_line(), code, *streams)
