"""MUD-HoG's histories, detectors and confirmation on hand-made updates."""

import json
from pathlib import Path

import numpy as np
import pytest

from bouquet.strategies.clustering import (
    dbscan,
    distance_matrix,
    largest_gap_split,
    two_means,
)
from bouquet.strategies.context import RoundContext
from bouquet.strategies.mudhog import (
    MALICIOUS,
    LongShortHistory,
    MUDHoG,
    _fresh,
    detection_scores,
)
from bouquet.strategies.state import ServerState, load_state, save_state
from bouquet.strategies.validation import ClientReply

DIM = 6


def _replies(updates):
    return [
        ClientReply(
            node=100 + n, partition=n, num_examples=1 + n, metrics={}, arrays={"w": u}
        )
        for n, u in enumerate(updates)
    ]


def _ctx(server_round):
    nodes = tuple(range(100, 120))
    x = {"w": np.zeros(DIM)}
    return RoundContext(server_round, None, "train", nodes, nodes, x, {})


def _round_updates(rng, honest=8):
    """8 honest updates near (1, 1, ...), a sign flipper, a noise attacker."""
    direction = np.ones(DIM)
    good = [direction + 0.1 * rng.standard_normal(DIM) for _ in range(honest)]
    noise = rng.standard_normal(DIM)
    noise -= (noise @ direction) / DIM * direction  # no sign flip: orthogonal
    return [*good, -4.0 * good[0], good[1] + 20.0 * noise]


def test_clustering_helpers_on_hand_made_points():
    points = np.array([[0.0], [0.1], [0.2], [5.0], [5.1], [5.2], [20.0]])
    labels = dbscan(distance_matrix(points), eps=0.15, min_samples=2)
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1, -1])
    # min_samples counts the point itself: 0.0 has only 0.1 within 0.1.
    np.testing.assert_array_equal(
        dbscan(distance_matrix(points), eps=0.1, min_samples=3), [0, 0, 0, 1, 1, 1, -1]
    )
    np.testing.assert_array_equal(two_means(points[:6]), [0, 0, 0, 1, 1, 1])
    assert largest_gap_split([0.9, 0.1, 0.2, 0.8]) == pytest.approx(0.5)
    assert largest_gap_split([3.0]) == 0.0


def test_warm_up_is_the_plain_mean_and_histories_accumulate():
    combine = LongShortHistory(window=2, tau0=3)
    state = combine.init()
    updates = [np.arange(DIM, dtype=float) * k for k in (1.0, 2.0, -9.0)]
    for t in (1, 2, 3):
        delta, state = combine.update(_replies(updates), None, state, _ctx(t))
        np.testing.assert_allclose(delta["w"], np.mean(updates, axis=0))
    client = state["clients"]["2"]
    np.testing.assert_allclose(client["long"], 3 * updates[2])
    assert len(client["recent"]) == 2
    assert set(state["labels"].values()) == {"normal"}


def test_sign_flip_and_noise_are_excluded_and_confirmed():
    rng = np.random.default_rng(0)
    combine = LongShortHistory(tau0=1, delay=2)
    state = combine.init()
    for t in range(1, 6):
        updates = _round_updates(rng)
        delta, state = combine.update(_replies(updates), None, state, _ctx(t))
        labels = state["labels"]
        if t == 1:
            continue
        assert labels["8"] == "sign-flip" and labels["9"] == "noise"
        kept = [int(k) for k, v in labels.items() if v not in ("sign-flip", "noise")]
        kept = [i for i in kept if labels[str(i)] != "targeted"]
        np.testing.assert_allclose(
            delta["w"], np.mean([updates[i] for i in kept], axis=0)
        )
    assert state["clients"]["8"]["status"] == "sign-flip"
    assert state["clients"]["9"]["status"] == "noise"
    honest = {str(i) for i in range(8)}
    assert all(state["clients"][k]["status"] != "targeted" for k in honest)


def test_persistent_minority_is_confirmed_targeted_after_two_delays():
    # Two clients pull a fixed extra direction (a label flip's bias); they
    # stay inside DBSCAN's cluster but dominate the long history's split.
    rng = np.random.default_rng(1)
    combine = LongShortHistory(tau0=0, delay=1, min_samples=2)
    state = combine.init()
    bias = np.zeros(DIM)
    bias[0] = 0.6
    statuses = []
    for t in range(1, 5):
        good = [np.ones(DIM) + 0.05 * rng.standard_normal(DIM) for _ in range(7)]
        updates = [*good, good[0] + bias, good[1] + bias]
        _, state = combine.update(_replies(updates), None, state, _ctx(t))
        flagged = {k for k, v in state["labels"].items() if v in MALICIOUS}
        assert flagged == {"7", "8"}  # honest ones: normal or unreliable (kept)
        statuses.append(state["clients"]["7"]["status"])
    assert state["labels"]["7"] == state["labels"]["8"] == "targeted"
    assert statuses[0] == "normal" and statuses[-1] == "targeted"


def test_confirmation_release_and_unreliable_hysteresis():
    combine = LongShortHistory(delay=2)
    client = {"suspect": 0, "targeted": 0, "clean": 0, "unreliable": 0}
    client["status"] = "normal"
    client = combine.confirm(client, "noise", False)
    assert client["status"] == "normal"  # one flagged round is not enough
    client = combine.confirm(client, "noise", False)
    assert client["status"] == "noise"
    client = combine.confirm(client, None, False)
    assert client["status"] == "noise"
    client = combine.confirm(client, None, False)  # clean for delay rounds
    assert client["status"] == "unreliable" and client["unreliable"] == 3
    # Unreliable test: one low-cosine client among aligned ones.
    keys = [str(i) for i in range(4)]
    short = np.array([[1.0, 0.0], [1.0, 0.05], [0.95, 0.0], [0.2, 1.0]])
    clients = {k: {"unreliable": 0, "status": "normal"} for k in keys}
    for _ in range(3):
        combine.mark_unreliable(keys, short, clients)
    assert clients["3"] == {"unreliable": 3, "status": "unreliable"}
    assert all(clients[k]["status"] == "normal" for k in keys[:3])
    for _ in range(3):  # the counter falls back to 0 once it looks aligned
        combine.mark_unreliable(keys, short[[0, 1, 2, 0]], clients)
    assert clients["3"]["status"] == "normal"


def test_detection_scores_and_metrics():
    labels = {"0": "normal", "1": "sign-flip", "2": "noise", "3": "unreliable"}
    scores = detection_scores(labels, {"1", "3", "7"})  # "7" did not reply
    assert scores == {"precision": 0.5, "recall": 0.5}
    assert detection_scores({"0": "normal"}, set()) == {
        "precision": 1.0,
        "recall": 1.0,
    }


def test_state_round_trips_through_a_checkpoint(tmp_path):
    rng = np.random.default_rng(2)
    strategy = MUDHoG(tau0=1)
    combine = strategy.aggregator.combine
    state = combine.init()
    for t in (1, 2, 3):
        _, state = combine.update(_replies(_round_updates(rng)), None, state, _ctx(t))
    save_state(ServerState(3, {"w": np.zeros(DIM)}, {"c": state}), tmp_path / "ck")
    loaded = load_state(tmp_path / "ck").strategy["c"]
    updates = _round_updates(rng)
    a, _ = combine.update(_replies(updates), None, state, _ctx(4))
    b, _ = combine.update(_replies(updates), None, loaded, _ctx(4))
    np.testing.assert_array_equal(a["w"], b["w"])


def test_one_detection_round_matches_the_official_code():
    # The round's flags of the official Server.mud_hog on hand-made histories
    # (repo and commit in "source"; /work/scratch/robust-golden/mudhog).
    case = json.loads(
        (Path(__file__).parent / "data" / "mudhog_official.json").read_text()
    )
    rule = LongShortHistory(window=3, tau0=3, delay=2, dbscan_eps=0.5, min_samples=5)
    keys = [str(i) for i in range(len(case["kinds"]))]
    clients = {}
    for key, rows in zip(keys, case["updates"], strict=True):
        updates = np.asarray(rows)
        clients[key] = {
            **_fresh(),
            "long": updates.sum(0),
            "recent": list(updates[-3:]),
        }
    labels = rule.detect(keys, clients)

    def flagged(label):
        return [int(k) for k in keys if labels[k] == label]

    official = case["official"]
    assert flagged("sign-flip") == official["flip"]
    assert flagged("noise") == official["untargeted"]
    assert flagged("targeted") == official["targeted"]
    # Known difference: the official unreliable test drops this round's
    # sign-flip suspects but keeps its noise suspects (not yet confirmed); ours
    # keeps every client not confirmed malicious. Only round-one suspects,
    # excluded from the mean anyway, get a different counter.
    ours = [int(k) for k in keys if clients[k]["unreliable"] > 0]
    assert (ours, official["unreliable"]) == ([7], [8, 9])
