"""nnopt: a declarative runner for neural-network optimization pipelines."""

__version__ = "0.1.0"

__all__ = ["__version__"]
