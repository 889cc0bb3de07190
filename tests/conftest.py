"""Session fixtures: tiny reference ERNIE 4.5 models and their GGUF conversions.

Interface (all session-scoped, built lazily and cached under one temp folder):

* ``TINY_MODELS`` (module constant, also the ``tiny_models`` fixture): name -> spec
  dict with ``kind`` ("dense"/"moe"), ``dtype`` (how weights are stored), optional
  ``shard`` and ``config`` (kwargs of the transformers config class). Names:
  ``dense_a``, ``dense_b``, ``moe_a``, ``moe_odd``, ``moe_step2``, ``dense_h128``,
  ``moe_64x6`` and ``moe_layout_{start}_{end}_{interval}`` (every MoE layout of a 6-layer
  model; see tests/reference_models.py).
* ``hf_model_dir(name) -> Path``: the saved checkpoint (safetensors, config.json,
  tokenizer.model, tokenizer.json, tokenizer_config.json with ERNIE's chat template).
* ``gguf_model(name, outtype="f32") -> Path``: that checkpoint converted by
  ``pyllama_ernie.convert.convert`` (outtype f32/f16/bf16/q8_0).
* ``reference_model(name) -> transformers model``: loaded from ``hf_model_dir(name)``
  in float32, eval mode (``torch.set_num_threads(1)`` is set).
* ``reference_tokenizer(name) -> transformers tokenizer`` (``AutoTokenizer``).
* ``tiny_gguf(arch) -> Path``: ``write_tiny_gguf(arch)`` for "ernie4_5" / "ernie4_5-moe" /
  "ernie4_5-vl-moe" (needs neither torch nor transformers); ``tiny_vl -> (model, mmproj)``: the
  synthetic VL model with a tiny projector.
* ERNIE 4.5 VL (``Ernie4_5_VLMoeForConditionalGeneration``), models ``VL_MODELS`` (the
  ``vl_models`` fixture): ``vl_a`` (head_dim 128, mrope [22, 22, 20]), ``vl_b`` (head_dim 64,
  [11, 11, 10], untied, bf16), ``vl_c`` (head_dim 32, [6, 6, 4], MoE layers 3 and 5 of 6, vision
  experts wider than text ones, 2 shared experts, sharded) and ``vl_baidu`` (vl_c's weights with
  Baidu's original config.json and tensor names; see tests/reference_models.py):

  * ``vl_model_dir(name) -> Path``: the saved checkpoint with the tokenizer files (whose image /
    video token ids the config points at);
  * ``vl_gguf(name, outtype="f32") -> Path``: converted by ``pyllama_ernie.convert.convert``;
  * ``vl_mmproj(name, outtype="f32") -> Path``: the checkpoint's vision tower + resampler, written
    by ``pyllama_ernie.convert.convert_mmproj`` (a "clip" mmproj GGUF, projector ``ernie4_5vl``);
  * ``vl_reference_model(name)``: the transformers model in float32, eval mode (for ``vl_baidu``,
    the model of ``vl_c``, whose weights it holds);
  * ``reference_tokenizer_vl(name)``: ``AutoTokenizer`` of that checkpoint.
* ``ernie_tokenizer -> {"dir", "n_pieces", "special_ids"}``: the reference tokenizer files
  (one SentencePiece BPE model shared by all tiny models; ``special_ids`` maps ERNIE's
  special tokens, e.g. "<|IMAGE_START|>", to their ids). Every model's vocab_size is
  ``reference_models.model_vocab_size(n_pieces)`` (padded, like ERNIE's 103424).
* ``converter``: the ``pyllama_ernie.convert`` package.

Fixtures that need torch/transformers/sentencepiece skip (with the reason) when
those are not installed; the tests that use them are marked ``reference``.

Markers (pyproject.toml): ``slow``, ``reference``, ``gpu``, ``cpu_feature``, ``upstream``.
With ``CI=true`` in the environment, a skip of a test that is not marked ``gpu`` or
``cpu_feature`` (the declared skips: no GPU, or a CPU without the feature a kernel needs)
is turned into a failure, and the session refuses to start unless ``pyllama_ernie`` is the
installed copy (site-packages), not the repository's source folder.
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
from pathlib import Path
from typing import Any, Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyllama_ernie.convert as convert_pkg  # noqa: E402
from reference_models import (  # noqa: E402
    TINY_MODELS,
    VL_MODELS,
    build_model,
    build_tokenizer,
    build_vl_baidu,
    build_vl_model,
)

__all__ = ["TINY_MODELS", "VL_MODELS"]


REPO = Path(__file__).resolve().parent.parent
#: CI=true (set by CI runners): undeclared skips fail, and the installed package must be tested.
CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
#: the markers that declare a skip as expected on some machines
DECLARED_SKIPS = ("gpu", "cpu_feature")
#: fixtures that build the reference models (need torch/transformers): their tests are ``reference``
REFERENCE_FIXTURES = frozenset({
    "ernie_tokenizer", "hf_model_dir", "gguf_model", "reference_model", "reference_tokenizer",
    "vl_model_dir", "vl_gguf", "vl_mmproj", "vl_reference_model", "reference_tokenizer_vl",
    "ref",  # tests/unit/test_images.py: transformers' PIL image processor
})


def _package_location_problem() -> str | None:
    """Why the imported ``pyllama_ernie`` is not the installed copy (None when it is)."""
    import pyllama_ernie

    pkg = Path(pyllama_ernie.__file__).resolve().parent
    if pkg == (REPO / "pyllama_ernie").resolve():
        return (f"pyllama_ernie was imported from the repository's source tree ({pkg}), not from the installed "
                "package: run the pytest console script (`pytest tests`), not `python -m pytest`, and do not "
                "install it in editable mode")
    site_dirs = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    site_dirs |= {Path(d).resolve() for d in (*site.getsitepackages(), site.getusersitepackages())}
    if pkg.parent not in site_dirs:
        return (f"pyllama_ernie was imported from {pkg}, which is not this interpreter's site-packages "
                f"({', '.join(sorted(map(str, site_dirs)))})")
    return None


def pytest_configure(config: Any) -> None:
    # the markers themselves are registered in pyproject.toml ([tool.pytest.ini_options])
    if CI:
        problem = _package_location_problem()
        if problem:
            raise pytest.UsageError(f"CI=true: {problem}")


def pytest_collection_modifyitems(config: Any, items: list) -> None:
    """``reference`` for the tests that use the reference fixtures; ``slow`` for every ``reference``
    test (importing torch and building the reference models lazily costs most of the suite's time,
    charged to whichever test comes first, so per-test durations hide it) and ``upstream`` test.
    ``-m "not slow"`` leaves out every test that needs torch or transformers."""
    for item in items:
        if REFERENCE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.reference)
        if item.get_closest_marker("reference") or item.get_closest_marker("upstream"):
            item.add_marker(pytest.mark.slow)


def _declared(node: Any) -> bool:
    return any(node.get_closest_marker(m) is not None for m in DECLARED_SKIPS)


def _skip_reason(report: Any) -> str:
    lr = report.longrepr
    return lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr)


def _fail_skip(report: Any, what: str) -> None:
    reason = _skip_reason(report)
    report.outcome = "failed"
    report.longrepr = (f"CI=true: {what} was skipped ({reason}), and only tests marked "
                       f"{' or '.join(DECLARED_SKIPS)} may skip in CI")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: Any, call: Any):
    report = yield
    if CI and report.skipped and not hasattr(report, "wasxfail") and not _declared(item):
        _fail_skip(report, f"{item.nodeid} ({report.when})")
    return report


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_make_collect_report(collector: Any):
    report = yield
    if CI and report.skipped and not _declared(collector):
        _fail_skip(report, f"collecting {collector.nodeid}")
    return report


def _need_reference_stack() -> None:
    missing = []
    for mod in ("torch", "transformers", "sentencepiece", "tokenizers", "safetensors"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        reason = f"reference models need {', '.join(missing)} (not installed)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def converter():
    return convert_pkg


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, dict[str, Any]]:
    return TINY_MODELS


@pytest.fixture(scope="session")
def _cache_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_ernie")


@pytest.fixture(scope="session")
def ernie_tokenizer(_cache_root) -> dict[str, Any]:
    """Builds the reference tokenizer files once; returns {"dir", "n_pieces", "special_ids"}."""
    _need_reference_stack()
    d = _cache_root / "_tokenizer"
    info = build_tokenizer(d)
    return dict(info, dir=d)


@pytest.fixture(scope="session")
def hf_model_dir(_cache_root, ernie_tokenizer) -> Callable[[str], Path]:
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in TINY_MODELS:
            raise KeyError(f"no tiny model {name!r}; have {sorted(TINY_MODELS)}")
        if name not in built:
            built[name] = build_model(name, _cache_root / name, ernie_tokenizer["dir"], ernie_tokenizer["n_pieces"])
        return built[name]

    return get


def _converted(cache_root: Path, model_dir: Callable[[str], Path]) -> Callable[..., Path]:
    """A factory converting ``model_dir(name)`` with our converter, once per (name, outtype)."""
    made: dict[tuple[str, str], Path] = {}

    def get(name: str, outtype: str = "f32") -> Path:
        key = (name, outtype)
        if key not in made:
            out = cache_root / "gguf" / f"{name}-{outtype}.gguf"
            out.parent.mkdir(exist_ok=True)
            made[key] = convert_pkg.convert(model_dir(name), out, outtype)
        return made[key]

    return get


@pytest.fixture(scope="session")
def gguf_model(_cache_root, hf_model_dir) -> Callable[..., Path]:
    return _converted(_cache_root, hf_model_dir)


@pytest.fixture(scope="session")
def reference_model(hf_model_dir) -> Callable[[str], Any]:
    loaded: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in loaded:
            import torch
            from transformers import AutoModelForCausalLM

            m = AutoModelForCausalLM.from_pretrained(hf_model_dir(name), dtype=torch.float32)
            loaded[name] = m.eval()
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def reference_tokenizer(hf_model_dir) -> Callable[[str], Any]:
    loaded: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in loaded:
            from transformers import AutoTokenizer

            loaded[name] = AutoTokenizer.from_pretrained(hf_model_dir(name))
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def tiny_gguf(_cache_root) -> Callable[[str], Path]:
    import importlib

    synthetic = importlib.import_module(f"{convert_pkg.__name__}.synthetic")
    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            out = _cache_root / "synthetic" / f"tiny-{arch}.gguf"
            out.parent.mkdir(exist_ok=True)
            made[arch] = synthetic.write_tiny_gguf(arch, out)
        return made[arch]

    return get


# -- ERNIE 4.5 VL ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_vl(tiny_gguf, _cache_root) -> tuple[Path, Path]:
    """(model, mmproj): the synthetic ``ernie4_5-vl-moe`` GGUF and a tiny projector for it
    (``write_tiny_mmproj``, seed 0); no torch needed."""
    from pyllama_ernie.convert.synthetic import write_tiny_mmproj

    model = tiny_gguf("ernie4_5-vl-moe")
    mmproj = model.parent / "tiny-mmproj.gguf"
    if not mmproj.exists():
        write_tiny_mmproj(mmproj, n_embd_text=64, seed=0)
    return model, mmproj


@pytest.fixture(scope="session")
def vl_models() -> dict[str, dict[str, Any]]:
    return VL_MODELS


@pytest.fixture(scope="session")
def vl_model_dir(_cache_root, ernie_tokenizer) -> Callable[[str], Path]:
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in VL_MODELS:
            raise KeyError(f"no VL model {name!r}; have {sorted(VL_MODELS)}")
        if name not in built:
            source = VL_MODELS[name].get("baidu_of")
            if source is not None:
                # same folder name as the source, so general.name (taken from it) is the same too
                built[name] = build_vl_baidu(get(source), _cache_root / "baidu" / source)
            else:
                built[name] = build_vl_model(name, _cache_root / name, ernie_tokenizer["dir"],
                                             ernie_tokenizer["n_pieces"], ernie_tokenizer["special_ids"])
        return built[name]

    return get


@pytest.fixture(scope="session")
def vl_gguf(_cache_root, vl_model_dir) -> Callable[..., Path]:
    return _converted(_cache_root, vl_model_dir)


@pytest.fixture(scope="session")
def vl_reference_model(vl_model_dir) -> Callable[[str], Any]:
    loaded: dict[str, Any] = {}

    def get(name: str) -> Any:
        name = VL_MODELS[name].get("baidu_of", name)
        if name not in loaded:
            import torch
            from transformers import Ernie4_5_VLMoeForConditionalGeneration

            m = Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(vl_model_dir(name), dtype=torch.float32)
            loaded[name] = m.eval()
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def reference_tokenizer_vl(vl_model_dir) -> Callable[[str], Any]:
    loaded: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in loaded:
            from transformers import AutoTokenizer

            loaded[name] = AutoTokenizer.from_pretrained(vl_model_dir(name))
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def vl_mmproj(_cache_root, vl_model_dir) -> Callable[..., Path]:
    made: dict[tuple[str, str], Path] = {}

    def get(name: str, outtype: str = "f32") -> Path:
        key = (name, outtype)
        if key not in made:
            out = _cache_root / "mmproj" / f"{name}-{outtype}.gguf"
            out.parent.mkdir(exist_ok=True)
            made[key] = convert_pkg.convert_mmproj(vl_model_dir(name), out, outtype)
        return made[key]

    return get
