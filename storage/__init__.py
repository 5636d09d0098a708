"""Where wf's data lives and in what format: store layout, Parquet schemas, atomic writes,
manifests and fingerprints. Imports nothing of ours, and neither Ray nor TensorFlow."""
