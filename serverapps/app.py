"""The Bouquet ServerApp: one app for every algorithm (see ``serverapps.run``)."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the algorithm that ``run_config["algorithm"]`` names."""
    from serverapps.run import run_server

    # What the user set with --run-config (the rest are pyproject defaults):
    # a resumed run checks these against its saved config (serverapps.resume).
    overrides = dict(grid.run.override_config)
    run_server(grid, context.run_config, overrides=overrides)
