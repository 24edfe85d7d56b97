"""u2zoo: a U²-Net model zoo and deployment-conversion toolchain."""

__version__ = "0.1.0"
