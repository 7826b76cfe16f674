"""audit-capture: a run saves one node's round, and the audit inverts it."""

import numpy as np
import pytest
import torch

from bouquet.simulations.gifd_audit import audit_captured, gifd, project_l1
from bouquet.simulations.inprocess import run_inprocess
from bouquet.tasks.capture import load_capture

ONE_STEP_ON_ONE_EXAMPLE = {
    "num-server-rounds": 1,
    "local-epochs": 1,
    "local-steps": 1,
    "batch-size": 1,
    "momentum": 0.0,
    "fraction-evaluate": 0.0,
    "min-evaluate-nodes": 0,
    "plot": False,
    "audit-capture-round": 1,
    "audit-capture-node": 1,
}


def _capture(tmp_path, **overrides):
    folder = tmp_path / "captured"
    run_inprocess(
        {
            **ONE_STEP_ON_ONE_EXAMPLE,
            "output-dir": str(tmp_path / "run"),
            "audit-capture": str(folder),
            **overrides,
        },
        num_nodes=2,
    )
    return folder


def test_a_captured_round_is_saved_and_inverted(tmp_path):
    folder = _capture(tmp_path)
    (path,) = folder.iterdir()  # only the chosen node, only the chosen round
    assert path.name == "capture-round1-node1.npz"
    captured = load_capture(path)
    assert captured["config"]["batch-size"] == 1
    assert captured["run-config"]["audit-capture-node"] == 1
    assert list(captured["true-steps"]) == [1]
    assert set(captured["sent"]) == set(captured["reply"]["arrays"])
    row = audit_captured(path, steps=40)
    # One example through an MLP: gradient matching recovers it closely.
    assert row["batch"] == 1 and row["ig-psnr"] > 15


def test_a_compressed_reply_is_decoded_as_the_server_does(tmp_path):
    # Top-k keeping every coordinate is lossless: the decoded reply is the
    # dense one, so the attack does as well as on an uncompressed reply.
    folder = _capture(tmp_path, compressor="topk", **{"compressor-k": 17226})
    (path,) = folder.iterdir()
    assert "values" in "".join(load_capture(path)["reply"]["arrays"])
    assert audit_captured(path, steps=40)["ig-psnr"] > 15


def test_l1_projection_is_the_nearest_point_of_the_ball():
    delta = torch.tensor([[3.0, -1.0, 0.5], [0.1, 0.1, -0.1]])
    out = project_l1(delta, torch.tensor([2.0, 1.0]))
    # Soft threshold at theta = 1: (2, 0, 0); the second row is inside.
    np.testing.assert_allclose(out[0], [2.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(out[1], delta[1])


class _Linear:
    """A two-stage generator (``z -> h -> x``) for the feature search."""

    latent = 2

    def __init__(self):
        self.w1 = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, -0.5]])

    def stages(self):
        return [lambda z: z @ self.w1, lambda h: torch.sigmoid(h).view(-1, 1, 3)]

    def __call__(self, z):
        return self.stages()[1](self.stages()[0](z))


def test_gifd_keeps_the_feature_search_inside_its_ball_and_never_worse():
    layer = torch.nn.Linear(3, 2)
    x = torch.tensor([[[0.9, 0.1, 0.8]]])
    y = torch.tensor([1])

    def gradient_of(candidate, label):
        loss = torch.nn.functional.cross_entropy(layer(candidate.view(-1, 3)), label)
        params = list(layer.parameters())
        return list(torch.autograd.grad(loss, params, create_graph=True))

    target = [g.detach() for g in gradient_of(x, y)]
    found = gifd(gradient_of, target, _Linear(), [[1]], steps=30, radii=(0.5,))
    assert found["gifd"][2] <= found["latent"][2]
    with pytest.raises(ValueError, match="radii"):
        gifd(gradient_of, target, _Linear(), [[1]], steps=1, radii=(0.5, 1.0))
