"""The row order of ``epoch_copies="one"``: each epoch reads every image once, copies in turn."""

import numpy as np

from tasks.training import epoch_order


def test_each_epoch_reads_every_image_once_in_its_next_copy():
    images, copies = 7, 3
    copy = np.tile(np.arange(copies), images)  # rows: image 0 copies 0..2, image 1 copies 0..2, ...
    image = np.repeat(np.arange(images), copies)
    order, per_epoch = epoch_order(copy, 0, 5, seed=4)
    assert per_epoch == images and len(order) == 5 * images
    for epoch in range(5):
        rows = order[epoch * images : (epoch + 1) * images]
        assert (copy[rows] == epoch % copies).all()
        assert sorted(image[rows]) == list(range(images))
    assert not (order[:images] == np.sort(order[:images])).all()  # shuffled


def test_a_resumed_run_continues_the_same_order():
    copy = np.tile(np.arange(2), 10)
    full, _ = epoch_order(copy, 0, 6, seed=1)
    resumed, _ = epoch_order(copy, 4, 6, seed=1)
    np.testing.assert_array_equal(resumed, full[4 * 10 :])
