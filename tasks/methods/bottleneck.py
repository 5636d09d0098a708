"""The blog's second method: a small dense top on bottleneck features.

Run the pretrained base once over every image (``wf extract`` stored its ``bottleneck`` tap,
for the original and each augmented copy), then train Flatten, Dense 256 relu, Dropout 0.5 and
a sigmoid (two classes) or softmax on those features: RMSprop 1e-3, batch 16, 50 epochs. The
saved model is the base with the trained top on it (``model.keras``; for an ONNX backbone,
``model.onnx``: one graph of the user's model and the top).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from tasks.backbones import ResolvedWeights, is_onnx_store, store_backbone
from tasks.backbones.onnx_backbone import OnnxModel, classifier_graph
from tasks.heads import build_top
from tasks.methods.base import JobContext, Method, Recipe, pretrained_base, stack_tap
from tasks.training.weights import set_named_weights


class Bottleneck(Method):
    name = "bottleneck"
    output_name = "top_output"
    embedding_layer = "top_dense"
    summary = "a dense top on the stored bottleneck tap (the blog's ~0.90 with VGG16)"
    recipe = Recipe()
    taps = ("bottleneck",)

    def features(self, context: JobContext, tables: list[pa.Table]) -> np.ndarray:
        return stack_tap(tables[0]["tap_bottleneck"], context.store.taps["bottleneck"])

    def build_on_rows(
        self, keras_module: Any, feature_shape: tuple[int, ...], num_classes: int
    ) -> Any:
        return build_top(keras_module, feature_shape, num_classes)

    def build_trainable(self, keras_module: Any, context: JobContext) -> Any:
        return self.build_on_rows(keras_module, context.store.taps["bottleneck"],
                                  len(context.classes))  # fmt: skip

    def complete_model(
        self, context: JobContext, trained: dict[str, list[np.ndarray]],
        weights: dict[str, ResolvedWeights],
    ) -> Any:  # fmt: skip
        import keras

        top = self.build_trainable(keras, context)
        set_named_weights(top, trained)
        if is_onnx_store(context.store.weights_source):  # no Keras base: one ONNX graph of both
            backbone = store_backbone(context.store.backbone, context.store.weights_source)
            return OnnxModel(classifier_graph(backbone.graph, top, self.embedding_layer))
        base = pretrained_base(context.store, weights)
        return keras.Model(base.input, top(base.output["bottleneck"]), name=context.run_name)
