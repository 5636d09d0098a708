"""Epoch callbacks, tested the way Keras tests EarlyStopping: a stand-in model and a list of
losses, no training."""

import numpy as np
import pytest
import tf_keras

from tasks.training.callbacks import BestEpoch, EpochLog, ReportEveryEpoch, StopWithoutProgress


class _Model:
    """What the callbacks touch: ``stop_training`` and the layers' weights."""

    def __init__(self) -> None:
        self.stop_training = False
        self.layers = [tf_keras.layers.Dense(1, name="d")]
        self.layers[0].build((None, 1))

    def set(self, value: float) -> None:
        self.layers[0].set_weights([np.full((1, 1), value, np.float32), np.zeros(1, np.float32)])


def _run(callback, losses, model=None):
    model = model or _Model()
    callback.set_model(model)
    for epoch, loss in enumerate(losses):
        if model.stop_training:
            break
        model.set(float(epoch))
        callback.on_epoch_begin(epoch)
        callback.on_epoch_end(epoch, {"loss": 1.0, "val_loss": loss})
    return model


def test_stop_without_progress_waits_patience_epochs():
    stop = StopWithoutProgress(patience=2)
    model = _run(stop, [0.9, 0.8, 0.85, 0.7, 0.75, 0.76, 0.5])
    assert model.stop_training and stop.best == 0.7 and stop.waited == 2
    # Resumed from its state, it goes on counting where it was.
    again = StopWithoutProgress(patience=3, **{"best": 0.7, "waited": 2})
    _run(again, [0.71])
    assert again.done and again.model.stop_training


def test_stop_without_progress_ignores_epochs_without_validation():
    stop = StopWithoutProgress(patience=1)
    model = _Model()
    stop.set_model(model)
    for epoch in range(5):
        stop.on_epoch_end(epoch, {"loss": 1.0})
    assert not model.stop_training and stop.best is None


def test_best_epoch_keeps_the_best_weights_by_layer_name():
    best = BestEpoch(keep_weights=True)
    _run(best, [0.9, 0.4, 0.6, 0.5])
    assert best.state() == {"best_val_loss": 0.4, "best_epoch": 2}
    assert best.weights["d"][0][0, 0] == 1.0  # the weights at epoch 2 (set to 1.0 then)
    light = BestEpoch(keep_weights=False)
    _run(light, [0.9, 0.4])
    assert light.weights is None and light.best_epoch == 2


def test_epoch_log_records_history_and_resumes():
    log = EpochLog()
    _run(log, [0.5, 0.4])
    assert log.epoch == 2 and log.history["val_loss"] == [0.5, 0.4]
    assert len(log.history["seconds"]) == 2 and all(s >= 0 for s in log.history["seconds"])
    resumed = EpochLog(**log.state())
    resumed.set_model(_Model())
    resumed.on_epoch_begin(2)
    resumed.on_epoch_end(2, {"val_loss": 0.3})
    assert resumed.epoch == 3 and resumed.history["val_loss"] == [0.5, 0.4, 0.3]


def test_report_is_called_with_the_epoch_number_and_floats():
    calls = []
    _run(ReportEveryEpoch(lambda epoch, logs: calls.append((epoch, logs))), [0.5, 0.25])
    assert calls == [(1, {"loss": 1.0, "val_loss": 0.5}), (2, {"loss": 1.0, "val_loss": 0.25})]


@pytest.mark.parametrize("callback", [EpochLog(), BestEpoch(True), StopWithoutProgress(1)])
def test_every_callback_state_is_json(callback):
    import json

    _run(callback, [0.3, 0.2])
    json.dumps(callback.state())
