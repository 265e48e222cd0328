"""semodel: train, evaluate and serve Squeeze-and-Excitation image classifiers."""

from semodel._version import __version__

__all__ = ["__version__"]
