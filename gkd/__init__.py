"""gkd: Generalized Knowledge Distillation (arXiv 2306.13649) in JAX/Flax."""

__version__ = "0.1.0"
