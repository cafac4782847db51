"""varkit's built-in plugins: ordinary packages registered through the `varkit` entry points."""
