import numpy as np
import pytest

from functools import partial

from gptjax.data.packing import RowBatches, as_batch, pack_rows

EOS = 0
PAD = -1  # outside the numbered rows' values, so no test token is mistaken for padding
_batches = partial(RowBatches, eos_id=EOS, pad_id=PAD)


def documents(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(1, 50, n))) for n in lengths]


def stream_of(docs):
    return np.array([t for doc in docs for t in (*doc, EOS)], np.int32)


# The first corpus (68 tokens) ends in a partial row of 4 that padding completes; the second fills exactly 4 rows.
@pytest.mark.parametrize("lengths, tail", [((5, 0, 12, 3, 30, 7, 4), 4), ((7, 7, 7, 7), 0)])
def test_pack_rows_keeps_every_token_and_pads_only_the_tail(lengths, tail):
    seq_len = 7
    docs = documents(lengths)
    stream = stream_of(docs)
    rows = pack_rows(docs, EOS, seq_len, PAD)
    assert rows.dtype == np.int32
    assert rows.shape == (-(-len(stream) // (seq_len + 1)), seq_len + 1)
    np.testing.assert_array_equal(rows.ravel()[:len(stream)], stream)
    assert (rows.ravel()[len(stream):] == PAD).all()
    assert rows.size - len(stream) == ((seq_len + 1 - tail) % (seq_len + 1))
    # Every document end is marked, an empty document included.
    assert (stream == EOS).sum() == len(docs)


def test_pack_rows_accepts_arrays_and_short_corpora():
    docs = [np.arange(1, 6, dtype=np.int64), np.arange(10, 13)]
    rows = pack_rows(docs, EOS, 3, PAD)
    np.testing.assert_array_equal(rows, [[1, 2, 3, 4], [5, EOS, 10, 11], [12, EOS, PAD, PAD]])
    assert rows.dtype == np.int32
    short = pack_rows([[1, 2]], EOS, 8, PAD)
    np.testing.assert_array_equal(short, [[1, 2, EOS] + [PAD] * 6])


def numbered_rows(n, width=5):
    """Row i holds i * width ... i * width + width - 1, so a batch names its rows."""
    return np.arange(n * width, dtype=np.int32).reshape(n, width)


def epoch_orders(batches, epochs):
    """Concatenated indices over `epochs` epochs, split per epoch."""
    n, b = len(batches.rows), batches.batch_size
    steps = epochs * n // b
    assert steps * b == epochs * n
    flat = np.concatenate([batches.indices(s) for s in range(steps)])
    return flat.reshape(epochs, n)


def test_each_epoch_visits_every_row_once_in_a_new_order():
    batches = _batches(numbered_rows(24), batch_size=6, seed=0)
    orders = epoch_orders(batches, 3)
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(24))
    assert len({tuple(o) for o in orders}) == 3
    assert not np.array_equal(orders[0], np.arange(24))


def test_batch_contents_follow_indices():
    rows = numbered_rows(24)
    batches = _batches(rows, batch_size=6, seed=0)
    for step in (0, 5, 13):
        idx = batches.indices(step)
        batch = batches.batch(step)
        np.testing.assert_array_equal(batch["tokens"], rows[idx, :-1])
        np.testing.assert_array_equal(batch["targets"], rows[idx, 1:])


def test_unshuffled_order_is_sequential_and_wraps():
    batches = _batches(numbered_rows(10), batch_size=4, seed=0, shuffle=False)
    np.testing.assert_array_equal(batches.indices(0), [0, 1, 2, 3])
    np.testing.assert_array_equal(batches.indices(2), [8, 9, 0, 1])


def test_same_seed_same_batches_different_seed_different():
    rows = numbered_rows(24)
    a, b, c = (_batches(rows, 6, seed=s) for s in (3, 3, 4))
    for step in range(8):
        np.testing.assert_array_equal(a.batch(step)["tokens"], b.batch(step)["tokens"])
    assert any(not np.array_equal(a.indices(s), c.indices(s)) for s in range(8))


def test_far_step_is_random_access():
    rows = numbered_rows(24)
    step = 10**6  # epoch 250000 starts exactly here (4 steps per epoch)
    forward = _batches(rows, 6, seed=1)
    got = [forward.indices(step + i) for i in range(4)]
    # A fresh object asked in the opposite order, after unrelated steps, must agree: the batch is
    # a function of the step alone, not of what was asked before.
    backward = _batches(rows, 6, seed=1)
    backward.indices(7)
    for i in reversed(range(4)):
        np.testing.assert_array_equal(backward.indices(step + i), got[i])
    np.testing.assert_array_equal(np.sort(np.concatenate(got)), np.arange(24))
    np.testing.assert_array_equal(_batches(rows, 6, seed=1).batch(step)["tokens"], rows[got[0], :-1])
    assert not np.array_equal(np.concatenate(got), np.concatenate([forward.indices(s) for s in range(4)]))


def test_batches_straddling_epochs():
    # 10 rows in batches of 4: steps 2 and 4 each take the end of one epoch and the start of the next.
    rows = numbered_rows(10)
    batches = _batches(rows, 4, seed=2)
    orders = epoch_orders(batches, 2)  # 5 steps = exactly 2 epochs
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(10))
    assert not np.array_equal(orders[0], orders[1])
    np.testing.assert_array_equal(batches.indices(2), np.concatenate([orders[0, 8:], orders[1, :2]]))
    # Asked cold, the straddling batch is the same.
    np.testing.assert_array_equal(_batches(rows, 4, seed=2).indices(2), batches.indices(2))
    # Steps 5-9 are epochs 2 and 3, straddled at step 7.
    later = np.concatenate([batches.indices(s) for s in range(5, 10)]).reshape(2, 10)
    for order in later:
        np.testing.assert_array_equal(np.sort(order), np.arange(10))
    assert len({tuple(o) for o in (*orders, *later)}) == 4


def test_as_batch_shifts_targets_by_one():
    rows = np.random.default_rng(0).integers(0, 1000, (3, 9)).astype(np.int32)
    batch = as_batch(rows, EOS, PAD, False)
    assert set(batch) == {"tokens", "targets", "positions", "loss_mask"}
    np.testing.assert_array_equal(batch["tokens"], rows[:, :8])
    np.testing.assert_array_equal(batch["targets"], rows[:, 1:])
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["tokens"][:, 1:])
    np.testing.assert_array_equal(batch["positions"], np.tile(np.arange(8), (3, 1)))
    assert batch["positions"].dtype == np.int32
    assert batch["loss_mask"].shape == (3, 8) and batch["loss_mask"].dtype == np.float32
    assert (batch["loss_mask"] == 1.0).all()


def test_fewer_rows_than_batch_size_is_an_error():
    rows = numbered_rows(3)
    with pytest.raises(ValueError, match="cannot fill"):
        _batches(rows, batch_size=4, seed=0)
    assert _batches(rows, batch_size=3, seed=0).indices(1).shape == (3,)


def test_document_mask_fields_restart_at_every_document():
    docs = [[11, 12, 13], [21, 22], [31, 32, 33, 34, 35]]
    rows = pack_rows(docs, EOS, 7, PAD)  # [11 12 13 E 21 22 E 31] [32 33 34 35 E P P P]
    batch = as_batch(rows, EOS, PAD, True)
    np.testing.assert_array_equal(batch["segment_ids"], [[1, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 2, 2]])
    np.testing.assert_array_equal(batch["positions"], [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 0, 1]])
    # Not counted: the guess made at an end-of-document token (the next document is invisible
    # from there) and every padding target.
    np.testing.assert_array_equal(batch["loss_mask"], [[1, 1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0]])
    plain = as_batch(rows, EOS, PAD, False)
    assert "segment_ids" not in plain
    np.testing.assert_array_equal(plain["positions"], np.tile(np.arange(7), (2, 1)))
    np.testing.assert_array_equal(plain["loss_mask"], [[1] * 7, [1, 1, 1, 1, 0, 0, 0]])


def test_an_epoch_holds_every_token_of_every_document_exactly_once():
    docs = documents(np.random.default_rng(5).integers(0, 40, 50), seed=5)
    seq_len, batch_size = 15, 4
    rows = pack_rows(docs, EOS, seq_len, PAD)
    batches = _batches(rows, batch_size, seed=9, document_mask=True)
    steps = len(rows) // batch_size
    seen = np.concatenate([batches.rows[batches.indices(s)] for s in range(steps)])
    leftover = np.setdiff1d(np.arange(len(rows)), np.concatenate([batches.indices(s) for s in range(steps)]))
    seen = np.concatenate([seen, rows[leftover]])  # rows past the last full batch open the next epoch
    # Every row exactly once, so the multiset of tokens is exactly the corpus plus padding.
    assert sorted(map(tuple, seen)) == sorted(map(tuple, rows))
    np.testing.assert_array_equal(np.sort(seen[seen != PAD]), np.sort(stream_of(docs)))
