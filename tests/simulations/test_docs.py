from bouquet.simulations.docs import README, render_readme


def test_readme_algorithm_table_is_current():
    text = README.read_text()
    assert render_readme(text) == text, "Run `python -m bouquet.simulations.docs`."
