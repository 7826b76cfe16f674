"""EControl's client hook against a step-by-step NumPy reference on a tiny model.

One full-batch SGD step of a linear softmax model (``v_i = -lr grad f_i(x)``
by hand, :func:`test_ef21_recipe.gradient`), then ``Delta = TopK(eta e + v -
h)``, ``e <- e + v - h - Delta``, ``h <- h + Delta`` over three rounds; with
``eta = 0`` the payloads are EF21's.
"""

import numpy as np
import torch

from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes import econtrol, ef21
from bouquet.clientapps.state import load_arrays
from bouquet.tasks import wire
from tests.clientapps.test_ef21_recipe import LR, X, Y, gradient

RNG = np.random.default_rng(1)


def client_round(w, b, config, state, recipe):
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(w))
        model.bias.copy_(torch.as_tensor(b))
    settings = TrainSettings(batch_size=64, lr=LR, momentum=0.0, max_steps=1)
    result = train_local(
        model,
        (torch.as_tensor(X), torch.as_tensor(Y)),
        settings,
        recipe.make_hooks(config),
        generator=torch.Generator().manual_seed(0),
        config=config,
        state=state,
    )
    record = result.run.reply_records[wire.ARRAYS]
    return {k: a.numpy() for k, a in record.items()}


def test_three_rounds_of_controlled_feedback_match_the_reference():
    eta = 0.3
    config = {"econtrol.compressor": "topk", "econtrol.k": 2, "econtrol.eta": eta}
    state: dict = {}
    e, h = np.zeros(8), np.zeros(8)
    for _ in range(3):
        w = RNG.standard_normal((2, 3)).astype(np.float32)
        b = RNG.standard_normal(2).astype(np.float32)
        payload = client_round(w, b, config, state, econtrol)
        v = -LR * gradient(w.astype(np.float64), b.astype(np.float64))
        target = eta * e + v - h
        chosen = np.sort(np.argsort(-np.abs(target), kind="stable")[:2])
        np.testing.assert_array_equal(payload["indices"], chosen)
        np.testing.assert_allclose(payload["values"], target[chosen], atol=1e-6)
        delta = np.zeros(8)
        delta[chosen] = payload["values"]
        e, h = e + v - h - delta, h + delta
        np.testing.assert_allclose(
            load_arrays(state, "econtrol", "e")["e"], e, atol=1e-6
        )
        np.testing.assert_allclose(
            load_arrays(state, "econtrol", "h")["h"], h, atol=1e-6
        )
    assert np.abs(e).sum() > 0  # the error is carried, not dropped


def test_eta_zero_sends_what_ef21_sends():
    mine = {"econtrol.compressor": "topk", "econtrol.k": 3, "econtrol.eta": 0.0}
    theirs = {"ef21.compressor": "topk", "ef21.k": 3}
    s1: dict = {}
    s2: dict = {}
    for _ in range(3):
        w = RNG.standard_normal((2, 3)).astype(np.float32)
        b = RNG.standard_normal(2).astype(np.float32)
        a = client_round(w, b, mine, s1, econtrol)
        c = client_round(w, b, theirs, s2, ef21)
        for key in ("indices", "values"):
            np.testing.assert_array_equal(a[key], c[key])
