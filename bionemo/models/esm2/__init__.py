from bionemo.models.esm2.model import ESM2

__all__ = ["ESM2"]
