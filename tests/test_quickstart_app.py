"""Acceptance of the mix-in path: Flower's quickstart-pytorch shape, made offline.

``tests/examples/quickstart_app`` is a Flower app as a user writes it: its own
``tasks.py`` (model, DataLoaders of ``{"img", "label"}`` batches over a
Hugging Face dataset, its own loop) and its own ``strategies`` package, whose
names are Bouquet's folder names on purpose. Its ServerApp starts a Bouquet
strategy with Flower's ``start`` signature; ``bouquet_client_app`` is the
documented client change, ``client_app`` the quickstart's unchanged one.
Each run here loads the app as Flower does (its folder first on
``sys.path``), in a fresh process, on the in-process grid;
``tests/deployment/test_quickstart_flwr_run.py`` runs it with ``flwr run``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent / "examples"
APP = EXAMPLES / "quickstart_app"


def run_app(algorithm: str, client: str, *extra: str, timeout: float = 240):
    """Run the app once; (exit code, its JSON summary or None, all output)."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "run_quickstart.py"), str(APP), algorithm,
         client, *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"},
        cwd=APP.parent,
    )
    output = done.stdout + done.stderr
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    return done.returncode, (json.loads(lines[-1]) if lines else None), output


@pytest.mark.parametrize("algorithm", ["fedld", "scaffold", "fedbuff", "fedadam"])
def test_a_bouquet_strategy_learns_in_the_quickstart_with_the_client_change(algorithm):
    code, summary, output = run_app(algorithm, "bouquet_client_app", "--rounds", "6")
    assert code == 0, output[-3000:]
    # The user's modules are the user's; Bouquet's are all under `bouquet`.
    assert summary["user_tasks"] == str(APP / "tasks.py")
    assert summary["user_strategies"] == str(APP / "strategies" / "__init__.py")
    assert summary["rounds"] == 6
    assert summary["accuracy"] > 0.3, summary  # 10 classes: chance is 0.1
    # Progress is visible as with Flower's own strategies.
    assert "Final results" in output and "Aggregated MetricRecord" in output


@pytest.mark.parametrize("algorithm", ["fedld", "scaffold", "fedbuff"])
def test_without_the_client_change_a_strategy_with_a_client_half_fails_loudly(
    algorithm,
):
    code, summary, output = run_app(algorithm, "client_app")
    assert code != 0 and summary is None
    assert "RoutineMissingError" in output
    assert "bouquet.clientapps.train_client" in output  # how to fix it


def test_fedadam_needs_no_client_change():
    code, summary, output = run_app("fedadam", "client_app")
    assert code == 0, output[-3000:]
    assert summary["rounds"] == 3


def test_fedbuff_without_a_query_handler_still_trains_full_tasks():
    code, summary, output = run_app(
        "fedbuff", "bouquet_client_app", "--no-query", "--rounds", "6"
    )
    assert code == 0, output[-3000:]
    assert "describe_client" in output  # the warning names the missing handler
    assert summary["accuracy"] > 0.3, summary
