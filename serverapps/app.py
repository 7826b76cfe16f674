"""The Bouquet ServerApp: one app for every algorithm (see ``serverapps.run``)."""

from logging import ERROR

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

if __package__ == "serverapps":
    # Flower imported this entry from the app's folder (``flwr run .``): every
    # ``bouquet.*`` import below must load this same copy (bouquet.tasks.fab).
    from tasks.fab import name_this_copy_bouquet

    name_this_copy_bouquet()

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the algorithm that ``run_config["algorithm"]`` names."""
    from flwr.supercore import log

    from bouquet.serverapps.run import run_server
    from bouquet.serverapps.settings import RunConfigError

    # What the user set with --run-config (the rest are pyproject defaults):
    # a resumed run checks these against its saved config (serverapps.resume).
    overrides = dict(grid.run.override_config)
    try:
        run_server(grid, context.run_config, overrides=overrides)
    except RunConfigError as err:
        log(ERROR, "Invalid run config: %s", err)
        raise
