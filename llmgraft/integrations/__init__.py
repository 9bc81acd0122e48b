"""Adapters that carry llmgraft plugins into host frameworks. No algorithm lives here."""
