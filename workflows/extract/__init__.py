"""``wf extract``: list datasets, plan shards against the store, run one Ray task per shard."""
