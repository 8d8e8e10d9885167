"""Built-in search spaces and known layers (imported by the registries on first lookup)."""
from opsearch.search_spaces import activation, evonorm, known_layers  # noqa: F401  (they register)
