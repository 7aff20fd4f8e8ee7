"""Business logic, one module per resource; routes and the CLI call these, never the reverse."""
