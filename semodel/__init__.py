"""semodel: train, evaluate and serve Squeeze-and-Excitation image classifiers."""

__version__ = "0.1.0"
