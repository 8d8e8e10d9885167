"""Built-in rejection filters, cheapest first: validity, numerics, equivalence, stability, quality.

Importing this package registers them in `opsearch.registry.rejection_filters` (the registry
imports it on first lookup). The interface and the pipeline are in `opsearch.rejection`.
"""
from opsearch.plugins.rejection import equivalence, numerics, quality, stability, validity  # noqa: F401
