"""Samples, synthetic vessels, collation and the Lightning DataModule."""
