"""``simulations/train_loss.py``: the final model's objective over the nodes' data."""

import json

import torch

from bouquet.simulations.train_loss import train_objective
from bouquet.strategies.state import ServerState, save_state
from bouquet.tasks import DataSpec, build_model, dataset_info, load_client_data


def test_train_objective_is_the_row_mean_over_every_node_training_part(tmp_path):
    config = {"dataset": "digits", "partitioner": "iid", "seed": 3, "model": "logreg"}
    spec = DataSpec.from_run_config(config, 3)
    model = build_model("logreg", dataset_info(spec), seed=7)
    arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_state(ServerState(round=5, arrays=arrays), tmp_path / "checkpoint")

    got = train_objective(tmp_path, 3)

    parts = [load_client_data(spec, p) for p in range(3)]
    x = torch.cat([p.train_x for p in parts])
    y = torch.cat([p.train_y for p in parts])
    with torch.no_grad():
        logits = model(x)
    expected = float(torch.nn.functional.cross_entropy(logits, y))
    assert got["round"] == 5
    assert abs(got["train-loss"] - expected) < 1e-5
    assert got["train-accuracy"] == int((logits.argmax(1) == y).sum()) / len(y)
