"""Experiments built from the launcher's stages: many sub-runs, one command, one report."""
