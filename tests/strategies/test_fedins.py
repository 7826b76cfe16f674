"""FedIns: the key-matching loss, the selection metric, the reduction to SSF FedAvg."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bouquet.clientapps.bounds import ConfigError
from bouquet.clientapps.recipes.fedins import TOP_ENTRY_SHARE, make_hooks
from bouquet.strategies.registry import get_algorithm
from bouquet.tasks import DataSpec, dataset_info
from bouquet.tasks.finetune import build_task_model
from bouquet.tasks.ssf import selected_entries, selected_similarity

DIGITS = dataset_info(DataSpec(dataset="digits-shift"))
POOLS = {"model": "mlp", "dataset": "digits-shift", "seed": 1, "peft": "ssf"}


def test_the_loss_mixes_cross_entropy_and_key_matching_and_counts_selections():
    model = build_task_model({**POOLS, "ssf-pool-size": 4, "ssf-top-k": 2}, DIGITS)
    (hook,) = make_hooks({"fedins.lam": 0.25})
    run = SimpleNamespace(model=model, metrics={})
    hook.setup(run)
    x, y = torch.randn(8, *DIGITS.input_shape), torch.arange(8) % 10
    logits = model(x)
    ce = torch.nn.functional.cross_entropy(logits, y)
    got = hook.loss(run, ce, logits, x, y)
    expected = 0.75 * ce + 0.25 * (1 - selected_similarity(model)).mean()
    torch.testing.assert_close(got, expected)
    chosen = selected_entries(model).reshape(-1)
    hook.finish(run)
    peak = np.bincount(chosen.numpy(), minlength=4).max() / 16
    assert run.metrics[TOP_ENTRY_SHARE] == pytest.approx(peak)


def test_a_model_without_ssf_is_refused():
    (hook,) = make_hooks({"fedins.lam": 0.1})
    model = build_task_model({"model": "mlp", "dataset": "digits-shift"}, DIGITS)
    with pytest.raises(ConfigError, match="peft must be 'ssf'"):
        hook.setup(SimpleNamespace(model=model, metrics={}))


def test_top_k_above_the_pool_is_refused():
    with pytest.raises(ValueError, match="top-k=4"):
        get_algorithm("fedins")(pool_size=3, top_k=4).validate()


def test_one_entry_without_the_key_term_is_plain_ssf():
    strategy = get_algorithm("fedins")(pool_size=1, top_k=1, lam=0.0)
    assert strategy.run_settings() == {
        "peft": "ssf",
        "ssf-pool-size": 1,
        "ssf-top-k": 1,
    }
    assert strategy.weighting == "uniform"
    # The model is FedAvg's with peft='ssf' and the loss is left as it is, so
    # the run is FedAvg (uniform weights) on plain SSF.
    model = build_task_model({**POOLS, **strategy.run_settings()}, DIGITS)
    (hook,) = make_hooks({"fedins.lam": 0.0})
    run = SimpleNamespace(model=model, metrics={})
    hook.setup(run)
    x, y = torch.randn(4, *DIGITS.input_shape), torch.arange(4)
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, y)
    assert hook.loss(run, loss, logits, x, y) is loss
