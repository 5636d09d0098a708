"""The backbone registry, the Lite0 conversion and the LiteRT runtime, on real weights."""

from pathlib import Path

import numpy as np
import pytest

from storage.errors import SettingsError, WeightsError
from tasks.backbones import BACKBONES, Backbone, get_backbone
from tasks.backbones.runtime import FeatureExtractor, prepare_backbone
from tasks.images import decode_image

# ImageNet class indices: 151-268 are dog breeds, 281-285 domestic cats.
DOGS, CATS = range(151, 269), range(281, 286)


def _photos(folder: Path, count: int) -> np.ndarray:
    files = sorted(folder.iterdir())[:count]
    return np.stack([decode_image(f.read_bytes(), (224, 224)) for f in files])


@pytest.mark.slow
@pytest.mark.shared_data
@pytest.mark.parametrize(
    "name, least_cats",
    # Measured here at 224 px (20 each): Lite0 14 cats (others: schipperke, towel, ...) and
    # 18 dogs; Lite1 18 and 20; Lite2 15 and 20. Chance is below 1%.
    [("efficientnet_lite0", 12), ("efficientnet_lite1", 15), ("efficientnet_lite2", 13)],
)
def test_lite_conversion_predicts_imagenet_cats_and_dogs(shared_datasets, name, least_cats):
    backbone = get_backbone(name)
    model = backbone.build((224, 224), backbone.resolve_weights("imagenet"), include_top=True)
    validation = shared_datasets / "cats_vs_dogs" / "validation"
    cats = model.predict(_photos(validation / "cats", 20).astype("float32"), verbose=0)
    dogs = model.predict(_photos(validation / "dogs", 20).astype("float32"), verbose=0)
    cat_hits = sum(int(p) in CATS for p in cats["predictions"].argmax(1))
    dog_hits = sum(int(p) in DOGS for p in dogs["predictions"].argmax(1))
    assert cat_hits >= least_cats and dog_hits >= 16, (cat_hits, dog_hits)


@pytest.mark.slow
def test_litert_runtime_matches_keras(cache_dir):
    backbone = get_backbone("efficientnet_lite0")
    weights = backbone.resolve_weights("imagenet")
    taps = ("bottleneck", "last_block_input")
    images = np.random.default_rng(0).integers(0, 255, (3, 96, 96, 3), dtype=np.uint8)
    outputs = {}
    for runtime in ("litert", "keras"):
        prepared = prepare_backbone(backbone, weights, (96, 96), taps, runtime, cache_dir)
        assert prepared.taps == {"bottleneck": (1280,), "last_block_input": (3, 3, 192)}
        outputs[runtime] = FeatureExtractor(prepared)(images)
    for tap in taps:
        scale = np.abs(outputs["keras"][tap]).max()
        assert np.abs(outputs["litert"][tap] - outputs["keras"][tap]).max() <= 1e-4 * max(scale, 1)


def test_vgg16_preprocessing_is_keras_caffe_mode():
    import keras

    backbone = get_backbone("vgg16")
    model = backbone.build((32, 32), backbone.resolve_weights("none"))
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    ours = keras.Model(model.input, model.get_layer("preprocess").output).predict(pixels, verbose=0)
    expected = keras.applications.vgg16.preprocess_input(pixels.copy())
    np.testing.assert_allclose(ours, expected, atol=1e-4)
    assert model.output["last_block_input"].shape[1:] == (2, 2, 512)


def test_vgg16_loads_a_local_weights_file(tmp_path):
    import keras

    plain = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "vgg16_notop.weights.h5"
    plain.save_weights(path)
    backbone = get_backbone("vgg16")
    weights = backbone.resolve_weights(str(path))
    assert len(weights.sha256) == 64
    model = backbone.build((32, 32), weights)
    np.testing.assert_array_equal(
        model.get_layer("block5_conv3").get_weights()[0],
        plain.get_layer("block5_conv3").get_weights()[0],
    )


def test_vgg16_imagenet_offline_names_the_alternatives():
    backbone = get_backbone("vgg16")
    try:
        weights = backbone.resolve_weights("imagenet")
    except WeightsError as error:  # offline, as here
        assert "efficientnet_lite0" in str(error) and "--weights" in str(error)
    else:  # online: Keras's cache holds the real file
        assert weights.path and len(weights.sha256) == 64


def test_user_mistakes_are_clear_errors(tmp_path):
    with pytest.raises(SettingsError, match="unknown backbone"):
        get_backbone("resnet9000")
    with pytest.raises(WeightsError, match="existing file"):
        get_backbone("vgg16").resolve_weights(str(tmp_path / "missing.h5"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a pickle")
    lite0 = get_backbone("efficientnet_lite0")
    with pytest.raises(WeightsError, match=r"legacy \.pth"):
        lite0.build((32, 32), lite0.resolve_weights(str(bad)))
    with pytest.raises(SettingsError, match="no tap"):
        prepare_backbone(
            lite0, lite0.resolve_weights("none"), (32, 32), ("pooled",), "litert", str(tmp_path)
        )


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_tail_turns_the_last_block_input_into_the_bottleneck(name):
    """What `finetune` trains (the tail on the stored tap) is the same function as the whole
    network, for every registered Lite variant, with its real weights."""
    import keras

    from tasks.training.weights import named_weights, set_named_weights

    backbone = get_backbone(name)
    model = backbone.build((64, 64), backbone.resolve_weights("imagenet"))
    images = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    outputs = model.predict(images, verbose=0)
    tail = backbone.build_tail(keras, outputs["last_block_input"].shape[1:])
    assert set_named_weights(tail, named_weights(model)) == len(
        [layer for layer in tail.layers if layer.weights]
    )
    np.testing.assert_allclose(
        tail.predict(outputs["last_block_input"], verbose=0),
        outputs["bottleneck"],
        rtol=1e-4,
        atol=1e-4,
    )


def test_every_registered_backbone_is_an_object_with_its_own_builders():
    # Dispatch is by object: a backbone is built by its own class, never by a default branch.
    assert set(BACKBONES) == {
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
        "vgg16",
    }
    for name, backbone in BACKBONES.items():
        assert isinstance(backbone, Backbone) and backbone.name == name
        assert {"bottleneck", "last_block_input"} <= set(backbone.taps)
        assert set(backbone.default_taps) <= set(backbone.taps)


@pytest.mark.slow
def test_int8_runtime_is_close_to_float32_on_every_tap_and_cached(cache_dir, tmp_path):
    from tests.conftest import make_dataset

    backbone = get_backbone("efficientnet_lite0")
    weights = backbone.resolve_weights("imagenet")
    data = make_dataset(tmp_path / "shapes", ("circles", "squares"), 12, size=64)
    images = np.stack([decode_image(p.read_bytes(), (64, 64)) for p in sorted(data.rglob("*.jpg"))])
    taps = ("bottleneck", "last_block_input", "features")
    float32 = prepare_backbone(backbone, weights, (64, 64), taps, "litert", cache_dir)
    int8 = prepare_backbone(
        backbone, weights, (64, 64), taps, "litert-int8", cache_dir, images[:16]
    )
    assert (
        int8.calibration
        and int8.key != float32.key
        and len(int8.model_bytes) < len(float32.model_bytes) / 2
    )
    exact, quantised = FeatureExtractor(float32)(images[16:]), FeatureExtractor(int8)(images[16:])
    for tap in taps:  # the held-out images, not the calibration ones
        a, b = exact[tap].reshape(8, -1), quantised[tap].reshape(8, -1)
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cosine.mean() >= 0.95 and cosine.min() >= 0.9, (tap, cosine)
    again = prepare_backbone(
        backbone, weights, (64, 64), taps, "litert-int8", cache_dir, images[:16]
    )
    assert again.key == int8.key and again.model_bytes == int8.model_bytes  # from the cache
    with pytest.raises(SettingsError, match="needs calibration images"):
        prepare_backbone(backbone, weights, (64, 64), taps, "litert-int8", cache_dir)
