"""Routing statistics, plots and reports."""
