"""The sampling knobs change the distribution as the same chain in NumPy says.

``_Sampler.probabilities`` runs our llama.cpp sampler chain (repeat penalty, top_k, top_p,
min_p, temperature, dist) on one fixed row of logits and returns the probabilities its last
stage draws from; a NumPy implementation of that chain gives the expected ones. Each knob is
also checked to change the distribution (so a knob that is accepted and ignored fails).
"""

from __future__ import annotations

import numpy as np
import pytest

from pyllama_ernie.context import _Sampler
from pyllama_ernie.values import SamplingParams

N = 400
LOGITS = (np.random.default_rng(0).standard_normal(N) * 2.5).astype(np.float32)
HISTORY = [int(t) for t in np.argsort(-LOGITS)[[0, 3, 7, 50, 200]]]  # the best token among them


def numpy_chain(logits, *, temperature, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, history=()):
    """llama.cpp's order: penalties, top_k, top_p, min_p, temperature, softmax."""
    x = logits.astype(np.float64).copy()
    for t in set(history):
        x[t] = x[t] / repeat_penalty if x[t] > 0 else x[t] * repeat_penalty
    keep = np.ones(len(x), dtype=bool)
    if top_k > 0:
        keep[:] = False
        keep[np.argsort(-x, kind="stable")[:top_k]] = True
    if top_p < 1.0:
        idx = np.flatnonzero(keep)
        idx = idx[np.argsort(-x[idx], kind="stable")]
        p = np.exp(x[idx] - x[idx].max())
        p /= p.sum()
        n_keep = int(np.searchsorted(np.cumsum(p), top_p)) + 1  # up to and including the one reaching top_p
        keep[:] = False
        keep[idx[:n_keep]] = True
    if min_p > 0.0:
        keep &= x >= x[keep].max() + np.log(min_p)
    z = x[keep] / temperature
    p = np.exp(z - z.max())
    out = np.zeros(len(x))
    out[keep] = p / p.sum()
    return out


def ours(**kw):
    history = kw.pop("history", ())
    params = SamplingParams(seed=1, **{**dict(top_k=0, top_p=1.0, min_p=0.0), **kw})
    s = _Sampler(params, N)
    try:
        for t in history:
            s.accept(t)
        return s.probabilities(LOGITS)
    finally:
        s.close()


CASES = {
    "temperature 1": dict(temperature=1.0),
    "temperature 0.5": dict(temperature=0.5),
    "temperature 1.7": dict(temperature=1.7),
    "top_k 10": dict(temperature=1.0, top_k=10),
    "top_p 0.8": dict(temperature=1.0, top_p=0.8),
    "min_p 0.1": dict(temperature=1.0, min_p=0.1),
    "repeat_penalty 1.5": dict(temperature=1.0, repeat_penalty=1.5, history=HISTORY),
    "all of them": dict(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.3, history=HISTORY),
}


@pytest.mark.parametrize("case", list(CASES))
def test_distribution_matches_numpy(case):
    kw = CASES[case]
    got = ours(**kw)
    want = numpy_chain(LOGITS, **kw)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-4)
    assert (got > 0).sum() == (want > 0).sum()


@pytest.mark.parametrize("knob, value", [("temperature", 0.5), ("top_k", 10), ("top_p", 0.8), ("min_p", 0.1),
                                         ("repeat_penalty", 1.5)])
def test_each_knob_changes_the_distribution(knob, value):
    base = dict(temperature=1.0, history=HISTORY)
    changed = ours(**{**base, knob: value})
    assert np.abs(changed - ours(**base)).max() > 1e-3, f"{knob}={value} left the distribution as it was"
