"""The ``wf`` CLI and the pipelines it runs; each pipeline is a plain function."""

__version__ = "0.1.0"
