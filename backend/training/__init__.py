"""Training tasks: routes, pages, the service and its schemas."""
