from bionemo.models.geneformer.model import Geneformer

__all__ = ["Geneformer"]
