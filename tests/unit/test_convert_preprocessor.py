"""The converter reads the checkpoint's image and video processor limits into the mmproj (no torch)."""

from __future__ import annotations

import json

import pytest

from pyllama_ernie.convert import ConversionError
from pyllama_ernie.convert import ernie4_5_vl_vision as vv
from pyllama_ernie.convert.synthetic import write_tiny_mmproj
from pyllama_ernie.gguf_check import validate_gguf
from pyllama_ernie.errors import InvalidModelFileError


def _dir(tmp_path, **files):
    for name, cfg in files.items():
        (tmp_path / name).write_text(json.dumps(cfg))
    return tmp_path


def test_defaults_without_processor_files(tmp_path):
    pre = vv.load_preprocessor(tmp_path)
    assert (pre.video_min_pixels, pre.video_max_pixels) == (299 * 28 * 28, 1196 * 28 * 28)
    assert pre.video_source is None


@pytest.mark.parametrize("cfg, want", [
    ({"size": {"shortest_edge": 1000, "longest_edge": 5000}}, (1000, 5000)),  # transformers
    ({"min_pixels": 2000, "max_pixels": 6000}, (2000, 6000)),  # Baidu's remote-code processor
    ({"size": {"min_pixels": 3000, "max_pixels": 7000}}, (3000, 7000)),
    ({"size": {"longest_edge": 300000}}, (299 * 28 * 28, 300000)),  # the other keeps its default
])
def test_video_preprocessor_config(tmp_path, cfg, want):
    d = _dir(tmp_path, **{"video_preprocessor_config.json": cfg,
                          "preprocessor_config.json": {"size": {"shortest_edge": 784, "longest_edge": 9408}}})
    pre = vv.load_preprocessor(d)
    assert (pre.video_min_pixels, pre.video_max_pixels) == want
    assert (pre.min_pixels, pre.max_pixels) == (784, 9408)  # the image limits are their own
    assert pre.video_source == "video_preprocessor_config.json"


def test_processor_config_video_section(tmp_path):
    d = _dir(tmp_path, **{"processor_config.json": {
        "image_processor": {"size": {"shortest_edge": 784, "longest_edge": 9408}},
        "video_processor": {"size": {"shortest_edge": 1568, "longest_edge": 4704}}}})
    pre = vv.load_preprocessor(d)
    assert (pre.min_pixels, pre.max_pixels, pre.video_min_pixels, pre.video_max_pixels) == (784, 9408, 1568, 4704)


def test_bad_video_limits_are_refused(tmp_path):
    d = _dir(tmp_path, **{"video_preprocessor_config.json": {"size": {"shortest_edge": 5000, "longest_edge": 10}}})
    with pytest.raises(ConversionError, match="exceed"):
        vv.load_preprocessor(d)


def test_written_and_checked(tmp_path):
    pre = vv.Preprocessor(video_min_pixels=1568, video_max_pixels=4704)
    s = validate_gguf(write_tiny_mmproj(tmp_path / "m.gguf", n_embd_text=64, preprocessor=pre), role="mmproj")
    assert (s.get(vv.KEY_VIDEO_MIN_PIXELS), s.get(vv.KEY_VIDEO_MAX_PIXELS)) == (1568, 4704)
    bad = vv.Preprocessor(video_min_pixels=4704, video_max_pixels=1568)  # not via parse: written as given
    with pytest.raises(InvalidModelFileError, match="video_min_pixels"):
        validate_gguf(write_tiny_mmproj(tmp_path / "bad.gguf", n_embd_text=64, preprocessor=bad), role="mmproj")
