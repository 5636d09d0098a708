"""``wf audit``: duplicates, leaks, outliers and label issues from a store's embeddings."""
