"""The mix-in path: a non-editable install, used from another directory."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import build_wheel

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_installed_package_drives_a_user_clientapp(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    wheel = build_wheel(ROOT, wheels)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
    )
    script = tmp_path / "elsewhere" / "my_app.py"
    script.parent.mkdir()
    script.write_text((ROOT / "tests" / "examples" / "mixin_script.py").read_text())
    # The user's own modules named like Bouquet's folders (architecture rule 10).
    (script.parent / "tasks.py").write_text("raise ImportError('the user tasks.py')\n")
    (script.parent / "strategies").mkdir()
    (script.parent / "strategies" / "__init__.py").write_text(
        "raise ImportError('the user strategies')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", "import bouquet.strategies as s; print(s.__file__)"],
        cwd=script.parent,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.startswith(str(site))  # the installed copy, not the checkout
    run = subprocess.run(
        [sys.executable, str(script)],
        cwd=script.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    accuracy = float(run.stdout.split("accuracy")[-1])
    assert accuracy > 0.8
