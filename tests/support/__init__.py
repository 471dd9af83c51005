"""Helpers the test suites share (real components started for a test)."""
