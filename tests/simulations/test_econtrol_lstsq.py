"""The EControl least-squares script: the batched run follows the recipe run."""

import numpy as np
import pytest

from bouquet.simulations.econtrol_lstsq import make_problem, run, run_batched


@pytest.mark.parametrize(
    ("method", "eta"), [("sgd", 0.0), ("ef14", 0.0), ("econtrol", 0.1)]
)
def test_the_full_batch_batched_run_follows_the_recipe_run(method, eta):
    problem = make_problem(3, 6, 8, zeta=2.0, seed=0)
    lr = 0.3 / problem.smoothness
    report = (1, 2, 4)
    real = run(problem, method, eta, 1, lr, 6, 6, 0, report)
    batched = run_batched(problem, method, eta, 1, lr, 6, 6, 0, report)
    assert set(batched) == set(real)
    for t in real:  # the recipe's model is float32
        np.testing.assert_allclose(batched[t], real[t], rtol=1e-4)
