"""A real Flower deployment on loopback: one SuperLink and N SuperNodes as separate processes (insecure mode),
and ``flwr run`` of an app folder against them. Every process started here is stopped by :meth:`stop`.

The commands, as a user runs them by hand (ports are this module's defaults; any free ones work)::

    flower-superlink --insecure --disable-runtime-dependency-installation --host 127.0.0.1 --port 9093
    flower-supernode --insecure --superlink 127.0.0.1:9093 --port 9094 --node-config 'partition-id=0'
    flower-supernode --insecure --superlink 127.0.0.1:9093 --port 9095 --node-config 'partition-id=1'
    # $FLWR_HOME/config.toml:  [superlink] default = "local-deploy"
    #                          [superlink.local-deploy] address = "127.0.0.1:9093"  insecure = true
    flwr run examples/flower_app local-deploy --run-config 'clients=2 rounds=1 out="/abs/run"' --stream
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from leaklab.errors import LeaklabError

CONNECTION = "local-deploy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


class Deployment:
    """SuperLink + ``nodes`` SuperNodes on 127.0.0.1 (free ports), each in its own process group."""

    def __init__(self, nodes: int = 2, home: str | Path | None = None):
        self.nodes = nodes
        self.home = Path(home or tempfile.mkdtemp(prefix="leaklab-flwr-"))
        self.home.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.port = free_port()  # flwr 1.42 serves the Fleet, Control and Runtime APIs over one HTTP port
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "PATH": path}

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.home / f"{name}.log", "w")  # noqa: SIM115  (closed with the process)
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.home, start_new_session=True
        )
        log.close()
        self.procs.append(proc)

    def start(self) -> Deployment:
        self._start(
            "superlink",
            [
                _bin("flower-superlink"),
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
        )
        try:
            self._wait_port(self.port)
        except LeaklabError:
            self.stop()
            raise
        for i in range(self.nodes):
            self._start(
                f"supernode-{i}",
                [
                    _bin("flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{self.port}",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    f"partition-id={i} num-partitions={self.nodes}",
                ],
            )
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n',
            encoding="utf-8",
        )
        return self

    def _wait_port(self, port: int, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(p.poll() is not None for p in self.procs):
                raise LeaklabError(f"a Flower process exited early; see the logs in {self.home}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise LeaklabError(f"the SuperLink did not open 127.0.0.1:{port} within {timeout:.0f} s")

    def run(self, app: str | Path, run_config: dict[str, Any], timeout: float = 600) -> subprocess.CompletedProcess:
        """``flwr run APP local-deploy --run-config ... --stream`` (blocks until the run ends or ``timeout``)."""
        pairs = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
        cmd = [_bin("flwr"), "run", str(app), CONNECTION, "--run-config", pairs, "--stream"]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, check=False)

    def descendants(self) -> list[psutil.Process]:
        """Every live process this deployment started, with what they started (SuperExec, app processes)."""
        out: list[psutil.Process] = []
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(p.pid)
                out += [root, *root.children(recursive=True)]
        return out

    def stop(self) -> None:
        """SIGTERM the SuperNodes, then the SuperLink (it stops its SuperExec), each process group; then SIGKILL
        whatever they started that is still alive after 10 s."""
        started = self.descendants()
        for p in reversed(self.procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        _, alive = psutil.wait_procs(started, timeout=5)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)

    def __enter__(self) -> Deployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
