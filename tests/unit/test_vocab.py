"""vocab.Vocab and gguf_check.read_tensor: the tokenizer of a loaded model and the rows it reads
from the file (no torch)."""

from __future__ import annotations

import numpy as np
import pytest

from pyllama_ernie import ClosedError, Model, TokenizeError
from pyllama_ernie.gguf_check import validate_gguf
from pyllama_ernie.quantize import quantize


@pytest.fixture(scope="module")
def model(tiny_gguf):
    with Model(tiny_gguf("ernie4_5-vl-moe"), n_ctx=64) as m:
        yield m


def test_vocab_is_the_models_tokenizer(model):
    v = model.vocab
    assert v.n_vocab == model.n_vocab
    ids = v.tokenize("hello world")
    assert ids == model.tokenize("hello world")
    assert (ids[0] == v.bos) == v.add_bos
    assert v.detokenize(ids, special=False) == "hello world"
    assert v.special_id("<|IMAGE_START|>") == model.tokenize("<|IMAGE_START|>", add_special=False)[0]
    with pytest.raises(TokenizeError):
        v.special_id("no such special token")
    assert v.token_text(-1) == "" and v.token_text(v.bos) == "<s>"
    assert v.eos in v.eog_tokens and v.is_eog(v.eos)
    with pytest.raises(TokenizeError):
        v.check_tokens([v.n_vocab])


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
def test_token_embeddings_are_the_files_rows(tiny_gguf, tmp_path, qtype):
    """Rows read through gguf_check equal gguf-py's reading of the same tensor."""
    import gguf

    src = tiny_gguf("ernie4_5")
    path = src if qtype == "F32" else quantize(src, tmp_path / f"m-{qtype}.gguf", qtype)
    summary = validate_gguf(path)
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "token_embd.weight")
    assert t.tensor_type.name == summary.tensors["token_embd.weight"].type_name
    raw = np.asarray(t.data)
    full = raw.astype(np.float32) if qtype in ("F32", "F16") else gguf.quants.dequantize(raw, t.tensor_type)
    rows = [0, 5, 17, full.shape[0] - 1]
    np.testing.assert_array_equal(summary.read_tensor("token_embd.weight", rows), full[rows])
    np.testing.assert_array_equal(summary.read_tensor("token_embd.weight"), full)
    with Model(path, n_ctx=32) as m:
        np.testing.assert_array_equal(m.token_embeddings(rows), full[rows])
    with pytest.raises(KeyError):
        summary.read_tensor("no.such.tensor")


def test_vocab_of_a_closed_model_raises(tiny_gguf):
    m = Model(tiny_gguf("ernie4_5"), n_ctx=32)
    v = m.vocab
    m.close()
    with pytest.raises(ClosedError):
        v.tokenize("hi")
    with pytest.raises(ClosedError):
        v.token_embeddings([1])
