"""Shard sets on disk: expanding patterns, the ``shards.json`` index, and writing shards.

A shard is a plain tar file (webdataset layout): the members of one sample share a
key, e.g. ``n01440764_10026.jpg`` and ``n01440764_10026.cls``. Every writer in varkit
records, beside its shards, an index ``shards.json`` with the number of samples in
each shard (and, for code shards, the code layout); readers use it to know the epoch
length without scanning the shards.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import attrs
import webdataset as wds

from varkit.errors import DataError

log = logging.getLogger(__name__)

#: File name of the index written beside the shards.
INDEX_NAME = "shards.json"
#: Version of the index layout; readers ignore indexes of a version they do not know.
INDEX_VERSION = 1
#: Image members a sample may hold, in the order they are looked for.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
#: Tar overhead of one member: a 512-byte header, data padded to 512 bytes.
TAR_BLOCK = 512


def is_local(url: str) -> bool:
    """Whether a shard url is a local file (not ``pipe:`` or a remote scheme)."""
    if url.startswith("file://"):
        return True
    return not url.startswith("pipe:") and "://" not in url


def local_path(url: str) -> str:
    """The file path of a local shard url (``file://`` removed)."""
    return url[len("file://") :] if url.startswith("file://") else url


def expand(pattern: str) -> list[str]:
    """Shard urls of a brace pattern (``a-{000..009}.tar``; ``::`` joins patterns)."""
    return wds.shardlists.expand_urls(pattern)


@attrs.frozen(kw_only=True)
class ShardSet:
    """The shards of one pattern and what is known about them."""

    #: The pattern as the recipe gave it.
    pattern: str
    #: Expanded shard urls, in pattern order.
    urls: tuple[str, ...]
    #: Samples per shard (same order as ``urls``), or None when unknown.
    counts: tuple[int, ...] | None
    #: What the index says of the set (``kind``, code layout, ...), empty without one.
    meta: Mapping = attrs.field(factory=dict)

    @property
    def total(self) -> int | None:
        """Samples in all shards together, or None when unknown."""
        return None if self.counts is None else sum(self.counts)

    @property
    def kind(self) -> str:
        """``images`` or ``codes``."""
        return self.meta.get("kind", "images")


def open_shards(pattern: str, *, field: str, count: bool = True) -> ShardSet:
    """Expand ``pattern`` and check that its shards exist.

    Args:
        pattern: a path, brace pattern or ``pipe:`` command.
        field: the recipe field that holds the pattern (named in errors).
        count: when no index covers local shards, count their samples by reading the
            tar headers (slow for large sets; ``varkit shards`` writes the index).

    Raises:
        DataError: no shard matches, or some are missing.
    """
    urls = expand(pattern)
    hint = (
        "write shards from an image folder with `varkit shards SRC OUT` (it prints the "
        "pattern to use), or check the path and the brace range"
    )
    if not urls:
        raise DataError(f"{field} {pattern!r} names no shards; {hint}")
    local = [u for u in urls if is_local(u)]
    missing = [u for u in local if not os.path.isfile(local_path(u))]
    if missing and len(missing) == len(urls):
        raise DataError(f"{field}: no shard of {pattern!r} exists (looked for {missing[0]} first); {hint}")
    if missing:
        listed = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise DataError(
            f"{field}: {len(missing)} of the {len(urls)} shards of {pattern!r} do not exist "
            f"({listed}); fix the brace range or {hint}"
        )
    counts, meta = _read_counts(urls)
    if counts is None and count and len(local) == len(urls):
        log.info("counting the samples of %d shards (no %s beside them)", len(urls), INDEX_NAME)
        counts = tuple(count_samples(local_path(u)) for u in urls)
    return ShardSet(pattern=pattern, urls=tuple(urls), counts=counts, meta=meta)


def _read_counts(urls: list[str]) -> tuple[tuple[int, ...] | None, dict]:
    """Counts and meta from the indexes beside local shards, when they cover them all."""
    indexes: dict[str, dict] = {}
    counts = []
    meta: dict = {}
    for url in urls:
        if not is_local(url):
            return None, {}
        path = Path(local_path(url))
        directory = str(path.parent)
        if directory not in indexes:
            indexes[directory] = read_index(path.parent) or {}
        index = indexes[directory]
        entry = index.get("shards", {}).get(path.name)
        if entry is None:
            return None, meta
        meta = index.get("sets", {}).get(entry.get("set"), meta)
        counts.append(int(entry["samples"]))
    return tuple(counts), meta


def read_index(directory: str | os.PathLike) -> dict | None:
    """The ``shards.json`` of a directory, or None when absent or of another version."""
    path = Path(directory) / INDEX_NAME
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable shard index %s: %s", path, exc)
        return None
    if index.get("version") != INDEX_VERSION:
        log.warning("ignoring shard index %s of version %s", path, index.get("version"))
        return None
    return index


def count_samples(path: str) -> int:
    """Samples (distinct keys) in a local tar shard, reading only the headers."""
    keys = 0
    last = None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                parts = split_name(member.name)  # the reader's rule: no extension, no sample
                if parts is not None and parts[0] != last:
                    keys += 1
                    last = parts[0]
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"shard {path} is not a readable tar file ({exc}); write it again") from exc
    return keys


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


@attrs.define
class WriteSummary:
    """What a shard writer wrote."""

    #: Brace pattern of the shards written (what recipes put in ``train_shards``).
    pattern: str
    samples: int
    shards: int
    bytes: int


class ShardSink:
    """Writes samples into numbered tar shards of about ``max_bytes`` each.

    Shards are named ``{prefix}-{000000}.tar``; `close` writes (or updates) the
    ``shards.json`` index beside them with each shard's sample count. ``max_samples``
    caps the samples per shard as well (the synthetic set uses it to get a fixed
    number of shards, so that ranks and workers each get some).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        prefix: str = "train",
        max_bytes: int = 256 << 20,
        max_samples: int | None = None,
    ):
        if not re.fullmatch(r"[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*", prefix):
            raise DataError(f"shard prefix {prefix!r} must be letters, digits, '_', '.' or '-'")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_bytes = max_bytes
        self.max_samples = max_samples
        self.counts: list[int] = []
        self.bytes = 0
        self._writer: wds.TarWriter | None = None
        self._size = 0

    def _name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def write(self, key: str, members: Mapping[str, bytes]) -> None:
        """Add one sample: ``members`` maps an extension (``jpg``, ``cls``) to its bytes."""
        size = sum(TAR_BLOCK + -(-len(v) // TAR_BLOCK) * TAR_BLOCK for v in members.values())
        full = (
            self._writer is not None
            and self.counts[-1] > 0
            and (
                self._size + size > self.max_bytes
                or (self.max_samples is not None and self.counts[-1] >= self.max_samples)
            )
        )
        if self._writer is None or full:
            self._roll()
        self._writer.write({"__key__": key, **members})
        self._size += size
        self.counts[-1] += 1

    def _roll(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self.bytes += os.path.getsize(self.out_dir / self._name(len(self.counts) - 1))
        # a fixed mtime and owner make the same samples give byte-identical shards
        self._writer = wds.TarWriter(
            str(self.out_dir / self._name(len(self.counts))),
            encoder=False,
            mtime=0,
            user="varkit",
            group="varkit",
        )
        self._size = 0
        self.counts.append(0)

    @property
    def pattern(self) -> str:
        last = max(len(self.counts) - 1, 0)
        return str(self.out_dir / f"{self.prefix}-{{000000..{last:06d}}}.tar")

    def close(self, meta: Mapping | None = None) -> WriteSummary:
        """Finish the last shard and write the index; ``meta`` goes into it as is."""
        if self._writer is not None:
            self._writer.close()
            self.bytes += os.path.getsize(self.out_dir / self._name(len(self.counts) - 1))
            self._writer = None
        index = read_index(self.out_dir) or {}
        # other shard sets in the same directory (another prefix) keep their entries
        shards = {k: v for k, v in index.get("shards", {}).items() if v.get("set") != self.prefix}
        shards.update({self._name(i): {"samples": n, "set": self.prefix} for i, n in enumerate(self.counts)})
        sets = {**index.get("sets", {}), self.prefix: dict(meta or {"kind": "images"})}
        write_json_atomic(
            self.out_dir / INDEX_NAME, {"version": INDEX_VERSION, "shards": shards, "sets": sets}
        )
        return WriteSummary(
            pattern=self.pattern, samples=sum(self.counts), shards=len(self.counts), bytes=self.bytes
        )


def split_name(name: str) -> tuple[str, str] | None:
    """``dir/key.ext.more`` -> ``("dir/key", "ext.more")`` (webdataset's rule), None without an extension."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return None
    return name[:dot], name[dot + 1 :].lower()


def open_url(url: str):
    """A binary stream of one shard: a local file, a ``pipe:`` command or a remote url.

    Raises:
        DataError: the shard cannot be opened (e.g. it disappeared since the run started).
    """
    try:
        if is_local(url):
            return open(local_path(url), "rb")
        return wds.gopen(url, "rb")
    except OSError as exc:
        raise DataError(
            f"shard {url} cannot be opened ({exc}); it existed when the run started, so it was "
            "moved or deleted since: restore it, or restart with a pattern of the shards that exist"
        ) from exc


class _TarFormatError(Exception):
    pass


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError(f"unexpected end of data ({len(data)} of {n} bytes)")
    return data


def tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of the regular files of a tar stream, in order.

    A lean reader of what tar writers produce (ustar, GNU long names, pax ``path``
    records): Python's ``tarfile`` spends most of a code-shard epoch parsing headers;
    this reads a header with two slices.
    """
    long_name = None
    while True:
        header = stream.read(512)
        if not header or header == _ZERO_BLOCK:
            return
        if len(header) != 512:
            raise EOFError("unexpected end of data inside a tar header")
        field = header[124:136]
        try:
            size = (
                int.from_bytes(field[1:], "big") if field[0] & 0x80 else int(field.strip(b"\0 ") or b"0", 8)
            )
        except ValueError:
            raise _TarFormatError(f"bad tar header (size field {field!r})") from None
        kind = header[156:157]
        data = _read_exact(stream, size) if size else b""
        if size % 512:
            _read_exact(stream, 512 - size % 512)
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
            continue
        if kind == b"x":  # pax header: only the path matters here
            for record in data.decode("utf-8", "replace").split("\n"):
                if " path=" in record:
                    long_name = record.split(" path=", 1)[1]
            continue
        if kind not in (b"0", b"\0", b"7"):  # directories, links, global headers
            long_name = None
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if header[257:262] == b"ustar" and header[345] != 0:
                name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        yield name, data


_ZERO_BLOCK = bytes(512)


def iter_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The samples of one shard in file order: ``(key, {ext: bytes})``.

    Members of one sample must be adjacent (as every webdataset writer puts them).

    Raises:
        DataError: the shard cannot be opened or is not a complete tar file.
    """
    stream = open_url(url)
    key, members = None, {}
    complete = False
    try:
        for name, data in tar_members(stream):
            parts = split_name(name)
            if parts is None:
                continue
            if parts[0] != key:
                if key is not None:
                    yield key, members
                key, members = parts[0], {}
            members[parts[1]] = data
        complete = True
        if key is not None:
            yield key, members
    except (OSError, EOFError, _TarFormatError) as exc:
        raise DataError(
            f"shard {url} could not be read to the end ({type(exc).__name__}: {exc}); it is truncated "
            "or corrupt: write it again with `varkit shards`, or leave it out of the pattern"
        ) from exc
    finally:
        try:
            stream.close()
        except Exception as exc:
            # a pipe: command reports its failure on close; one stopped early (the epoch
            # ended mid-shard) fails with a broken pipe, which is no error
            if complete:
                raise DataError(f"shard {url}: the command or download failed ({exc})") from exc


def parse_label(raw: bytes | None, num_classes: int | None = None) -> int | str:
    """A sample's ``cls`` member as a class index, or the reason it cannot be used."""
    if raw is None:
        return "no cls"
    try:
        label = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return "unreadable cls"
    if label < 0 or (num_classes is not None and label >= num_classes):
        return "class out of range"
    return label
