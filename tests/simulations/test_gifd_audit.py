"""The gradient-inversion audit on a one-example linear model (closed form)."""

import numpy as np
import torch

from bouquet.simulations.gifd_audit import (
    closed_form_input,
    cosine_distance,
    invert,
    label_from_bias,
    scores,
)


def _linear_case():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 4)
    x = torch.rand(1, 16)
    y = torch.tensor([2])
    loss = torch.nn.functional.cross_entropy(layer(x), y)
    gw, gb = torch.autograd.grad(loss, [layer.weight, layer.bias])
    return layer, x, y, gw, gb


def test_closed_form_recovers_the_input_and_idlg_the_label():
    _, x, y, gw, gb = _linear_case()
    np.testing.assert_allclose(closed_form_input(gw.numpy(), gb.numpy()), x[0], 1e-5)
    assert label_from_bias(gb.numpy()) == int(y)


def test_inverting_gradients_matches_on_a_linear_model():
    layer, x, _, gw, gb = _linear_case()

    def gradient_of(candidate, label):
        loss = torch.nn.functional.cross_entropy(layer(candidate.view(1, 16)), label)
        return list(
            torch.autograd.grad(loss, [layer.weight, layer.bias], create_graph=True)
        )

    x_hat, label, loss = invert(
        gradient_of, [gw, gb], (4, 4), [0, 2], steps=80, tv=0.0, seed=1
    )
    assert label == 2 and loss < 1e-3
    assert scores(x_hat.numpy(), x.view(4, 4).numpy())["psnr"] > 25
    assert float(cosine_distance([gw, gb], [gw, gb])) < 1e-6


def test_scores_of_a_perfect_and_a_flat_reconstruction():
    image = np.linspace(0, 1, 64).reshape(8, 8)
    assert scores(image, image)["ssim"] > 0.999
    flat = scores(np.full((8, 8), 0.5), image)
    assert np.isclose(flat["mse"], np.mean((image - 0.5) ** 2))
    assert np.isclose(flat["psnr"], 10 * np.log10(1 / flat["mse"]))
