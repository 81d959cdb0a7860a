"""The teacher wrapper: length-ordered batching returns the same vectors, in the caller's order."""
import numpy as np
import pytest

from teacher import Teacher

TEXTS = ["enzyme", "what is a coarse quantiser and why would a retrieval system use one?", "b",
         "A passage about rivers. " * 12, "zymogen", "who wrote it?", "the", "Ozymandias, king of kings"]


@pytest.fixture(scope="module")
def teacher():
    return Teacher.load("", "cpu", cache_dir=None, batch_size=2)


def test_length_batches_give_the_plain_vectors_in_order(teacher):
    texts = TEXTS * 3 + ["word"] * 5  # repeats, and more texts than one batch of the smallest size
    plain = teacher.model.encode(texts, batch_size=64, convert_to_numpy=True, normalize_embeddings=True)
    got = teacher.encode_uncached(texts)
    assert got.shape == (len(texts), teacher.dim)
    np.testing.assert_allclose(got, plain, atol=1e-5)
    assert teacher.calls == len(texts)


def test_batches_grow_for_short_texts_and_stay_whole_for_long_ones(teacher, monkeypatch):
    sizes = []
    encode = teacher.model.encode
    monkeypatch.setattr(teacher.model, "encode", lambda t, **kw: (sizes.append(len(t)), encode(t, **kw))[1])
    teacher.encode_uncached(["a"] * 40 + ["x" * 600] * 3)  # budget 512 x 2 characters, cap 32 texts
    assert sizes == [32, 8, 2, 1]
