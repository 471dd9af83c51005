"""Helpers shared by test modules (real components started for a test; no test module
imports another test module)."""
