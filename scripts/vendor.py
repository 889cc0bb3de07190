#!/usr/bin/env python3
"""Fill and maintain ``vendor/llama.cpp``: the pinned upstream tree plus ``patches/``.

The llama.cpp sources are not committed. They come from the PyPI sdist of
llama-cpp-python pinned below (hash-checked), and our changes live as ordered
patches listed in ``patches/series``.

Commands::

    python scripts/vendor.py fill      # fetch (if needed), verify, extract, patch
    python scripts/vendor.py edit      # make vendor/llama.cpp a git checkout:
                                       # base commit + one commit per patch
    python scripts/vendor.py export    # turn those commits back into patches/
    python scripts/vendor.py status    # what is in vendor/llama.cpp now

    python scripts/vendor.py fill --dest DIR [--unpatched]
                                       # the same tree (or upstream's, without
                                       # patches/) in DIR, e.g. to build llama.cpp's
                                       # own tools; status --dest DIR checks it

Environment:

    PYLLAMA_ERNIE_LLAMA_SDIST   path of an already downloaded sdist (offline builds)
    PYLLAMA_ERNIE_CACHE         where a downloaded sdist is kept
                                (default: ~/.cache/pyllama_ernie)

The CMake build runs ``fill`` when the tree is missing; every failure stops with
a message that says what to do.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_NAME = "llama-cpp-python"
SDIST_VERSION = "0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
BASE_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"

ROOT = Path(__file__).resolve().parent.parent
VENDOR = ROOT / "vendor" / "llama.cpp"
PATCHES = ROOT / "patches"
STAMP = ".pyllama_ernie_vendor.json"

# Parts of the upstream tree nothing here builds or patches (vocab test files,
# docs, web UI): left out to keep the filled tree and our sdist small.
EXCLUDE_TOP = {"models", "docs", "media", ".devops", ".github"}
EXCLUDE_PATHS = {"tools/ui"}
BASE_MESSAGE = f"llama.cpp {BASE_COMMIT[:9]} (from {SDIST_FILE})"


class VendorError(Exception):
    """A failure with a message that tells the user what to do."""


def read_series() -> list[str]:
    series = PATCHES / "series"
    if not series.exists():
        return []
    names = []
    for line in series.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            if not (PATCHES / line).is_file():
                raise VendorError(f"patches/series names {line}, which does not exist in patches/.")
            names.append(line)
    return names


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def wanted_stamp(patched: bool = True) -> dict:
    return {
        "base_commit": BASE_COMMIT,
        "sdist": SDIST_FILE,
        "sdist_sha256": SDIST_SHA256,
        "patches": [{"name": n, "sha256": sha256_of(PATCHES / n)} for n in read_series()] if patched else [],
    }


def current_stamp(tree: Path | None = None) -> dict | None:
    path = (tree or VENDOR) / STAMP
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cache_dir() -> Path:
    env = os.environ.get("PYLLAMA_ERNIE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pyllama_ernie"


def obtain_sdist() -> Path:
    """Return a verified path of the pinned sdist, downloading it with pip if needed."""
    env = os.environ.get("PYLLAMA_ERNIE_LLAMA_SDIST")
    if env:
        path = Path(env)
        if not path.is_file():
            raise VendorError(f"PYLLAMA_ERNIE_LLAMA_SDIST={env} is not a file.")
        verify(path)
        return path

    cached = cache_dir() / SDIST_FILE
    if cached.is_file():
        try:
            verify(cached)
            return cached
        except VendorError:
            cached.unlink()

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            # Metadata is read with the build backend already installed here;
            # an isolated build would compile cmake from source just to read it.
            "--no-build-isolation",
            f"{SDIST_NAME}=={SDIST_VERSION}", "-d", tmp,
        ]
        print(f"-- pyllama_ernie: downloading {SDIST_NAME}=={SDIST_VERSION} (llama.cpp sources)", flush=True)
        proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        got = Path(tmp) / SDIST_FILE
        if proc.returncode != 0 or not got.is_file():
            raise VendorError(
                f"could not download {SDIST_NAME}=={SDIST_VERSION} with pip:\n{proc.stdout[-2000:]}\n"
                "Without network access, download the file on another machine with\n"
                f"  pip download --no-deps --no-binary :all: --no-build-isolation {SDIST_NAME}=={SDIST_VERSION}\n"
                "and point PYLLAMA_ERNIE_LLAMA_SDIST at it (or install from pyllama_ernie's own sdist, "
                "which carries the patched sources)."
            )
        verify(got)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(got, cached)
            return cached
        except OSError:
            keep = Path(tempfile.mkdtemp()) / SDIST_FILE
            shutil.copyfile(got, keep)
            return keep


def verify(path: Path) -> None:
    digest = sha256_of(path)
    if digest != SDIST_SHA256:
        raise VendorError(
            f"{path} has sha256 {digest}, expected {SDIST_SHA256}.\n"
            "The file is damaged or is not the pinned release: delete it and build again."
        )


def extract(sdist: Path, dest: Path) -> None:
    """Extract ``vendor/llama.cpp`` of the sdist into ``dest`` (which must not exist)."""
    prefix = f"{SDIST_FILE[: -len('.tar.gz')]}/vendor/llama.cpp/"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".llama.cpp-"))
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            members = []
            for m in tar.getmembers():
                if not m.name.startswith(prefix):
                    continue
                rel = m.name[len(prefix):]
                parts = rel.split("/")
                if not rel or parts[0] in EXCLUDE_TOP or any(rel == p or rel.startswith(p + "/") for p in EXCLUDE_PATHS):
                    continue
                if rel == ".git":  # a submodule's gitdir pointer into the sdist's own .git
                    continue
                m.name = rel
                members.append(m)
            if not members:
                raise VendorError(f"{sdist} holds no vendor/llama.cpp tree.")
            tar.extractall(tmp, members=members, filter="data")
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def apply_patch(tree: Path, patch: Path) -> None:
    git = shutil.which("git")
    if git:
        cmd = [git, "apply", "--whitespace=nowarn", str(patch)]
    elif shutil.which("patch"):
        cmd = ["patch", "-p1", "--forward", "--batch", "-i", str(patch)]
    else:
        raise VendorError("applying patches/ needs git or patch on PATH; install one of them.")
    # GIT_DIR keeps git from treating an enclosing repository as the target.
    env = dict(os.environ, GIT_DIR=str(tree / ".git-none"))
    proc = subprocess.run(cmd, check=False, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if proc.returncode != 0:
        raise VendorError(
            f"patches/{patch.name} does not apply to llama.cpp {BASE_COMMIT[:9]}:\n{proc.stdout[-3000:]}\n"
            "Fix the patch (python scripts/vendor.py edit, then export) or its order in patches/series."
        )


def tree_name(tree: Path) -> str:
    return "vendor/llama.cpp" if tree == VENDOR else str(tree)


def fill(force: bool = False, dest: Path | None = None, patched: bool = True) -> bool:
    """Make ``vendor/llama.cpp`` (or ``dest``) the pinned tree with the current series applied.

    ``patched=False`` leaves out patches/ (upstream's tree, to compare against);
    the stamp in the tree records which. Returns True when the tree was
    (re)built, False when it was already current.
    """
    tree = Path(dest).resolve() if dest is not None else VENDOR
    name = tree_name(tree)
    want = wanted_stamp(patched)
    have = current_stamp(tree)
    if tree.is_dir() and have is None and tree != VENDOR and not any(tree.iterdir()):
        tree.rmdir()  # an empty directory given as --dest
    if tree.exists() and not force:
        if (tree / ".git").exists():
            print(f"-- pyllama_ernie: {name} is a git checkout (edit mode); using it as it is.")
            return False
        if have == want:
            return False
        if have is None:
            raise VendorError(
                f"{tree} exists but was not filled by scripts/vendor.py; remove it and build again."
            )
        print(f"-- pyllama_ernie: patches changed; refilling {name}", flush=True)
    if tree.exists():
        if (tree / ".git").exists() and not force:
            raise VendorError(f"{name} is in edit mode; run export, then fill --force.")
        if tree != VENDOR and have is None:
            raise VendorError(f"{tree} was not filled by scripts/vendor.py; not deleting it. Choose another --dest.")
        shutil.rmtree(tree)
    sdist = obtain_sdist()
    tree.parent.mkdir(parents=True, exist_ok=True)
    extract(sdist, tree)
    try:
        for entry in want["patches"]:
            apply_patch(tree, PATCHES / entry["name"])
    except BaseException:
        shutil.rmtree(tree, ignore_errors=True)
        raise
    (tree / STAMP).write_text(json.dumps(want, indent=1) + "\n")
    print(f"-- pyllama_ernie: {name} = {BASE_MESSAGE} + {len(want['patches'])} patches", flush=True)
    return True


def git(*args: str, capture: bool = False) -> str:
    proc = subprocess.run(["git", "-C", str(VENDOR), *args], check=False, text=True,
                          stdout=subprocess.PIPE if capture else None)
    if proc.returncode != 0:
        raise VendorError(f"git {' '.join(args)} failed in {VENDOR}")
    return proc.stdout or ""


def edit() -> None:
    """Re-extract the pristine tree as a git checkout and apply the series as commits."""
    if (VENDOR / ".git").exists():
        raise VendorError("vendor/llama.cpp is already in edit mode.")
    if VENDOR.exists():
        shutil.rmtree(VENDOR)
    extract(obtain_sdist(), VENDOR)
    ident = ["-c", "user.name=pyllama_ernie", "-c", "user.email=dev@pyllama-ernie.invalid"]
    git("init", "-q")
    git("add", "-A")
    git(*ident, "commit", "-q", "-m", BASE_MESSAGE)
    git("tag", "base")
    for name in read_series():
        proc = subprocess.run(["git", "-C", str(VENDOR), *ident, "am", "-q", "--keep-cr", str(PATCHES / name)], check=False)
        if proc.returncode != 0:
            raise VendorError(f"patches/{name} does not apply; resolve it in {VENDOR} (git am --continue).")
    print(f"vendor/llama.cpp is a git checkout: tag 'base' + {len(read_series())} commits.\n"
          "Edit and commit there (one commit per concern), then run: python scripts/vendor.py export")


def export() -> None:
    """Write one patch per commit since 'base' into patches/ and rewrite patches/series."""
    if not (VENDOR / ".git").exists():
        raise VendorError("vendor/llama.cpp is not in edit mode; run: python scripts/vendor.py edit")
    if git("status", "--porcelain", capture=True).strip():
        raise VendorError("vendor/llama.cpp has uncommitted changes; commit them first.")
    for old in PATCHES.glob("*.patch"):
        old.unlink()
    out = git("format-patch", "--zero-commit", "--no-signature", "--no-stat", "-N",
              "-o", str(PATCHES), "base..HEAD", capture=True)
    names = [Path(line).name for line in out.splitlines() if line.strip()]
    header = [l for l in (PATCHES / "series").read_text().splitlines() if l.startswith("#")] if (PATCHES / "series").exists() else []
    (PATCHES / "series").write_text("\n".join(header + names) + "\n")
    print(f"wrote {len(names)} patches to patches/ and patches/series")


def status(dest: Path | None = None, patched: bool = True) -> None:
    tree = Path(dest).resolve() if dest is not None else VENDOR
    name = tree_name(tree)
    have = current_stamp(tree)
    if not tree.exists():
        how = "" if dest is None else f" --dest {dest}" + ("" if patched else " --unpatched")
        print(f"{name}: missing (python scripts/vendor.py fill{how})")
    elif (tree / ".git").exists():
        print(f"{name}: edit mode (git checkout)")
        if tree == VENDOR:
            print(git("log", "--oneline", "base..HEAD", capture=True), end="")
    else:
        state = "current" if have == wanted_stamp(patched) else "stale (patches changed)"
        print(f"{name}: {state}; {BASE_MESSAGE}; patches: {[p['name'] for p in (have or {}).get('patches', [])]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fill", help="fetch, verify, extract and patch the tree if needed")
    f.add_argument("--force", action="store_true", help="refill even if the tree looks current")
    sub.add_parser("edit", help="make vendor/llama.cpp a git checkout with the series as commits")
    sub.add_parser("export", help="regenerate patches/ from the commits in vendor/llama.cpp")
    s = sub.add_parser("status", help="say what vendor/llama.cpp holds")
    for p in (f, s):
        p.add_argument("--dest", type=Path, default=None,
                       help="another directory instead of vendor/llama.cpp (e.g. to build llama.cpp's tools)")
        p.add_argument("--unpatched", action="store_true", help="upstream's tree: apply none of patches/ (needs --dest)")
    args = ap.parse_args(argv)
    if args.cmd in ("fill", "status") and args.unpatched and args.dest is None:
        ap.error("--unpatched needs --dest: vendor/llama.cpp always holds the patched tree")
    try:
        if args.cmd == "fill":
            fill(force=args.force, dest=args.dest, patched=not args.unpatched)
        elif args.cmd == "edit":
            edit()
        elif args.cmd == "export":
            export()
        else:
            status(dest=args.dest, patched=not args.unpatched)
    except VendorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
