"""Every ``python -m pyllama_ernie`` subcommand end to end, in subprocesses: output and exit codes.

Tiny synthetic models only (``tiny_gguf``, ``write_tiny_mmproj``); the ``convert`` test builds the
tiny ``dense_a`` checkpoint (needs torch + transformers, else it skips).
"""

from __future__ import annotations

import json
import os
import pty
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pyllama_ernie._lib", reason="pyllama_ernie is not built (pip install .)")

import pyllama_ernie
from pyllama_ernie.convert.synthetic import VL_CHAT_TEMPLATE, write_tiny_mmproj

#: the folder holding the package (the in-place build), used as cwd and on PYTHONPATH
ROOT = Path(pyllama_ernie.__file__).resolve().parent.parent
SUBCOMMANDS = ("run", "chat", "convert", "quantize", "info", "selfcheck", "system-info")

needs_chat = pytest.mark.skipif(not hasattr(pyllama_ernie.Model, "create_chat_completion"),
                                reason="Model.create_chat_completion is not there yet")

# the synthetic GGUFs' template is text-only: an ERNIE-4.5-VL-structured one for image chats
VL_TEMPLATE = VL_CHAT_TEMPLATE


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8",
                PYTHONPATH=str(ROOT) + (os.pathsep + path if path else ""))


def cli(*args: Any, input: str | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyllama_ernie", *map(str, args)], check=False,
                          capture_output=True,
                          text=True, encoding="utf-8", input=input, timeout=timeout, env=_env(), cwd=ROOT)


def assert_one_line_error(r: subprocess.CompletedProcess, code: int = 1) -> None:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr


def assert_usage_error(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0].startswith("usage: ")
    errs = [line for line in lines if ": error: " in line]
    assert len(errs) == 1 and errs[0] == lines[-1], r.stderr


def _png(path: Path, seed: int = 0, h: int = 56, w: int = 84) -> Path:
    from PIL import Image

    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


# --- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli_e2e")


@pytest.fixture(scope="module")
def text_model(tiny_gguf) -> Path:
    return tiny_gguf("ernie4_5")


@pytest.fixture(scope="module")
def vl(tiny_gguf, work) -> dict[str, Path]:
    model = tiny_gguf("ernie4_5-vl-moe")
    with pyllama_ernie.Model(model, n_ctx=64) as m:
        n_embd = m.n_embd
    return {"model": model, "mmproj": write_tiny_mmproj(work / "mmproj.gguf", n_embd_text=n_embd),
            "image": _png(work / "x.png")}


def _new_metadata(src: Path, dst: Path, *args: str) -> Path:
    """A copy of ``src`` with changed metadata (gguf-py's gguf_new_metadata script)."""
    r = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(src), str(dst), *args,
                        "--force"], check=False, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return dst


@pytest.fixture(scope="module")
def vl_template_file(work) -> Path:
    p = work / "vl.jinja"
    p.write_text(VL_TEMPLATE, encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def vl_templated(vl, work, vl_template_file) -> Path:
    """The tiny VL model with a chat template that takes images (as ERNIE-4.5-VL's does)."""
    return _new_metadata(vl["model"], work / "vl-templated.gguf", "--chat-template-file", str(vl_template_file))


# --- help and usage errors ----------------------------------------------------------------------

def test_help_of_everything():
    r = cli("--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: "), r.stderr
    for sub in SUBCOMMANDS:
        assert sub in r.stdout
    for sub in SUBCOMMANDS:
        r = cli(sub, "--help")
        assert r.returncode == 0, (sub, r.stderr)
        assert r.stdout.startswith("usage: python -m pyllama_ernie " + sub), (sub, r.stdout[:200])
        assert r.stderr == "", (sub, r.stderr)
    r = cli("chat", "--help")
    for word in ("--mmproj", "--system", "--think", "--no-think", "/image", "/reset", "/exit"):
        assert word in r.stdout, word
    # global options before the subcommand, convert included (it has its own parser)
    r = cli("--log-level", "INFO", "convert", "--help")
    assert r.returncode == 0 and "hf_dir" in r.stdout, r.stderr


def test_usage_errors_exit_2_one_line(text_model):
    for args in ((), ("frobnicate",), ("run",), ("chat",), ("info",), ("quantize", text_model),
                 ("quantize", text_model, "o.gguf", "Q9_X"), ("run", text_model, "-n", "many"),
                 ("chat", text_model, "--temperature", "hot"), ("selfcheck", "extra")):
        assert_usage_error(cli(*args))
    assert cli("convert").returncode == 2


# --- run ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_run_greedy_is_deterministic(text_model):
    args = ("run", text_model, "Hello world", "--temperature", "0", "-n", "8", "-c", "256")
    a, b = cli(*args), cli(*args)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and a.stdout.endswith("\n") and a.stdout.strip()
    with pyllama_ernie.Model(text_model, n_ctx=256) as m:
        assert a.stdout == m.generate("Hello world", max_tokens=8, temperature=0).text + "\n"


def test_run_errors_exit_1_one_line(text_model, vl, work):
    assert_one_line_error(cli("run", work / "missing.gguf", "hi"))
    r = cli("run", text_model, "hi", "-c", "256", "--image", vl["image"])
    assert_one_line_error(r)
    assert "--mmproj" in r.stderr
    # a projector file that is not there
    r = cli("run", vl["model"], "hi", "-c", "256", "--mmproj", work / "missing-mmproj.gguf")
    assert_one_line_error(r)
    assert "--mmproj" in r.stderr
    assert_one_line_error(cli("run", vl["model"], "hi", "-c", "256", "--mmproj", text_model))  # not a projector


@pytest.mark.slow
def test_run_vl_with_image(vl):
    args = ("run", vl["model"], "What is in the picture?", "--mmproj", vl["mmproj"],
            "--temperature", "0", "-n", "6", "-c", "512")
    r = cli(*args, "--image", vl["image"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n") and "Traceback" not in r.stderr
    with pyllama_ernie.Model(vl["model"], n_ctx=512, mmproj_path=vl["mmproj"]) as m:
        expected = m.generate(pyllama_ernie.IMAGE_MARKER + "What is in the picture?", images=[vl["image"]],
                              max_tokens=6, temperature=0).text
    assert r.stdout == expected + "\n"
    # a missing image file: one line
    assert_one_line_error(cli(*args, "--image", vl["image"].with_name("nope.png")))


# --- info, quantize, selfcheck, system-info -----------------------------------------------------

def test_info_text_and_json(text_model):
    r = cli("info", text_model)
    assert r.returncode == 0, r.stderr
    rows = dict(line.split(None, 1) for line in r.stdout.splitlines())
    assert rows["architecture"] == "ernie4_5"
    r = cli("info", text_model, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["architecture"] == "ernie4_5"
    assert info["tensors"] > 0 and info["vocab_size"] > 0
    assert info["tensor_types"] == {"F32": info["tensors"]}


def test_quantize_then_info(text_model, work):
    out = work / "q8.gguf"
    r = cli("quantize", text_model, out, "q8_0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"wrote {out}"
    info = json.loads(cli("info", out, "--json").stdout)
    assert "Q8_0" in info["tensor_types"]
    r = cli("run", out, "Hello", "--temperature", "0", "-n", "4", "-c", "128")
    assert r.returncode == 0, r.stderr
    assert_one_line_error(cli("quantize", work / "missing.gguf", work / "o.gguf", "Q8_0"))


def test_selfcheck():
    r = cli("selfcheck", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "selfcheck passed" in r.stdout


def test_system_info_is_json():
    r = cli("system-info")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert isinstance(info, dict) and info


# --- convert ------------------------------------------------------------------------------------

def test_convert_then_run_and_chat(hf_model_dir, work):
    src = hf_model_dir("dense_a")
    out = work / "dense_a-f32.gguf"
    r = cli("convert", src, "-o", out, "--outtype", "f32", "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {out}")
    assert json.loads(cli("info", out, "--json").stdout)["architecture"] == "ernie4_5"
    r = cli("run", out, "Hello world", "--temperature", "0", "-n", "6", "-c", "256")
    assert r.returncode == 0, r.stderr
    with pyllama_ernie.Model(out, n_ctx=256) as m:
        assert r.stdout == m.generate("Hello world", max_tokens=6, temperature=0).text + "\n"
        has_chat = m.chat_template is not None and hasattr(m, "create_chat_completion")
    if has_chat:  # the checkpoint's own ERNIE chat template
        r = cli("chat", out, "--temperature", "0", "-n", "6", "-c", "256", input="hello\n")
        assert r.returncode == 0, r.stderr
        assert r.stdout.endswith("\n")
    assert_one_line_error(cli("convert", work / "no-such-dir"))


# --- chat ---------------------------------------------------------------------------------------

def _answers(model: Path, conversations: list[list[dict[str, Any]]], max_tokens: int, **kw: Any) -> list[str]:
    with pyllama_ernie.Model(model, n_ctx=512, **kw) as m:
        return [m.create_chat_completion(msgs, max_tokens=max_tokens, temperature=0)["choices"][0]["message"]
                ["content"] for msgs in conversations]


CHAT = ("--temperature", "0", "-n", "8", "-c", "512")


@needs_chat
def test_chat_history_reset_and_exit(text_model):
    r = cli("chat", text_model, *CHAT, input="hello\n/reset\nhi again\n/exit\nnever answered\n")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    a1, a2 = _answers(text_model, [[{"role": "user", "content": "hello"}],
                                   [{"role": "user", "content": "hi again"}]], 8)
    assert r.stdout == f"{a1}\n{a2}\n"
    assert "> " not in r.stderr  # stdin is not a terminal: no prompt marker

    # without /reset the history (and the system message) goes with every turn; EOF ends with 0
    r = cli("chat", text_model, *CHAT, "--system", "Be brief.", input="hello\n\nhi again\n")
    assert r.returncode == 0, r.stderr
    sys_msg = {"role": "system", "content": "Be brief."}
    (b1,) = _answers(text_model, [[sys_msg, {"role": "user", "content": "hello"}]], 8)
    (b2,) = _answers(text_model, [[sys_msg, {"role": "user", "content": "hello"},
                                   {"role": "assistant", "content": b1}, {"role": "user", "content": "hi again"}]], 8)
    assert r.stdout == f"{b1}\n{b2}\n"


@needs_chat
def test_chat_commands_and_errors_continue(text_model, vl):
    stdin = (f"/image {vl['image']}\n/help\n/bogus\nhello\n/image\n"
             f"{'word ' * 600}\nhi again\n")
    r = cli("chat", text_model, *CHAT, input=stdin)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4, r.stderr  # /image without --mmproj (twice), /bogus, the too long prompt
    assert sum("--mmproj" in e for e in errors) == 2
    assert "/reset" in r.stderr.split(errors[-1])[1]  # the hint after the too-long prompt
    assert "/image PATH" in r.stderr  # /help
    (a1,) = _answers(text_model, [[{"role": "user", "content": "hello"}]], 8)
    (a2,) = _answers(text_model, [[{"role": "user", "content": "hello"}, {"role": "assistant", "content": a1},
                                   {"role": "user", "content": "hi again"}]], 8)
    assert r.stdout == f"{a1}\n{a2}\n"  # the failed turn left the history as it was


@needs_chat
def test_chat_no_template_exits_1(text_model, work, vl_template_file):
    bare = _new_metadata(text_model, work / "no-template.gguf", "--remove-metadata", "tokenizer.chat_template")
    with pyllama_ernie.Model(bare, n_ctx=64) as m:
        assert m.chat_template is None
    r = cli("chat", bare, "-c", "128", input="hello\n")
    assert_one_line_error(r)
    assert "no chat template" in r.stderr
    # ... unless one is given
    r = cli("chat", bare, *CHAT, "--chat-template-file", vl_template_file, input="hello\n")
    assert r.returncode == 0 and r.stdout.endswith("\n"), r.stderr
    assert_one_line_error(cli("chat", work / "missing.gguf", input=""))


@needs_chat
@pytest.mark.slow
def test_chat_with_image(vl, vl_templated):
    args = ("chat", vl_templated, *CHAT, "--mmproj", vl["mmproj"])
    r = cli(*args, input=f"/image {vl['image']}\nwhat is it\nand now?\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "error" not in r.stderr and "image attached" in r.stderr
    user1 = {"role": "user", "content": [{"type": "image", "image": str(vl["image"])},
                                         {"type": "text", "text": "what is it"}]}
    (a1,) = _answers(vl_templated, [[user1]], 8, mmproj_path=vl["mmproj"])
    (a2,) = _answers(vl_templated, [[user1, {"role": "assistant", "content": a1},
                                     {"role": "user", "content": "and now?"}]], 8, mmproj_path=vl["mmproj"])
    assert r.stdout == f"{a1}\n{a2}\n"
    # bad images: one line each, the session goes on
    r = cli(*args, input=f"/image {vl['image'].with_name('nope.png')}\n/image {vl['mmproj']}\nhello\n")
    assert r.returncode == 0, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "no such image file" in errors[0], r.stderr
    assert r.stdout.count("\n") == 1
    # the text-only template of the synthetic GGUF cannot take images: one line, then text works
    r = cli("chat", vl["model"], *CHAT, "--mmproj", vl["mmproj"], input=f"/image {vl['image']}\nwhat\nhello\n")
    assert r.returncode == 0, r.stderr
    assert len([line for line in r.stderr.splitlines() if line.startswith("error: ")]) == 1, r.stderr
    assert r.stdout.count("\n") == 1


@needs_chat
def test_chat_thinking(vl, vl_template_file):
    args = ("chat", vl["model"], "--chat-template-file", vl_template_file, "--temperature", "0", "-n", "6",
            "-c", "512")
    with pyllama_ernie.Model(vl["model"], n_ctx=512) as m:
        msg = m.create_chat_completion([{"role": "user", "content": "hello"}], max_tokens=6, temperature=0,
                                       enable_thinking=True, chat_template=VL_TEMPLATE)["choices"][0]["message"]
    r = cli(*args, "--think", input="hello\n")
    assert r.returncode == 0, r.stderr
    assert msg["reasoning_content"]  # the template's <think> prefill: the answer starts as reasoning
    expected = f"[thinking]\n{msg['reasoning_content']}"
    expected += ("" if expected.endswith("\n") else "\n") + "[/thinking]\n"
    if msg["content"]:
        expected += msg["content"] + "\n"
    assert r.stdout == expected
    r = cli(*args, "--no-think", input="hello\n")
    assert r.returncode == 0, r.stderr
    assert "[thinking]" not in r.stdout


# --- chat: terminals and Ctrl-C -------------------------------------------------------------------

class _Chat:
    """A chat subprocess with its output read by threads (no blocking reads in the test)."""

    def __init__(self, *args: Any, stdin: Any = subprocess.PIPE, preexec_fn: Any = None) -> None:
        self.p = subprocess.Popen([sys.executable, "-m", "pyllama_ernie", "chat", *map(str, args)], stdin=stdin,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=ROOT,
                                  preexec_fn=preexec_fn)
        self.out: queue.Queue[bytes] = queue.Queue()
        self.err: queue.Queue[bytes] = queue.Queue()
        self.stdout, self.stderr = b"", b""
        for stream, q in ((self.p.stdout, self.out), (self.p.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, q), daemon=True).start()

    @staticmethod
    def _pump(stream: Any, q: queue.Queue[bytes]) -> None:
        for chunk in iter(lambda: stream.read1(4096), b""):
            q.put(chunk)

    def _drain(self) -> None:
        while not self.out.empty():
            self.stdout += self.out.get()
        while not self.err.empty():
            self.stderr += self.err.get()

    def wait_for(self, stream: str, text: str, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self._drain()
            if text.encode() in getattr(self, stream):
                return
            time.sleep(0.02)
        raise AssertionError(f"no {text!r} on {stream} after {timeout}s: {self.stdout[-300:]!r} {self.stderr!r}")

    def send(self, text: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(text.encode())
        self.p.stdin.flush()

    def finish(self, timeout: float = 60) -> int:
        try:
            code = self.p.wait(timeout)
        finally:
            if self.p.poll() is None:
                self.p.kill()
        time.sleep(0.1)
        self._drain()
        return code


@needs_chat
def test_chat_ctrl_c_works_when_started_with_sigint_ignored(text_model):
    """A background job of a script starts with SIGINT ignored; chat claims it back."""
    ignore = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731
    c = _Chat(text_model, "--temperature", "0", "-n", "100000", "-c", "16384", preexec_fn=ignore)
    try:
        c.send("hello\n")
        c.wait_for("stdout", "8")
        c.p.send_signal(signal.SIGINT)
        c.wait_for("stderr", "(cancelled)")  # during an answer
        time.sleep(0.2)
        c.p.send_signal(signal.SIGINT)  # again, at the prompt: exit 130
        assert c.finish() == 130, c.stderr
    finally:
        if c.p.poll() is None:
            c.p.kill()
    assert b"Traceback" not in c.stderr


@needs_chat
def test_chat_ctrl_c_cancels_the_answer_then_twice_exits_130(text_model):
    # -n/-c large: the tiny model's greedy answer to "hello" runs on until we cancel it
    c = _Chat(text_model, "--temperature", "0", "-n", "100000", "-c", "16384")
    try:
        c.send("hello\n")
        c.wait_for("stdout", "8")
        c.p.send_signal(signal.SIGINT)
        c.wait_for("stderr", "(cancelled)")
        n = len(c.stdout)
        c.send("/reset\nhello\n")  # the session goes on: the next answer comes (and is cancelled too)
        c.wait_for("stderr", "(conversation cleared)")
        end = time.monotonic() + 60
        while len(c.stdout) <= n + 2 and time.monotonic() < end:
            time.sleep(0.02)
            c._drain()
        c.p.send_signal(signal.SIGINT)
        c.wait_for("stderr", "(conversation cleared)\n(cancelled)")
        c.send("/exit\n")
        assert c.finish() == 0, c.stderr
    finally:
        if c.p.poll() is None:
            c.p.kill()
    assert b"Traceback" not in c.stderr

    c = _Chat(text_model, "--temperature", "0", "-n", "2", "-c", "256")
    try:
        c.send("hello\n")
        c.wait_for("stderr", "(the answer reached")
        time.sleep(0.2)
        c.p.send_signal(signal.SIGINT)  # at the prompt: a hint
        c.wait_for("stderr", "Ctrl-C again")
        assert c.p.poll() is None
        c.p.send_signal(signal.SIGINT)  # and again: exit 130
        assert c.finish() == 130
    finally:
        if c.p.poll() is None:
            c.p.kill()
    assert b"Traceback" not in c.stderr
    assert c.stdout.count(b"\n") == 1


@needs_chat
def test_chat_on_a_terminal_prompts_on_stderr(text_model):
    master, slave = pty.openpty()
    try:
        c = _Chat(text_model, *CHAT, stdin=slave)
        os.close(slave)
        slave = -1
        c.wait_for("stderr", "> ")
        os.write(master, b"hello\n")
        c.wait_for("stderr", "(the answer reached")
        c.wait_for("stderr", "> ")
        os.write(master, b"/exit\n")
        assert c.finish() == 0, c.stderr
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    (a1,) = _answers(text_model, [[{"role": "user", "content": "hello"}]], 8)
    assert c.stdout.decode("utf-8") == a1 + "\n"  # stdout holds the answer only
    assert c.stderr.count(b"> ") >= 2 and b"/help" in c.stderr
