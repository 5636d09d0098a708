"""``wf train-all``: plan jobs, cross-validate, train on the engine, write the report."""
