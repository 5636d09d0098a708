"""How `wf suggest` chooses a batch, on embeddings whose answer is known."""

import numpy as np

from tasks.audit import normalise
from tasks.training.small_fits import FitProblem, out_of_fold_probabilities
from workflows.label.suggest import choose_batch, margin_scores, redundancy_radius


def _clusters(rng, centres, per, noise=0.05):
    return np.concatenate([c + noise * rng.normal(size=(per, len(c))) for c in centres])


def test_margin_is_one_for_a_coin_toss_and_zero_for_a_sure_answer():
    np.testing.assert_allclose(margin_scores(np.array([[0.5, 0.5], [1.0, 0.0]])), [1.0, 0.0])
    np.testing.assert_allclose(margin_scores(np.array([[0.2, 0.7, 0.1]])), [0.5])


def test_near_copies_of_one_confusing_image_cost_one_label_and_known_regions_give_way():
    rng = np.random.default_rng(0)
    dim = 16
    centres = normalise(rng.normal(size=(4, dim)))
    labelled = normalise(_clusters(rng, centres[:2], 30, noise=0.1))  # two regions known
    # Pool: 10 near-copies of one very uncertain image (0-9), then 4 groups of 10 (10-49) by
    # the 4 centres; the groups beside the labelled images are the less sure ones.
    confusing = normalise(centres[0] + centres[1] + 0.001 * rng.normal(size=(10, dim)))
    groups = normalise(_clusters(rng, centres, 10, noise=0.1))
    pool = np.concatenate([confusing, groups])
    scores = np.r_[np.full(10, 0.99), rng.uniform(0.7, 0.9, 20), rng.uniform(0.2, 0.4, 20)]
    plain, plain_reasons = choose_batch(pool, labelled, scores, 8, spread=False)
    chosen, reasons = choose_batch(pool, labelled, scores, 8)
    # Uncertainty alone takes the copies once (near duplicates are left out even then), then
    # the least sure images, all beside what is labelled already.
    assert sum(i < 10 for i in plain) == 1 and set(plain_reasons) == {"uncertain"}
    assert all(10 <= i < 30 for i in plain[1:])
    # Spread: one copy, then some of the known regions give way to those nobody labelled.
    assert chosen[0] < 10 and reasons[0] == "uncertain"
    assert sum(i < 10 for i in chosen) == 1 and len(set(chosen)) == 8
    assert sum(i >= 30 for i in chosen) >= 1 and "spread" in reasons
    assert set(reasons) <= {"uncertain", "spread"}
    # An image that is a copy of a labelled one is never suggested.
    copy = labelled[:1]
    found, _ = choose_batch(np.concatenate([copy, pool]), labelled, np.r_[1.0, scores], 8)
    assert 0 not in found


def test_each_pick_is_the_least_sure_image_apart_from_what_is_known():
    """The rule itself, on random data: a pick lies farther than the radius from every image
    labelled or picked before it, and every less sure image passed over lies within it."""
    from tasks.abstention import nearest_distance
    from workflows.label.suggest import _near_limit

    rng = np.random.default_rng(4)
    pool = normalise(rng.normal(size=(200, 6)))
    labelled = normalise(rng.normal(size=(30, 6)))
    scores = rng.uniform(size=200)
    chosen, reasons = choose_batch(pool, labelled, scores, 25)
    near = _near_limit(pool, labelled)
    radius = max(near, redundancy_radius(pool, near))
    assert len(chosen) == 25 and "filled" not in reasons and "spread" in reasons
    order = [int(i) for i in np.argsort(-scores, kind="stable")]
    spread_yet = False
    for n, pick in enumerate(chosen):
        known = np.concatenate([labelled, pool[chosen[:n]]])
        assert nearest_distance(pool[[pick]], known, k=1)[0] > radius
        earlier = order[: order.index(pick)]
        passed = [i for i in earlier if i not in chosen[:n]]
        if passed:
            gaps = nearest_distance(pool[passed], known, k=1)
            assert (gaps <= radius + 1e-6).all()
            spread_yet |= bool((gaps > near).any())  # passed over for spread, not as copies
        assert reasons[n] == ("spread" if spread_yet else "uncertain")


def test_a_smaller_budget_is_the_start_of_a_larger_one_and_the_pool_is_used_up():
    rng = np.random.default_rng(1)
    pool = normalise(rng.normal(size=(120, 16)))
    labelled = normalise(rng.normal(size=(20, 16)))
    scores = rng.uniform(size=120)
    every, reasons = choose_batch(pool, labelled, scores, 120)
    assert {"uncertain", "spread", "filled"} <= set(reasons)  # the prefixes cross all three
    for budget in (1, 3, reasons.index("spread") + 2, reasons.index("filled") + 2, 119):
        assert choose_batch(pool, labelled, scores, budget)[0] == every[:budget]
    # Asking for the whole pool: spread runs out, the rest is filled least sure first; only
    # near duplicates of labelled or chosen images are left out.
    filled = [i for i, r in zip(every, reasons, strict=True) if r == "filled"]
    assert filled == sorted(filled, key=lambda i: -scores[i])
    alone, _ = choose_batch(pool, np.zeros((0, 16)), scores, 120)
    assert sorted(alone) == list(range(120))


def test_exact_copies_are_suggested_once_even_when_most_images_have_many():
    rng = np.random.default_rng(5)
    distinct = normalise(rng.normal(size=(3, 8)))
    pool = np.repeat(distinct, 20, axis=0)  # 3 images, 20 copies of each
    chosen, _ = choose_batch(pool, np.zeros((0, 8)), rng.uniform(size=60), 10)
    assert sorted(i // 20 for i in chosen) == [0, 1, 2]


def test_redundancy_radius_is_the_median_nearest_neighbour_distance(monkeypatch):
    import workflows.label.suggest as suggest

    rng = np.random.default_rng(3)
    pool = normalise(rng.normal(size=(300, 6)))
    similarity = pool @ pool.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = 1 - similarity.max(axis=1)
    assert abs(redundancy_radius(pool) - float(np.median(nearest))) < 1e-6
    # A sample of 100 rows, a few rows a block: the same rows' median.
    monkeypatch.setattr(suggest, "SIMILARITIES", 7 * 300)
    rows = np.sort(np.random.default_rng(0).permutation(300)[:100])
    assert abs(redundancy_radius(pool, sample=100) - float(np.median(nearest[rows]))) < 1e-6
    assert redundancy_radius(pool[:1]) == 0.0
    # Over half the pool in near-copy pairs: its median nearest distance is about 0, so the
    # spacing is taken to the nearest image that is no near duplicate.
    twins = normalise(np.concatenate([pool[:200], pool[:200] + 1e-3, pool[200:]]))
    similarity = twins @ twins.T
    np.fill_diagonal(similarity, -np.inf)
    assert np.median(1 - similarity.max(axis=1)) < 1e-4
    assert abs(redundancy_radius(twins, near=0.01) - redundancy_radius(pool)) < 0.05


def test_prototype_small_fits_run_in_numpy_out_of_fold():
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(3, 20)) * 3
    y = np.repeat(np.arange(3), 10)
    x = (centres[y] + rng.normal(size=(30, 20))).astype(np.float32)
    probs = out_of_fold_probabilities(FitProblem(x, y, 3, "prototype"), np.arange(30) % 5)
    assert probs.shape == (30, 3) and np.allclose(probs.sum(axis=1), 1)
    assert (probs.argmax(axis=1) == y).mean() > 0.9
