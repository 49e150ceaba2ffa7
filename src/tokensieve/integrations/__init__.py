"""Integrations of tokensieve with other tools (each imports its tool lazily, only when used)."""
