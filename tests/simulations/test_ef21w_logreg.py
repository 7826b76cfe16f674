"""The EF21 / EF21-W comparison script on a tiny problem: constants, descent, batched."""

import numpy as np

from bouquet.clientapps.recipes.ef21 import logistic_smoothness
from bouquet.simulations.ef21w_logreg import make_problem, run, run_batched


def test_constants_and_descending_runs():
    problem = make_problem(3, 12, 4, 1, spread=10.0, seed=1)
    # The stepsizes' 2-class softmax bound is twice the clients' logistic one.
    for (x, _), s in zip(problem.data, problem.smoothness, strict=True):
        np.testing.assert_allclose(s, 2 * logistic_smoothness(x), rtol=1e-5)
    assert problem.gamma_am > problem.gamma_qm  # L_AM <= L_QM
    for weighted, gamma in [(False, problem.gamma_qm), (True, problem.gamma_am)]:
        curve = run(problem, weighted, 5 * gamma, rounds=10, seed=0)
        assert set(curve) == {0, 10} and curve[10] < curve[0]


def test_the_batched_run_follows_the_recipe_run():
    problem = make_problem(3, 12, 4, 2, spread=10.0, seed=1)
    report = (1, 2, 5)
    for weighted in (False, True):
        gamma = 5 * problem.gamma_am
        real = run(problem, weighted, gamma, rounds=8, seed=0, report=report)
        batched = run_batched(problem, weighted, gamma, 8, seed=0, report=report)
        assert set(batched) == set(real)
        for t in real:  # the recipe's model and step are float32
            np.testing.assert_allclose(batched[t], real[t], rtol=1e-5)
