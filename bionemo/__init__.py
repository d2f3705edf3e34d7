"""Trainers for biological language models. Importing this package imports no torch."""

# bionemo-scdl installs into a `bionemo` namespace package (bionemo.scdl); extend our path so that
# it stays importable next to this project's own `bionemo`.
__path__ = __import__("pkgutil").extend_path(__path__, __name__)
