"""stepd: a durable workflow executor daemon."""

__version__ = "0.1.0"
