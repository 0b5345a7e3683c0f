"""lmstack: a declarative experiment framework for the full LLM stack."""

__version__ = "0.1.0"
