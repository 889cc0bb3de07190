"""The build's own machinery: vendoring, patches, and the checked C declarations."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_vendor_module():
    spec = importlib.util.spec_from_file_location("vendor_script", ROOT / "scripts" / "vendor.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def vendor():
    return _load_vendor_module()


def test_hash_mismatch_is_refused(vendor, tmp_path, monkeypatch):
    fake = tmp_path / vendor.SDIST_FILE
    fake.write_bytes(b"not the release")
    monkeypatch.setenv("PYLLAMA_ERNIE_LLAMA_SDIST", str(fake))
    with pytest.raises(vendor.VendorError, match="sha256"):
        vendor.obtain_sdist()


def test_missing_sdist_path_is_refused(vendor, tmp_path, monkeypatch):
    monkeypatch.setenv("PYLLAMA_ERNIE_LLAMA_SDIST", str(tmp_path / "absent.tar.gz"))
    with pytest.raises(vendor.VendorError, match="not a file"):
        vendor.obtain_sdist()


def test_patch_that_does_not_apply_says_what_to_do(vendor, tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_text("one\ntwo\n")
    bad = tmp_path / "0001-bad.patch"
    bad.write_text("--- a/a.txt\n+++ b/a.txt\n@@ -1,2 +1,2 @@\n-uno\n+eins\n two\n")
    with pytest.raises(vendor.VendorError, match="does not apply"):
        vendor.apply_patch(tree, bad)
    good = tmp_path / "0002-good.patch"
    good.write_text("--- a/a.txt\n+++ b/a.txt\n@@ -1,2 +1,2 @@\n-one\n+eins\n two\n")
    vendor.apply_patch(tree, good)
    assert (tree / "a.txt").read_text() == "eins\ntwo\n"


def test_series_names_existing_patches(vendor):
    names = vendor.read_series()
    on_disk = sorted(p.name for p in (ROOT / "patches").glob("*.patch"))
    assert sorted(names) == on_disk


def test_extract_leaves_out_gitdir_pointer_and_excluded_parts(vendor, tmp_path):
    top = vendor.SDIST_FILE[: -len(".tar.gz")]
    src = tmp_path / "src" / top / "vendor" / "llama.cpp"
    (src / "docs").mkdir(parents=True)
    (src / "docs" / "x.md").write_text("doc")
    (src / "src").mkdir()
    (src / "src" / "llama.cpp").write_text("code")
    (src / ".git").write_text("gitdir: ../../.git/modules/vendor/llama.cpp")
    sdist = tmp_path / vendor.SDIST_FILE
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(tmp_path / "src" / top, arcname=top)
    dest = tmp_path / "out"
    vendor.extract(sdist, dest)
    assert (dest / "src" / "llama.cpp").read_text() == "code"
    assert not (dest / ".git").exists()
    assert not (dest / "docs").exists()


def test_filled_tree_matches_series():
    stamp = ROOT / "vendor" / "llama.cpp" / ".pyllama_ernie_vendor.json"
    if not stamp.exists():
        pytest.skip("vendor/llama.cpp is not filled in this checkout")
    vendor = _load_vendor_module()
    assert vendor.current_stamp() == vendor.wanted_stamp()


def test_drifted_declaration_fails_to_compile(tmp_path):
    """API mode: a declaration that disagrees with llama.h is a compile error, not memory corruption."""
    include = [ROOT / "vendor" / "llama.cpp" / d for d in ("include", "ggml/include", "tools/mtmd")]
    if not all(p.is_dir() for p in include) or shutil.which("cc") is None:
        pytest.skip("needs the filled vendor tree and a C compiler")
    cffi = pytest.importorskip("cffi")
    sys.path.insert(0, str(ROOT / "pyllama_ernie"))
    try:
        import _cffi_build  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    drifted = _cffi_build.CDEF.replace(
        "int32_t llama_model_n_embd(const struct llama_model * model);",
        "int64_t llama_model_n_embd(const struct llama_model * model, int extra);",
    )
    assert drifted != _cffi_build.CDEF
    for cdef, should_compile in ((_cffi_build.CDEF, True), (drifted, False)):
        ffi = cffi.FFI()
        ffi.cdef(cdef)
        ffi.set_source("_drift_check", _cffi_build.SOURCE, include_dirs=[str(p) for p in include])
        c_file = tmp_path / f"check_{should_compile}.c"
        ffi.emit_c_code(str(c_file))
        cmd = ["cc", "-fsyntax-only", "-Werror=incompatible-pointer-types", "-Werror=implicit-function-declaration",
               *[f"-I{p}" for p in include], f"-I{_python_include()}", str(c_file)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert (proc.returncode == 0) == should_compile, proc.stderr[-2000:]


def _python_include() -> str:
    import sysconfig

    return sysconfig.get_paths()["include"]


@pytest.mark.slow
def test_edit_then_export_reproduces_the_series(tmp_path):
    """The documented patch workflow: edit (git checkout with one commit per patch), export."""
    if shutil.which("git") is None:
        pytest.skip("needs git")
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    shutil.copytree(ROOT / "patches", tmp_path / "patches")
    run = lambda *a: subprocess.run([sys.executable, str(tmp_path / "scripts" / "vendor.py"), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=600)
    r = run("edit")
    assert r.returncode == 0, r.stderr
    log = subprocess.run(["git", "-C", str(tmp_path / "vendor" / "llama.cpp"), "log", "--format=%s", "base..HEAD"],
                         capture_output=True, text=True).stdout.split("\n")
    series = [p for p in (ROOT / "patches" / "series").read_text().splitlines() if p and not p.startswith("#")]
    assert len([line for line in log if line]) == len(series)
    r = run("export")
    assert r.returncode == 0, r.stderr
    for name in series:
        assert (tmp_path / "patches" / name).read_bytes() == (ROOT / "patches" / name).read_bytes(), name
    assert (tmp_path / "patches" / "series").read_text() == (ROOT / "patches" / "series").read_text()
