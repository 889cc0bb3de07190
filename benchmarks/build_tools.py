"""Build llama.cpp's own ``llama-bench`` and ``llama-completion`` (and ``llama-server``), patched and upstream.

    python benchmarks/build_tools.py [--work DIR] [--jobs 2] [--which patched,unpatched]
                                     [--server | --targets llama-server,...]

For each tree, ``scripts/vendor.py`` fills ``DIR/src-<which>`` from the pinned
sdist ("patched": with patches/series applied, the tree the package builds;
"unpatched": upstream's) and skips the refill when its stamp is current. The
tree is configured in ``DIR/build-<which>`` with the wheel's ggml options
(Release, GGML_NATIVE=OFF, the instruction sets of the CPU variant the installed
package loads on this machine, plus whatever the CMAKE_ARGS environment variable
says, e.g. CMAKE_ARGS="-DGGML_NATIVE=ON" or "-DGGML_CUDA=ON"), static
libraries, and only llama-common and the tools (with the server's targets, but no
web UI, examples, tests, curl or OpenSSL); then only the requested targets are
built: by default ``llama-bench`` and ``llama-completion``; ``--server`` builds
``llama-server`` as well (``benchmarks/serve_bench.py`` compares our server with
it), ``--targets`` names the targets exactly. The build directory is reused:
after a refill (patches changed) only the files whose content changed are
rebuilt; it starts afresh when the configure options change.
Default DIR: build/bench-tools. Prints the binaries' paths.

The server's CMake needs ``tools/ui`` (the web UI), which ``scripts/vendor.py``
leaves out of the filled tree; only its ``CMakeLists.txt`` and the templates of
the generated asset table (``ui.h.in``, ``ui.cpp.in``) are put back into the tree
here, from the same pinned sdist. With ``LLAMA_BUILD_UI=OFF`` and
``LLAMA_USE_PREBUILT_UI=OFF`` (no npm, no download) llama-server is built with an
empty asset table: the HTTP API works, ``/`` serves no web page.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORK = ROOT / "build" / "bench-tools"
TREES = ("patched", "unpatched")
TARGETS = ("llama-bench", "llama-completion")
SERVER_TARGET = "llama-server"
# what ``--targets`` may name (any other CMake target of the tree works too, unchecked)
KNOWN_TARGETS = TARGETS + (SERVER_TARGET, "llama-batched-bench", "llama-cli", "llama-mtmd-cli")
UI_FILES = ("tools/ui/CMakeLists.txt", "tools/ui/ui.h.in", "tools/ui/ui.cpp.in")
CONFIG_STAMP = ".pyllama_ernie_tools.json"


def _load_vendor():
    spec = importlib.util.spec_from_file_location("pyllama_ernie_vendor", ROOT / "scripts" / "vendor.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


vendor = _load_vendor()


def _tool(name: str) -> str:
    """``name`` from this interpreter's environment (the venv has cmake and ninja), else from PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"error: {name} not found; install it (pip install {name}).")
    return found


# ggml's x86 CPU variants (ggml/src/CMakeLists.txt) and their instruction sets. The
# package loads the best variant the CPU supports; the tools are static, so they are
# compiled for that same variant.
X86_FEATURES = ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX_VNNI",
                "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_TILE", "AMX_INT8")
_HASWELL = ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2")
CPU_VARIANT_FEATURES = {
    "x64": (),
    "sse42": ("SSE42",),
    "sandybridge": ("SSE42", "AVX"),
    "ivybridge": ("SSE42", "AVX", "F16C"),
    "piledriver": ("SSE42", "AVX", "F16C", "FMA"),
    "haswell": _HASWELL,
    "skylakex": _HASWELL + ("AVX512",),
    "cannonlake": _HASWELL + ("AVX512", "AVX512_VBMI"),
    "cascadelake": _HASWELL + ("AVX512", "AVX512_VNNI"),
    "icelake": _HASWELL + ("AVX512", "AVX512_VBMI", "AVX512_VNNI"),
    "cooperlake": _HASWELL + ("AVX512", "AVX512_VNNI", "AVX512_BF16"),
    "zen4": _HASWELL + ("AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"),
    "alderlake": _HASWELL + ("AVX_VNNI",),
    "sapphirerapids": _HASWELL + ("AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_TILE", "AMX_INT8"),
}


def package_cpu_variant() -> str | None:
    """The CPU variant the installed package loads on this machine (None: one CPU backend)."""
    try:
        from pyllama_ernie.system import cpu_variant
    except ImportError:
        return None
    return cpu_variant()


def variant_args(variant: str | None) -> list[str]:
    """ggml options compiling one static CPU backend like the package's ``variant`` module."""
    if variant is None:
        return []
    if variant not in CPU_VARIANT_FEATURES:
        raise SystemExit(f"error: unknown CPU variant {variant!r}; add it to CPU_VARIANT_FEATURES")
    on = CPU_VARIANT_FEATURES[variant]
    return [f"-DGGML_{f}={'ON' if f in on else 'OFF'}" for f in X86_FEATURES]


def cmake_args(which: str, variant: str | None = None) -> list[str]:
    """The configure options: the wheel's ggml settings, tools on, everything else off, then CMAKE_ARGS.

    ``variant``: compile the CPU backend for this ggml CPU variant (see ``package_cpu_variant``).
    """
    commit = vendor.BASE_COMMIT[:7] + ("-patched" if which == "patched" else "")
    args = [
        "-G", "Ninja",
        f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}",
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",  # static ggml/llama: the binaries need no library path
        "-DGGML_NATIVE=OFF",  # as the wheel; CMAKE_ARGS="-DGGML_NATIVE=ON" overrides it
        "-DLLAMA_BUILD_COMMON=ON",
        "-DLLAMA_BUILD_TOOLS=ON",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        # configured always (so that adding the server to the targets does not reconfigure);
        # built only when asked for; tools/ui's CMakeLists.txt comes from add_ui_cmake()
        "-DLLAMA_BUILD_SERVER=ON",
        "-DLLAMA_BUILD_UI=OFF",  # no npm build of the web UI
        "-DLLAMA_USE_PREBUILT_UI=OFF",  # and no download of a prebuilt one
        "-DLLAMA_BUILD_APP=OFF",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_SUBPROCESS=OFF",
        "-DLLAMA_BUILD_IS_DEV=OFF",
        "-DLLAMA_BUILD_NUMBER=0",
        # the tree is no git checkout; llama-bench reports this as build_commit
        f"-DLLAMA_BUILD_COMMIT={commit}",
    ]
    return args + variant_args(variant) + shlex.split(os.environ.get("CMAKE_ARGS", ""))


def _run(cmd: list[str], env: dict | None = None) -> None:
    print("+ " + shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, check=False, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"error: {cmd[0]} failed with status {proc.returncode}")


def source_hashes(tree: Path) -> dict[str, str]:
    """sha256 of every file of a filled tree, by relative path."""
    return {
        path.relative_to(tree).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(tree.rglob("*"))
        if path.is_file() and path.name != vendor.STAMP
    }


def touch_changed(tree: Path, old: dict[str, str], new: dict[str, str]) -> list[str]:
    """Give each file whose content changed since ``old`` the current time; returns their paths.

    A refilled tree keeps the sdist's mtimes: a file a removed patch had
    changed goes back to an mtime older than its object, and ninja would keep
    the stale object. Touched, only what changed is rebuilt.
    """
    changed = [rel for rel, digest in new.items() if old.get(rel) != digest]
    now = time.time()
    for rel in changed:
        os.utime(tree / rel, (now, now))
    return changed


def add_ui_cmake(tree: Path) -> list[str]:
    """Put ``tools/ui``'s CMake files (left out by ``scripts/vendor.py``) back into a filled tree.

    tools/CMakeLists.txt adds ``tools/ui`` whenever LLAMA_BUILD_SERVER is on; the
    rest of the web UI (its npm sources) is not needed with LLAMA_BUILD_UI=OFF and
    LLAMA_USE_PREBUILT_UI=OFF: scripts/ui-assets.cmake then fills the templates with
    an empty asset table. Taken from the pinned sdist (hash-checked). Returns
    the relative paths written (none when they were already there).
    """
    import tarfile

    missing = [rel for rel in UI_FILES if not (tree / rel).is_file()]
    if not missing:
        return []
    try:
        sdist = vendor.obtain_sdist()
    except vendor.VendorError as e:
        raise SystemExit(f"error: {e}") from None
    prefix = f"{vendor.SDIST_FILE[: -len('.tar.gz')]}/vendor/llama.cpp/"
    with tarfile.open(sdist, "r:gz") as tar:
        for rel in missing:
            f = tar.extractfile(prefix + rel)
            if f is None:
                raise SystemExit(f"error: {sdist} holds no {rel}")
            dest = tree / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read())
    return missing


def build_one(work: Path, which: str, jobs: int = 2, targets=TARGETS) -> dict[str, Path]:
    if which not in TREES:
        raise ValueError(f"which must be one of {TREES}, not {which!r}")
    targets = tuple(targets)
    src = work / f"src-{which}"
    build = work / f"build-{which}"
    try:
        vendor.fill(dest=src, patched=which == "patched")
    except vendor.VendorError as e:
        raise SystemExit(f"error: {e}") from None
    add_ui_cmake(src)
    # The trees sit inside this repository: without a ceiling, upstream's
    # `git describe` (configure, and ninja's re-runs of it) would report our
    # commit as ggml's.
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(work))

    args = cmake_args(which, package_cpu_variant())
    sources = source_hashes(src)
    stamp = build / CONFIG_STAMP
    try:
        have = json.loads(stamp.read_text())
    except (OSError, ValueError):
        have = None
    if not have or have.get("cmake_args") != args or "sources" not in have or not (build / "build.ninja").is_file():
        # A dropped CMAKE_ARGS option would stay in CMake's cache: start afresh.
        if build.exists():
            print(f"-- {which}: configure options changed; configuring {build} afresh", flush=True)
            shutil.rmtree(build)
        _run([_tool("cmake"), "-S", str(src), "-B", str(build), *args], env=env)
    else:
        changed = touch_changed(src, have["sources"], sources)
        if changed:
            print(f"-- {which}: {len(changed)} source files changed since the last build", flush=True)
    stamp.write_text(json.dumps({"cmake_args": args, "sources": sources}, indent=1) + "\n")
    _run([_tool("cmake"), "--build", str(build), "--target", *targets, "-j", str(jobs)], env=env)
    bins = {t: build / "bin" / t for t in targets}
    missing = [str(p) for p in bins.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"error: the build did not produce {', '.join(missing)}")
    return bins


def build_tools(work: Path | str = DEFAULT_WORK, which=TREES, jobs: int = 2,
                targets=TARGETS) -> dict[str, dict[str, Path]]:
    """Build ``targets`` of each tree in ``which``; returns ``{tree: {target: binary path}}``."""
    work = Path(work).resolve()
    out = {}
    for w in which:
        t0 = time.perf_counter()
        out[w] = build_one(work, w, jobs, targets)
        print(f"-- {w}: built in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def build_server(work: Path | str = DEFAULT_WORK, jobs: int = 2, which: str = "patched") -> Path:
    """Build ``llama-server`` from the ``which`` tree (default: the patched one the package uses); its path."""
    return build_tools(work, (which,), jobs, (SERVER_TARGET,))[which][SERVER_TARGET]


def server_binary(work: Path | str = DEFAULT_WORK, which: str = "patched") -> Path:
    """Where ``build_server`` puts ``llama-server`` (it may not be built yet)."""
    return Path(work).resolve() / f"build-{which}" / "bin" / SERVER_TARGET


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="where the trees and builds go (default: %(default)s)")
    ap.add_argument("--jobs", "-j", type=int, default=2, help="parallel compile jobs (default: %(default)s)")
    ap.add_argument("--which", default=",".join(TREES), help="comma-separated trees to build (default: %(default)s)")
    ap.add_argument("--server", action="store_true", help=f"also build {SERVER_TARGET}")
    ap.add_argument("--targets", default=None,
                    help=f"comma-separated targets to build instead (default: {','.join(TARGETS)}; "
                         f"known: {','.join(KNOWN_TARGETS)})")
    args = ap.parse_args(argv)
    which = [w.strip() for w in args.which.split(",") if w.strip()]
    bad = [w for w in which if w not in TREES]
    if bad or not which:
        ap.error(f"--which takes {', '.join(TREES)}; got {args.which!r}")
    targets = list(TARGETS) if args.targets is None else [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets:
        ap.error("--targets names no target")
    if args.server and SERVER_TARGET not in targets:
        targets.append(SERVER_TARGET)
    for w, bins in build_tools(args.work, which, args.jobs, targets).items():
        for target, path in bins.items():
            print(f"{w} {target}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
