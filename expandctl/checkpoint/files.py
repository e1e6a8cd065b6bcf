"""File-level helpers shared by the checkpoint modules: atomic writes, hashes, format sniffing, paths."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import struct
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import UsageError

__all__ = ["TORCH_SUFFIXES", "SAFETENSORS_SUFFIXES", "atomic_write", "sha256_file", "sniff_format", "check_output_path"]

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)


def _check_output_folder(path: Path) -> None:
    """The folder an output goes into must exist, and be a folder: a file of that name is not one."""
    for parent in (path.parent, *path.parent.parents):
        if parent.exists() and not parent.is_dir():
            raise UsageError(
                f"cannot write {str(path)!r}: {str(parent)!r} is a file, not a directory; choose another output path"
            )
    if not path.parent.is_dir():
        raise UsageError(f"the output directory {str(path.parent)!r} does not exist; create it first")


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    On any exception the temporary file is removed and an existing ``path`` is left untouched, so
    a failed command never leaves a file that looks finished.
    """
    path = Path(path)
    _check_output_folder(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _as_output_error(e, path) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(e, OSError) and _names_temporary(e, path):
            raise _as_output_error(e, path) from None
        raise


def _names_temporary(e: OSError, path: Path) -> bool:
    return any(f is not None and Path(f).name.startswith(f".{path.name}.") for f in (e.filename, e.filename2))


def _as_output_error(e: OSError, path: Path) -> OSError:
    """The same error, naming the output the user asked for instead of the hidden temporary file beside it."""
    return OSError(e.errno, e.strerror or str(e), str(path))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sniff_format(path: str | Path) -> str:
    """``"torch"`` (zip), ``"torch-legacy"``, ``"safetensors"`` or ``"onnx"``, from the bytes (ONNX,
    protobuf without a magic number, from the ``.onnx`` suffix). Raises :class:`UsageError`."""
    path = _existing(path)
    size = path.stat().st_size
    if size == 0:
        raise UsageError(f"{str(path)!r} is empty; re-create or re-download it")
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "torch"
    if len(head) > 8 and head[8:9] == b"{":
        n = struct.unpack("<Q", head[:8])[0]
        if n < 1 << 27:
            return "safetensors"
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "torch-legacy"
    raise UsageError(
        f"{str(path)!r} is not a PyTorch checkpoint, safetensors or ONNX file (unknown format); "
        "expandctl reads .pt/.pth (torch.save), .safetensors and .onnx"
    )


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{str(path)!r} does not exist; check the path")
    if not path.is_file():
        raise UsageError(f"{str(path)!r} is not a file")
    return path


def check_output_path(out: str | Path, inputs: Sequence[str | Path] = (), suffixes: Sequence[str] = ()) -> Path:
    """Validate an output path before any work: known suffix, existing directory, not an input."""
    out = Path(out)
    if suffixes and out.suffix.lower() not in suffixes:
        raise UsageError(f"output {str(out)!r} must end in one of {', '.join(suffixes)}")
    _check_output_folder(out)
    if out.is_dir():
        raise UsageError(f"output {str(out)!r} is a directory; give a file name")
    for src in inputs:
        if src is not None and Path(src).exists() and out.resolve() == Path(src).resolve():
            raise UsageError(
                f"output {str(out)!r} is the input file; the input is never overwritten, choose another -o"
            )
    return out


def _corrupt(path: Path, e: BaseException) -> UsageError:
    reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    return UsageError(f"{str(path)!r} is truncated or corrupt ({reason}); re-create or re-download it")
