"""The blog's first method: a small convnet trained from scratch with real-time augmentation.

Three conv/relu/maxpool blocks (32, 32, 64 filters), Dense 64, Dropout 0.5 and a sigmoid or
softmax, on the images themselves at 150 px (read from the dataset by the paths the store
holds, original copies only), each batch freshly augmented with the blog's policy: RMSprop
1e-3, batch 16, 50 epochs. The saved model is the convnet.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from storage.filesystem import Location
from storage.names import unescape_name
from tasks.backbones import ResolvedWeights
from tasks.heads import SCRATCH_IMAGE_SIZE, build_scratch
from tasks.images import ImageRejected, load_image
from tasks.methods.base import JobContext, Method, MethodOption, Recipe
from tasks.training.weights import set_named_weights


class Scratch(Method):
    name = "scratch"
    output_name = "scratch_output"
    embedding_layer = "scratch_dense"
    summary = "the small convnet on the images, augmented live (the blog's ~0.80)"
    recipe = Recipe()
    options = (MethodOption("scratch_image_size", "Input size of the small convnet (the blog's: "
                            f"{SCRATCH_IMAGE_SIZE})", minimum=32),)  # fmt: skip
    augments_live = True

    def features(self, context: JobContext, tables: list[pa.Table]) -> np.ndarray:
        size = (context.options.scratch_image_size,) * 2
        images = Location.at(context.dataset_root)
        out = np.zeros((tables[0].num_rows, *size, 3), np.uint8)
        for index, relative in enumerate(tables[0]["path"].to_pylist()):
            path = images.path(unescape_name(relative))
            try:
                out[index] = load_image(images.filesystem, path, size)
            except ImageRejected as rejected:
                raise RuntimeError(
                    f"{relative} was usable at extraction and is not now: {rejected}"
                ) from None
        return out

    def build_trainable(self, keras_module: Any, context: JobContext) -> Any:
        size = context.options.scratch_image_size
        return build_scratch(keras_module, size, len(context.classes))

    def complete_model(
        self, context: JobContext, trained: dict[str, list[np.ndarray]],
        weights: dict[str, ResolvedWeights],
    ) -> Any:  # fmt: skip
        import keras

        model = self.build_trainable(keras, context)
        set_named_weights(model, trained)
        return model
