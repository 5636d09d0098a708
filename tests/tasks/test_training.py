"""The rows of ``epoch_copies="one"``: each epoch reads every image once, copies in turn."""

import numpy as np

from tasks.training.inputs import Rows, one_copy_per_epoch


def _epochs(dataset, rows_per_epoch, epochs):
    rows = [int(x) for x, _ in dataset.take(rows_per_epoch * epochs).as_numpy_iterator()]
    return [rows[e * rows_per_epoch : (e + 1) * rows_per_epoch] for e in range(epochs)]


def test_each_epoch_reads_every_image_once_in_its_next_copy():
    images, copies = 7, 3
    copy = np.tile(np.arange(copies), images)  # rows: image 0 copies 0..2, image 1 copies 0..2, ...
    row = np.arange(images * copies)
    dataset = one_copy_per_epoch(Rows(row, row % 2, copy), 0, images, seed=4)
    epochs = _epochs(dataset, images, 5)
    for epoch, rows in enumerate(epochs):
        assert (copy[rows] == epoch % copies).all()
        assert sorted(np.array(rows) // copies) == list(range(images))  # every image once
    assert epochs[0] != sorted(epochs[0]) and epochs[0] != epochs[3]  # shuffled, reshuffled


def test_a_resumed_run_starts_with_the_copy_of_its_epoch():
    copy = np.tile(np.arange(2), 10)
    row = np.arange(20)
    (rows,) = _epochs(one_copy_per_epoch(Rows(row, row, copy), 5, 10, seed=1), 10, 1)
    assert (copy[rows] == 1).all() and len(set(rows)) == 10


def test_whole_batches_wrap_around_within_the_copy():
    copy = np.tile(np.arange(2), 5)  # 5 images, batches of 4: an epoch is 2 batches, 8 rows
    row = np.arange(10)
    for epoch, rows in enumerate(_epochs(one_copy_per_epoch(Rows(row, row, copy), 0, 8, 0), 8, 4)):
        assert (copy[rows] == epoch % 2).all() and len(set(rows)) == 5
