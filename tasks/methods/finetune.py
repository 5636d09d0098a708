"""The blog's third method: fine-tune the base's last block together with the trained top.

Start from the pretrained last block (Lite0: block 15 and the head; VGG16: block 5) and the
``bottleneck`` job's trained top, and train both slowly: SGD 1e-4, momentum 0.9, batch 16,
with BatchNorm in inference mode. The block reads the stored ``last_block_input`` tap, so the
frozen layers never run again. The saved model is the frozen base up to the last block's
input, then the trained block and top: the model that was trained, on images.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from storage.runs import Artifact
from tasks.backbones import ResolvedWeights, get_backbone
from tasks.heads import build_top
from tasks.methods.base import JobContext, Method, Recipe, pretrained_base, stack_tap
from tasks.training.weights import named_weights, set_named_weights


class Finetune(Method):
    name = "finetune"
    output_name = "top_output"
    embedding_layer = "top_dense"
    summary = "the last block and the top, from the bottleneck top, slowly (the blog's ~0.94)"
    recipe = Recipe(optimizer="sgd", learning_rate=1e-4, momentum=0.9)
    taps = ("last_block_input",)
    depends_on = "bottleneck"

    def features(self, context: JobContext, tables: list[pa.Table]) -> np.ndarray:
        return stack_tap(tables[0]["tap_last_block_input"], context.store.taps["last_block_input"])

    def build_trainable(self, keras_module: Any, context: JobContext) -> Any:
        backbone = get_backbone(context.store.backbone)
        tail = backbone.build_tail(keras_module, context.store.taps["last_block_input"])
        for layer in tail.layers:  # BatchNorm in inference mode, its statistics frozen
            if isinstance(layer, keras_module.layers.BatchNormalization):
                layer.trainable = False
        features = tuple(int(d) for d in tail.output.shape[1:])
        top = build_top(keras_module, features, len(context.classes))
        return keras_module.Model(tail.input, top(tail.output), name="finetune")

    def initial_weights(
        self, context: JobContext, weights: dict[str, ResolvedWeights]
    ) -> dict[str, list[np.ndarray]]:
        import keras

        base = pretrained_base(context.store, weights)
        start = self.build_trainable(keras, context)
        set_named_weights(start, named_weights(base))  # the pretrained last block
        top = context.runs.job(context.dataset, self.depends_on).read_weights(
            Artifact.TRAINED_WEIGHTS
        )
        return {**named_weights(start), **top}

    def complete_model(
        self, context: JobContext, trained: dict[str, list[np.ndarray]],
        weights: dict[str, ResolvedWeights],
    ) -> Any:  # fmt: skip
        """The frozen base up to the last block's input, then the trained model itself (the
        fine-tuned block and the top), so the saved model is the one that was trained, on the
        base's own ``last_block_input``. The base is shared and never changed: its own last
        block is not on this model's path."""
        import keras

        base = pretrained_base(context.store, weights)
        trainable = self.build_trainable(keras, context)
        if set_named_weights(trainable, trained) != len(named_weights(trainable)):
            raise RuntimeError("the trained weights do not cover the fine-tuned block and top")
        return keras.Model(
            base.input, trainable(base.output["last_block_input"]), name=context.run_name
        )
