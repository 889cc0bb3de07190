"""scripts/vendor.py fill --dest DIR [--unpatched]: the pinned tree elsewhere, with or without patches/."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Added by patches/0002 (the ERNIE-4.5-VL-MoE language model); upstream has neither.
PATCH_ONLY_FILE = "src/models/ernie4-5-vl-moe.cpp"
PATCH_ONLY_ARCH = '"ernie4_5-vl-moe"'

pytestmark = pytest.mark.slow  # extracts and patches the whole pinned tree several times


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def vendor(tmp_path_factory):
    mod = _load("vendor_script_dest", ROOT / "scripts" / "vendor.py")
    # The real vendor/llama.cpp is never a target here: the default path points into tmp.
    mod.VENDOR = tmp_path_factory.mktemp("default") / "vendor" / "llama.cpp"
    env = os.environ.get("PYLLAMA_ERNIE_LLAMA_SDIST")
    if not (env and Path(env).is_file()) and not (mod.cache_dir() / mod.SDIST_FILE).is_file():
        try:
            mod.obtain_sdist()  # downloads it, where there is network
        except mod.VendorError as e:
            pytest.skip(f"the pinned llama.cpp sdist is not cached and cannot be downloaded: {str(e)[:200]}")
    return mod


@pytest.fixture(scope="module")
def trees(vendor, tmp_path_factory):
    base = tmp_path_factory.mktemp("trees")
    patched, unpatched = base / "src-patched", base / "src-unpatched"
    assert vendor.fill(dest=patched) is True
    assert vendor.fill(dest=unpatched, patched=False) is True
    return patched, unpatched


def test_patched_dest_has_our_changes_and_unpatched_does_not(vendor, trees):
    patched, unpatched = trees
    assert (patched / PATCH_ONLY_FILE).is_file()
    assert PATCH_ONLY_ARCH in (patched / "src" / "llama-arch.cpp").read_text()
    assert not (unpatched / PATCH_ONLY_FILE).exists()
    assert PATCH_ONLY_ARCH not in (unpatched / "src" / "llama-arch.cpp").read_text()
    # upstream's own ERNIE 4.5 (text MoE) support is in both
    for tree in trees:
        assert '"ernie4_5-moe"' in (tree / "src" / "llama-arch.cpp").read_text()
        assert (tree / "CMakeLists.txt").is_file()
        assert not (tree / "docs").exists()  # the same exclusions as vendor/llama.cpp


def test_dest_stamps_say_which_tree(vendor, trees):
    patched, unpatched = trees
    assert vendor.current_stamp(patched) == vendor.wanted_stamp()
    assert vendor.current_stamp(unpatched) == vendor.wanted_stamp(patched=False)
    assert vendor.current_stamp(unpatched)["patches"] == []
    assert vendor.wanted_stamp()["patches"], "patches/series lists patches"
    assert not vendor.VENDOR.exists(), "fill --dest must not touch the default tree"


def test_current_dest_is_not_refilled_and_a_changed_one_is(vendor, trees):
    patched, unpatched = trees
    marker = patched / "marker"
    marker.write_text("kept")
    assert vendor.fill(dest=patched) is False
    assert marker.read_text() == "kept"
    # the unpatched tree asked for patched: stale, refilled with the patches
    assert vendor.fill(dest=unpatched) is True
    assert (unpatched / PATCH_ONLY_FILE).is_file()
    assert vendor.fill(dest=unpatched, patched=False) is True
    assert not (unpatched / PATCH_ONLY_FILE).exists()
    # a stamp from other patches: refilled
    stamp = patched / vendor.STAMP
    stamp.write_text(json.dumps(dict(vendor.wanted_stamp(), patches=[{"name": "old.patch", "sha256": "0"}])))
    assert vendor.fill(dest=patched) is True
    assert not marker.exists()
    assert vendor.current_stamp(patched) == vendor.wanted_stamp()


def test_a_directory_not_filled_by_vendor_py_is_never_deleted(vendor, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(vendor.VendorError, match="not filled by scripts/vendor.py"):
        vendor.fill(dest=mine)
    with pytest.raises(vendor.VendorError, match="not deleting"):
        vendor.fill(dest=mine, force=True)
    assert (mine / "notes.txt").read_text() == "precious"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert vendor.fill(dest=empty, patched=False) is True
    assert vendor.current_stamp(empty) == vendor.wanted_stamp(patched=False)


def test_default_fill_still_fills_vendor_llama_cpp_patched(vendor, trees, capsys):
    assert vendor.main(["fill"]) == 0
    assert (vendor.VENDOR / PATCH_ONLY_FILE).is_file()
    assert vendor.current_stamp() == vendor.wanted_stamp()
    assert vendor.fill() is False
    capsys.readouterr()
    vendor.status()
    assert capsys.readouterr().out.startswith("vendor/llama.cpp: current;")


def test_cli_dest_and_status(vendor, trees, capsys):
    unpatched = trees[1]
    assert vendor.main(["fill", "--dest", str(unpatched), "--unpatched"]) == 0
    capsys.readouterr()
    assert vendor.main(["status", "--dest", str(unpatched), "--unpatched"]) == 0
    assert vendor.main(["status", "--dest", str(unpatched)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{unpatched}: current;") and out[0].endswith("patches: []")
    assert out[1].startswith(f"{unpatched}: stale")
    with pytest.raises(SystemExit):
        vendor.main(["fill", "--unpatched"])  # vendor/llama.cpp is always the patched tree
    assert "needs --dest" in capsys.readouterr().err


def test_build_tools_configures_like_the_wheel_plus_tools(monkeypatch):
    bt = _load("build_tools_script", ROOT / "benchmarks" / "build_tools.py")
    monkeypatch.setenv("CMAKE_ARGS", "-DGGML_NATIVE=ON -DGGML_CUDA=ON")
    args = bt.cmake_args("unpatched")
    for opt in ("-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_COMMON=ON",
                # llama-server for serve_bench.py, without its web UI (no npm) and without TLS
                "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_OPENSSL=OFF", "-DCMAKE_BUILD_TYPE=Release"):
        assert opt in args, opt
    # CMAKE_ARGS comes last, so it wins over the defaults
    assert args.index("-DGGML_NATIVE=ON") > args.index("-DGGML_NATIVE=OFF")
    assert args[-1] == "-DGGML_CUDA=ON"
    assert f"-DLLAMA_BUILD_COMMIT={bt.vendor.BASE_COMMIT[:7]}-patched" in bt.cmake_args("patched")
    with pytest.raises(SystemExit):
        bt.main(["--which", "patched,nonsense"])


def test_build_tools_touches_only_files_whose_content_changed(tmp_path):
    """A refill restores the sdist's old mtimes; what changed must look newer than its object."""
    bt = _load("build_tools_script", ROOT / "benchmarks" / "build_tools.py")
    tree = tmp_path / "src"
    (tree / "src").mkdir(parents=True)
    for name, text in (("same.cpp", "a"), ("patched.cpp", "b"), ("dropped.cpp", "c")):
        (tree / "src" / name).write_text(text)
    (tree / bt.vendor.STAMP).write_text("{}")
    before = bt.source_hashes(tree)
    assert sorted(before) == ["src/dropped.cpp", "src/patched.cpp", "src/same.cpp"]
    (tree / "src" / "patched.cpp").write_text("b, unpatched")  # a patch taken out ...
    (tree / "src" / "dropped.cpp").unlink()
    (tree / "src" / "new.cpp").write_text("d")
    for path in tree.rglob("*.cpp"):
        os.utime(path, (1_000_000, 1_000_000))  # ... with the sdist's old mtime
    changed = bt.touch_changed(tree, before, bt.source_hashes(tree))
    assert sorted(changed) == ["src/new.cpp", "src/patched.cpp"]
    assert (tree / "src" / "same.cpp").stat().st_mtime == 1_000_000
    assert (tree / "src" / "patched.cpp").stat().st_mtime > 1_000_000


def test_build_tools_compiles_the_package_cpu_variant():
    """Static tools get the instruction sets of the variant the package loads, as ggml's CMake lists them."""
    import re

    bt = _load("build_tools_script", ROOT / "benchmarks" / "build_tools.py")
    text = (ROOT / "vendor" / "llama.cpp" / "ggml" / "src" / "CMakeLists.txt").read_text()
    x86 = text[text.index('if (GGML_SYSTEM_ARCH STREQUAL "x86")', text.index("if (GGML_CPU_ALL_VARIANTS)")):]
    x86 = x86[:x86.index("elseif")]
    ggml = {m.group(1): tuple(m.group(2).split()) for m in re.finditer(r"ggml_add_cpu_backend_variant\((\w+)([^)]*)\)", x86)}
    assert ggml == {k: tuple(v) for k, v in bt.CPU_VARIANT_FEATURES.items()}

    args = bt.cmake_args("patched", "zen4")
    for feat in ("AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16"):
        assert f"-DGGML_{feat}=ON" in args
    for feat in ("AMX_TILE", "AMX_INT8", "AVX_VNNI"):
        assert f"-DGGML_{feat}=OFF" in args
    assert all(a.endswith("=OFF") for a in bt.variant_args("x64"))
    assert bt.variant_args(None) == []
    with pytest.raises(SystemExit):
        bt.variant_args("pentium")
