"""metaopt: adapt the learning process itself, on Ray, tracked in MLflow."""

__version__ = "0.1.0"
