"""The one exception family for what a user can act on.

The CLI turns a :class:`WfError` into a one-line message and its exit code (2 for bad input or
settings, 1 for a run that failed); anything else is a bug, printed as one line too, with its
traceback only under ``--debug``.
"""


class WfError(Exception):
    """A mistake the user can fix: a bad path, an unknown backbone, an empty class."""

    exit_code = 2


class DatasetError(WfError):
    """A dataset folder that cannot be used as it is."""


class StoreError(WfError):
    """A feature store or runs folder that is missing, unreadable or inconsistent."""


class StoreBusyError(StoreError):
    """Another live run holds the lease of a store this run would write."""


class SettingsError(WfError):
    """An option or config file value that is out of range or unknown."""


class WeightsError(WfError):
    """Backbone weights that cannot be found, fetched or trusted."""


class ClusterError(WfError):
    """A Ray cluster that cannot be reached or joined."""


class RunFailed(WfError):
    """The run went ahead and part of it failed (a shard, a job); the rest was kept."""

    exit_code = 1
