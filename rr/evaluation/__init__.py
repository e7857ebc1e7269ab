"""Shared metrics and the step report."""
