"""values: the value classes check what they are given."""

from __future__ import annotations

import numpy as np
import pytest

from pyllama_ernie.values import ContextParams, Embeddings, Media, SamplingParams


@pytest.mark.parametrize("bad", [dict(n_ctx=-1), dict(n_batch=0), dict(n_ubatch=0), dict(n_threads=-2),
                                 dict(kv_cache_type="f8")])
def test_context_params_refuse_bad_values(bad):
    with pytest.raises(ValueError):
        ContextParams(**bad).validate()


def test_context_params_defaults_are_valid():
    ContextParams().validate()
    with pytest.raises(TypeError):
        ContextParams(n_ctxx=5)  # a typo is an error, not a silently ignored keyword


@pytest.mark.parametrize("bad", [dict(top_k=-1), dict(top_p=0.0), dict(min_p=1.5), dict(repeat_penalty=0),
                                 dict(seed=2**32)])
def test_sampling_params_refuse_bad_values(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad).validate()


def test_media_key_is_the_pixels():
    a = np.zeros((56, 56, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 1
    assert Media("image", [a], 2, 2).key() == Media("image", [a.copy()], 2, 2).key()
    assert Media("image", [a], 2, 2).key() != Media("image", [b], 2, 2).key()
    assert Media("image", [a], 2, 2).key() != Media("video", [a, a], 2, 2).key()


def test_embeddings_key_covers_rows_and_positions():
    rows = np.ones((2, 4), np.float32)
    e1 = Embeddings(rows, [0, 1])
    assert e1.key == Embeddings(rows.copy(), [0, 1]).key
    assert e1.key != Embeddings(rows, [1, 2]).key and e1.next_pos == 2
