"""The credential broker: short-lived, read-only AWS credentials into customers' accounts."""

__version__ = "0.1.0"
