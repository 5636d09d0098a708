"""The one exception family for user mistakes.

The CLI turns a :class:`WfError` into a one-line message and a non-zero exit code; everything
else is a bug and keeps its traceback.
"""


class WfError(Exception):
    """A mistake the user can fix: a bad path, an unknown backbone, an empty class."""


class DatasetError(WfError):
    """A dataset folder that cannot be used as it is."""


class StoreError(WfError):
    """A feature store that is missing, unreadable or inconsistent."""


class SettingsError(WfError):
    """An option or config file value that is out of range or unknown."""


class WeightsError(WfError):
    """Backbone weights that cannot be found, fetched or trusted."""


class ClusterError(WfError):
    """A Ray cluster that cannot be reached or joined."""
