"""Prefect tasks: one thin wrapper per pipeline node."""
