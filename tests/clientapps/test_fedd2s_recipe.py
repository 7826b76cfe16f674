"""FedD2S's client: distillation below the cut against a reference; the upload."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from bouquet.clientapps.bounds import ConfigError
from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes.fedd2s import SOFT_LABELS, UPLOAD, make_hooks

CONFIG = {
    "fedd2s.cut": 1,
    "fedd2s.temperature": 2.0,
    "fedd2s.alpha": 0.5,
    "fedd2s.samples": 3,
}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _soft(ids, probs):
    return {
        SOFT_LABELS: ArrayRecord(
            {
                str(i): Array(np.asarray(p, np.float32))
                for i, p in zip(ids, probs, strict=True)
            }
        )
    }


def _run(model, x, y, incoming, config=CONFIG):
    return train_local(
        model,
        (x, y),
        TrainSettings(epochs=1, batch_size=4, lr=0.1),
        make_hooks(config),
        generator=torch.Generator().manual_seed(0),
        incoming=incoming,
    )


def test_one_step_distils_into_the_layers_below_the_cut_only():
    # Prepare
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    ids, probs = [2, 0], np.array([[0.2, 0.8], [0.6, 0.4]])
    model, reference = _model(), _model()
    # Execute
    result = _run(model, x, y, _soft(ids, probs))
    # Reference: the loop's order draw, then the soft-labelled batch draw;
    # the KL's gradient reaches the first layer only (cut 1: the classifier
    # stays personal).
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(4, generator=generator)
    pick = torch.randint(2, (2,), generator=generator)
    ce = nn.functional.cross_entropy(reference(x[order]), y[order])
    hidden = reference[1](reference[0](x[torch.tensor(ids)[pick]]))
    out = nn.functional.linear(
        hidden, reference[2].weight.detach(), reference[2].bias.detach()
    )
    q = torch.as_tensor(probs, dtype=torch.float32)[pick]
    kl = (q * (q.log() - (out / 2.0).log_softmax(1))).sum(1).mean()
    loss = ce + 0.5 * 4.0 * kl
    loss.backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    # Assert
    assert result.loss_first == pytest.approx(float(loss.detach()), rel=1e-5)
    for (name, got), want in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, want, msg=name)


def test_the_upload_is_the_cut_layers_input_and_the_logits_in_eval_mode():
    x, y = torch.randn(2, 3), torch.tensor([1, 0])
    model = _model()
    result = _run(model, x, y, {}, {**CONFIG, "fedd2s.cut": 1})
    upload = result.run.reply_records[UPLOAD]
    ids = torch.as_tensor(upload["ids"].numpy())
    assert len(ids) == 3 and set(ids.tolist()) <= {0, 1}  # 3 drawn from 2: repeated
    np.testing.assert_array_equal(upload["labels"].numpy(), y[ids].numpy())
    with torch.no_grad():
        hidden = model[1](model[0](x[ids]))
        np.testing.assert_allclose(
            upload["features"].numpy(), hidden.numpy(), rtol=1e-6
        )
        np.testing.assert_allclose(
            upload["logits"].numpy(), model(x[ids]).numpy(), rtol=1e-6
        )


def test_a_cut_without_layers_below_and_foreign_soft_labels_are_refused():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ConfigError, match=r"fedd2s\.cut"):
        _run(_model(), x, y, {}, {**CONFIG, "fedd2s.cut": 2})
    with pytest.raises(ConfigError, match=SOFT_LABELS):
        _run(_model(), x, y, _soft([9], [[0.5, 0.5]]))  # no sample 9 here
    with pytest.raises(ConfigError, match=SOFT_LABELS):
        _run(_model(), x, y, _soft([1], [[0.5, 0.6]]))  # not a distribution
