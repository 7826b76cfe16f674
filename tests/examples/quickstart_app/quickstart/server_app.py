"""The quickstart's ServerApp with a Bouquet strategy (a two-line change)."""

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from strategies import make_strategy
from tasks import Net

app = ServerApp()
RESULT = None


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the strategy the run config names."""
    config = context.run_config
    strategy = make_strategy(str(config["algorithm"]), float(config["fraction-evaluate"]))
    torch.manual_seed(0)  # a fixed initial model: the tests' numbers replay
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(Net().state_dict()),
        train_config=ConfigRecord({"lr": float(config["learning-rate"])}),
        num_rounds=int(config["num-server-rounds"]),
    )
    global RESULT
    RESULT = result
