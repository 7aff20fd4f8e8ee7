"""What belongs to no single domain: templating, the dashboard, the API docs page."""
