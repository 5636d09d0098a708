"""Training one (dataset, method) job on Ray Train workers: named weights, the input pipelines,
epoch callbacks, the worker loop and the job runner."""
