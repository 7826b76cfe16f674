"""DIFF2's client on a tiny model, against per-example references."""

import numpy as np
import torch
from flwr.app import RecordDict

from bouquet.clientapps import per_example
from bouquet.clientapps.loop import TrainSettings, train_local
from bouquet.clientapps.recipes import diff2
from bouquet.strategies.aggregation import to_record

GEN = torch.Generator().manual_seed(0)
X = torch.randn(7, 3, generator=GEN)
Y = torch.tensor([0, 1, 1, 0, 1, 0, 1])


def _model(seed=4):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    )


def _per_example(model):
    out = []
    for i in range(len(X)):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X[i : i + 1]), Y[i : i + 1])
        loss.backward()
        out.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(out)


def _clipped_mean(grads, clip):
    norms = grads.norm(dim=1, keepdim=True)
    return (grads * torch.clamp(clip / norms, max=1.0)).sum(0) / len(grads)


def _run(model, config, incoming=None):
    result = train_local(
        model,
        (X, Y),
        TrainSettings(batch_size=3),
        diff2.make_hooks(config),
        generator=torch.Generator().manual_seed(1),
        config=config,
        incoming=incoming or RecordDict(),
    )
    reply = result.run.reply_records["arrays"]
    assert result.steps == 0
    return torch.cat(
        [
            torch.as_tensor(reply[n].numpy()).flatten()
            for n, _ in model.named_parameters()
        ]
    )


def _config(restart, clip, noise):
    return {
        "diff2.restart": restart,
        "diff2.clip": clip,
        "diff2.noise-multiplier": noise,
    }


def test_restart_is_the_clipped_mean_of_per_example_gradients():
    model = _model()
    expected = _clipped_mean(_per_example(_model()), 0.3)
    got = _run(model, _config(True, 0.3, 0.0))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    # A huge clip: the plain full-batch gradient (DP-GD at sigma=0 is GD).
    full = _per_example(_model()).mean(0)
    torch.testing.assert_close(_run(_model(), _config(True, 1e6, 0.0)), full)


def test_difference_round_clips_to_c2_times_the_step():
    now, before = _model(4), _model(5)
    step = torch.cat(
        [
            (a - b).detach().flatten()
            for a, b in zip(now.parameters(), before.parameters(), strict=True)
        ]
    ).norm()
    arrays = {k: v.numpy() for k, v in before.state_dict().items()}
    incoming = RecordDict({"diff2.previous": to_record(arrays)})
    differences = _per_example(_model(4)) - _per_example(_model(5))
    expected = _clipped_mean(differences, 0.2 * float(step))
    got = _run(now, _config(False, 0.2, 0.0), incoming)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_noise_scale_is_sigma_c_over_n():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2000)  # many coordinates: an empirical stdev
    clean = _run(model, _config(True, 0.5, 0.0))
    noisy = _run(model, _config(True, 0.5, 3.0))
    stdev = float((noisy - clean).std())
    assert abs(stdev - 3.0 * 0.5 / len(X)) < 0.03 * 3.0 * 0.5 / len(X)


def test_factored_layers_equal_vmap_with_batchnorm_and_conv():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3, padding=1),
        torch.nn.BatchNorm2d(3),
        torch.nn.Flatten(),
        torch.nn.Linear(48, 2),
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    x, y = torch.randn(5, 1, 4, 4), torch.tensor([0, 1, 1, 0, 1])

    class Run:
        pass

    run = Run()
    run.model = model
    run.loss_fn = lambda logits, t, _: torch.nn.functional.cross_entropy(logits, t)
    now = {k: v.detach() for k, v in model.named_parameters()}
    before = {k: v + 0.1 * torch.randn(v.shape) for k, v in now.items()}
    buffers = dict(model.named_buffers())

    def loss(p, xi, yi):
        logits = per_example.functional_call(model, (p, buffers), (xi[None],))
        return run.loss_fn(logits, yi[None], run)

    def vmapped(params):
        return per_example.vmap(per_example.grad(loss), in_dims=(None, 0, 0))(
            params, x, y
        )

    assert per_example.layered(model)
    g_now, g_before = vmapped(now), vmapped(before)
    fast_now = per_example._layer_terms(run, now, x, y)
    fast_before = per_example._layer_terms(run, before, x, y)
    # Each example's gradient, and the clipped sums of gradients and differences.
    ones = torch.eye(5)
    for key in now:
        rows = torch.stack([per_example.weighted(fast_now[key], e) for e in ones])
        np.testing.assert_allclose(rows.numpy(), g_now[key].numpy(), atol=1e-6)
    for clip in (0.05, 1e6):
        dense = {k: ("dense", g, None, g.shape[1:]) for k, g in g_now.items()}
        dense_before = {k: ("dense", g, None, g.shape[1:]) for k, g in g_before.items()}
        for a, b, c, d in (
            (fast_now, None, dense, None),
            (fast_now, fast_before, dense, dense_before),
        ):
            got, expected = (
                per_example.clipped_sum(a, b, clip),
                per_example.clipped_sum(c, d, clip),
            )
            for key in now:
                np.testing.assert_allclose(
                    got[key].numpy(), expected[key].numpy(), atol=1e-6
                )
