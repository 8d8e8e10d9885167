"""Built-in search algorithms (imported by `registry.algorithms` on first lookup).

regularized_evolution, pareto_evolution, nsga2, random, and pyglove:<name> adapters; the
interface is opsearch.algorithm.Algorithm, the graph-aware mutation is in mutation.py.
"""
from opsearch.plugins.algorithms import (  # noqa: F401  (imported for registration)
    nsga2,
    pareto_evolution,
    pyglove_adapter,
    random_search,
    regularized_evolution,
)
