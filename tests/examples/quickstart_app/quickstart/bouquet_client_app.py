"""The quickstart's ClientApp with the client change Bouquet documents.

Each handler hands the user's model and DataLoader to Bouquet's client
routine, which runs whatever the server's algorithm asks (FedLD's margin
loss, SCAFFOLD's control variates, FedBuff's deltas, ...). The query handler
lets asynchronous strategies size each node's task by its data.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from bouquet.clientapps import describe_client, evaluate_client, train_client
from tasks import Net, load_data

app = ClientApp()

# The quickstart's own loop uses SGD momentum 0.9: say so, where neither the
# server's message nor the run config sets it.
MY_DEFAULTS = {"momentum": 0.9}


def _loaders(context: Context):
    return load_data(
        context.node_config["partition-id"],
        context.node_config["num-partitions"],
        context.run_config["batch-size"],
    )


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Train as the server's algorithm asks."""
    trainloader, _ = _loaders(context)
    return train_client(msg, context, Net(), trainloader, defaults=MY_DEFAULTS)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the node's validation split."""
    _, valloader = _loaders(context)
    return evaluate_client(msg, context, Net(), valloader)


@app.query()
def query_handler(msg: Message, context: Context) -> Message:
    """Describe the node's data (asynchronous strategies ask once per run)."""
    trainloader, _ = _loaders(context)
    return describe_client(msg, context, trainloader, num_classes=10)
