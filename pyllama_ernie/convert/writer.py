"""Writing a GGUF file tensor by tensor, on top of ``gguf.GGUFWriter``.

``gguf.GGUFWriter`` keeps every added tensor in memory until the end. Here the
header, the key/values and all tensor infos (name, shape, type, offset) go first,
from shapes alone; then each tensor's data is produced, converted and written in
row blocks, so peak memory is about one block however large the model is.

The file is written to a temporary name in the destination folder and renamed
into place at the end; on any failure (including Ctrl-C) the temporary file is
removed and nothing is left at the destination.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from .errors import ConversionError

__all__ = ["TensorSpec", "GGUFOutput", "encode", "tensor_nbytes", "OUTTYPES", "ProgressFn"]

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
ProgressFn = Callable[[int, int, str], None]

# --outtype -> (default tensor type, general.file_type)
OUTTYPES: dict[str, tuple[Q, gguf.LlamaFileType]] = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


@dataclass
class TensorSpec:
    """One output tensor: its GGUF name, logical shape (numpy order), type and data.

    ``blocks`` is called once, while writing, and yields float arrays whose
    concatenation in row-major order is the tensor; every block's last dimension
    equals the tensor's (so row-wise quantization works block by block).
    """

    name: str
    shape: tuple[int, ...]
    qtype: Q
    blocks: Callable[[], Iterable[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.qtype)


def tensor_nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = math.prod(shape)
    if shape and shape[-1] % block:
        raise ValueError(f"row size {shape[-1]} is not a multiple of {qtype.name}'s block size {block}")
    return n // block * size


def encode(block: np.ndarray, qtype: Q) -> np.ndarray:
    """Float values -> the bytes of ``qtype`` (same rounding as llama.cpp's converter)."""
    if qtype == Q.F32:
        return np.ascontiguousarray(block, dtype="<f4")
    if qtype == Q.F16:
        return np.ascontiguousarray(block, dtype="<f2")
    return gguf.quants.quantize(np.ascontiguousarray(block, dtype=np.float32), qtype)


def _write_bytes(fout, data: np.ndarray) -> None:
    """Write one encoded block (a module-level function so tests can simulate a full disk)."""
    fout.write(memoryview(np.ascontiguousarray(data)).cast("B"))


def _describe_os_error(e: OSError, path: Path) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"not enough disk space to write {path} ({e.strerror or e})."
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: {e.strerror or e}."
    return f"writing {path} failed: {e.strerror or e}."


class GGUFOutput:
    """Collects key/values and tensor specs, then writes the file in one streaming pass.

    ``gguf`` is the underlying ``gguf.GGUFWriter`` for adding key/values (its
    ``add_*`` methods); tensors go through :meth:`add_tensor`.
    """

    def __init__(self, path: str | os.PathLike[str], arch: str):
        self.path = Path(path)
        self.arch = arch
        self.gguf = gguf.GGUFWriter(path=None, arch=arch)
        self.tensors: list[TensorSpec] = []

    def add_tensor(self, spec: TensorSpec) -> None:
        if any(t.name == spec.name for t in self.tensors):
            raise ConversionError(f"internal error: tensor {spec.name} added twice.")
        self.tensors.append(spec)
        # the shape-only info; add_tensor_info takes the logical shape when raw_dtype is given
        self.gguf.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32), spec.nbytes, raw_dtype=spec.qtype)

    def parameter_count(self) -> tuple[int, int, int, int]:
        """(total, shared, expert, expert count) as gguf counts them for general.size_label."""
        return self.gguf.get_total_parameter_count()

    def write(self, progress: ProgressFn | None = None) -> Path:
        out = self.path
        parent = out.parent if str(out.parent) else Path(".")
        if out.is_dir():
            raise ConversionError(f"the output path {out} is a directory; give a file name such as model.gguf.")
        if not parent.is_dir():
            raise ConversionError(f"the output folder {parent} does not exist.")
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=parent)
            os.close(fd)
        except OSError as e:
            raise ConversionError(_describe_os_error(e, out)) from e
        tmp = Path(tmp_name)
        try:
            self._write_to(tmp, progress)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it private; give it a normal file's mode
            os.replace(tmp, out)
        except OSError as e:
            remove_partial(tmp)
            raise ConversionError(_describe_os_error(e, out)) from e
        except BaseException:
            remove_partial(tmp)
            raise
        return out

    def _write_to(self, tmp: Path, progress: ProgressFn | None) -> None:
        w = self.gguf
        w.open_output_file(tmp)
        try:
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            assert w.fout is not None
            fout = w.fout[0]
            align = w.data_alignment
            total = len(self.tensors)
            for i, spec in enumerate(self.tensors):
                _pad(fout, align)
                written = 0
                for block in spec.blocks():
                    if block.ndim > 1 and block.shape[-1] != spec.shape[-1]:
                        raise ConversionError(f"internal error: block of {spec.name} has shape {block.shape}.")
                    data = encode(block, spec.qtype)
                    _write_bytes(fout, data)
                    written += data.nbytes
                    del data
                if written != spec.nbytes:
                    raise ConversionError(
                        f"internal error: tensor {spec.name} produced {written} bytes, expected {spec.nbytes}."
                    )
                _pad(fout, align)
                if progress is not None:
                    progress(i + 1, total, spec.name)
            fout.flush()
            os.fsync(fout.fileno())
        finally:
            w.close()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pad(fout, align: int) -> None:
    n = (-fout.tell()) % align
    if n:
        fout.write(b"\0" * n)


def remove_partial(p: Path) -> None:
    """Delete a partly written (or no longer wanted) output file; never raises."""
    try:
        p.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:  # pragma: no cover - nothing more to do
        logger.warning("could not remove the partial file %s: %s", p, e)
