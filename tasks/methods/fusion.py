"""Multi-backbone fusion: one linear top on the bottleneck features of every backbone stored
for the dataset, concatenated.

``wf extract --backbone efficientnet_lite0`` (then ``_lite1``, ``_lite2``) into one store gives
each image several views; their pooled features side by side, Dropout 0.5 and a softmax (or a
sigmoid for two classes), trained with Adam 1e-3 for 30 epochs, transfer better than any one
alone. Rows are matched across the stores by image path and copy. The saved model takes one
image (RGB in [0, 255], the largest backbone's size), resizes it inside for each backbone, runs
them all and applies the top. With an ONNX backbone among them, the saved model is one ONNX
graph of them all and the top (``model.onnx``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from storage.errors import SettingsError
from tasks.backbones import ResolvedWeights, is_onnx_store, store_backbone
from tasks.backbones.onnx_backbone import (
    IMAGE_INPUT as IMAGE_NAME,
)
from tasks.backbones.onnx_backbone import (
    OnnxModel,
    classifier_graph,
    fusion_graph,
    graph_opset,
)
from tasks.heads import output_layer
from tasks.methods.base import JobContext, Method, Recipe, pretrained_base, stack_tap
from tasks.training.weights import set_named_weights

DROPOUT = 0.5
TF2ONNX_MAX_OPSET = 18


class Fusion(Method):
    name = "fusion"
    output_name = "fusion_output"
    embedding_layer = "fusion_dropout"
    summary = "a linear top on the bottleneck taps of every stored backbone, side by side"
    recipe = Recipe(epochs=30, optimizer="adam", learning_rate=1e-3)
    taps = ("bottleneck",)
    all_backbones = True

    def features(self, context: JobContext, tables: list[pa.Table]) -> np.ndarray:
        return np.concatenate(
            [
                stack_tap(table["tap_bottleneck"], store.taps["bottleneck"])
                for store, table in zip(context.stores, tables, strict=True)
            ],
            axis=1,
        )

    def build_on_rows(
        self, keras_module: Any, feature_shape: tuple[int, ...], num_classes: int
    ) -> Any:
        inputs = keras_module.Input((int(np.prod(feature_shape)),), name="fused")
        x = keras_module.layers.Dropout(DROPOUT, name="fusion_dropout")(inputs)
        outputs = output_layer(keras_module, num_classes, "fusion_output")(x)
        return keras_module.Model(inputs, outputs, name="fusion_top")

    def build_trainable(self, keras_module: Any, context: JobContext) -> Any:
        width = sum(int(np.prod(store.taps["bottleneck"])) for store in context.stores)
        return self.build_on_rows(keras_module, (width,), len(context.classes))

    def complete_model(
        self, context: JobContext, trained: dict[str, list[np.ndarray]],
        weights: dict[str, ResolvedWeights],
    ) -> Any:  # fmt: skip
        import keras

        if any(is_onnx_store(store.weights_source) for store in context.stores):
            return self._onnx_model(context, trained, weights)
        side = max(max(store.input_size) for store in context.stores)
        image = keras.Input((side, side, 3), name="image")
        pooled = []
        for store in context.stores:
            base = pretrained_base(store, weights)
            base = keras.Model(base.input, base.output["bottleneck"], name=store.backbone)
            resized = keras.layers.Resizing(*store.input_size, name=f"resize_{store.backbone}")(
                image
            )
            pooled.append(keras.layers.Flatten(name=f"flat_{store.backbone}")(base(resized)))
        fused = keras.layers.Concatenate(name="fuse")(pooled) if len(pooled) > 1 else pooled[0]
        top = self.build_trainable(keras, context)
        set_named_weights(top, trained)
        return keras.Model(image, top(fused), name=context.run_name)

    def _onnx_model(
        self, context: JobContext, trained: dict[str, list[np.ndarray]],
        weights: dict[str, ResolvedWeights],
    ) -> Any:  # fmt: skip
        """The saved model when a store is an ONNX backbone's: one ONNX graph (``model.onnx``)
        of the built-in bases (exported from Keras, resizing inside as in ``model.keras``), the
        ONNX backbones' feature graphs on the image resized for each, and the top."""
        import keras

        from tasks.converters import to_onnx

        side = max(max(store.input_size) for store in context.stores)
        image = keras.Input((side, side, 3), name="image")
        outputs, names, parts = [], [], {}
        for index, store in enumerate(context.stores):
            # tf2onnx exports Keras's Resizing wrongly (even to the same size: checked below),
            # so the image goes as it is wherever a backbone takes the model's own size.
            same = tuple(store.input_size) == (side, side)
            resized = image if same else keras.layers.Resizing(
                *store.input_size, name=f"resize_{store.backbone}")(image)  # fmt: skip
            if is_onnx_store(store.weights_source):
                parts[index] = store_backbone(store.backbone, store.weights_source).graph
                if not same:
                    outputs.append(resized)
                names.append(IMAGE_NAME if same else f"wf_image_{index}")
                continue
            base = pretrained_base(store, weights)
            base = keras.Model(base.input, base.output["bottleneck"], name=store.backbone)
            outputs.append(keras.layers.Flatten(name=f"flat_{store.backbone}")(base(resized)))
            names.append(f"wf_features_{index}")
        # tf2onnx 1.17 writes opsets up to 18; fusion_graph converts its part up where needed.
        opset = min(TF2ONNX_MAX_OPSET, max(graph_opset(graph) for graph in parts.values()))
        top = self.build_trainable(keras, context)
        set_named_weights(top, trained)
        if not outputs:  # every backbone is an ONNX model
            graph = fusion_graph(None, parts, names, side)
            return OnnxModel(classifier_graph(graph, top, self.embedding_layer))
        bases = keras.Model(image, outputs, name="fusion_bases")
        builtin = to_onnx(bases, tuple(n for n in names if n != IMAGE_NAME), opset)
        pixels = np.random.default_rng(0).uniform(0, 255, (2, side, side, 3)).astype(np.float32)
        expected = bases.predict_on_batch(pixels)
        found = OnnxModel(builtin, outputs=tuple(n for n in names if n != IMAGE_NAME))
        found = found.predict_on_batch(pixels)
        pairs = zip(expected if isinstance(expected, list) else [expected],
                    found if isinstance(found, tuple) else [found], strict=True)  # fmt: skip
        difference = max(float(np.abs(np.asarray(k) - o).max()) for k, o in pairs)
        if difference > 1e-3:
            raise SettingsError(
                f"fusion with an ONNX backbone: the built-in bases' ONNX export differs from "
                f"Keras by {difference:.2g} (tf2onnx's Resize); extract every backbone at the "
                "same input size"
            )
        graph = fusion_graph(builtin, parts, names)
        return OnnxModel(classifier_graph(graph, top, self.embedding_layer))
