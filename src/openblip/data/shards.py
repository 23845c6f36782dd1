"""WebDataset tar shards in the img2dataset layout, with nothing but the standard library.

A shard is an uncompressed tar whose members are grouped into samples by key:
``000010005.jpg``, ``000010005.json``, ``000010005.txt`` form one sample with key
``000010005`` (img2dataset: 5-digit shard number + 4-digit index). As in webdataset,
the key is the member path up to the first dot of its basename and the extension is
everything after it, lower-cased; consecutive members with the same key form a sample.

Shard lists are written like open_clip's ``--train-data``:
``"a/train-{00000..00099}.tar::b/{part1,part2}-*.tar"`` is two sources (``::``),
each brace-expanded (zero-padded ranges, comma lists, several groups) and then
globbed. Only local paths are supported.

Reading never raises past a shard: unreadable or truncated tars and undecodable
members are logged and counted in a `collections.Counter`, and reading moves on.
Writing is atomic: a shard appears under its final name complete or not at all.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import posixpath
import re
import tarfile
import tempfile
import zlib
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "MemberRef",
    "ShardWriter",
    "atomic_write",
    "expand_braces",
    "expand_urls",
    "iter_samples",
    "parse_weights",
    "write_shard",
]

log = logging.getLogger(__name__)

# Image member extensions, in order of preference (open_clip's --image-key default).
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "png", "jpeg", "webp")

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(\d+))?$")
_GLOB_CHARS = re.compile(r"[*?\[]")
_BLOCK = tarfile.BLOCKSIZE
_ZERO_BLOCK = bytes(_BLOCK)
_GZIP, _BZIP2, _XZ = b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00"

# ------------------------------------------------------------------------------------
# Shard lists


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces: ``{0..3}``, ``{000..010}`` (zero-padded), ``{a,b}``.

    Several groups expand left to right (``{a,b}{1,2}`` -> a1 a2 b1 b2); groups may
    nest; a range may carry a step (``{0..10..5}``). A brace with neither ``..`` nor
    a comma, or without a closing brace, is kept literally.
    """
    open_at = pattern.find("{")
    while open_at >= 0:
        close_at = _matching_brace(pattern, open_at)
        if close_at < 0:
            return [pattern]
        body = pattern[open_at + 1 : close_at]
        options = _brace_options(body)
        if options is not None:
            prefix, rest = pattern[:open_at], expand_braces(pattern[close_at + 1 :])
            return [prefix + head + tail for option in options for head in expand_braces(option) for tail in rest]
        open_at = pattern.find("{", open_at + 1)
    return [pattern]


def _matching_brace(text: str, open_at: int) -> int:
    depth = 0
    for index in range(open_at, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return index
    return -1


def _brace_options(body: str) -> list[str] | None:
    """The alternatives of one brace group, or None when it is not an expansion."""
    match = _RANGE.match(body)
    if match:
        low, high, step = match.group(1), match.group(2), int(match.group(3) or 1)
        # bash pads to the wider bound when either bound is written with a leading zero.
        padded = any(len(b.lstrip("-")) > 1 and b.lstrip("-").startswith("0") for b in (low, high))
        width = max(len(low), len(high)) if padded else 0
        a, b = int(low), int(high)
        numbers = range(a, b + 1, max(step, 1)) if a <= b else range(a, b - 1, -max(step, 1))
        return [str(n).zfill(width) for n in numbers]
    parts, depth, start = [], 0, 0
    for index, char in enumerate(body):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(body[start:index])
            start = index + 1
    if not parts:
        return None
    return parts + [body[start:]]


def expand_urls(spec: str | os.PathLike | Sequence[str | os.PathLike | Sequence[str]]) -> list[list[str]]:
    """Turn a shard specification into one list of existing shard paths per source.

    Args:
        spec: a string with sources separated by ``::`` (open_clip convention), or a
            sequence whose items are sources (a pattern string, or a list of patterns
            forming one source). Each pattern is brace-expanded; an expansion with
            ``* ? [`` is globbed (sorted); a directory stands for its ``*.tar`` files;
            a ``file://`` prefix is accepted.

    Raises:
        FileNotFoundError: a pattern matches nothing or names a missing shard (the
            message names the pattern).
        ValueError: an empty source or a remote URL (only local paths are supported).
    """
    if isinstance(spec, (str, os.PathLike)):
        sources: list[Any] = os.fspath(spec).split("::")
    else:
        sources = list(spec)
    if not sources:
        raise ValueError("empty shard specification")
    expanded = []
    for source in sources:
        patterns = [source] if isinstance(source, (str, os.PathLike)) else list(source)
        expanded.append([path for pattern in patterns for path in _expand_pattern(os.fspath(pattern).strip())])
    return expanded


def _expand_pattern(pattern: str) -> list[str]:
    if not pattern:
        raise ValueError("empty shard pattern (look for a stray '::' in the shard list)")
    if pattern.startswith("file://"):
        pattern = pattern[len("file://") :]
    elif "://" in pattern or pattern.startswith("pipe:"):
        raise ValueError(f"{pattern!r}: only local shard paths are supported (no URLs or pipes)")
    paths, missing = [], []
    for item in expand_braces(os.path.expanduser(pattern)):
        if _GLOB_CHARS.search(item):
            hits = sorted(glob.glob(item))
            if not hits:
                raise FileNotFoundError(f"no shard matches {item!r} (from pattern {pattern!r})")
            paths.extend(hits)
        elif os.path.isdir(item):
            hits = sorted(glob.glob(os.path.join(glob.escape(item), "*.tar")))
            if not hits:
                raise FileNotFoundError(f"directory {item!r} holds no *.tar shards (from pattern {pattern!r})")
            paths.extend(hits)
        elif os.path.exists(item):
            paths.append(item)
        else:
            missing.append(item)
    if missing:
        raise FileNotFoundError(
            f"shard pattern {pattern!r}: {len(missing)} of {len(missing) + len(paths)} shards missing, "
            f"first {missing[0]!r}"
        )
    return paths


def parse_weights(weights: str | Sequence[float] | None, num_sources: int) -> list[float]:
    """Sampling weights per source: None (equal), ``"3::1"`` or a sequence of numbers."""
    if weights is None:
        return [1.0] * num_sources
    values = [float(w) for w in (weights.split("::") if isinstance(weights, str) else weights)]
    if len(values) != num_sources:
        raise ValueError(f"{len(values)} weights given for {num_sources} sources")
    if any(not w >= 0 for w in values) or sum(values) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {values}")
    return values


# ------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class MemberRef:
    """Where a member's bytes lie in an uncompressed shard, to read them later."""

    path: str
    offset: int
    size: int

    def read(self, file: BinaryIO | None = None) -> bytes:
        """Read the member (from `file`, an open handle on `path`, when given).

        Raises:
            EOFError: the shard is shorter than the member (truncated).
        """
        with contextlib.ExitStack() as stack:
            handle = file if file is not None else stack.enter_context(open(self.path, "rb"))
            handle.seek(self.offset)
            data = handle.read(self.size)
        if len(data) != self.size:
            raise EOFError(f"{self.path}: member at byte {self.offset} truncated")
        return data


def split_key(name: str) -> tuple[str, str] | None:
    """``"dir/0001.seg.png"`` -> ``("dir/0001", "seg.png")``; None for names to ignore."""
    name = name.removeprefix("./")
    directory, base = posixpath.split(name)
    if "." not in base or base.startswith("."):
        return None  # no extension, or hidden files such as macOS "._x.jpg"
    stem, ext = base.split(".", 1)
    return (posixpath.join(directory, stem) if directory else stem), ext.lower()


def iter_samples(
    shard_path: str | os.PathLike, *, stats: Counter | None = None, lazy: Collection[str] = ()
) -> Iterator[dict[str, Any]]:
    """Yield the samples of one shard as dicts.

    Each sample is ``{"__key__": str, "__shard__": str, <ext>: value, ...}`` where
    ``txt`` is decoded to ``str``, ``json`` to a dict, and other members stay ``bytes``
    (or a `MemberRef` for extensions in `lazy`, when the tar is uncompressed, so
    that image payloads are only read when needed).

    Never raises for bad data: an unreadable or truncated shard counts
    ``stats["shard_error"]`` (samples before the damage are still yielded, the
    possibly incomplete last one is dropped); an undecodable ``txt``/``json`` member
    counts ``stats["member_error"]`` and is left out of its sample.
    """
    stats = Counter() if stats is None else stats
    path = os.fspath(shard_path)
    pending: dict[str, Any] | None = None
    try:
        for key, ext, payload in _members(path, frozenset(lazy)):
            if pending is not None and pending["__key__"] != key:
                yield pending
                pending = None
            if pending is None:
                pending = {"__key__": key, "__shard__": path}
            value = _decode_member(ext, payload, path, key, stats)
            if value is not None:
                pending[ext] = value
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        stats["shard_error"] += 1
        log.warning("%s: unreadable shard, skipping the rest of it (%s)", path, exc)
        return
    if pending is not None:
        yield pending


def _decode_member(ext: str, payload: bytes | MemberRef, path: str, key: str, stats: Counter) -> Any:
    if ext not in ("txt", "json") or isinstance(payload, MemberRef):
        return payload
    try:
        text = payload.decode("utf-8")
        return json.loads(text) if ext == "json" else text
    except (UnicodeDecodeError, ValueError) as exc:
        stats["member_error"] += 1
        log.warning("%s: skipping undecodable member %s.%s (%s)", path, key, ext, exc)
        return None


def _members(path: str, lazy: frozenset[str]) -> Iterator[tuple[str, str, bytes | MemberRef]]:
    """``(key, ext, payload)`` for each regular member, in archive order."""
    with open(path, "rb") as file:
        if file.read(6).startswith((_GZIP, _BZIP2, _XZ)):
            file.seek(0)
            yield from _compressed_members(file)
            return
        for name, offset, size in _raw_headers(file, os.fstat(file.fileno()).st_size):
            parts = split_key(name)
            if parts is None:
                continue
            key, ext = parts
            if ext in lazy:
                yield key, ext, MemberRef(path, offset, size)
            else:
                file.seek(offset)
                yield key, ext, file.read(size)


def _compressed_members(file: BinaryIO) -> Iterator[tuple[str, str, bytes]]:
    # Compressed shards cannot be read at an offset, so every payload is read here.
    with tarfile.open(fileobj=file, mode="r|*") as tar:
        for info in tar:
            parts = split_key(info.name) if info.isfile() else None
            if parts is not None:
                handle = tar.extractfile(info)
                yield parts[0], parts[1], handle.read() if handle is not None else b""


def _raw_headers(file: BinaryIO, file_size: int) -> Iterator[tuple[str, int, int]]:
    """``(name, data offset, size)`` of the regular files of an uncompressed tar.

    A minimal reader of ustar/GNU/PAX headers: `tarfile` parses every header field
    in Python, which made scanning (done by every DataLoader worker) several times
    slower. Raises `tarfile.ReadError` for a bad checksum or a truncated archive.
    """
    position, long_name = 0, None
    while True:
        file.seek(position)
        header = file.read(_BLOCK)
        if len(header) < _BLOCK:
            raise tarfile.ReadError(f"truncated at byte {position} (no end-of-archive marker)")
        if header == _ZERO_BLOCK:
            return
        _check_header(header, position)
        size, kind, offset = _octal(header[124:136]), header[156:157], position + _BLOCK
        position = offset + -(-size // _BLOCK) * _BLOCK
        if offset + size > file_size:
            raise tarfile.ReadError(f"member at byte {offset} truncated")
        if kind in (b"x", b"L"):  # PAX attributes / GNU long name: apply to the next member
            file.seek(offset)
            data = file.read(size)
            long_name = _pax_path(data) if kind == b"x" else data.rstrip(b"\0").decode("utf-8", "replace")
        elif kind in (b"0", b"\0", b"7"):
            yield long_name or _header_name(header), offset, size
            long_name = None
        elif kind != b"g":
            long_name = None  # directories, links, devices: not sample members


def _check_header(header: bytes, position: int) -> None:
    stored, expected = header[148:156], _octal(header[148:156])
    if sum(header) - sum(stored) + 8 * 32 == expected:
        return
    # Some old writers summed signed bytes (differs only for non-ASCII names).
    if sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]) + 8 * 32 != expected:
        raise tarfile.ReadError(f"bad header checksum at byte {position} (not a tar file, or corrupt)")


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large numbers
        return int.from_bytes(field[1:], "big")
    digits = field.replace(b"\0", b" ").strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise tarfile.ReadError(f"invalid number field {field!r} in tar header") from None


def _header_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\x00":  # POSIX ustar keeps long paths' directories in `prefix`
        prefix = header[345:500].split(b"\0", 1)[0]
        name = prefix + b"/" + name if prefix else name
    return name.decode("utf-8", "replace")


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a PAX extended header (records are ``"<len> key=value\\n"``)."""
    index = 0
    while index < len(data):
        space = data.find(b" ", index)
        if space < 0:
            break
        length = int(data[index:space])
        key, _, value = data[space + 1 : index + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "replace")
        index += length
    return None


# ------------------------------------------------------------------------------------
# Writing


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temporary file next to `path`; on success fsync it and rename it to `path`.

    On any exception (including KeyboardInterrupt) the temporary file is removed and
    `path` is left untouched, so readers never see a partial file. The temporary name
    starts with a dot and ends in ``.tmp`` so shard globs do not pick it up.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; shards are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable; not supported on every platform/filesystem.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _encode(ext: str, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}.get(ext)
        if fmt is None:
            raise ValueError(f"cannot encode a PIL image as .{ext}")
        value.save(buffer, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
        return buffer.getvalue()
    if ext == "json" or isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8")
    if isinstance(value, (int, float)):
        return str(value).encode("utf-8")
    raise TypeError(f"cannot encode a {type(value).__name__} as .{ext}")


def _add_sample(tar: tarfile.TarFile, sample: dict[str, Any]) -> None:
    key = str(sample["__key__"])
    if "." in posixpath.basename(key) or not key:
        raise ValueError(f"invalid sample key {key!r}: must be non-empty without a dot in its basename")
    # Sorted extensions give img2dataset's member order: key.jpg, key.json, key.txt.
    for ext in sorted(k for k in sample if not k.startswith("__")):
        data = _encode(ext, sample[ext])
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed mtime: reproducible bytes
        tar.addfile(info, io.BytesIO(data))


def write_shard(path: str | os.PathLike, samples: Iterable[dict[str, Any]]) -> int:
    """Write `samples` (dicts with ``__key__`` and ``ext: value``) to one shard, atomically.

    Values may be ``bytes``, ``str`` (UTF-8), a dict/list (JSON) or a PIL image (encoded
    by extension: jpg/jpeg at quality 95, png, webp). Returns the number of samples.
    If iterating `samples` or encoding fails, no file appears at `path`.
    """
    count = 0
    with atomic_write(path) as file, tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            _add_sample(tar, sample)
            count += 1
    return count


class ShardWriter:
    """Write a stream of samples into numbered shards of at most `maxcount` samples.

    `pattern` is a path with one integer field, ``"out/train-%05d.tar"`` or
    ``"out/train-{:05d}.tar"``. Each shard is written atomically; samples without a
    ``__key__`` get img2dataset keys (5-digit shard number + index, at least 4
    digits). Leaving a ``with ShardWriter(...)`` block by an exception discards the
    unfinished shard; completed ones stay.
    """

    def __init__(self, pattern: str, maxcount: int = 10000, start_shard: int = 0) -> None:
        if maxcount < 1:
            raise ValueError("maxcount must be >= 1")
        self.pattern = pattern
        self.maxcount = maxcount
        self.shard = start_shard
        self.digits = max(4, len(str(maxcount - 1)))
        self.paths: list[str] = []
        self._stack: contextlib.ExitStack | None = None
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def _path(self, shard: int) -> str:
        return self.pattern % shard if "%" in self.pattern else self.pattern.format(shard)

    def write(self, sample: dict[str, Any]) -> str:
        """Add one sample; returns its key."""
        if self._tar is not None and self._count >= self.maxcount:
            self._finish()
            self.shard += 1
        if self._tar is None:
            self._open()
        key = sample.get("__key__") or f"{self.shard:05d}{self._count:0{self.digits}d}"
        _add_sample(self._tar, {**sample, "__key__": key})
        self._count += 1
        return key

    def _open(self) -> None:
        self._stack = contextlib.ExitStack()
        file = self._stack.enter_context(atomic_write(self._path(self.shard)))
        self._tar = self._stack.enter_context(tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT))
        self._count = 0

    def _finish(self) -> None:
        stack, self._stack, self._tar = self._stack, None, None
        if stack is not None:
            stack.close()
            self.paths.append(self._path(self.shard))

    def close(self) -> list[str]:
        """Commit the current shard; returns the paths of all shards written."""
        self._finish()
        return self.paths

    def abort(self) -> None:
        """Discard the unfinished shard (its temporary file is removed)."""
        stack, self._stack, self._tar = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(_Abort):
                stack.__exit__(_Abort, _Abort(), None)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _Abort(Exception):
    """Raised into the open shard's context to make `atomic_write` discard it."""
