"""The package version, for the model card and `dppa_ui.__version__`."""

__version__ = "0.1.0"
