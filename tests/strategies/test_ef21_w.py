"""EF21-W's server: the weighted step against NumPy, the EF21 reduction, a real run.

Richtarik, Gasanov, Burlachenko, "Error Feedback Reloaded", ICLR 2024,
https://arxiv.org/abs/2402.10774: ``g = sum_i w_i g_i`` with ``w_i`` proportional
to ``L_i``; here the clients send ``c'_i = C(v_i / L_i - h_i)`` and the server
adds ``(1/N) sum_i L_i c'_i`` (``strategies/ef21.py``).
"""

import numpy as np
import pytest

from bouquet.simulations.inprocess import run_inprocess
from bouquet.strategies.aggregation import to_numpy
from bouquet.strategies.context import RoundContext
from bouquet.strategies.ef21 import EF21, EF21W, SMOOTHNESS, ErrorFeedbackMean
from bouquet.strategies.pieces import Aggregator, ServerSGD, Uniform
from bouquet.strategies.registry import get_algorithm
from bouquet.strategies.validation import ClientReply
from tests.conftest import answer, make_reply
from tests.strategies.test_ef21 import X0, _configured

RNG = np.random.default_rng(3)


def _replies(cs, smoothness):
    return [
        ClientReply(
            node=i + 1,
            partition=i,
            num_examples=7.0,
            metrics={SMOOTHNESS: s},
            arrays={"w": c[:4].reshape(2, 2), "b": c[4:]},
        )
        for i, (c, s) in enumerate(zip(cs, smoothness, strict=True))
    ]


def test_weighted_step_matches_the_numpy_reference_over_two_rounds():
    nodes, eta = (1, 2, 3, 4), 0.5
    chain = Aggregator(Uniform(), ErrorFeedbackMean(eta, SMOOTHNESS), ServerSGD())
    state, x = chain.init(), dict(X0)
    flat_x = np.concatenate([X0["w"].reshape(-1), X0["b"]]).astype(np.float64)
    g = np.zeros(5)
    for rnd, (sampled, smoothness) in enumerate(
        [((1, 2, 3), [0.5, 2.0, 30.0]), ((2, 4), [2.0, 7.25])], start=1
    ):
        cs = [RNG.standard_normal(5) for _ in sampled]
        ctx = RoundContext(rnd, None, "train", nodes, sampled, x, {})
        x, state = chain.update(_replies(cs, smoothness), state, ctx)
        # Reference: g += (1/N) sum_i L_i c'_i over the population N = 4.
        g = g + sum(s * c for s, c in zip(smoothness, cs, strict=True)) / len(nodes)
        flat_x = flat_x + eta * g
        np.testing.assert_allclose(
            np.concatenate([state["combine"]["w"].reshape(-1), state["combine"]["b"]]),
            g,
            rtol=1e-12,
        )
        got = np.concatenate([x["w"].reshape(-1), x["b"]])
        np.testing.assert_allclose(got, flat_x, rtol=1e-6)
        assert x["w"].dtype == np.float32 and x["n"] == 7


def test_equal_smoothness_is_ef21_on_the_same_replies():
    ctx = RoundContext(1, None, "train", (1, 2, 3), (1, 2, 3), X0, {})
    cs = [RNG.standard_normal(5) for _ in range(3)]
    plain = Aggregator(Uniform(), ErrorFeedbackMean(1.0), ServerSGD())
    weighted = Aggregator(Uniform(), ErrorFeedbackMean(1.0, SMOOTHNESS), ServerSGD())
    expected, _ = plain.update(_replies(cs, [0.0] * 3), plain.init(), ctx)
    # A power of two scales exactly: the same numbers bit for bit.
    exact, _ = weighted.update(
        _replies([c / 4 for c in cs], [4.0] * 3), weighted.init(), ctx
    )
    # Any other common L_i: the same up to rounding.
    close, _ = weighted.update(
        _replies([c / 3 for c in cs], [3.0] * 3), weighted.init(), ctx
    )
    for key in ("w", "b"):
        np.testing.assert_array_equal(exact[key], expected[key])
        np.testing.assert_allclose(close[key], expected[key], rtol=1e-6)


def test_a_round_scales_each_topk_reply_by_its_reported_smoothness():
    strategy = EF21W(k=2)
    messages, nodes = _configured(strategy)
    sent = messages[0].content["config"]
    assert sent[SMOOTHNESS] == "logistic" and sent["ef21.k"] == 2
    assert sent["client-routine"] == "ef21"
    replies = [
        make_reply(
            {"indices": np.array(i, np.int32), "values": np.array(v, np.float32)},
            {"num-examples": 5, SMOOTHNESS: s},
            node_id=node,
            routine="ef21",
        )
        for node, i, v, s in [
            (nodes[0], [0, 4], [2.0, -1.0], 3.0),
            (nodes[1], [3, 4], [4.0, 3.0], 0.5),
        ]
    ]
    arrays, _ = strategy.aggregate_train(1, answer(strategy, replies))
    new = to_numpy(arrays)
    # g = (3 c'_1 + 0.5 c'_2) / 2: w [[3, 0], [0, 1]], b (-3 + 1.5) / 2.
    np.testing.assert_allclose(new["w"], X0["w"] + [[3.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(new["b"], X0["b"] - 0.75)


@pytest.mark.parametrize("bad", [0.0, -1.0, 1e13, float("nan")])
def test_a_smoothness_out_of_range_is_dropped(bad):
    strategy = EF21W(k=1, min_train_nodes=1)
    _, nodes = _configured(strategy)
    replies = [
        make_reply(
            {"indices": np.array([0], np.int32), "values": np.array([1.0], np.float32)},
            {"num-examples": 5, SMOOTHNESS: s},
            node_id=node,
            routine="ef21",
        )
        for node, s in [(nodes[0], 2.0), (nodes[1], bad)]
    ]
    arrays, _ = strategy.aggregate_train(1, answer(strategy, replies))
    outcome = strategy.train_round.outcome
    assert outcome.accepted == 1 and SMOOTHNESS in outcome.dropped[0]
    np.testing.assert_allclose(to_numpy(arrays)["w"], X0["w"] + [[1.0, 0], [0, 0]])


def test_registered_with_ef21_params_and_the_uniform_reduction():
    assert get_algorithm("ef21-w") is EF21W
    assert [p.key for p in EF21W.params][:4] == [p.key for p in EF21.params]
    assert EF21W.reductions[0].settings == {"smoothness": "uniform"}
    with pytest.raises(ValueError, match="smoothness"):
        EF21W(smoothness="hessian")


# ----------------------------------------------------- in-process, two rounds --
CONFIG = {
    "num-server-rounds": 2,
    "fraction-evaluate": 0.0,
    "local-steps": 1,
    "momentum": 0.0,
    "model": "mlp",
    "seed": 5,
    "plot": False,
}


def test_uniform_smoothness_runs_ef21_bit_for_bit(tmp_path):
    runs = [
        run_inprocess(
            {
                **CONFIG,
                "algorithm": name,
                f"{name}.k": 50,
                **extra,
                "output-dir": str(tmp_path / name),
            },
            num_nodes=3,
        )[0]
        for name, extra in [("ef21", {}), ("ef21-w", {"ef21-w.smoothness": "uniform"})]
    ]
    for key in runs[0].arrays:
        np.testing.assert_array_equal(
            runs[1].arrays[key].numpy(), runs[0].arrays[key].numpy()
        )


def test_two_rounds_server_g_is_the_smoothness_weighted_sum(tmp_path):
    from bouquet.strategies.state import load_state

    _, path, grid = run_inprocess(
        {**CONFIG, "algorithm": "ef21-w", "ef21-w.k": 50, "output-dir": str(tmp_path)},
        num_nodes=3,
    )
    server_g = load_state(path / "checkpoint").strategy["aggregator"]["combine"]
    flat = np.concatenate([server_g[k].reshape(-1) for k in server_g])
    states = [c.state for c in grid.contexts.values()]
    smoothness = np.array([s["ef21.L"]["L"].numpy()[0] for s in states])
    h = [s["ef21.g"]["g"].numpy() for s in states]
    assert len(h) == 3 and np.all(smoothness > 0)
    assert len(set(smoothness.tolist())) == 3  # each node's own data
    # g = (1/N) sum_i L_i h_i = sum_i w_i g_i (the paper's g with g_i = L_AM h_i).
    expected = sum(s * hi for s, hi in zip(smoothness, h, strict=True)) / 3
    np.testing.assert_allclose(flat, expected, rtol=1e-6, atol=1e-9)
    assert 0 < np.count_nonzero(flat) <= 3 * 2 * 50


def test_heterogeneous_smoothness_gives_ef21_iterates_up_to_rounding(tmp_path):
    # C(a x) = a C(x) for a > 0: with G_i = L_i h_i the client's rule is EF21's
    # (G_i <- G_i + C(v_i - G_i)) and the server's g = mean_i G_i, whatever the
    # L_i; only the float32 rounding of the payload differs.
    runs = [
        run_inprocess(
            {
                **CONFIG,
                "algorithm": name,
                f"{name}.k": 50,
                "output-dir": str(tmp_path / name),
            },
            num_nodes=3,
        )
        for name in ("ef21", "ef21-w")
    ]
    smoothness = [
        c.state["ef21.L"]["L"].numpy()[0] for c in runs[1][2].contexts.values()
    ]
    assert max(smoothness) > 1.01 * min(smoothness)
    for key in runs[0][0].arrays:
        np.testing.assert_allclose(
            runs[1][0].arrays[key].numpy(),
            runs[0][0].arrays[key].numpy(),
            rtol=1e-5,
            atol=1e-7,
        )
