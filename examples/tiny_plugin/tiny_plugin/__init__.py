"""An example model plugin for bionemo-hpc (see bionemo/models/__init__.py for the interface)."""
