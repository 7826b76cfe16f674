"""Run the quickstart-shaped app in-process, as Flower would load it.

    python run_quickstart.py APP_DIR ALGORITHM CLIENT_MODULE [--no-query] [--rounds N]

The app's folder goes first on ``sys.path`` (Flower does the same), so its own
``tasks.py`` and ``strategies/`` shadow any top-level module of that name.
Prints one JSON line: the final metrics and which files the names resolved to.
"""

import json
import sys
import tomllib
from importlib import import_module
from pathlib import Path

from flwr.app import Context, RecordDict

app_dir, algorithm, client_module = sys.argv[1:4]
no_query = "--no-query" in sys.argv[4:]
num_nodes = 4
sys.path.insert(0, app_dir)
pyproject = tomllib.loads((Path(app_dir) / "pyproject.toml").read_text())
config = {**pyproject["tool"]["flwr"]["app"]["config"], "algorithm": algorithm}
if "--rounds" in sys.argv:
    config["num-server-rounds"] = int(sys.argv[sys.argv.index("--rounds") + 1])

server = import_module("quickstart.server_app")
client = import_module(f"quickstart.{client_module}")

from bouquet.simulations.inprocess import InProcessGrid  # noqa: E402

client_app = client.app
if no_query:  # the same handlers, without the query one
    from flwr.clientapp import ClientApp

    client_app = ClientApp()
    client_app.train()(client.train_handler)
    client_app.evaluate()(client.evaluate_handler)
grid = InProcessGrid(client_app, num_nodes, config)
context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
server.app(grid, context)
result = server.RESULT
last = max(result.evaluate_metrics_clientapp)
print(
    json.dumps(
        {
            "rounds": last,
            "accuracy": result.evaluate_metrics_clientapp[last].get("eval-accuracy"),
            "user_tasks": sys.modules["tasks"].__file__,
            "user_strategies": sys.modules["strategies"].__file__,
        }
    )
)
