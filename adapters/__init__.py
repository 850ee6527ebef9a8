"""Modules that join an encoder to the frozen LM (later stages)."""
