"""Start, drive and stop real Flower processes on loopback.

Used by the deployment tests and usable from scripts and benchmarks. Everything
binds to 127.0.0.1 (a deployment SuperLink can bind another ``host``, behind
the admin guard as ``start-superlink.sh`` runs it, see
``simulations/admin_guard.py``) and runs in a private environment: its own ``FLWR_HOME``
per process, a neutral working directory (the SuperLink's cwd ends up first in
the Ray workers' ``sys.path``), runtime dependency installation off, telemetry
and the update check off, Hugging Face offline and a private Ray.

Typical use::

    with FlowerProcesses() as procs:
        link = procs.start_simulation_superlink()
        run = procs.submit_run(APP_DIR, link.connection,
                               run_config={"num-server-rounds": 2},
                               federation_config={"num-supernodes": 4})
        assert procs.wait_for_run(run.run_id, link.connection) == STATUS_COMPLETED

Leaving the ``with`` block stops every started process and its whole tree
(process group, descendants, and anything carrying this instance's tag in its
environment), even when the block raised. Each process logs to a file under
:attr:`FlowerProcesses.workdir`; :meth:`FlowerProcesses.logs` collects their
tails for a failure message.
"""

from __future__ import annotations

import atexit
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from bouquet.simulations.proctools import (
    ADMIN_GUARD,
    APP_DIR,
    HOST,
    RUN_ID_PATTERN,
    STATUS_COMPLETED,
    TAG_VARIABLE,
    TlsFiles,
    descendants,
    flower_env,
    free_port,
    free_ports,
    is_alive,
    proc_stat,
    signal_group,
    signal_pid,
    tagged_pids,
    toml_overrides,
    wait_for_health,
    write_connections,
)

# ----------------------------------------------------------------------------
# Managed processes
# ----------------------------------------------------------------------------


@dataclass
class ManagedProcess:
    """One started process: its ``Popen``, name and log file."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    argv: list[str]

    @property
    def pid(self) -> int:
        """Process id (also its process group id: it leads a new session)."""
        return self.popen.pid

    def running(self) -> bool:
        """Whether the process has not exited yet."""
        return self.popen.poll() is None

    def log_tail(self, max_chars: int = 6000) -> str:
        """Return the last ``max_chars`` characters of the process's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-max_chars:]


@dataclass
class SuperLink:
    """A started SuperLink and the ``flwr`` connection that reaches it."""

    process: ManagedProcess
    port: int
    connection: str
    flwr_home: Path
    tls: TlsFiles | None = None
    node_auth: bool = False
    host: str = HOST
    """The address it binds (it is always reachable on loopback too)."""

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>`` (Fleet, Control and Runtime API, one port)."""
        return f"{HOST}:{self.port}"


@dataclass
class SubmittedRun:
    """A run submitted with ``flwr run``."""

    run_id: int
    connection: str
    output: str = ""
    submit_seconds: float = 0.0
    status: str = ""
    """The final status of a streamed run (empty when not streamed)."""


class RunFailedError(RuntimeError):
    """A streamed run did not end ``finished:completed``."""

    def __init__(self, run: SubmittedRun) -> None:
        super().__init__(
            f"Run {run.run_id} ended {run.status} (flwr run --stream exits 0 "
            f"whatever the run's status). The end of its output:\n"
            f"{run.output[-4000:]}"
        )
        self.run = run


@dataclass
class Deployment:
    """A deployment SuperLink plus its SuperNodes."""

    superlink: SuperLink
    supernodes: list[ManagedProcess] = field(default_factory=list)


class FlowerProcesses:
    """Starts Flower processes and guarantees they are all stopped.

    Parameters
    ----------
    workdir : str or Path, optional
        Where logs, ``FLWR_HOME`` folders, neutral cwds and the cache go; a new
        temporary directory (removed on exit unless ``keep``) if not given.
    keep : bool
        Keep a self-made ``workdir`` on exit.
    grace : float
        Seconds between SIGTERM and SIGKILL when stopping.
    env : Mapping[str, str], optional
        Extra environment for every started process.

    """

    def __init__(
        self,
        workdir: str | Path | None = None,
        *,
        keep: bool = False,
        grace: float = 10.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="bouquet-procs-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.grace = grace
        self.tag = uuid.uuid4().hex
        self.extra_env = dict(env or {})
        self.processes: list[ManagedProcess] = []
        self.cli_home = self.workdir / "cli-home"
        self.cache_dir = self.workdir / "cache"
        self._connections: dict[str, str | tuple[str, str]] = {}
        self._atexit = False

    # -- context manager ----------------------------------------------------

    def __enter__(self) -> FlowerProcesses:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop_all()
        finally:
            if self._own_workdir and not self.keep and exc_type is None:
                shutil.rmtree(self.workdir, ignore_errors=True)

    # -- environment --------------------------------------------------------

    def env(self, flwr_home: str | Path | None = None) -> dict[str, str]:
        """Return the environment of a started process (tagged, private)."""
        return flower_env(
            flwr_home or self.cli_home,
            cache_dir=self.cache_dir,
            extra={**self.extra_env, TAG_VARIABLE: self.tag},
        )

    def neutral_dir(self, name: str) -> Path:
        """Return an empty directory to use as a cwd (nothing can shadow the app)."""
        path = self.workdir / "cwd" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def add_connection(
        self, name: str, address: str, ca_file: str | Path | None = None
    ) -> None:
        """Register a connection in the CLI's ``$FLWR_HOME/config.toml``."""
        self._connections[name] = (
            address if ca_file is None else (address, str(ca_file))
        )
        write_connections(self.cli_home, self._connections)

    # -- starting -----------------------------------------------------------

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        flwr_home: str | Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> ManagedProcess:
        """Start ``argv`` in a new session, logging to ``<workdir>/logs/<name>.log``.

        Parameters
        ----------
        name : str
            Unique name (used for the log file and cwd).
        argv : Sequence[str]
            Command; a bare program name is looked up in the venv first.
        flwr_home : str or Path, optional
            The process's ``FLWR_HOME`` (``<workdir>/homes/<name>`` by default).
        env : Mapping[str, str], optional
            Extra environment.

        Returns
        -------
        ManagedProcess
            The running process.

        """
        if any(p.name == name for p in self.processes):
            raise ValueError(f"A process named {name!r} was already started.")
        home = Path(flwr_home or self.workdir / "homes" / name)
        home.mkdir(parents=True, exist_ok=True)
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        log_path = logs / f"{name}.log"
        full_env = {**self.env(home), **(env or {})}
        command = list(argv)
        command[0] = shutil.which(command[0], path=full_env["PATH"]) or command[0]
        with open(log_path, "ab") as log_file:
            popen = subprocess.Popen(
                command,
                cwd=self.neutral_dir(name),
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = ManagedProcess(name, popen, log_path, command)
        self.processes.append(process)
        if not self._atexit:  # last resort if the caller never stops us
            atexit.register(self.stop_all)
            self._atexit = True
        return process

    def start_simulation_superlink(
        self,
        connection: str = "sim",
        *,
        port: int | None = None,
        timeout: float = 90.0,
    ) -> SuperLink:
        """Start ``flower-superlink --simulation`` as the ``:local:`` one would be.

        Same flags as the SuperLink ``flwr`` auto-starts for ``:local:`` (and
        ``--disable-runtime-dependency-installation``), on a free port, with a
        private ``FLWR_HOME`` and database, from a neutral cwd. Waits for
        ``/health`` and registers ``connection`` for the ``flwr`` CLI.
        """
        return self._start_superlink(connection, port, timeout, simulation=True)

    def start_deployment(
        self,
        num_supernodes: int,
        connection: str = "deploy",
        *,
        node_config: Mapping[str, Any] | None = None,
        timeout: float = 90.0,
        tls: TlsFiles | None = None,
        node_keys: Sequence[Path] | None = None,
        host: str = HOST,
        admin_guard: bool = True,
    ) -> Deployment:
        """Start a deployment SuperLink and ``num_supernodes`` SuperNodes.

        SuperNode ``i`` gets ``--node-config "partition-id=i num-partitions=N"``
        (plus ``node_config``), its own ``FLWR_HOME`` and its own ``--port``.
        With ``tls`` everything runs over HTTPS (the SuperNodes and the CLI
        check the SuperLink's certificate against the CA). With ``node_keys``
        (private keys, the ``.pub`` next to each) the SuperLink requires
        SuperNode authentication, every public key is registered with
        ``flwr supernode register`` and SuperNode ``i`` signs in with key ``i``.
        The SuperLink binds ``host`` and, with ``admin_guard`` (as
        ``start-superlink.sh`` runs it), answers Control and Runtime requests
        from loopback only (``simulations/admin_guard.py``); everything here
        reaches it on loopback. Returns once the SuperLink is healthy; the
        SuperNodes connect on their own (the ServerApp waits for
        ``min-available-nodes``).
        """
        if node_keys is not None and len(node_keys) < num_supernodes:
            raise ValueError(f"Need {num_supernodes} node keys, got {len(node_keys)}.")
        link = self._start_superlink(
            connection,
            None,
            timeout,
            simulation=False,
            tls=tls,
            node_auth=node_keys is not None,
            host=host,
            admin_guard=admin_guard,
        )
        deployment = Deployment(link)
        for key in node_keys or ():
            self.register_supernode(link, key)
        for i, port in enumerate(free_ports(num_supernodes)):
            config = {"partition-id": i, "num-partitions": num_supernodes}
            config.update(node_config or {})
            deployment.supernodes.append(
                self.start_supernode(
                    link,
                    f"supernode-{i}",
                    config,
                    private_key=None if node_keys is None else node_keys[i],
                    port=port,
                )
            )
        return deployment

    def register_supernode(self, link: SuperLink, private_key: Path) -> None:
        """``flwr supernode register <key>.pub`` on ``link`` (node auth)."""
        public = Path(f"{private_key}.pub")
        self.flwr("supernode", "register", str(public), link.connection)

    def start_supernode(
        self,
        link: SuperLink,
        name: str,
        node_config: Mapping[str, Any],
        *,
        private_key: Path | None = None,
        max_retries: int | None = None,
        port: int | None = None,
        address: str | None = None,
    ) -> ManagedProcess:
        """Start one ``flower-supernode`` connected to ``link`` (a free port).

        ``address``: how it reaches the SuperLink (default ``link.address``).
        """
        argv = ["flower-supernode", "--superlink", address or link.address]
        if link.tls is None:
            argv.append("--insecure")
        else:
            argv += ["--root-certificates", str(link.tls.ca)]
        if private_key is not None:
            argv += ["--auth-supernode-private-key", str(private_key)]
        if max_retries is not None:
            argv += ["--max-retries", str(max_retries)]
        argv += ["--host", HOST, "--port", str(port or free_port())]
        argv += ["--node-config", toml_overrides(node_config)]
        return self.start(name, argv)

    def _start_superlink(
        self,
        connection: str,
        port: int | None,
        timeout: float,
        *,
        simulation: bool,
        tls: TlsFiles | None = None,
        node_auth: bool = False,
        host: str = HOST,
        admin_guard: bool = False,
    ) -> SuperLink:
        port = port or free_port()
        name = f"superlink-{connection}"
        home = self.workdir / "homes" / name
        argv = ["flower-superlink"]
        if admin_guard:
            argv = [sys.executable, "-P", str(ADMIN_GUARD)]
        if tls is None:
            argv.append("--insecure")
        else:
            argv += ["--ssl-ca-certfile", str(tls.ca)]
            argv += ["--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
        if node_auth:
            argv.append("--enable-supernode-auth")
        if simulation:
            argv += ["--simulation", "--isolation", "subprocess"]
        argv += [
            "--host",
            host,
            "--port",
            str(port),
            "--database",
            str(home / "state.db"),
            "--disable-runtime-dependency-installation",
        ]
        process = self.start(name, argv, flwr_home=home)
        ca_file = None if tls is None else tls.ca
        try:
            wait_for_health(port, timeout, process.popen, ca_file=ca_file)
        except (TimeoutError, RuntimeError) as err:
            raise RuntimeError(f"{err}\n{self.logs()}") from err
        self.add_connection(connection, f"{HOST}:{port}", ca_file)
        return SuperLink(process, port, connection, home, tls, node_auth, host)

    # -- the flwr CLI -------------------------------------------------------

    def flwr(
        self, *args: str, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI with this instance's ``FLWR_HOME`` and environment.

        Raises
        ------
        subprocess.CalledProcessError
            Non-zero exit and ``check``.
        subprocess.TimeoutExpired
            Still running after ``timeout`` (it is killed).

        """
        env = self.env()
        command = [shutil.which("flwr", path=env["PATH"]) or "flwr", *args]
        with subprocess.Popen(
            command,
            cwd=self.neutral_dir("flwr-cli"),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        ) as popen:
            try:
                output, _ = popen.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                signal_group(popen.pid, signal.SIGKILL)
                output, _ = popen.communicate()
                raise subprocess.TimeoutExpired(command, timeout, output) from None
        result = subprocess.CompletedProcess(command, popen.returncode, output, None)
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(
                result.returncode, command, output=output
            )
        return result

    def submit_run(
        self,
        connection: str,
        app_dir: str | Path = APP_DIR,
        *,
        run_config: Mapping[str, Any] | None = None,
        federation_config: Mapping[str, Any] | None = None,
        stream: bool = True,
        timeout: float = 600.0,
        check: bool = True,
    ) -> SubmittedRun:
        """``flwr run <app_dir> <connection>``; return the run id and output.

        With ``stream`` (the default) this returns when the run has ended,
        ``output`` holds its log and ``status`` its final status. ``flwr run
        --stream`` exits 0 even when the ServerApp fails: with ``check`` (the
        default) a streamed run that did not complete raises
        :class:`RunFailedError` with the end of its output.

        Raises
        ------
        RuntimeError
            The submission failed (no run id in the output).
        RunFailedError
            ``stream`` and ``check``, and the run did not complete.

        """
        args = ["run", str(Path(app_dir).resolve()), connection]
        if stream:
            args.append("--stream")
        if run_config:
            args += ["--run-config", toml_overrides(run_config)]
        if federation_config:
            args += ["--federation-config", toml_overrides(federation_config)]
        start = time.monotonic()
        try:
            result = self.flwr(*args, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as err:
            match = RUN_ID_PATTERN.search(str(err.output or ""))
            if match:
                self.flwr("stop", match.group(1), connection, check=False)
            raise
        match = RUN_ID_PATTERN.search(result.stdout)
        if match is None:
            raise RuntimeError(
                f"flwr run failed (exit {result.returncode}):\n{result.stdout}"
            )
        run = SubmittedRun(
            int(match.group(1)), connection, result.stdout, time.monotonic() - start
        )
        if stream:
            # The status can lag the end of the log stream by a moment.
            run.status = self.wait_for_run(run.run_id, connection, timeout=120)
            if check and run.status != STATUS_COMPLETED:
                raise RunFailedError(run)
        return run

    def run_info(self, run_id: int, connection: str) -> dict[str, Any]:
        """Return the run's row of ``flwr ls --run-id ID <conn> --format json``."""
        result = self.flwr(
            "ls", "--run-id", str(run_id), connection, "--format", "json", check=False
        )
        text = result.stdout
        try:
            payload = json.loads(text[text.index("{") :])
        except ValueError as err:
            raise RuntimeError(f"Unexpected `flwr ls` output:\n{text}") from err
        runs = payload.get("runs") or []
        if not payload.get("success") or not runs:
            raise RuntimeError(f"`flwr ls` found no run {run_id}:\n{text}")
        return runs[0]

    def supernodes(self, connection: str) -> list[dict[str, Any]]:
        """The SuperNodes ``flwr supernode ls <connection> --format json`` lists."""
        text = self.flwr("supernode", "ls", connection, "--format", "json").stdout
        return list(json.loads(text[text.index("{") :])["nodes"])

    def run_status(self, run_id: int, connection: str) -> str:
        """Return the run's status, e.g. ``running`` or ``finished:completed``."""
        return str(self.run_info(run_id, connection)["status"])

    def wait_for_run(
        self,
        run_id: int,
        connection: str,
        timeout: float = 600.0,
        poll: float = 1.0,
    ) -> str:
        """Wait until the run's status starts with ``finished``; return it.

        Raises
        ------
        TimeoutError
            Not finished in time (the run is stopped with ``flwr stop``).

        """
        deadline = time.monotonic() + timeout
        while True:
            status = self.run_status(run_id, connection)
            if status.startswith("finished"):
                return status
            if time.monotonic() > deadline:
                self.flwr("stop", str(run_id), connection, check=False)
                raise TimeoutError(f"Run {run_id} still {status} after {timeout}s")
            time.sleep(poll)

    def run_log(self, run_id: int, connection: str) -> str:
        """Return the run's whole log (``flwr log <run-id> <connection> --show``)."""
        return self.flwr("log", str(run_id), connection, "--show", check=False).stdout

    # -- stopping and reporting ---------------------------------------------

    def stop_all(self) -> None:
        """Stop every started process, its process group and its descendants.

        SIGTERM to all groups at once, up to :attr:`grace` seconds for them to
        exit, then SIGKILL to whatever is left: the groups, the descendants
        seen before, and every process carrying this instance's tag.
        """
        leaders = [p for p in self.processes if p.running()]
        tree = descendants(p.pid for p in leaders) | tagged_pids(self.tag)
        for process in leaders:
            signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and (
            any(p.running() for p in leaders) or any(is_alive(pid) for pid in tree)
        ):
            time.sleep(0.1)
        for _ in range(50):
            leftovers = {pid for pid in tree if is_alive(pid)} | tagged_pids(self.tag)
            leftovers |= {p.pid for p in self.processes if p.running()}
            if not leftovers:
                break
            for process in self.processes:
                signal_group(process.pid, signal.SIGKILL)
            for pid in leftovers:
                signal_pid(pid, signal.SIGKILL)
            time.sleep(0.1)
        for process in self.processes:
            try:
                process.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        # Orphaned children linger as zombies until init reaps them: wait a bit.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(proc_stat(pid) for pid in tree):
            time.sleep(0.1)
        atexit.unregister(self.stop_all)
        self._atexit = False

    def pids_of(self, program: str) -> list[int]:
        """Live processes of this instance whose command line contains ``program``.

        E.g. ``"flwr-serverapp"`` (the ServerApp of a deployment run) or
        ``"flwr-clientapp"``: processes Flower itself spawned, found through
        this instance's tag.
        """
        found = []
        for pid in sorted(tagged_pids(self.tag)):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(program.encode() in arg for arg in argv):
                found.append(pid)
        return found

    def leftover_pids(self) -> set[int]:
        """Return this instance's live processes (none after :meth:`stop_all`)."""
        return tagged_pids(self.tag) | {p.pid for p in self.processes if p.running()}

    def logs(self, max_chars: int = 6000) -> str:
        """Return the tail of every process's log, for a failure message."""
        parts = []
        for process in self.processes:
            state = "running" if process.running() else f"exit {process.popen.poll()}"
            parts.append(
                f"----- {process.name} (pid {process.pid}, {state}) "
                f"{process.log_path} -----\n{process.log_tail(max_chars)}"
            )
        return "\n".join(parts)
