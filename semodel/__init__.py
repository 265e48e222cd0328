"""semodel: train, evaluate and serve Squeeze-and-Excitation image classifiers.

The Python API (``semodel.fit``, ``semodel.evaluate_model``, ``semodel.predict_files``,
``semodel.build_model``, ``semodel.load_config``) is imported on first use, so that
``import semodel`` and the CLI start without loading torch.
"""

from semodel._version import __version__

API = ("build_model", "evaluate_model", "fit", "load_config", "predict_files")
__all__ = ["__version__", *API]


def __getattr__(name: str):
    if name in API:
        from semodel import api

        return getattr(api, name)
    raise AttributeError(f"module 'semodel' has no attribute {name!r}")
