"""FedZip's client hook: the reply is the FedZip payload of the local update."""

import numpy as np
import torch

from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes.fedzip import make_hooks
from bouquet.tasks import compression, wire


def test_reply_is_the_payload_of_y_minus_x():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    x0 = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    data = (torch.randn(12, 6), torch.randint(0, 4, (12,)))
    config = {"fedzip.z": 0.25, "fedzip.clusters": 4}
    settings = TrainSettings(batch_size=4, lr=0.5, momentum=0.0, max_steps=3)
    result = train_local(
        model,
        data,
        settings,
        make_hooks(config),
        generator=torch.Generator().manual_seed(0),
        config=config,
    )
    y = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    update = (y - x0).double().numpy()
    payload = {k: a.numpy() for k, a in result.run.reply_records[wire.ARRAYS].items()}
    codec = compression.FedZip(0.25, 4)
    expected = codec.encode(update, np.random.default_rng(0))
    for key in expected:
        np.testing.assert_array_equal(payload[key], expected[key])
    decoded = codec.decode(payload, update.size)
    assert np.count_nonzero(decoded) <= 7  # ceil(0.25 * 28)
    assert len(np.unique(decoded)) <= 4
