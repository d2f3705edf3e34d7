"""Trainers for biological language models. Importing this package imports no torch."""
