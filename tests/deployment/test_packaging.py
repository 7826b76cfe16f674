"""What ``flwr run .`` ships: never deployment state or run outputs.

Fast: the FAB is built in memory with Flower's own builder (what ``flwr run``
calls), no process is started.
"""

import io
import os
import re
import subprocess
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_files
from flwr.cli.utils import collect_files

from bouquet.serverapps.run import run_directory
from bouquet.simulations.proctools import APP_DIR, DEPLOY_SCRIPTS
from tests.conftest import build_wheel

DEEP = "/".join(f"d{i}" for i in range(12))


def _shipped(extra: dict[str, bytes]) -> list[str]:
    files = {**collect_files(APP_DIR), **extra}
    fab, _ = build_fab_from_files(files)
    return zipfile.ZipFile(io.BytesIO(fab)).namelist()


def test_state_and_outputs_inside_the_app_are_not_shipped():
    # What the old default ./bouquet-deploy held after a few runs: every run's
    # app copy in the SuperLink's FLWR_HOME, deeper than Flower's limit of 10.
    state = "bouquet-deploy/superlink/home/apps/bouquet.flwr-bouquet.0.1.0.abc"
    extra = {
        f"{state}/serverapps/app.py": b"app = None\n",
        f"{state}/{DEEP}/x.json": b"{}",
        "bouquet-deploy/supernode-0/home/config.toml": b"",
        "bouquet-runs/2026-fedavg-digits-42/metrics.json": b"{}",
        "runs/2026-fedavg-digits-42/config.json": b"{}",
        ".flwr-home/config.toml": b"",
    }
    names = _shipped(extra)
    assert "serverapps/app.py" in names and "clientapps/app.py" in names
    leaked = [n for n in names if n.split("/")[0] in {p.split("/")[0] for p in extra}]
    assert leaked == []


def _script_default_state(env: dict[str, str]) -> Path:
    script = f'. "{DEPLOY_SCRIPTS / "common.sh"}"; default_state_dir'
    out = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, check=True
    )
    return Path(out.stdout.strip())


def test_the_scripts_keep_their_state_outside_the_app(tmp_path):
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    assert _script_default_state(base) == tmp_path / ".local/state/bouquet-deploy"
    xdg = {**base, "XDG_STATE_HOME": str(tmp_path / "xdg")}
    assert _script_default_state(xdg) == tmp_path / "xdg/bouquet-deploy"
    own = {**xdg, "BOUQUET_DEPLOY_STATE": str(tmp_path / "own")}
    assert _script_default_state(own) == tmp_path / "own"
    for script in DEPLOY_SCRIPTS.glob("*.sh"):
        assert "./bouquet-deploy" not in script.read_text(), script.name


def test_a_state_dir_inside_the_app_is_warned_about(tmp_path):
    script = f'. "{DEPLOY_SCRIPTS / "common.sh"}"; warn_if_inside_app "$1"'
    for directory, warned in ((APP_DIR / "tasks", True), (tmp_path, False)):
        out = subprocess.run(
            ["bash", "-c", script, "-", str(directory)], capture_output=True, text=True
        )
        assert ("is inside the Flower app" in out.stderr) == warned, directory


def test_run_outputs_default_outside_the_app(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(APP_DIR)  # relative output-dir is under home, not the cwd
    for output_dir in ("", "runs", "~/elsewhere"):
        path = run_directory({"output-dir": output_dir})
        assert path.is_relative_to(tmp_path), path
        assert not path.is_relative_to(APP_DIR), path


def test_the_wheel_ships_code_not_results(tmp_path):
    # A device installs the wheel (docs/deploy.md, "Install"): the measured
    # results (plots, tables under simulations/results) stay in the repository.
    # Every package is installed under one name, ``bouquet``, so none collides
    # with a user's own modules (architecture rule 10).
    wheel = build_wheel(APP_DIR, tmp_path)
    names = {n for n in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in n}
    code = {
        f"bouquet/{p.relative_to(APP_DIR).as_posix()}"
        for package in ("strategies", "clientapps", "serverapps", "simulations", "tasks")
        for p in (APP_DIR / package).rglob("*.py")
        if "results" not in p.parts
    }
    assert names == code


def test_code_imports_its_packages_only_under_the_bouquet_name():
    # Architecture rule 10: a bare `import tasks` would load a user's tasks.py.
    bare = re.compile(
        r"^\s*(?:from|import) (?:strategies|clientapps|serverapps|simulations|tasks)\b"
        r"(?!\.fab import name_this_copy_bouquet)",
        re.M,
    )
    user_app = APP_DIR / "tests" / "examples" / "quickstart_app"
    offenders = [
        f"{path.relative_to(APP_DIR)}: {match.group(0).strip()}"
        for path in [*APP_DIR.rglob("*.py"), *APP_DIR.rglob("*.md")]
        if ".venv" not in path.parts and not path.is_relative_to(user_app)
        for match in bare.finditer(path.read_text())
    ]
    assert not offenders, offenders
