"""Launchers: render, submit and manage training jobs on SLURM clusters (including the bundled local one)."""
