"""Scoring a learned optimizer: loss curves against tuned Adam, speedups, plots."""
