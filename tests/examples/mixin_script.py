import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from bouquet.clientapps import evaluate_client, train_client
from bouquet.simulations.inprocess import InProcessGrid
from bouquet.strategies import FedLD


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)
    )


gen = torch.Generator().manual_seed(0)
X = torch.randn(400, 4, generator=gen)
Y = (X[:, 0] + X[:, 1] > 0).long()
app = ClientApp()


@app.train()
def train(msg: Message, ctx: Context) -> Message:
    i = int(ctx.node_config["partition-id"])
    return train_client(msg, ctx, net(), (X[i::4], Y[i::4]))


@app.evaluate()
def evaluate(msg: Message, ctx: Context) -> Message:
    return evaluate_client(msg, ctx, net(), (X, Y))


strategy = FedLD(lambda_=0.1, min_available_nodes=4)
result = strategy.start(InProcessGrid(app, 4, {}), ArrayRecord(net().state_dict()), 5)
print("accuracy", result.evaluate_metrics_clientapp[5]["eval-accuracy"])
