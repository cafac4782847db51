"""Built-in plugins of this kind."""
