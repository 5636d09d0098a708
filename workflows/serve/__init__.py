"""``wf predict``, ``wf evaluate``, ``wf export`` and ``wf serve``: use a trained model."""
