"""Generated documentation: the README's algorithm table, from the declarations.

``python -m bouquet.simulations.docs`` rewrites the block between the
``algorithm-table`` markers of README.md; a test fails when it is stale.
"""

from __future__ import annotations

import re
from pathlib import Path

from bouquet.strategies.registry import get_algorithm, list_algorithms

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(
    r"(<!-- algorithm-table:start -->\n).*?(<!-- algorithm-table:end -->)", re.S
)


def algorithm_table() -> str:
    """Markdown table of every registered algorithm."""
    lines = [
        "| name | class | family | what it does | client recipe "
        "| hyperparameters (defaults) | paper |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in list_algorithms():
        cls = get_algorithm(name)
        params = ", ".join(f"`{p.key}={p.describe()}`" for p in cls.params)
        lines.append(
            f"| `{name}` | `{cls.__name__}` | {cls.family} | {cls.tagline} | "
            f"`{cls.routine}` | "
            f"{params or '-'} | {cls.paper} |"
        )
    return "\n".join(lines) + "\n"


def render_readme(text: str) -> str:
    """``text`` with its algorithm-table block regenerated."""
    if not _BLOCK.search(text):
        raise ValueError("README.md has no algorithm-table markers.")
    return _BLOCK.sub(lambda m: m.group(1) + algorithm_table() + m.group(2), text)


def main() -> None:
    """Rewrite README.md in place."""
    README.write_text(render_readme(README.read_text()))
    print(f"Updated the algorithm table in {README}")


if __name__ == "__main__":
    main()
