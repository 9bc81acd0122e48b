"""Built-in method plugins: one module per method, each a pluggy plugin with ``@hookimpl`` functions."""
