"""Building blocks for driving Flower processes on loopback.

Free ports, the private environment, the ``flwr`` CLI's connection file, TOML
values for ``--run-config``, health checks (HTTP or HTTPS), TLS material and
SuperNode keys from the deployment scripts, Linux ``/proc`` inspection and
signals, and reading a run's results. :mod:`simulations.processes` builds the
process manager on these.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

APP_DIR = Path(__file__).resolve().parent.parent
"""The Bouquet app directory (the one holding ``pyproject.toml``)."""

DEPLOY_SCRIPTS = Path(__file__).resolve().parent / "deploy"
"""The deployment scripts (certificates, node keys, start/stop)."""

ADMIN_GUARD = Path(__file__).resolve().parent / "admin_guard.py"
"""``flower-superlink`` answering admin requests from loopback only."""

HOST = "127.0.0.1"
TAG_VARIABLE = "BOUQUET_PROCESS_TAG"
"""Environment variable that marks every process started by one instance."""

STATUS_COMPLETED = "finished:completed"
STATUS_FAILED = "finished:failed"
STATUS_STOPPED = "finished:stopped"

PRIVATE_ENV: dict[str, str] = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_OFFLINE": "1",
    "RAY_ADDRESS": "local",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "PYTHONUNBUFFERED": "1",
}
"""Environment every started process gets (on top of the caller's)."""

RUN_ID_PATTERN = re.compile(r"Successfully started run (\d+)")


# ----------------------------------------------------------------------------
# Small building blocks
# ----------------------------------------------------------------------------


def free_ports(count: int = 1) -> list[int]:
    """Return ``count`` distinct TCP ports that are free on 127.0.0.1 right now.

    Parameters
    ----------
    count : int
        How many ports.

    Returns
    -------
    list[int]
        Distinct ports; all sockets are held open until every port is chosen.

    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """Return one TCP port that is free on 127.0.0.1 right now."""
    return free_ports(1)[0]


def venv_bin() -> Path:
    """Return the directory of this interpreter's scripts (``flwr``, ...)."""
    return Path(sys.executable).parent


def flower_env(
    flwr_home: str | Path,
    *,
    cache_dir: str | Path | None = None,
    base: Mapping[str, str] | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment for a Flower process with a private ``FLWR_HOME``.

    Parameters
    ----------
    flwr_home : str or Path
        ``FLWR_HOME`` of the process.
    cache_dir : str or Path, optional
        ``BOUQUET_CACHE_DIR`` (kept from ``base`` if not given).
    base : Mapping[str, str], optional
        Starting environment; ``os.environ`` by default.
    extra : Mapping[str, str], optional
        Last-word overrides.

    Returns
    -------
    dict[str, str]
        ``base`` plus :data:`PRIVATE_ENV`, ``FLWR_HOME`` and the venv's ``bin``
        first on ``PATH``.

    """
    env = dict(os.environ if base is None else base)
    env.update(PRIVATE_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    if cache_dir is not None:
        env["BOUQUET_CACHE_DIR"] = str(cache_dir)
    path = env.get("PATH", "")
    env["PATH"] = os.pathsep.join(p for p in (str(venv_bin()), path) if p)
    env.update(extra or {})
    return env


def write_connections(
    flwr_home: str | Path,
    connections: Mapping[str, str | tuple[str, str]],
    default: str | None = None,
) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with SuperLink connections.

    A connection is ``host:port`` (insecure) or ``(host:port, ca_file)`` (TLS,
    the server certificate checked against ``ca_file``).

    Parameters
    ----------
    flwr_home : str or Path
        The ``FLWR_HOME`` the ``flwr`` CLI will use.
    connections : Mapping[str, str | tuple[str, str]]
        Connection name -> ``host:port`` or ``(host:port, ca_file)``.
    default : str, optional
        The default connection (the first one if not given).

    Returns
    -------
    Path
        The written file (existing content is replaced).

    """
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    names = list(connections)
    if not names:
        raise ValueError("At least one connection is needed.")
    lines = ["[superlink]", f'default = "{default or names[0]}"', ""]
    for name, target in connections.items():
        address, ca_file = (target, None) if isinstance(target, str) else target
        lines += [f"[superlink.{name}]", f'address = "{address}"']
        if ca_file is None:
            lines += ["insecure = true", ""]
        else:
            lines += [f'root-certificates = "{ca_file}"', ""]
    target = home / "config.toml"
    target.write_text("\n".join(lines))
    return target


def toml_value(value: Any) -> str:
    """Format a scalar as a TOML value for ``--run-config`` and friends.

    Raises
    ------
    TypeError
        For values TOML overrides cannot carry (``None``, containers).
    ValueError
        For a string holding both quote characters.

    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, (str, Path)):
        text = str(value)
        if "'" not in text:
            return f"'{text}'"
        if '"' not in text and "\\" not in text:
            return f'"{text}"'
        raise ValueError(f"Cannot pass {text!r} as a Flower config override.")
    raise TypeError(f"Unsupported config override value {value!r}.")


def toml_overrides(values: Mapping[str, Any]) -> str:
    """Format ``{"lr": 0.1, "algorithm": "x"}`` as ``"lr=0.1 algorithm='x'"``."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in values.items())


def wait_for_health(
    port: int,
    timeout: float = 60.0,
    process: subprocess.Popen | None = None,
    ca_file: str | Path | None = None,
) -> float:
    """Wait until ``http(s)://127.0.0.1:<port>/health`` answers with success.

    Parameters
    ----------
    port : int
        The SuperLink's HTTP port.
    timeout : float
        Seconds before giving up.
    process : subprocess.Popen, optional
        The server; its early exit fails the wait at once.
    ca_file : str or Path, optional
        Use HTTPS and check the server's certificate against this CA.

    Returns
    -------
    float
        Seconds waited.

    Raises
    ------
    TimeoutError
        Not healthy in time.
    RuntimeError
        ``process`` exited first.

    """
    start = time.monotonic()
    scheme = "http" if ca_file is None else "https"
    url = f"{scheme}://{HOST}:{port}/health"
    context = None if ca_file is None else ssl.create_default_context(cafile=ca_file)
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"Process exited with {process.returncode} before {url}")
        try:
            with urllib.request.urlopen(url, timeout=1.0, context=context) as response:
                if 200 <= response.status < 300:
                    return time.monotonic() - start
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{url} not healthy after {timeout:.0f}s")
        time.sleep(0.2)


# ----------------------------------------------------------------------------
# Process tree inspection (Linux /proc; elsewhere only process groups are used)
# ----------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, session id) of ``pid`` or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[3])


def all_pids() -> list[int]:
    """Every PID in ``/proc`` (empty where there is no ``/proc``)."""
    try:
        return [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []


def descendants(pids: Iterable[int]) -> set[int]:
    """All live descendants of ``pids`` (not including them)."""
    children: dict[int, list[int]] = {}
    for pid in all_pids():
        stat = proc_stat(pid)
        if stat is not None:
            children.setdefault(stat[1], []).append(pid)
    found: set[int] = set()
    todo = list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def tagged_pids(tag: str) -> set[int]:
    """Live, non-zombie processes whose environment holds ``TAG_VARIABLE=tag``."""
    needle = f"{TAG_VARIABLE}={tag}".encode()
    found = set()
    for pid in all_pids():
        if pid == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        stat = proc_stat(pid)
        if needle in environ.split(b"\0") and stat is not None and stat[0] != "Z":
            found.add(pid)
    return found


def is_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not count)."""
    stat = proc_stat(pid)
    if stat is not None:
        return stat[0] != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not Path("/proc").is_dir()


def signal_pid(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to ``pid``; a process that is gone is ignored."""
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to process group ``pgid``; a group that is gone is ignored."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Poll:
    """Call ``sample()`` every ``interval`` seconds in a thread, within ``with``.

    For watching processes while a run goes on (memory, which node ran what).
    """

    def __init__(self, sample: Callable[[], None], interval: float = 0.2) -> None:
        self.sample, self.interval = sample, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Poll:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


@dataclass(frozen=True)
class TlsFiles:
    """A CA and the SuperLink certificate it signed (``generate-certs.sh``)."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def generate(cls, directory: str | Path, hosts: Iterable[str] = ()) -> TlsFiles:
        """Run ``simulations/deploy/generate-certs.sh DIRECTORY HOSTS...``.

        The certificate names ``hosts`` plus localhost, 127.0.0.1 and ::1.
        """
        directory = Path(directory)
        script = DEPLOY_SCRIPTS / "generate-certs.sh"
        subprocess.run(
            ["bash", str(script), str(directory), *hosts],
            check=True,
            capture_output=True,
        )
        return cls(
            directory / "ca.crt", directory / "server.pem", directory / "server.key"
        )


def generate_node_keys(directory: str | Path, count: int) -> list[Path]:
    """SuperNode auth key pairs (``generate-node-keys.sh``); the private keys."""
    directory = Path(directory)
    script = DEPLOY_SCRIPTS / "generate-node-keys.sh"
    subprocess.run(
        ["bash", str(script), str(directory), str(count)],
        check=True,
        capture_output=True,
    )
    return [directory / f"node-{i}" for i in range(count)]


def non_loopback_address() -> str | None:
    """This machine's IPv4 address on its default route, or None if it has none.

    Connecting a UDP socket sends nothing; it only picks the source address.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.connect(("10.255.255.255", 1))
        address = sock.getsockname()[0]
    except OSError:
        return None
    finally:
        sock.close()
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def read_run_metrics(output_dir: str | Path) -> tuple[list[dict[str, Any]], Path]:
    """Read the rows of the one Bouquet run directory under ``output_dir``.

    Parameters
    ----------
    output_dir : str or Path
        The ``output-dir`` a single run was started with.

    Returns
    -------
    tuple[list[dict[str, Any]], Path]
        The ``metrics.json`` rows (round 0 first) and the run directory.

    Raises
    ------
    FileNotFoundError
        Not exactly one run directory with a ``metrics.json``.

    """
    runs = sorted(p.parent for p in Path(output_dir).glob("*/metrics.json"))
    if len(runs) != 1:
        raise FileNotFoundError(f"Expected one run directory in {output_dir}: {runs}")
    return json.loads((runs[0] / "metrics.json").read_text())["rounds"], runs[0]
