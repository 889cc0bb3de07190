"""Hostile files: damaged GGUF models and projectors, and damaged checkpoints for the converter.

llama.cpp aborts the process on some damaged GGUF files (HAZARDS.md item 8), so every
GGUF case runs in a subprocess, where a crash is counted instead of ending the test run.
The corpus is made from tiny valid files (``write_tiny_gguf`` for the three ERNIE 4.5
architectures, ``write_tiny_mmproj``): random truncations and bit/byte flips in each
region of the file (header, metadata, tensor table, tensor data), plus designed cases
(a duplicated token, the wrong architecture, missing rope sections, an mmproj as the model
and the model as mmproj, values that trip llama.cpp's asserts, not a GGUF file at all...).
Each case is loaded with :class:`pyllama_ernie.Model` and, if it loads, asked for two
tokens (an image prompt for projectors) and one chat turn. Every case must load or raise
one of our exceptions; none may crash.

``python tests/hostile/test_files.py [--bypass] [--seed N] [--scale K] [--hunt N]`` prints
the table by hand; ``--bypass`` switches our validator off in the workers, to count what
llama.cpp alone does with the same corpus; ``--hunt N`` runs only the files, among N random
mutations, that the validator accepts (see docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

SEED = 4_500_2024
ARCHS = ("ernie4_5", "ernie4_5-moe", "ernie4_5-vl-moe")
BATCH = 20
BATCH_TIMEOUT = 120  # seconds for a whole batch; a hang is a failure too

# Runs in the subprocess: one JSON line per case, flushed, so a crash leaves the earlier ones.
_WORKER = r'''
import json, os, sys, traceback
from pathlib import Path

import numpy as np

job = json.load(open(sys.argv[1]))
import pyllama_ernie
from pyllama_ernie import IMAGE_MARKER, Model

if job.get("bypass"):
    import pyllama_ernie.model as pm
    import pyllama_ernie.vision as pv
    pm.check_gguf_file = lambda path, role=None: Path(os.fspath(path))
    pv.read_projector_info = lambda path: pv.ProjectorInfo("ernie4_5vl", 14, 2, 3136, 4842768, 64)


def ours(e):
    return isinstance(e, (pyllama_ernie.ErnieError, FileNotFoundError))


def origin(e):
    files = [f.filename for f in traceback.extract_tb(e.__traceback__)]
    return "validator" if any(f.endswith("gguf_check.py") for f in files) else "llama"


img = (np.arange(56 * 56 * 3, dtype=np.uint32).reshape(56, 56, 3) * 7 % 251).astype(np.uint8)
for case in job["cases"]:
    rec = {"i": case["i"]}
    try:
        if case["role"] == "mmproj":
            m = Model(case["model"], mmproj_path=case["path"], n_ctx=256, n_threads=1, seed=0)
        else:
            m = Model(case["path"], n_ctx=128, n_threads=1, seed=0)
    except BaseException as e:
        rec.update(load=origin(e) if ours(e) else "leak", exc=type(e).__name__, msg=str(e)[:400])
        print(json.dumps(rec), flush=True)
        continue
    rec["load"] = "ok"
    try:
        if case["role"] == "mmproj":
            m.generate(IMAGE_MARKER + " Hello", images=[img], max_tokens=2)
        else:
            m.generate("Hello w\u00f6rld \u2713 \u4f60\u597d \u00e9", max_tokens=2)
        rec["gen"] = "ok"
    except BaseException as e:
        rec["gen"] = type(e).__name__ if ours(e) else "leak:" + type(e).__name__
        rec["gen_msg"] = str(e)[:300]
    try:
        m.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=2)
        rec["chat"] = "ok"
    except BaseException as e:
        rec["chat"] = type(e).__name__ if ours(e) or isinstance(e, ValueError) else "leak:" + type(e).__name__
        rec["chat_msg"] = str(e)[:300]
    m.close()
    print(json.dumps(rec), flush=True)
'''


# -- building the corpus -------------------------------------------------------------------------

def _regions(path: Path) -> dict[str, tuple[int, int]]:
    """Byte ranges of the header, metadata, tensor table and tensor data of a valid file."""
    import gguf

    r = gguf.GGUFReader(str(path))
    ti = min(t.field.offset for t in r.tensors)
    size = path.stat().st_size
    return {"header": (0, 24), "kv": (24, ti), "tensor_info": (ti, r.data_offset), "data": (r.data_offset, size)}


def _rewrite(src: Path, dst: Path, *, arch: str | None = None, drop: tuple[str, ...] = (),
             values: dict[str, Any] | None = None,
             tensor: Callable[[str, np.ndarray], np.ndarray | None] | None = None) -> Path:
    """Copy a GGUF file with gguf-py, dropping/overriding keys and editing tensors (None drops one).

    ``values[key]`` is ``(value, GGUFValueType)`` or ``(list, ARRAY, element type)``.
    """
    import gguf

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), arch or str(r.fields["general.architecture"].contents()))
    values = dict(values or {})
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop:
            continue
        if name in values:
            w.add_key_value(name, *values.pop(name))
            continue
        sub = f.types[1] if len(f.types) > 1 else None
        w.add_key_value(name, f.contents(), f.types[0], sub)
    for key, v in values.items():
        w.add_key_value(key, *v)
    for t in r.tensors:
        data = np.asarray(t.data)
        if tensor is not None:
            data = tensor(t.name, data)
            if data is None:
                continue
        w.add_tensor(t.name, data, raw_dtype=t.tensor_type if t.tensor_type not in
                     (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def _tokens(path: Path) -> list[str]:
    import gguf

    return list(gguf.GGUFReader(str(path)).fields["tokenizer.ggml.tokens"].contents())


def _random_cases(rng: random.Random, base: Path, out: Path, role: str, model: str | None,
                  plan: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """``plan[region] = (n_truncations, n_flips)``."""
    data = base.read_bytes()
    regions = _regions(base)
    cases = []
    for region, (n_trunc, n_flip) in plan.items():
        a, b = regions[region]
        for k in range(n_trunc):
            cut = rng.randrange(a, b)
            p = out / f"{base.stem}-trunc-{region}-{k}.gguf"
            p.write_bytes(data[:cut])
            cases.append({"name": f"{base.stem}: truncated in {region} at {cut}", "path": str(p), "role": role,
                          "model": model, "kind": f"truncate/{region}"})
        for k in range(n_flip):
            buf = bytearray(data)
            how = rng.choice(("bit", "bit", "byte", "word"))
            pos = rng.randrange(a, b)
            if how == "bit":
                buf[pos] ^= 1 << rng.randrange(8)
            elif how == "byte":
                buf[pos] = rng.randrange(256)
            else:  # a run of 0xFF or random bytes: blown counts and lengths
                n = rng.randrange(2, 9)
                buf[pos:pos + n] = (b"\xff" * n) if rng.random() < 0.5 else bytes(rng.randrange(256) for _ in range(n))
                del buf[len(data):]
            p = out / f"{base.stem}-{how}-{region}-{k}.gguf"
            p.write_bytes(bytes(buf))
            cases.append({"name": f"{base.stem}: {how} flip in {region} at {pos}", "path": str(p), "role": role,
                          "model": model, "kind": f"flip/{region}"})
    return cases


def _designed_cases(d: Path, bases: dict[str, Path]) -> list[dict[str, Any]]:
    """Hand-made damage; ``expect`` is where it must be refused (or "ok"), ``match`` a part of the message.

    Without the validator (``--bypass``), llama.cpp or mtmd abort on the duplicated tokens, the
    missing byte token, the expert counts, the MoE step, the rope dimension, the 600 layers, the
    integer tensor, the projector key type, the temporal weight shape and the vision head size."""
    import gguf

    T = gguf.GGUFValueType
    vl, mm = bases["ernie4_5-vl-moe"], bases["mmproj"]
    cases: list[dict[str, Any]] = []

    def add(name: str, path: Path | str, role: str = "model", expect: str | list[str] = "validator",
            match: str | None = None) -> None:
        cases.append({"name": name, "path": str(path), "role": role, "model": str(vl) if role == "mmproj" else None,
                      "kind": "designed", "expect": expect, "match": match})

    # the vocabulary
    for arch in ARCHS:
        toks = _tokens(bases[arch])
        toks[300] = toks[301]
        add(f"{arch}: duplicated token", _rewrite(bases[arch], d / f"dup-{arch}.gguf", values={
            "tokenizer.ggml.tokens": (toks, T.ARRAY, T.STRING)}), match="twice")
    toks = _tokens(bases["ernie4_5"])
    toks[300] = toks[301] + "\x00tail"  # the same text to llama.cpp, which stops at the NUL
    add("token equal to another up to a NUL byte", _rewrite(bases["ernie4_5"], d / "dup-nul.gguf", values={
        "tokenizer.ggml.tokens": (toks, T.ARRAY, T.STRING)}), match="twice")
    toks = _tokens(bases["ernie4_5"])
    toks[3 + 0xC3] = "<0xC3>x"  # no byte-fallback token for 0xC3: tokenizing "é" (C3 A9) would abort
    add("missing byte token", _rewrite(bases["ernie4_5"], d / "nobyte.gguf", values={
        "tokenizer.ggml.tokens": (toks, T.ARRAY, T.STRING)}), match="byte token <0xC3>")
    add("no vocabulary", _rewrite(bases["ernie4_5"], d / "notokens.gguf", drop=("tokenizer.ggml.tokens",)),
        match="no vocabulary")
    add("tokenizer model 'none'", _rewrite(bases["ernie4_5"], d / "tokmodel.gguf", values={
        "tokenizer.ggml.model": ("none", T.STRING)}), match="tokenizer.ggml.model")
    add("scores shorter than tokens", _rewrite(bases["ernie4_5"], d / "scores.gguf", values={
        "tokenizer.ggml.scores": ([0.0] * 10, T.ARRAY, T.FLOAT32)}), match="scores")
    add("special token id out of range", _rewrite(bases["ernie4_5"], d / "eos.gguf", values={
        "tokenizer.ggml.eos_token_id": (100000, T.UINT32)}), match="eos_token_id")
    # the architecture and its hyperparameters
    add("wrong architecture (llama)", _rewrite(bases["ernie4_5"], d / "llama.gguf", arch="llama"),
        match="not an ERNIE 4.5 model")
    add("unknown architecture", _rewrite(bases["ernie4_5"], d / "ernie9.gguf", arch="ernie9"),
        match="not an ERNIE 4.5 model")
    add("VL model without rope sections", _rewrite(vl, d / "nosections.gguf", drop=(
        "ernie4_5-vl-moe.rope.dimension_sections",)), match="dimension_sections")
    add("VL rope sections with the wrong sum", _rewrite(vl, d / "badsections.gguf", values={
        "ernie4_5-vl-moe.rope.dimension_sections": ([2, 3, 3, 1], T.ARRAY, T.INT32)}), match="dimension_sections")
    moe = bases["ernie4_5-moe"]
    add("more experts used than exist", _rewrite(moe, d / "used.gguf", values={
        "ernie4_5-moe.expert_used_count": (5, T.UINT32)}), match="expert")
    add("no expert_used_count", _rewrite(moe, d / "noused.gguf", drop=("ernie4_5-moe.expert_used_count",)),
        match="expert_used_count")
    add("MoE layer step 0", _rewrite(moe, d / "step0.gguf", values={
        "ernie4_5-moe.interleave_moe_layer_step": (0, T.UINT32)}), match="interleave_moe_layer_step")
    add("rope dimension count differs from the head size", _rewrite(bases["ernie4_5"], d / "nrot.gguf", values={
        "ernie4_5.rope.dimension_count": (8, T.UINT32)}), match="rope.dimension_count")
    add("600 layers", _rewrite(bases["ernie4_5"], d / "layers.gguf", values={
        "ernie4_5.block_count": (600, T.UINT32)}), match="block_count")
    add("zero KV heads", _rewrite(bases["ernie4_5"], d / "kv0.gguf", values={
        "ernie4_5.attention.head_count_kv": (0, T.UINT32)}), match="head_count")
    add("hyperparameter of the wrong type", _rewrite(bases["ernie4_5"], d / "i32.gguf", values={
        "ernie4_5.embedding_length": (64, T.INT32)}), match="embedding_length")
    add("embedding of the wrong vocabulary size", _rewrite(
        bases["ernie4_5"], d / "emb.gguf", tensor=lambda n, a: a[:-1] if n == "token_embd.weight" else a),
        match="token_embd.weight")
    add("a tensor of an integer type", _rewrite(
        bases["ernie4_5"], d / "itype.gguf",
        tensor=lambda n, a: a.view(np.int32) if n == "output_norm.weight" else a), match="not a weight type")
    # mmproj / model confusion and damaged projectors
    # (refused by llama.cpp, cleanly, unless Model passes role="model" to check_gguf_file)
    add("mmproj given as the model", mm, expect=["validator", "llama"], match="mmproj")
    add("model given as mmproj", vl, role="mmproj", match="not an mmproj")
    add("text model given as mmproj", bases["ernie4_5"], role="mmproj", match="not an mmproj")
    add("projector of another width", bases["mmproj32"], role="mmproj", expect="llama",
        match="belongs to another model")
    add("projector type 'mlp'", _rewrite(mm, d / "mlp.gguf", values={"clip.projector_type": ("mlp", T.STRING)}),
        role="mmproj", match="projector type")
    add("projector key of the wrong type", _rewrite(mm, d / "patch-i32.gguf", values={
        "clip.vision.patch_size": (14, T.INT32)}), role="mmproj", match="patch_size")
    add("projector without vision encoder", _rewrite(mm, d / "novision.gguf", values={
        "clip.has_vision_encoder": (False, T.BOOL)}), role="mmproj", match="has_vision_encoder")
    add("temporal weight of the wrong shape", _rewrite(
        mm, d / "mm3.gguf", tensor=lambda n, a: a.reshape(1, -1, a.shape[-1]) if n == "mm.3.weight" else a),
        role="mmproj", match="mm.3.weight")
    add("missing projector tensor", _rewrite(mm, d / "nomm7.gguf", tensor=lambda n, a: None if n == "mm.7.weight"
                                             else a), role="mmproj", match="mm.7.weight")
    add("vision head size not a multiple of 4", _rewrite(mm, d / "heads.gguf", values={
        "clip.vision.attention.head_count": (16, T.UINT32)}), role="mmproj", match="multiple of 4")
    # not GGUF files at all
    (d / "empty.gguf").write_bytes(b"")
    add("zero bytes", d / "empty.gguf", match="empty")
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    (d / "image.gguf").write_bytes(png)
    add("a PNG image", d / "image.gguf", match="PNG")
    (d / "text.gguf").write_text("This is a README, not a model.\n" * 20)
    add("a text file", d / "text.gguf", match="text file")
    (d / "lfs.gguf").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    add("a Git LFS pointer", d / "lfs.gguf", match="Git LFS")
    (d / "be.gguf").write_bytes(b"GGUF\x00\x00\x00\x03" + bytes(64))
    add("a big-endian GGUF", d / "be.gguf", match="big-endian")
    (d / "v1.gguf").write_bytes(b"GGUF\x01\x00\x00\x00" + bytes(64))
    add("GGUF version 1", d / "v1.gguf", match="version 1")
    (d / "adir.gguf").mkdir()
    add("a directory", d / "adir.gguf", match="directory")
    add("a missing file", d / "missing.gguf", match="no such")
    if hasattr(os, "geteuid") and os.geteuid() != 0:  # root reads anyway
        p = d / "noperm.gguf"
        shutil.copyfile(bases["ernie4_5"], p)
        p.chmod(0)
        add("no read permission", p, match="permission")
    # valid files load (the corpus would mean little if nothing did)
    for arch in ARCHS:
        add(f"valid {arch}", bases[arch], expect="ok")
    add("valid mmproj", mm, role="mmproj", expect="ok")
    add("valid copy rewritten by gguf-py", _rewrite(vl, d / "copy.gguf"), expect="ok")
    return cases


def build_corpus(d: Path, seed: int = SEED, scale: int = 1) -> list[dict[str, Any]]:
    from pyllama_ernie.convert.synthetic import write_tiny_gguf, write_tiny_mmproj

    d.mkdir(parents=True, exist_ok=True)
    bases = {arch: write_tiny_gguf(arch, d / f"{arch}.gguf") for arch in ARCHS}
    bases["mmproj"] = write_tiny_mmproj(d / "mmproj.gguf", n_embd_text=64)
    bases["mmproj32"] = write_tiny_mmproj(d / "mmproj32.gguf", n_embd_text=32)
    rng = random.Random(seed)
    rand = d / "random"
    rand.mkdir(exist_ok=True)
    cases = _designed_cases(d, bases)
    model_plan = {"header": (3 * scale, 6 * scale), "kv": (6 * scale, 22 * scale),
                  "tensor_info": (5 * scale, 16 * scale), "data": (4 * scale, 4 * scale)}
    for arch in ARCHS:
        cases += _random_cases(rng, bases[arch], rand, "model", None, model_plan)
    mm_plan = {"header": (3 * scale, 4 * scale), "kv": (5 * scale, 16 * scale),
               "tensor_info": (4 * scale, 14 * scale), "data": (3 * scale, 3 * scale)}
    cases += _random_cases(rng, bases["mmproj"], rand, "mmproj", str(bases["ernie4_5-vl-moe"]), mm_plan)
    for i, c in enumerate(cases):
        c["i"] = i
    return cases


# -- running it ----------------------------------------------------------------------------------

def _package_parent() -> Path:
    """The workers' folder: the one holding the package this process imports (``python -c`` puts
    its working directory first on sys.path; the repository root would mean the source tree)."""
    import pyllama_ernie

    return Path(pyllama_ernie.__file__).resolve().parent.parent


def _run_worker(cases: list[dict[str, Any]], bypass: bool, tmp: Path) -> tuple[dict[int, dict[str, Any]], int, str]:
    fd, job = tempfile.mkstemp(suffix=".json", dir=tmp)
    with os.fdopen(fd, "w") as f:
        json.dump({"cases": cases, "bypass": bypass}, f)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    try:
        proc = subprocess.run([sys.executable, "-c", _WORKER, job], capture_output=True, text=True, check=False,
                              timeout=BATCH_TIMEOUT, env=env, cwd=_package_parent())
        rc, err, out = proc.returncode, proc.stderr, proc.stdout
    except subprocess.TimeoutExpired as e:
        rc = -int(signal.SIGKILL)
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = "timeout"
    results = {}
    for line in out.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            results[rec["i"]] = rec
    return results, rc, err[-4000:]


def _crash(i: int, rc: int, err: str, note: str) -> dict[str, Any]:
    sig = -rc if rc < 0 else None
    try:
        name = signal.Signals(sig).name if sig else None
    except ValueError:
        name = f"signal {sig}"
    return {"i": i, "load": "crash", "rc": rc, "signal": name, "stderr": f"({note})\n{err[-3000:]}"}


def _run_batch(cases: list[dict[str, Any]], bypass: bool, tmp: Path) -> dict[int, dict[str, Any]]:
    """Run cases in one worker. A worker that ends with anything but exit status 0 crashed: the
    first case without a result was running then, and is counted as a crash even when it passes
    on its own (run alone once more, for the message); the rest go on in a new worker. A worker
    that printed every result and still failed (a crash while closing or exiting) counts as a
    crash of its last case."""
    results: dict[int, dict[str, Any]] = {}
    todo = list(cases)
    while todo:
        got, rc, err = _run_worker(todo, bypass, tmp)
        results.update(got)
        missing = [c for c in todo if c["i"] not in got]
        if not missing:
            if rc != 0:
                last = todo[-1]["i"]
                results[last] = _crash(last, rc, err, f"the worker exited with {rc} after its last case")
            break
        culprit = missing[0]
        alone, rc1, _ = _run_worker([culprit], bypass, tmp)
        again = ("crashes again when run alone" if culprit["i"] not in alone or rc1 != 0
                 else "passes when run alone: intermittent, or caused by an earlier case in the worker")
        results[culprit["i"]] = _crash(culprit["i"], rc, err, f"the worker died during this case; it {again}")
        todo = missing[1:]
    return results


def run_corpus(cases: list[dict[str, Any]], tmp: Path, bypass: bool = False, jobs: int = 2) -> list[dict[str, Any]]:
    batches = [cases[k:k + BATCH] for k in range(0, len(cases), BATCH)]
    with ThreadPoolExecutor(jobs) as pool:
        parts = list(pool.map(lambda b: _run_batch(b, bypass, tmp), batches))
    merged = {i: r for part in parts for i, r in part.items()}
    return [dict(c, **merged[c["i"]]) for c in cases]


def outcome(r: dict[str, Any]) -> str:
    load = r["load"]
    if load == "ok":
        return "loaded"
    return {"validator": "refused by validator", "llama": "refused by llama.cpp (our exception)",
            "crash": "crash", "leak": "other exception"}[load]


def summary_table(results: list[dict[str, Any]]) -> str:
    groups: dict[str, Counter] = {}
    for r in results:
        key = r["kind"].split("/")[0] + ("/" + r["kind"].split("/")[1] if "/" in r["kind"] else "")
        key = f"{'mmproj' if r['role'] == 'mmproj' else 'model'} {key}"
        groups.setdefault(key, Counter())[outcome(r)] += 1
    cols = ["loaded", "refused by validator", "refused by llama.cpp (our exception)", "crash", "other exception"]
    short = ["loaded", "validator", "llama.cpp", "crashes", "other"]
    lines = [f"{'cases':34} {'n':>4} " + " ".join(f"{s:>9}" for s in short)]
    total: Counter = Counter()
    for key in sorted(groups):
        c = groups[key]
        total.update(c)
        lines.append(f"{key:34} {sum(c.values()):>4} " + " ".join(f"{c[k]:>9}" for k in cols))
    lines.append(f"{'total':34} {sum(total.values()):>4} " + " ".join(f"{total[k]:>9}" for k in cols))
    gen = Counter(r.get("gen") for r in results if r["load"] == "ok")
    chat = Counter(r.get("chat") for r in results if r["load"] == "ok")
    lines.append(f"after loading: generate {dict(gen)}, chat {dict(chat)}")
    return "\n".join(lines)


# -- the tests -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus_results(tmp_path_factory) -> list[dict[str, Any]]:
    d = tmp_path_factory.mktemp("hostile")
    cases = build_corpus(d)
    t = time.perf_counter()
    results = run_corpus(cases, d)
    print(f"\n{len(cases)} hostile GGUF cases in {time.perf_counter() - t:.1f} s\n{summary_table(results)}")
    return results


def test_corpus_is_large_enough(corpus_results):
    assert len(corpus_results) >= 200
    assert sum(r["kind"] != "designed" for r in corpus_results) >= 200


def test_no_crashes(corpus_results):
    crashes = [r for r in corpus_results if r["load"] == "crash"]
    assert not crashes, "llama.cpp crashed on:\n" + "\n".join(
        f"  {r['name']} ({r['path']}): rc {r['rc']} {r['signal']}\n{r['stderr']}" for r in crashes)


def test_only_our_exceptions(corpus_results):
    leaks = [r for r in corpus_results if r["load"] == "leak"
             or str(r.get("gen", "")).startswith("leak") or str(r.get("chat", "")).startswith("leak")]
    assert not leaks, "\n".join(f"  {r['name']}: {r.get('exc')} {r.get('msg')} gen={r.get('gen')} "
                                f"{r.get('gen_msg')} chat={r.get('chat')} {r.get('chat_msg')}" for r in leaks)


def test_designed_cases(corpus_results):
    wrong = []
    for r in corpus_results:
        if r["kind"] != "designed":
            continue
        want = r["expect"] if isinstance(r["expect"], list) else [r["expect"]]
        got = r["load"]
        if got not in want or (r.get("match") and r["match"].lower() not in r.get("msg", "").lower()):
            wrong.append(f"  {r['name']}: expected {want} ({r.get('match')!r}), got {got}: "
                         f"{r.get('exc')} {r.get('msg')}")
        if got == "ok" and (r.get("gen") != "ok" or r.get("chat") != "ok"):
            wrong.append(f"  {r['name']}: loads, but generate -> {r.get('gen')} {r.get('gen_msg')}, "
                         f"chat -> {r.get('chat')} {r.get('chat_msg')}")
    assert not wrong, "\n".join(wrong)


def test_refusals_name_the_file(corpus_results):
    for r in corpus_results:
        if r["load"] == "validator" and r["exc"] == "InvalidModelFileError":
            assert Path(r["path"]).name in r["msg"], r


def test_unreadable_file_is_a_load_error(tmp_path, monkeypatch):
    """No read permission (simulated: the test may run as root, who reads anyway)."""
    import pyllama_ernie.gguf_check as gc
    from pyllama_ernie.errors import InvalidModelFileError, ModelLoadError

    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGUF")

    def denied(*a: Any, **k: Any) -> Any:
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(gc, "open", denied, raising=False)
    with pytest.raises(ModelLoadError, match="permission denied") as ei:
        gc.validate_gguf(p)
    assert not isinstance(ei.value, InvalidModelFileError) and ei.value.llama_log == ""


def test_validation_reads_only_the_metadata(tmp_path):
    """A 14 GB model (a sparse file: the metadata of a real-sized model, no data written) validates fast."""
    import gguf

    from pyllama_ernie.convert.synthetic import tiny_vocab
    from pyllama_ernie.gguf_check import validate_gguf

    p = tmp_path / "big.gguf"
    w = gguf.GGUFWriter(str(p), "ernie4_5")
    n_vocab, n_embd = 103424, 2560
    vocab = tiny_vocab()
    tokens = [t.decode() for t in vocab.tokens] + [f"tok{i}" for i in range(n_vocab - len(vocab.tokens))]
    for key, val in (("context_length", 131072), ("embedding_length", n_embd), ("block_count", 28),
                     ("feed_forward_length", 12288), ("attention.head_count", 20),
                     ("attention.head_count_kv", 4)):
        w.add_uint32(f"ernie4_5.{key}", val)
    w.add_float32("ernie4_5.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([1] * n_vocab)
    shapes = {"token_embd.weight": (n_vocab, n_embd), "output.weight": (n_vocab, n_embd)}  # numpy order
    for i in range(28):
        shapes.update({f"blk.{i}.attn_q.weight": (n_embd, n_embd), f"blk.{i}.attn_output.weight": (n_embd, n_embd),
                       f"blk.{i}.attn_k.weight": (512, n_embd), f"blk.{i}.attn_v.weight": (512, n_embd),
                       f"blk.{i}.ffn_up.weight": (12288, n_embd),
                       f"blk.{i}.ffn_down.weight": (n_embd, 12288), f"blk.{i}.ffn_gate.weight": (12288, n_embd)})
    for name, shape in shapes.items():
        w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * shape[1] * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with open(p, "r+b") as f:  # the data: a hole, never written (every size is a multiple of the alignment)
        f.truncate(_pad_to(p.stat().st_size, 32) + sum(r * c * 4 for r, c in shapes.values()))
    size = p.stat().st_size
    assert size > 14e9
    t = time.perf_counter()
    s = validate_gguf(p)
    dt = time.perf_counter() - t
    assert s.n_vocab == n_vocab and s.n_embd == n_embd and len(s.tensors) == 2 + 28 * 7
    assert dt < 0.5, f"validating a {size / 1e9:.1f} GB file took {dt:.2f} s"
    with open(p, "r+b") as f:  # one byte short: refused as truncated, as fast
        f.truncate(size - 1)
    with pytest.raises(Exception, match="truncated"):
        validate_gguf(p)


def _pad_to(n: int, a: int) -> int:
    return (n + a - 1) // a * a


# -- damaged checkpoints for the converter -------------------------------------------------------

def _convert_cases(d: Path, rng: random.Random, n_random: int) -> list[tuple[str, Callable[[Path], None], bool]]:
    """(name, damage(dir), must_fail)."""
    cfg_path = d / "config.json"

    def edit_config(fn: Callable[[dict], None]) -> Callable[[Path], None]:
        def damage(dd: Path) -> None:
            cfg = json.loads((dd / "config.json").read_text())
            fn(cfg)
            (dd / "config.json").write_text(json.dumps(cfg))
        return damage

    def weights(dd: Path) -> list[Path]:
        return sorted(dd.glob("*.safetensors"))

    def truncate_weights(frac: float) -> Callable[[Path], None]:
        def damage(dd: Path) -> None:
            st = weights(dd)[-1]
            data = st.read_bytes()
            st.write_bytes(data[: int(len(data) * frac)])
        return damage

    def drop_shard(dd: Path) -> None:
        ws = weights(dd)
        index = dd / "model.safetensors.index.json"
        if index.exists() and len(ws) > 1:
            ws[-1].unlink()
        else:
            index.write_text(json.dumps({"metadata": {}, "weight_map": {
                "model.norm.weight": "model-00002-of-00002.safetensors"}}))

    def reshape_tensor(dd: Path) -> None:
        from safetensors.numpy import load_file, save_file

        st = weights(dd)[0]
        w = load_file(str(st))
        name = next(k for k in sorted(w) if k.endswith(("q_proj.weight", "qkv_proj.weight")))
        w[name] = np.ascontiguousarray(w[name][:-1])
        save_file(w, str(st), metadata={"format": "pt"})

    def bad_header(dd: Path) -> None:
        st = weights(dd)[0]
        data = bytearray(st.read_bytes())
        data[0:8] = (1 << 40).to_bytes(8, "little")
        st.write_bytes(bytes(data))

    designed: list[tuple[str, Callable[[Path], None], bool]] = [
        ("config.json is not JSON", lambda dd: (dd / "config.json").write_text("{\"hidden_size\": 64,"), True),
        ("config.json is a list", lambda dd: (dd / "config.json").write_text("[1, 2, 3]"), True),
        ("config.json missing", lambda dd: (dd / "config.json").unlink(), True),
        ("hidden_size is a string", edit_config(lambda c: _set_text(c, "hidden_size", "sixty-four")), True),
        ("negative layer count", edit_config(lambda c: _set_text(c, "num_hidden_layers", -3)), True),
        ("zero attention heads", edit_config(lambda c: _set_text(c, "num_attention_heads", 0)), True),
        ("vocab size disagrees with the weights", edit_config(lambda c: _set_text(c, "vocab_size", 999)), True),
        ("missing shard", drop_shard, True),
        ("tensor of the wrong shape", reshape_tensor, True),
        ("truncated safetensors (half)", truncate_weights(0.5), True),
        ("truncated safetensors (header)", truncate_weights(0.0001), True),
        ("safetensors header length blown", bad_header, True),
        ("no tokenizer", lambda dd: [p.unlink() for p in dd.glob("tokenizer*") if p.name != "tokenizer_config.json"],
         True),
    ]
    keys = sorted(json.loads(cfg_path.read_text()))
    odd_values = [None, -1, 0, 1 << 40, 3.5, "x", [], {}, True, [1, 2]]
    random_cases = []
    for k in range(n_random):
        how = rng.choice(("config-key", "config-value", "config-truncate", "weights-truncate", "weights-flip"))
        if how == "config-key":
            key = rng.choice(keys)
            random_cases.append((f"random: config.json without {key}", edit_config(lambda c, key=key: c.pop(key, None)),
                                 False))
        elif how == "config-value":
            key, val = rng.choice(keys), rng.choice(odd_values)
            random_cases.append((f"random: config.json {key} = {val!r}",
                                 edit_config(lambda c, key=key, val=val: c.__setitem__(key, val)), False))
        elif how == "config-truncate":
            frac = rng.random()

            def damage(dd: Path, frac: float = frac) -> None:
                text = (dd / "config.json").read_text()
                (dd / "config.json").write_text(text[: int(len(text) * frac)])
            random_cases.append((f"random: config.json cut at {frac:.2f}", damage, False))
        elif how == "weights-truncate":
            frac = rng.random()
            random_cases.append((f"random: safetensors cut at {frac:.3f}", truncate_weights(frac), False))
        else:
            pos_frac, bit = rng.random() ** 3, rng.randrange(8)  # mostly in the header

            def damage(dd: Path, pos_frac: float = pos_frac, bit: int = bit) -> None:
                st = weights(dd)[0]
                data = bytearray(st.read_bytes())
                data[int(pos_frac * (len(data) - 1))] ^= 1 << bit
                st.write_bytes(bytes(data))
            random_cases.append((f"random: safetensors bit {bit} flipped at {pos_frac:.4f}", damage, False))
    return designed + random_cases


def _set_text(cfg: dict, key: str, value: Any) -> None:
    """Set a text-model key in either config layout (flat, or under text_config)."""
    (cfg["text_config"] if "text_config" in cfg and key not in cfg else cfg)[key] = value


@pytest.mark.parametrize("model", ["dense_a", "vl_a"])
def test_damaged_checkpoints(model, hf_model_dir, vl_model_dir, tmp_path):
    from pyllama_ernie.convert import ConversionError, convert
    from pyllama_ernie.gguf_check import validate_gguf

    src = vl_model_dir(model) if model.startswith("vl") else hf_model_dir(model)
    rng = random.Random(SEED + len(model))
    problems = []
    counts: Counter = Counter()
    n_random = int(os.environ.get("HOSTILE_CONVERT_RANDOM", "12"))
    for k, (name, damage, must_fail) in enumerate(_convert_cases(src, rng, n_random)):
        d = tmp_path / f"ckpt{k}"
        shutil.copytree(src, d)
        damage(d)
        out = tmp_path / f"out{k}"
        out.mkdir()
        try:
            convert(d, out / "m.gguf", "f32")
        except ConversionError as e:
            counts["ConversionError"] += 1
            if not str(e):
                problems.append(f"{name}: ConversionError without a message")
            if any(out.iterdir()):
                problems.append(f"{name}: ConversionError left {sorted(p.name for p in out.iterdir())}")
        except Exception as e:  # noqa: BLE001 - any other exception is the finding
            counts[type(e).__name__] += 1
            problems.append(f"{name}: {type(e).__name__}: {e}")
        else:
            counts["converted"] += 1
            if must_fail:
                problems.append(f"{name}: converted without error")
            for f in out.iterdir():  # what it wrote must be a file we load without complaint
                validate_gguf(f, role="mmproj" if f.name.startswith("mmproj") else "model")
        shutil.rmtree(d)
        shutil.rmtree(out)
    print(f"\n{model}: {dict(counts)}")
    assert not problems, "\n".join(problems)


# -- by hand -------------------------------------------------------------------------------------

def hunt_corpus(d: Path, seed: int, n: int) -> list[dict[str, Any]]:
    """``n`` random mutations (1-6 edits in the first 64 KiB, 3 in 4 of them in the metadata or
    tensor table) of the tiny files; the cases are
    the ones the validator accepts: does anything that passes it still crash llama.cpp?"""
    import struct

    from pyllama_ernie.convert.synthetic import write_tiny_gguf, write_tiny_mmproj
    from pyllama_ernie.errors import ModelLoadError
    from pyllama_ernie.gguf_check import validate_gguf

    d.mkdir(parents=True, exist_ok=True)
    bases = {arch: write_tiny_gguf(arch, d / f"{arch}.gguf") for arch in ARCHS}
    bases["mmproj"] = write_tiny_mmproj(d / "mmproj.gguf", n_embd_text=64)
    raw = {k: p.read_bytes() for k, p in bases.items()}
    meta_end = {k: _regions(p)["data"][0] for k, p in bases.items()}
    rng = random.Random(seed)
    values = (0, 1, 2, 3, 4, 8, 0xFF, 0x7FFF_FFFF, 0xFFFF_FFFF, 1 << 32, (1 << 63) - 1, (1 << 64) - 1)
    cases = []
    for i in range(n):
        kind = rng.choice(sorted(raw))
        data = bytearray(raw[kind])
        for _ in range(rng.randint(1, 6)):
            # mostly in the metadata and tensor table, sometimes in the data (first 64 KiB)
            end = meta_end[kind] if rng.random() < 0.75 else 65536
            pos = rng.randrange(min(end, len(data)))
            op = rng.choice(("bit", "bit", "byte", "u32", "u64", "insert", "delete", "copy"))
            if op == "bit":
                data[pos] ^= 1 << rng.randrange(8)
            elif op == "byte":
                data[pos] = rng.randrange(256)
            elif op in ("u32", "u64"):
                chunk = struct.pack("<Q", rng.choice(values))[: 4 if op == "u32" else 8]
                data[pos:pos + len(chunk)] = chunk
                del data[len(raw[kind]):]
            elif op == "insert":
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            elif op == "delete":
                del data[pos:pos + rng.randint(1, 16)]
            else:
                k = rng.randint(4, 64)
                src = rng.randrange(max(min(65536, len(data)) - k, 1))
                data[pos:pos + k] = data[src:src + k]
        p = d / f"m{i}.gguf"
        p.write_bytes(bytes(data))
        role = "mmproj" if kind == "mmproj" else "model"
        try:
            validate_gguf(p, role=role)
        except ModelLoadError:
            p.unlink()
            continue
        cases.append({"i": len(cases), "name": f"{kind} mutation {i}", "path": str(p), "role": role,
                      "model": str(bases["ernie4_5-vl-moe"]) if role == "mmproj" else None,
                      "kind": f"accepted mutation/{kind}"})
    print(f"{n} mutations, {len(cases)} accepted by the validator")
    return cases


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bypass", action="store_true", help="switch our validator off in the workers")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--scale", type=int, default=1, help="multiply the random cases")
    ap.add_argument("--hunt", type=int, default=0, metavar="N",
                    help="instead: N random mutations, run the ones the validator accepts")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.hunt:
            cases = hunt_corpus(Path(tmp), args.seed, args.hunt)
        else:
            cases = build_corpus(Path(tmp), args.seed, args.scale)
        t = time.perf_counter()
        results = run_corpus(cases, Path(tmp), bypass=args.bypass, jobs=args.jobs)
        print(f"{len(cases)} cases in {time.perf_counter() - t:.1f} s (validator {'off' if args.bypass else 'on'})")
        print(summary_table(results))
        for r in results:
            if r["load"] in ("crash", "leak"):
                lines = (r.get("stderr") or r.get("msg") or "").splitlines()
                why = ([ln for ln in lines if "GGML_ASSERT" in ln or "what()" in ln or "GGML_ABORT" in ln]
                       or [ln for ln in lines if "error" in ln.lower() and "Fatal Python" not in ln])
                print(f"  {r['load']}: {r['name']} ({r['path']}): {r.get('signal') or r.get('exc')} "
                      f"{(why or lines or [''])[-1].strip()[:200]}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    raise SystemExit(main(sys.argv[1:]))
