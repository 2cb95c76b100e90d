"""Held-out evaluation suites: tasks no preset meta-trains on, tuned baselines, reports."""
