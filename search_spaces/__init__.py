"""Built-in plugins (imported by the registries on first lookup)."""
