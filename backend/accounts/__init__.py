"""Accounts: users, browser sessions, API tokens and sign-in (routes, views, services, schemas)."""
