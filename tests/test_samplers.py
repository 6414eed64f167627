"""Samplers: properties across 2 ranks, determinism from (seed, epoch), mid-epoch resume."""

from __future__ import annotations

import numpy as np
import pytest

from dist_train.data.samplers import (
    IdentityCapSampler,
    IdentityRatioSampler,
    MPerClassSampler,
    ShuffleSampler,
    build_sampler,
)

W = 2


def _labels(seed: int = 0, classes: int = 40) -> np.ndarray:
    """Imbalanced identities: 1 to 60 images each."""
    counts = np.random.default_rng(seed).integers(1, 61, classes)
    return np.repeat(np.arange(classes), counts)


def _ranks(cls, labels, batch, seed=0, **kw):
    return [cls(labels, batch, r, W, seed, **kw) for r in range(W)]


def _epoch(samplers, epoch):
    for s in samplers:
        s.set_epoch(epoch)
    return [np.array(list(s)) for s in samplers]


def _global_batches(per_rank, batch):
    """Rebuild the global batches: batch g = rank 0's g-th batch + rank 1's g-th batch."""
    chunks = [p.reshape(-1, batch) for p in per_rank]
    assert len({len(c) for c in chunks}) == 1, "ranks must run the same number of batches"
    return [np.concatenate([c[g] for c in chunks]) for g in range(len(chunks[0]))]


@pytest.mark.parametrize("name", ["shuffle", "identity_cap", "identity_ratio", "m_per_class"])
def test_ranks_disjoint_equal_length_deterministic(name):
    labels = _labels()
    kw = dict(max_images_per_identity=10, identity_ratio=0.5, m_per_class=4)
    a = [build_sampler(name, labels, 16, r, W, 3, **kw) for r in range(W)]
    b = [build_sampler(name, labels, 16, r, W, 3, **kw) for r in range(W)]
    e1 = _epoch(a, 1)
    assert len(e1[0]) == len(e1[1]) == len(a[0]) > 0
    assert len(e1[0]) % 16 == 0 and len(e1[0]) // 16 == a[0].num_batches
    if name != "m_per_class":  # m_per_class may repeat small classes (with replacement)
        both = np.concatenate(e1)
        assert len(np.unique(both)) == len(both), "an image was given to two ranks"
    for x, y in zip(e1, _epoch(b, 1)):
        np.testing.assert_array_equal(x, y)
    e2 = _epoch(a, 2)
    assert not np.array_equal(e1[0], e2[0]), "the order must change with the epoch"
    c = [build_sampler(name, labels, 16, r, W, 4, **kw) for r in range(W)]
    assert not np.array_equal(_epoch(c, 1)[0], e1[0]), "the order must change with the seed"


def test_shuffle_covers_everything_once():
    labels = np.arange(100) % 7
    ranks = _ranks(ShuffleSampler, labels, 10)
    got = np.concatenate(_epoch(ranks, 0))
    assert sorted(got.tolist()) == list(range(100))
    ranks = _ranks(ShuffleSampler, np.arange(105) % 7, 10)  # 5 left over: dropped
    assert len(np.concatenate(_epoch(ranks, 0))) == 100


def test_identity_cap_limits_and_redraws():
    labels = _labels()
    counts = np.bincount(labels)
    ranks = _ranks(IdentityCapSampler, labels, 8, max_per_identity=10)
    seen = []
    for epoch in range(3):
        ranks[0].set_epoch(epoch)
        full = ranks[0].epoch_order(epoch)
        per_class = np.bincount(labels[full], minlength=len(counts))
        assert per_class.max() <= 10
        pool = ranks[0].global_order(epoch)
        np.testing.assert_array_equal(
            np.bincount(labels[pool], minlength=len(counts)), np.minimum(counts, 10)
        )
        big = np.flatnonzero(counts > 10)[0]
        seen.append(frozenset(pool[labels[pool] == big].tolist()))
    assert len(set(seen)) > 1, "capped identities must be redrawn each epoch"


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 1.0])
def test_identity_ratio_fixed_fraction(ratio):
    labels = _labels()
    counts = np.bincount(labels)
    ranks = _ranks(IdentityRatioSampler, labels, 4, ratio=ratio)
    expected = np.maximum(1, np.round(ratio * counts).astype(int))
    sets = []
    for epoch in range(3):
        pool = ranks[0].global_order(epoch)
        np.testing.assert_array_equal(np.bincount(labels[pool], minlength=len(counts)), expected)
        sets.append(frozenset(pool.tolist()))
        per_rank = _epoch(ranks, epoch)
        assert set(np.concatenate(per_rank).tolist()) <= sets[-1]
    assert len(set(sets)) == 1, "the subset must not change between epochs"
    # the other rank built the same subset on its own
    np.testing.assert_array_equal(ranks[0].subset, ranks[1].subset)


@pytest.mark.parametrize("m, batch", [(2, 8), (4, 16), (3, 6)])
def test_m_per_class_global_batches(m, batch):
    labels = _labels(1, classes=50)
    ranks = _ranks(MPerClassSampler, labels, batch, m=m)
    for epoch in range(3):
        per_rank = _epoch(ranks, epoch)
        batches = _global_batches(per_rank, batch)
        assert len(batches) > 3
        for gb in batches:
            cls, cnt = np.unique(labels[gb], return_counts=True)
            assert np.all(cnt == m), "each class of a global batch has exactly m images"
            assert len(cls) == batch * W // m, "no class twice in a global batch"
        for p in per_rank:  # every rank's own batch holds whole groups
            for b in p.reshape(-1, batch):
                assert np.all(np.unique(labels[b], return_counts=True)[1] == m)


def test_m_per_class_rejects_impossible_setups():
    with pytest.raises(ValueError, match="multiple of m_per_class"):
        MPerClassSampler(np.arange(10), 6, m=4)
    with pytest.raises(ValueError, match="distinct classes"):
        MPerClassSampler(np.arange(40) % 3, 8, 0, 2, m=2)


@pytest.mark.parametrize("name", ["shuffle", "identity_cap", "identity_ratio", "m_per_class"])
def test_resume_mid_epoch(name):
    labels = _labels()
    kw = dict(max_images_per_identity=10, identity_ratio=0.5, m_per_class=2)
    ranks = [build_sampler(name, labels, 8, r, W, 7, **kw) for r in range(W)]
    full = _epoch(ranks, 2)
    states = [s.state_dict(batches_consumed=3) for s in ranks]
    assert states[0]["epoch"] == 2 and states[0]["batches_consumed"] == 3
    fresh = [build_sampler(name, labels, 8, r, W, 7, **kw) for r in range(W)]
    for s, st in zip(fresh, states):
        s.load_state_dict(st)
        s.set_epoch(2)  # the trainer sets the epoch again before iterating: keeps the position
    resumed = [np.array(list(s)) for s in fresh]
    for f, r in zip(full, resumed):
        np.testing.assert_array_equal(r, f[3 * 8 :])
    # the next epoch starts from its beginning and matches an uninterrupted run
    nxt = _epoch(fresh, 3)
    ref = _epoch(ranks, 3)
    for a, b in zip(nxt, ref):
        np.testing.assert_array_equal(a, b)


def test_resume_state_mismatch_is_an_error():
    labels = _labels()
    s = ShuffleSampler(labels, 8, 0, 2, seed=1)
    state = s.state_dict(1)
    with pytest.raises(ValueError, match="world_size"):
        ShuffleSampler(labels, 8, 0, 1, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        ShuffleSampler(labels, 8, 0, 2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="batches_consumed"):
        s.state_dict(s.num_batches + 1)


def test_resume_on_another_world_size_continues_the_global_order():
    labels = _labels()
    two = _ranks(ShuffleSampler, labels, 8, seed=1)
    for s in two:
        s.set_epoch(2)
    state = two[0].state_dict(batches_consumed=3)  # 3 global batches of 16 images consumed
    one = ShuffleSampler(labels, 12, 0, 1, seed=1)
    assert one.load_state_dict(state, reshard=True) == 4  # 48 images = 4 batches of 12
    one.set_epoch(2)
    # the 2-rank run consumed the first 48 images of the same global order
    consumed = np.concatenate(_global_batches([s.rank_indices(2) for s in two], 8)[:3])
    np.testing.assert_array_equal(consumed, one.rank_indices(2)[:48])
    # one rank of one: its indices are the epoch's whole global order
    np.testing.assert_array_equal(np.array(list(one)), one.rank_indices(2)[48:])
