"""Units of work that run inside Ray workers: decoding, augmentation, backbones, extraction.

Each is a plain function first; the ``ray.remote`` wrappers are thin."""
