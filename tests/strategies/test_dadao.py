"""DADAO: its events by hand, the relay's rounds against a sequential NumPy run,
the client's events against the official optimizer's numbers."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from bouquet.clientapps.bounds import ConfigError
from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes.dadao import (
    Constants,
    advance,
    exchange,
    gradient_event,
    make_hooks,
    ode_matrix,
    read_times,
)
from bouquet.clientapps.state import load_arrays, load_values
from bouquet.strategies.context import RoundContext
from bouquet.strategies.dadao import DADAO, graph_constants
from bouquet.strategies.topology import make_graph
from bouquet.strategies.validation import ClientReply
from bouquet.tasks import wire

NODES = (20, 21, 22, 23)
L, MU = 4.0, 2.0  # nu = 1, sqrt(nu / L) = 1/2


def test_constants_and_events_by_hand():
    c = Constants(L, MU, chi1=3.0)
    assert (c.alpha, c.alpha_t, c.eta, c.theta) == (1 / 8, 1 / 16, 1 / 16, 1.0)
    assert (c.beta, c.beta_t, c.delta, c.delta_t) == (0.5, 12.0, 1 / 8, 1.0)
    assert (c.gamma, c.gamma_t) == (1 / 16, 1 / 8)
    x = np.array([[2.0], [1.0], [0.5], [1.0], [0.25], [-1.0]])  # x xt y yt z zt
    # r = g - nu x - yt = 7 - 2 - 1 = 4
    after = gradient_event(x, np.array([7.0]), c)
    np.testing.assert_allclose(
        after.ravel(), [2 - 4 / 16, 1 - 4 / 8, 0.5, 1 + 4.5, 0.25, -1]
    )
    # m = (0.5 + 0.25) - 0.25 = 0.5: z -= 0.25, zt -= 6
    after = exchange(x, np.array([0.25]), c)
    np.testing.assert_allclose(after.ravel(), [2, 1, 0.5, 1, 0.0, -7.0])


def test_advance_is_the_flow_of_the_ode():
    c = Constants(L, MU, chi1=3.0)
    x = np.random.default_rng(0).normal(size=(6, 3))
    h = 1e-6
    np.testing.assert_allclose((advance(x, h, c) - x) / h, ode_matrix(c) @ x, atol=1e-4)
    np.testing.assert_allclose(advance(advance(x, 0.3, c), 0.5, c), advance(x, 0.8, c))
    assert advance(x, 0.0, c) is x


def test_graph_constants_of_the_ring():
    ring = make_graph("ring", 4)  # L_G eigenvalues 0, 2, 2, 4; R_edge = 3/4
    chi1, chi2 = graph_constants(ring, 4.0)  # Lambda = L_G
    assert chi1 == pytest.approx(0.5) and chi2 == pytest.approx(3 / 8)
    chi1, chi2 = graph_constants(ring, 8.0)
    assert chi1 == pytest.approx(0.25) and chi2 == pytest.approx(3 / 16)
    # The default rate: sqrt(2 chi1 chi2) of L_G / |E| (the code's lamb_mix).
    rate, chi1 = DADAO().rate_and_chi1(ring)
    assert rate == pytest.approx(math.sqrt(2 * 2.0 * 1.5))
    assert chi1 == pytest.approx(2.0 / rate)  # the code's chi_1 / lamb_mix


def _ctx(server_round, nodes=NODES):
    return RoundContext(
        server_round=server_round,
        num_rounds=None,
        phase="train",
        nodes=tuple(nodes),
        sampled=(),
        arrays={"weight": np.zeros((1, 2), np.float64)},
        # What the driver adds: the declared ``send`` parameters.
        config={
            wire.SERVER_ROUND: server_round,
            "dadao.smoothness": L,
            "dadao.strong-convexity": MU,
        },
    )


def _data(v):
    rng = np.random.default_rng(10 + v)
    return rng.normal(size=(5, 2)), rng.normal(size=5)


def _quadratic(logits, y):
    return 0.5 * ((logits.squeeze(-1) - y) ** 2).sum()


def _run_rounds(strategy, rounds):
    models = {n: torch.nn.Linear(2, 1, bias=False).double() for n in NODES}
    for n, model in models.items():
        with torch.no_grad():
            model.weight.fill_(0.5 + 0.1 * NODES.index(n))
    states = {n: {} for n in NODES}
    for r in range(1, rounds + 1):
        ctx = _ctx(r)
        plan = strategy.recipients(ctx)
        replies = []
        for node, content in plan.items():
            config = content[wire.CONFIG]
            x, y = (torch.from_numpy(a) for a in _data(NODES.index(node)))
            result = train_local(
                models[node],
                (x, y),
                TrainSettings(batch_size=5, max_steps=0),
                make_hooks(config),
                generator=torch.Generator().manual_seed(r),
                config=config,
                state=states[node],
                incoming=content,
                loss=_quadratic,
            )
            records = {
                name: {k: a.numpy() for k, a in record.items()}
                for name, record in result.run.reply_records.items()
            }
            replies.append(ClientReply(node, NODES.index(node), 5, {}, {}, records))
        strategy.aggregate(replies, ctx)
    return ctx, replies


def _sequential(strategy, targets):
    """Sequential DADAO of the sampled events; each node's x at its target time."""
    c = Constants(L, MU, strategy.rate_and_chi1(make_graph("ring", 4))[1])
    times, edges = strategy.exchanges(make_graph("ring", 4))
    cursor = strategy.state["dadao"]["cursor"]
    events = [
        (t, "x", int(i), int(j))
        for t, (i, j) in zip(times[:cursor], edges[:cursor], strict=True)
    ]
    for v in range(4):
        events += [(t, "g", v, -1) for t in strategy.gradient_times(v)]
    events.sort()
    nodes = {v: np.zeros((6, 2)) for v in range(4)}
    for v in range(4):
        nodes[v][0] = 0.5 + 0.1 * v
    last, snapshot = dict.fromkeys(range(4), 0.0), {}

    def take(upto):
        for v, target in targets.items():
            if v not in snapshot and target < upto:
                snapshot[v] = advance(nodes[v], target - last[v], c)[0]

    for t, kind, i, j in events:
        take(t)
        if len(snapshot) == 4:
            break
        for v in (i, j) if kind == "x" else (i,):
            nodes[v], last[v] = advance(nodes[v], t - last[v], c), t
        if kind == "x":
            si = nodes[i][2] + nodes[i][4]
            sj = nodes[j][2] + nodes[j][4]
            nodes[i], nodes[j] = exchange(nodes[i], sj, c), exchange(nodes[j], si, c)
        else:
            a, b = _data(i)
            w = nodes[i][0]
            grad = a.T @ (a @ w - b) + MU * w
            nodes[i] = gradient_event(nodes[i], grad, c)
    take(np.inf)
    return snapshot


def test_the_relay_runs_the_sequential_events_exactly():
    # Prepare
    strategy = DADAO(
        topology="ring",
        smoothness=L,
        strong_convexity=MU,
        gossip_rate=3.0,
        gradient_rate=1.5,
        horizon=4.0,
        seed=5,
    )
    # Execute
    ctx, replies = _run_rounds(strategy, rounds=5)
    # Assert
    targets = {info["vertex"]: info["until"] for info in ctx.per_node.values()}
    expected = _sequential(strategy, targets)
    assert sum(info["neighbors"] for info in ctx.per_node.values()) >= 2
    for reply in replies:
        v = NODES.index(reply.node)
        model = reply.records[wire.GOSSIP_MODEL]["weight"].ravel()
        np.testing.assert_allclose(model, expected[v], rtol=1e-9, atol=1e-12)
    assert strategy.state["dadao"]["cursor"] > 5  # several exchanges happened
    metrics = strategy.train_metrics(replies, ctx)
    assert metrics["dadao-time"] == max(targets.values())
    assert metrics["consensus-distance"] > 0


def test_a_failed_node_drops_its_exchanges_and_the_run_goes_on():
    strategy = DADAO(topology="ring", gossip_rate=20.0, horizon=5.0, seed=2)
    alive = [n for n in NODES if n != 22]  # vertex 2 left: the path 1-0-3
    model = {"weight": np.ones((1, 2))}
    records = {wire.GOSSIP_MODEL: model, wire.DADAO_MESSAGE: model}
    first = _ctx(1)
    strategy.recipients(first)  # round 1: all four, the graph is the ring
    strategy.aggregate([ClientReply(n, 0, 5, {}, {}, records) for n in NODES], first)
    waiting, relayed = None, 0
    for r in range(2, 10):
        ctx = _ctx(r, alive)
        plan = strategy.recipients(ctx)
        assert sorted(plan) == alive
        pairs = strategy.state["dadao"]["pairs"]
        assert "2" not in pairs and 2 not in pairs.values()
        if waiting is not None:  # its partner was silent: nothing to apply
            assert wire.gossip_neighbor(0) not in plan[waiting]
        relayed += sum(wire.gossip_neighbor(0) in c for c in plan.values())
        # Node 21 (vertex 1) stopped replying; the others go on.
        replies = [ClientReply(n, 0, 5, {}, {}, records) for n in plan if n != 21]
        strategy.aggregate(replies, ctx)
        partner = pairs.get("1")
        waiting = NODES[partner] if partner is not None else None
    assert relayed > 0  # the exchanges 0-3 still happen


def test_the_client_refuses_bad_times():
    for bad in ([2.0, 1.0], [float("nan")], [-1.0], "1", [True]):
        with pytest.raises(ConfigError, match="gradient-times"):
            read_times({"dadao.gradient-times": bad})
    assert read_times({}) == []


def test_scipy_expm_is_the_series():
    c = Constants(L, MU, chi1=1.0)
    m = ode_matrix(c) * 0.1
    series = sum(np.linalg.matrix_power(m, k) / math.factorial(k) for k in range(20))
    np.testing.assert_allclose(scipy.linalg.expm(m), series, atol=1e-12)


def test_the_client_matches_the_official_optimizer():
    """The events of ``data/dadao_official.json`` through the real hook.

    The fixture holds the six vectors of each node after the official
    ``DADAO_optimizer.step`` (its repository and commit inside) ran a fixed
    sequence of gradient events and exchanges on a 3-node triangle with its
    own ``logistic_regression`` (mu/2 ||x||^2 included). Here each node runs
    its messages through ``make_hooks``/``train_local`` (full-batch gradient
    events), the partner's reply ``y + z`` being relayed as the relay would.
    """
    golden = json.loads(
        (Path(__file__).parent / "data" / "dadao_official.json").read_text()
    )
    smoothness, mu = golden["smoothness"], golden["strong_convexity"]
    data = np.asarray(golden["data"])
    labels = np.asarray(golden["labels"])
    models = {}
    for v, x0 in enumerate(golden["x0"]):
        models[v] = torch.nn.Linear(3, 1, bias=False).double()
        with torch.no_grad():
            models[v].weight.copy_(torch.tensor([x0]))
    states = {v: {} for v in range(3)}

    def logistic(logits, y):  # the official loss, without the regularizer
        return torch.log1p(torch.exp(-y * logits.squeeze(-1))).mean()

    def message(v, times, until, partner=None):
        config = {
            "dadao.smoothness": smoothness,
            "dadao.strong-convexity": mu,
            "dadao.chi1": golden["chi_1_star"],
            "dadao.gradient-times": times,
            "dadao.time": until,
        }
        incoming = {} if partner is None else {wire.gossip_neighbor(0): partner}
        result = train_local(
            models[v],
            (torch.from_numpy(data[v]), torch.from_numpy(labels[v])),
            TrainSettings(batch_size=len(labels[v]), max_steps=0),
            make_hooks(config),
            generator=torch.Generator().manual_seed(0),
            config=config,
            state=states[v],
            incoming=incoming,
            loss=logistic,
        )
        return result.run.reply_records[wire.DADAO_MESSAGE]

    # Events: g0 .3, g1 .4, x01 .7, g2 .8, x12 1.1, g0 1.2, x02 1.5, g1 1.6, g1 1.9
    assert [e["time"] for e in golden["events"]] == [
        0.3, 0.4, 0.7, 0.8, 1.1, 1.2, 1.5, 1.6, 1.9
    ]  # fmt: skip
    m0 = message(0, [0.3], 0.7)
    m1 = message(1, [0.4], 0.7)
    m2 = message(2, [0.8], 1.1)
    m0b = message(0, [1.2], 1.5, partner=m1)  # x01 at .7, then g0 1.2
    m1b = message(1, [], 1.1, partner=m0)  # x01 at .7
    m2b = message(2, [], 1.5, partner=m1b)  # x12 at 1.1
    message(1, [1.6, 1.9], 1.9, partner=m2)  # x12 at 1.1, then g1 1.6, 1.9
    message(0, [], 1.5, partner=m2b)  # x02 at 1.5
    message(2, [], 1.5, partner=m0b)  # x02 at 1.5

    for v in range(3):
        vectors = load_arrays(states[v], "dadao", "vectors")["X"]
        clock = load_values(states[v], "dadao", "clock")["time"]
        assert clock == pytest.approx(golden["last_event_time"][v])
        # The official ODE matrix is filled in float32 before .double(): its
        # constants carry ~1e-8 relative rounding (differences ~3e-9 here).
        np.testing.assert_allclose(vectors, golden["vectors"][v], rtol=1e-6, atol=1e-8)
