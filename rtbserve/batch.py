"""Offline batch scoring (``rtbserve batch``): feature files in, the rows with their scores out.

INPUT is one file or a directory of files (non-recursive, sorted by name; hidden and ``_``-prefixed
files skipped) in CSV, JSON lines, Arrow IPC (file or stream) or Parquet, read as a stream of
Arrow record batches, so INPUT may exceed memory. OUTPUT is one Parquet or CSV file holding every
input row in order, with the score column(s) appended (``--append``) or alone (``--scores-only``).

Pipeline: three threads joined by two bounded FIFO queues, so reading, scoring and writing overlap
while memory stays bounded::

    read (decode + rows) --Queue(2)--> score --Queue(2)--> write --> progress (main thread)

- ``rtb-batch-read``: pyarrow reads and decodes record batches (its C++ code releases the GIL and
  uses Arrow's own thread pool), regroups them into chunks of ``batch_rows`` rows, and turns each
  chunk's feature columns into one C-contiguous float32 (rows, n_features) matrix with a jitted
  ``nogil`` kernel (cache-blocked transpose; a null is NaN).
- ``rtb-batch-score``: ``Model.predict(X, nthread=None)``, which releases the GIL and splits a
  large chunk across every core.
- ``rtb-batch-write``: pyarrow encodes and writes each chunk to a temporary file beside OUTPUT
  (GIL released); OUTPUT appears by an atomic rename only once every row is written, so a failed
  or interrupted run leaves no partial file.

Memory bound: at most ``MAX_CHUNKS_IN_FLIGHT`` (7) chunks exist at once: one being read, two
queued for scoring, one being scored, two queued for writing, one being written. A chunk holds
``batch_rows`` input rows as Arrow arrays plus, until scored, their float32 matrix
(``batch_rows * n_features * 4`` bytes), so the bound is about ``7 * batch_rows * (input row bytes
+ 4 * n_features)``: ~250 MB for the default 65,536 rows of the 67-feature demo model, plus
pyarrow's reader buffers (a Parquet row group's column chunks being decoded, a few CSV/JSON
blocks) and the writer's pages for one chunk.

Features are float32 exactly as the online path computes them: a text value is
``np.float32(float(token))`` (pyarrow parses to the correctly rounded float64, then rounds to
float32), an integer is ``np.float32(float(i))``, a null or an empty CSV field is NaN. CSV text has
no types, so every CSV column is a feature unless ``--columns``/``--drop-columns`` say otherwise
(the other columns pass through as text); in typed formats the features are, by default, every
numeric column in order. Parquet output is written for speed: plain encoding (no dictionary),
statistics for the score columns only, snappy unless ``--compression`` says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import os
import queue
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from rtbserve.errors import ConfigError, InvalidInput, RtbError

if TYPE_CHECKING:  # pyarrow is imported on first use: `rtbserve serve` never needs it
    import pyarrow as pa

    from rtbserve.registry.model import Model

INPUT_FORMATS = ("parquet", "csv", "json", "arrow")
OUTPUT_FORMATS = ("parquet", "csv")
OUTPUTS = ("probability", "margin", "label")
PARQUET_COMPRESSIONS = ("snappy", "zstd", "lz4", "gzip", "none")
_EXTENSIONS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "json",
    ".ndjson": "json",
    ".json": "json",
    ".arrow": "arrow",
    ".arrows": "arrow",
    ".feather": "arrow",
    ".ipc": "arrow",
}
# pyarrow decompresses CSV and JSON lines files with these suffixes as it reads them
_COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")
DEFAULT_BATCH_ROWS = 65_536
MAX_BATCH_ROWS = 1 << 24
QUEUE_CHUNKS = 2  # per queue: enough slack for one slow chunk; each one costs memory
MAX_CHUNKS_IN_FLIGHT = 3 + 2 * QUEUE_CHUNKS  # one per thread + both queues full
_POLL_S = 0.1  # queue waits wake this often to notice a failed stage
_KERNEL_BLOCK_ROWS = 64  # 64 rows x n_features float32 stay in L1 during the transpose
_CSV_BLOCK_BYTES = (1 << 20, 32 << 20)  # pyarrow CSV block size bounds (one block ~ one chunk)
_CSV_PEEK_BYTES = 1 << 20
_CSV_MAX_LINE_BYTES = 64 << 20
# a whitespace-only CSV field is empty, hence NaN (the online codec strips fields); pyarrow
# matches null spellings before it trims, so the common ones are listed
_CSV_NULLS = ["", *(" " * k for k in range(1, 33)), "\t", "\t\t", " \t", "\t "]
_MAX_NAMES_SHOWN = 12
_LOCATE_MAX_ROWS = 50_000_000  # a located error scans at most this far past the failing chunk


# --------------------------------------------------------------------------- options, result


@dataclass(frozen=True)
class BatchOptions:
    """How ``score_files`` reads, scores and writes. Defaults match the CLI's.

    output: "probability" | "margin" | "label" (``Model.predict``).
    batch_rows: rows per chunk (one ``predict`` call, one Parquet row group); also sets memory.
    columns: feature columns by name, in model order; None picks them (see the module docstring).
    drop_columns: names excluded from the features (with ``columns=None``).
    has_header: CSV files start with a header line (else columns are named f0, f1, ...).
    score_column: the output column; multi-class models get ``<name>_0`` .. ``<name>_{K-1}``.
    scores_only: write only the score column(s), not the input columns.
    input_format / output_format: override the format the file extension implies.
    compression: Parquet output codec.
    """

    output: str = "probability"
    batch_rows: int = DEFAULT_BATCH_ROWS
    columns: tuple[str, ...] | None = None
    drop_columns: tuple[str, ...] = ()
    has_header: bool = True
    score_column: str = "score"
    scores_only: bool = False
    input_format: str | None = None
    output_format: str | None = None
    compression: str = "snappy"

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise ConfigError(
                f"unknown output {self.output!r}; expected one of {', '.join(OUTPUTS)}"
            )
        if not 1 <= self.batch_rows <= MAX_BATCH_ROWS:
            raise ConfigError(
                f"batch rows must lie in [1, {MAX_BATCH_ROWS}], got {self.batch_rows}"
            )
        if self.columns is not None and self.drop_columns:
            raise ConfigError("choose features with --columns or --drop-columns, not both")
        if self.columns is not None and len(set(self.columns)) != len(self.columns):
            raise ConfigError(f"--columns names a column twice: {', '.join(self.columns)}")
        if not self.score_column:
            raise ConfigError("the score column needs a name")
        for name, value, valid in (
            ("input format", self.input_format, INPUT_FORMATS),
            ("output format", self.output_format, OUTPUT_FORMATS),
            ("compression", self.compression, PARQUET_COMPRESSIONS),
        ):
            if value is not None and value not in valid:
                raise ConfigError(f"unknown {name} {value!r}; expected one of {', '.join(valid)}")


@dataclass
class BatchResult:
    """What a run did. ``stage_busy_s``: seconds each thread spent working (not waiting on a
    queue); the largest is the bottleneck."""

    rows: int
    files: int
    seconds: float
    output: Path
    stage_busy_s: dict[str, float] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------- pyarrow access


@functools.cache
def _pa() -> Any:
    try:
        import pyarrow
        import pyarrow.compute
        import pyarrow.csv
        import pyarrow.ipc
        import pyarrow.json
        import pyarrow.parquet
    except ImportError as exc:  # pragma: no cover - pyarrow is a dependency
        raise ConfigError(f"rtbserve batch needs pyarrow: {exc}") from exc
    return pyarrow


def _arrow_error_types() -> tuple[type[BaseException], ...]:
    return (_pa().ArrowException, OSError)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:300] + "..."


def _names_shown(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES_SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _MAX_NAMES_SHOWN else "")


# --------------------------------------------------------------------------- features


def _is_numeric(t: pa.DataType) -> bool:
    types = _pa().types
    if types.is_dictionary(t):
        return _is_numeric(t.value_type)
    return bool(
        types.is_integer(t) or types.is_floating(t) or types.is_decimal(t) or types.is_null(t)
    )


def _choose_features(
    path: Path, names: list[str], types: list[pa.DataType] | None, opts: BatchOptions, n: int
) -> list[int]:
    """Column indices of the ``n`` features, in model order: the ``columns`` named, else every
    numeric column not in ``drop_columns`` (``types`` None, CSV text: every column not dropped).
    InvalidInput, naming the columns found, unless there are exactly ``n``."""
    if opts.columns is not None:
        index: dict[str, int] = {}
        twice = set()
        for i, name in enumerate(names):
            if name in index:
                twice.add(name)
            index[name] = i
        missing = [c for c in opts.columns if c not in index]
        if missing:
            raise InvalidInput(
                f"{path}: no column {_names_shown(missing)}; its columns: {_names_shown(names)}"
            )
        ambiguous = [c for c in opts.columns if c in twice]
        if ambiguous:
            raise InvalidInput(f"{path}: column name(s) {', '.join(ambiguous)} appear twice")
        if len(opts.columns) != n:
            raise InvalidInput(
                f"the model expects {n} features, --columns names {len(opts.columns)}: "
                f"{_names_shown(list(opts.columns))}"
            )
        return [index[c] for c in opts.columns]
    unknown = [c for c in opts.drop_columns if c not in names]
    if unknown:
        raise InvalidInput(
            f"{path}: --drop-columns names no column {_names_shown(unknown)}; "
            f"its columns: {_names_shown(names)}"
        )
    dropped = set(opts.drop_columns)
    kept = [i for i, name in enumerate(names) if name not in dropped]
    chosen = kept if types is None else [i for i in kept if _is_numeric(types[i])]
    if len(chosen) != n:
        how = ("columns" if types is None else "numeric columns") + (
            " left after --drop-columns" if dropped else ""
        )
        skipped = [f"{names[i]} ({types[i]})" for i in kept if i not in chosen] if types else []
        note = f" (not numeric, skipped: {_names_shown(skipped)})" if skipped else ""
        raise InvalidInput(
            f"{path}: the model expects {n} features, found {len(chosen)} {how}: "
            f"{_names_shown([names[i] for i in chosen])}{note}; choose the features with "
            "--columns a,b,c or --drop-columns"
        )
    return chosen


def _float32_column(arr: pa.Array, name: str, path: Path) -> pa.Array:
    """One feature column as a float32 Arrow array (nulls kept), rounded as the online path."""
    pa = _pa()
    pc = pa.compute
    t = arr.type
    try:
        if pa.types.is_float32(t):
            return arr
        if pa.types.is_dictionary(t):
            return _float32_column(arr.dictionary_decode(), name, path)
        if pa.types.is_null(t):
            return pa.nulls(len(arr), pa.float32())
        if pa.types.is_integer(t):
            # through float64, as np.float32(float(i)): one rounding to double, one to float
            arr = pc.cast(arr, pa.float64(), safe=False)
        elif pa.types.is_decimal(t):
            # through the decimal text: the correctly rounded float64, as float(Decimal)
            arr = pc.cast(pc.cast(arr, pa.string()), pa.float64())
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            arr = pc.cast(arr, pa.float64())
        elif not (pa.types.is_floating(t) or pa.types.is_boolean(t)):
            raise InvalidInput(f"{path}: feature column {name!r} has type {t}, not a number")
        return pc.cast(arr, pa.float32(), safe=False)  # float64 -> float32 rounds to nearest
    except pa.ArrowException as exc:
        raise InvalidInput(f"{path}: feature column {name!r} ({t}): {_short(exc)}") from exc


@functools.cache
def _rows_kernel() -> Callable[..., None]:
    """The jitted transpose, compiled (or loaded from numba's cache) on first use."""
    from numba import njit

    @njit(nogil=True, boundscheck=False, cache=True)
    def fill_rows(cols, validity, has_nulls, shifts, n, out):
        # out[r, j] = cols[j, r], NaN where bit (r + shifts[j]) of validity[j] is clear; blocks
        # of rows keep the written block in L1 while every column streams through it
        n_cols = out.shape[1]
        nan = np.float32(np.nan)
        for start in range(0, n, _KERNEL_BLOCK_ROWS):
            stop = min(n, start + _KERNEL_BLOCK_ROWS)
            for j in range(n_cols):
                if has_nulls[j]:
                    shift = shifts[j]
                    for r in range(start, stop):
                        k = r + shift
                        v = cols[j, r]
                        if not (validity[j, k >> 3] >> (k & 7)) & 1:
                            v = nan
                        out[r, j] = v
                else:
                    for r in range(start, stop):
                        out[r, j] = cols[j, r]

    return fill_rows


class RowsBuilder:
    """Arrow feature columns -> C-contiguous float32 (rows, n_features) matrices.

    Keeps one staging buffer (n_features x batch_rows floats and validity bytes), so it is not
    thread-safe: the reader thread owns one.
    """

    def __init__(self, n_features: int, batch_rows: int) -> None:
        self.n_features = n_features
        self._cols = np.empty((n_features, batch_rows), dtype=np.float32)  # allocates
        self._validity = np.empty((n_features, batch_rows // 8 + 2), dtype=np.uint8)
        self._has_nulls = np.zeros(n_features, dtype=np.bool_)
        self._shifts = np.zeros(n_features, dtype=np.int64)
        self._kernel = _rows_kernel()

    def fill(self, columns: list[pa.Array], out: np.ndarray) -> None:
        """Write float32 ``columns`` (one per feature, equal lengths <= batch_rows) into
        ``out`` (shape (len, n_features), C-contiguous)."""
        n = len(out)
        for j, arr in enumerate(columns):
            validity, data = arr.buffers()[:2]
            self._cols[j, :n] = np.frombuffer(data, np.float32, n, arr.offset * 4)  # copies
            has_nulls = arr.null_count > 0
            self._has_nulls[j] = has_nulls
            if has_nulls:
                first, shift = divmod(arr.offset, 8)
                n_bytes = (shift + n + 7) // 8
                self._validity[j, :n_bytes] = np.frombuffer(validity, np.uint8, n_bytes, first)
                self._shifts[j] = shift
        self._kernel(self._cols, self._validity, self._has_nulls, self._shifts, n, out)  # nogil


# --------------------------------------------------------------------------- inputs


def _format_of(path: Path, forced: str | None) -> str | None:
    if forced:
        return forced
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED_SUFFIXES:
        suffixes = suffixes[:-1]
    return _EXTENSIONS.get(suffixes[-1]) if suffixes else None


def list_inputs(path: Path, forced_format: str | None) -> list[tuple[Path, str]]:
    """(file, format) for INPUT: the file itself, or a directory's data files sorted by name."""
    if path.is_dir():
        found = []
        for p in sorted(path.iterdir(), key=lambda p: p.name):
            if p.name.startswith((".", "_")) or not p.is_file():
                continue
            fmt = _format_of(p, forced_format)
            if fmt is not None:
                found.append((p, fmt))
        if not found:
            known = ", ".join(f"*{e}" for e in _EXTENSIONS)
            raise ConfigError(f"no input files in directory {path} (looked for {known})")
        return found
    if not path.exists():
        raise ConfigError(f"input {path} does not exist")
    fmt = _format_of(path, forced_format)
    if fmt is None:
        raise ConfigError(
            f"cannot tell the format of {path} from its extension; use --input-format "
            f"{{{','.join(INPUT_FORMATS)}}}"
        )
    return [(path, fmt)]


class _Input:
    """One input file: its columns as the reader yields them, the chosen features, and (opened
    again when its turn comes, so a directory of many files holds one open at a time) a stream
    of record batches."""

    fmt = ""

    def __init__(self, path: Path, opts: BatchOptions) -> None:
        self.path = path
        self.opts = opts
        self.schema: pa.Schema  # of the batches ``batches(False)`` yields, no metadata
        self.features: list[int] = []  # feature positions in ``schema``, in model order
        self.total_rows: int | None = None

    @property
    def names(self) -> list[str]:
        return list(self.schema.names)

    def _choose(self, types: list[pa.DataType] | None, n_features: int) -> None:
        self.features = _choose_features(self.path, self.names, types, self.opts, n_features)

    def batches(self, feature_only: bool) -> tuple[Iterator[pa.RecordBatch], list[int]]:
        """Record batches in file order and the feature positions in them (model order).
        ``feature_only``: the batches may hold the features alone (less to decode)."""
        raise NotImplementedError

    def explain(self, exc: BaseException, rows_before: int) -> RtbError:
        """A read failure as the error to report (``rows_before``: rows read before it)."""
        return InvalidInput(f"{self.path}: cannot read as {self.fmt}: {_short(exc)}")


class _ParquetInput(_Input):
    fmt = "parquet"

    def __init__(self, path: Path, opts: BatchOptions, n_features: int) -> None:
        super().__init__(path, opts)
        pq = _pa().parquet
        self.schema = pq.read_schema(path).remove_metadata()
        self.total_rows = pq.read_metadata(path).num_rows
        self._choose(list(self.schema.types), n_features)

    def batches(self, feature_only: bool) -> tuple[Iterator[pa.RecordBatch], list[int]]:
        pq = _pa().parquet
        names = self.names
        # a projection is by name: only when the names are unique
        project = feature_only and len(set(names)) == len(names)
        columns = [names[i] for i in self.features] if project else None
        # memory-mapped: a column chunk is a view of the page cache, not a private copy, so a
        # file with one huge row group does not need that row group's size in memory
        stream = pq.ParquetFile(self.path, memory_map=True).iter_batches(
            batch_size=self.opts.batch_rows, columns=columns, use_threads=True
        )
        return stream, list(range(len(self.features))) if project else self.features


class _ArrowInput(_Input):
    fmt = "arrow"

    def __init__(self, path: Path, opts: BatchOptions, n_features: int) -> None:
        super().__init__(path, opts)
        with self._open() as reader:
            self.schema = reader.schema.remove_metadata()
            if isinstance(reader, _pa().ipc.RecordBatchFileReader):
                self.total_rows = reader.count_rows()  # batch headers only
        self._choose(list(self.schema.types), n_features)

    @contextlib.contextmanager
    def _open(self) -> Iterator[Any]:
        pa = _pa()
        with pa.memory_map(str(self.path)) as source:  # zero-copy batches
            if source.read(6) == b"ARROW1":
                yield pa.ipc.open_file(source)
            else:
                source.seek(0)
                yield pa.ipc.open_stream(source)

    def batches(self, feature_only: bool) -> tuple[Iterator[pa.RecordBatch], list[int]]:
        def stream() -> Iterator[pa.RecordBatch]:
            with self._open() as reader:
                if isinstance(reader, _pa().ipc.RecordBatchFileReader):
                    for i in range(reader.num_record_batches):
                        yield reader.get_batch(i)
                else:
                    yield from reader

        return stream(), self.features


def _open_text(path: Path) -> Any:
    """The file's bytes, decompressed by suffix as pyarrow's CSV/JSON readers do."""
    return _pa().input_stream(str(path), compression="detect")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, line without its end) for every line of a text file."""
    with _open_text(path) as f:
        lineno = 0
        rest = b""
        while block := f.read(1 << 20):
            parts = (rest + block).split(b"\n")
            rest = parts.pop()
            for line in parts:
                lineno += 1
                yield lineno, line[:-1] if line.endswith(b"\r") else line
        if rest:
            yield lineno + 1, rest[:-1] if rest.endswith(b"\r") else rest


def _is_number(token: str) -> bool:
    """``float(token)`` succeeds, as the online CSV codec reads a field (no ``_`` groups)."""
    if "_" in token:
        return False
    try:
        float(token)
    except ValueError:
        return False
    return True


def _looks_like_data(header: list[str]) -> bool:
    """Every field a number or empty, other than pandas' default column names 0, 1, 2, ..."""
    fields = [f.strip() for f in header]
    if fields == [str(i) for i in range(len(fields))]:
        return False
    return any(fields) and all(not f or _is_number(f) for f in fields)


def _shown(token: str) -> str:
    return repr(token if len(token) <= 40 else token[:40] + "...")


class _CsvInput(_Input):
    fmt = "csv"

    def __init__(self, path: Path, opts: BatchOptions, n_features: int) -> None:
        super().__init__(path, opts)
        pa = _pa()
        first, self._line_bytes = self._first_line()
        fields = next(csv.reader([first])) if first else []
        if not fields:
            raise InvalidInput(f"{path}: empty CSV file (no first line)")
        if opts.has_header and _looks_like_data(fields):
            raise InvalidInput(
                f"{path}: line 1 is numbers, not a header (it would be lost as column names); "
                "use --no-header"
            )
        names = fields if opts.has_header else [f"f{i}" for i in range(len(fields))]
        self.schema = pa.schema([(n, pa.string()) for n in names])
        self._choose(None, n_features)
        # features parse as float64 (then round to float32); the other columns pass as text
        feature_set = set(self.features)
        self.schema = pa.schema(
            [(n, pa.float64() if i in feature_set else pa.string()) for i, n in enumerate(names)]
        )

    def _first_line(self) -> tuple[str, int]:
        with _open_text(self.path) as f:
            head = b""
            while b"\n" not in head and len(head) < _CSV_MAX_LINE_BYTES:
                block = f.read(_CSV_PEEK_BYTES)
                if not block:
                    break
                head += block
        line = head.split(b"\n", 1)[0].rstrip(b"\r")
        if len(line) >= _CSV_MAX_LINE_BYTES:
            raise InvalidInput(f"{self.path}: first line longer than {_CSV_MAX_LINE_BYTES} bytes")
        try:
            return line.decode("utf-8-sig"), len(line) + 1
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"{self.path}: line 1 is not UTF-8 text: {exc}") from exc

    def batches(self, feature_only: bool) -> tuple[Iterator[pa.RecordBatch], list[int]]:
        pa = _pa()
        names = self.names
        feature_names = [names[i] for i in self.features]
        lo, hi = _CSV_BLOCK_BYTES
        read = pa.csv.ReadOptions(
            use_threads=True,
            # about one chunk per block: fewer, larger batches to regroup
            block_size=min(max(self._line_bytes * self.opts.batch_rows, lo), hi),
            autogenerate_column_names=not self.opts.has_header,
        )
        project = feature_only and len(set(names)) == len(names)
        convert = pa.csv.ConvertOptions(
            column_types=dict(zip(names, self.schema.types, strict=True)),
            null_values=_CSV_NULLS,
            strings_can_be_null=False,
            include_columns=feature_names if project else None,
        )
        stream = pa.csv.open_csv(str(self.path), read_options=read, convert_options=convert)
        return stream, list(range(len(feature_names))) if project else self.features

    def explain(self, exc: BaseException, rows_before: int) -> RtbError:
        located = self._locate(rows_before)
        if located:
            return InvalidInput(f"{self.path}: {located}")
        return InvalidInput(f"{self.path}: after row {rows_before:,}: {_short(exc)}")

    def _locate(self, rows_before: int) -> str | None:
        """The first invalid line at or after data row ``rows_before`` (error path only: a
        Python scan of the file, which counts rows as pyarrow does, skipping empty lines)."""
        names = self.names
        width = len(names)
        row = -1
        for lineno, raw in _lines(self.path):
            if (self.opts.has_header and lineno == 1) or not raw:
                continue
            row += 1
            if row < rows_before:
                continue
            if row > rows_before + _LOCATE_MAX_ROWS:
                break
            try:
                fields = next(csv.reader([raw.decode("utf-8")]))
            except (UnicodeDecodeError, csv.Error) as exc:
                return f"line {lineno}: not CSV text: {exc}"
            if len(fields) != width:
                return f"line {lineno} has {len(fields)} fields, expected {width}"
            for pos in self.features:
                token = fields[pos].strip()
                if token and not _is_number(token):
                    name = f" ({names[pos]})" if self.opts.has_header else ""
                    return f"line {lineno}, column {pos + 1}{name}: {_shown(token)} is not a number"
        return None


class _JsonInput(_Input):
    fmt = "json"

    def __init__(self, path: Path, opts: BatchOptions, n_features: int) -> None:
        super().__init__(path, opts)
        pa = _pa()
        try:
            inferred = pa.json.open_json(str(path), read_options=self._read_options()).schema
        except pa.ArrowException as exc:
            raise self.explain(exc, 0) from exc
        self.schema = inferred.remove_metadata()
        self._choose(list(self.schema.types), n_features)
        # features as float64 whatever the first block held (ints, nulls): a later block may
        # have 0.5 where the first had 0; the other fields are inferred as usual
        feature_set = set(self.features)
        self.schema = pa.schema(
            [
                pa.field(f.name, pa.float64()) if i in feature_set else f
                for i, f in enumerate(self.schema)
            ]
        )

    @staticmethod
    def _read_options() -> Any:
        return _pa().json.ReadOptions(use_threads=True, block_size=4 << 20)

    def batches(self, feature_only: bool) -> tuple[Iterator[pa.RecordBatch], list[int]]:
        pa = _pa()
        names = self.names
        explicit = pa.schema([self.schema.field(i) for i in self.features])
        parse = pa.json.ParseOptions(explicit_schema=explicit, unexpected_field_behavior="infer")
        reader = pa.json.open_json(
            str(self.path), read_options=self._read_options(), parse_options=parse
        )

        def stream() -> Iterator[pa.RecordBatch]:
            # the explicit fields come first: restore the file's order
            for batch in reader:
                yield batch if batch.schema.names == names else batch.select(names)

        return stream(), self.features

    def explain(self, exc: BaseException, rows_before: int) -> RtbError:
        located = self._locate(rows_before)
        if located:
            return InvalidInput(f"{self.path}: {located}")
        return InvalidInput(f"{self.path}: after row {rows_before:,}: {_short(exc)}")

    def _locate(self, rows_before: int) -> str | None:
        """The first invalid line at or after data row ``rows_before`` (error path only)."""
        import orjson

        # before the features are chosen (the first block failed): the first object's numbers
        wanted = [self.names[i] for i in self.features] if self.features else None
        row = -1
        for lineno, raw in _lines(self.path):
            if not raw.strip():
                continue
            row += 1
            if row < rows_before:
                continue
            if row > rows_before + _LOCATE_MAX_ROWS:
                break
            try:
                doc = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                return f"line {lineno}: not JSON: {exc}"
            if not isinstance(doc, dict):
                return f"line {lineno}: expected one JSON object per line"
            if wanted is None:
                wanted = [k for k, v in doc.items() if _is_json_number(v)]
            for name in wanted:
                v = doc.get(name)
                if v is not None and not _is_json_number(v):
                    text = orjson.dumps(v).decode()
                    return f"line {lineno}: feature {name!r} is {_shown(text)}, not a number"
        return None


def _is_json_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


_INPUT_CLASSES: dict[str, Callable[[Path, BatchOptions, int], _Input]] = {
    "parquet": _ParquetInput,
    "arrow": _ArrowInput,
    "csv": _CsvInput,
    "json": _JsonInput,
}


def _open_input(path: Path, fmt: str, opts: BatchOptions, n_features: int) -> _Input:
    try:
        return _INPUT_CLASSES[fmt](path, opts, n_features)
    except _arrow_error_types() as exc:
        raise InvalidInput(f"{path}: cannot read as {fmt}: {_short(exc)}") from exc


# --------------------------------------------------------------------------- outputs


class _Sink:
    """Writes tables to a temporary file beside ``path``; ``commit`` renames it into place."""

    def __init__(
        self, path: Path, schema: pa.Schema, fmt: str, score_names: list[str], *, compression: str
    ) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        pa = _pa()
        self._writer: Any = None
        try:
            if fmt == "parquet":
                self._writer = pa.parquet.ParquetWriter(
                    str(self.tmp),
                    schema,
                    compression=compression,
                    use_dictionary=False,  # features rarely repeat: dictionaries cost, then spill
                    write_statistics=score_names,
                )
                self._is_parquet = True
            else:
                self._writer = pa.csv.CSVWriter(str(self.tmp), schema)
                self._is_parquet = False
        except OSError as exc:
            self.abort()
            raise ConfigError(f"cannot write {path}: {_short(exc)}") from exc

    def write(self, table: pa.Table) -> None:
        try:
            if self._is_parquet:  # one chunk, one row group
                self._writer.write_table(table, row_group_size=table.num_rows)  # releases GIL
            else:
                self._writer.write_table(table)  # releases GIL
        except OSError as exc:
            raise ConfigError(f"cannot write {self.path}: {_short(exc)}") from exc
        except _pa().ArrowException as exc:
            raise InvalidInput(f"cannot write {self.path}: {_short(exc)}") from exc

    def commit(self) -> None:
        """Close, flush to disk, and rename over ``path`` (atomic within one filesystem)."""
        try:
            self._writer.close()
            fd = os.open(self.tmp, os.O_RDONLY)
            try:
                os.fsync(fd)  # syscall: the rename must not reach the disk before the data
            finally:
                os.close(fd)
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.abort()
            raise ConfigError(f"cannot write {self.path}: {_short(exc)}") from exc
        with contextlib.suppress(OSError):
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def abort(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()


# --------------------------------------------------------------------------- progress


class ProgressReporter:
    """Rows done and rows/s on ``stream`` (stderr): redrawn in place at most 10 times a second
    when it is a TTY, else one line every ``interval_s`` seconds (0: after every chunk), and a
    summary line at the end. Called from one thread at a time."""

    def __init__(
        self,
        stream: IO[str],
        *,
        total_rows: int | None,
        interval_s: float = 10.0,
        is_tty: bool | None = None,
    ) -> None:
        self.stream = stream
        self.total_rows = total_rows
        self.is_tty = stream.isatty() if is_tty is None else is_tty
        self.interval_s = 0.1 if self.is_tty else interval_s
        self.t0 = time.perf_counter()
        self._last = self.t0
        self._drawn = False

    def _text(self, rows: int, now: float) -> str:
        elapsed = now - self.t0
        rate = rows / elapsed if elapsed > 0 else 0.0
        done = f"{rows:,}"
        if self.total_rows:
            done += f" / {self.total_rows:,} rows ({100.0 * rows / self.total_rows:.1f}%)"
        else:
            done += " rows"
        return f"rtbserve batch: {done}, {_fmt_rate(rate)} rows/s, {elapsed:.1f} s"

    def update(self, rows: int) -> None:
        now = time.perf_counter()
        if now - self._last < self.interval_s:
            return
        self._last = now
        if self.is_tty:
            self.stream.write("\r" + self._text(rows, now) + "\x1b[K")
            self._drawn = True
        else:
            self.stream.write(self._text(rows, now) + "\n")
        self.stream.flush()

    def finish(self, result: BatchResult) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
        files = f"{result.files} file{'s' if result.files != 1 else ''}"
        self.stream.write(
            f"rtbserve batch: scored {result.rows:,} rows from {files} in {result.seconds:.2f} s "
            f"({_fmt_rate(result.rows_per_s)} rows/s) -> {result.output}\n"
        )
        self.stream.flush()

    def abandon(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def _fmt_rate(r: float) -> str:
    if r >= 1e6:
        return f"{r / 1e6:.2f}M"
    if r >= 1e3:
        return f"{r / 1e3:.1f}k"
    return f"{r:.0f}"


# --------------------------------------------------------------------------- the pipeline


class _Stopped(Exception):
    """Another stage failed: this one leaves quietly."""


@dataclass
class _Chunk:
    """Up to ``batch_rows`` consecutive rows of one file on their way through the pipeline."""

    source: _Input
    batches: list[pa.RecordBatch]  # zero-copy slices of the reader's batches
    n_rows: int
    X: np.ndarray | None  # the float32 features; dropped once scored
    scores: np.ndarray | None = None


class _Pipeline:
    """The stages' shared state: the first failure, a stop flag, queue waits that notice it."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.busy_s: dict[str, float] = {}
        self._lock = threading.Lock()

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc
        self.stop.set()

    def put(self, q: queue.Queue[Any], item: Any) -> None:
        while True:
            try:
                q.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                if self.stop.is_set():
                    raise _Stopped from None

    def get(self, q: queue.Queue[Any]) -> Any:
        while True:
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                if self.stop.is_set():
                    raise _Stopped from None

    def start(self, name: str, target: Callable[[], float]) -> threading.Thread:
        """Run ``target`` (returns its busy seconds) on a thread; a failure stops every stage."""

        def run() -> None:
            try:
                self.busy_s[name] = target()
            except _Stopped:
                pass
            except BaseException as exc:  # reported by the main thread
                self.fail(exc)

        thread = threading.Thread(target=run, name=f"rtb-batch-{name}", daemon=True)
        thread.start()
        return thread


def _rebatch(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[list[pa.RecordBatch]]:
    """Lists of record batches holding ``rows`` rows in all (the last may hold fewer), made of
    zero-copy slices; empty batches vanish."""
    group: list[pa.RecordBatch] = []
    have = 0
    for batch in batches:
        start = 0
        while start < batch.num_rows:
            take = min(rows - have, batch.num_rows - start)
            group.append(batch if take == batch.num_rows else batch.slice(start, take))
            have += take
            start += take
            if have == rows:
                yield group
                group, have = [], 0
    if group:
        yield group


def score_files(
    model: Model,
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    options: BatchOptions | None = None,
    *,
    progress: Callable[[int | None], ProgressReporter] | None = None,
) -> BatchResult:
    """Score every row of INPUT (a file or a directory) with ``model``; write OUTPUT atomically.

    options: see ``BatchOptions`` (default: its defaults). progress: called once with the total
    row count (None when unknown: CSV, JSON lines, Arrow streams) to make a reporter; None
    reports nothing. Raises ``ConfigError`` (paths, formats, flags) or ``InvalidInput`` (the
    data; the message names the file, and the line for CSV and JSON lines), leaving no output
    file. Uses every core through ``Model.predict``'s shared pool: one run at a time per process.
    """
    opts = options or BatchOptions()
    out = Path(output_path)
    out_fmt = opts.output_format or _format_of(out, None)
    if out_fmt not in OUTPUT_FORMATS:
        raise ConfigError(
            f"cannot tell the output format of {out} from its extension; name it .parquet or "
            f".csv, or use --output-format {{{','.join(OUTPUT_FORMATS)}}}"
        )
    if out.is_dir():
        raise ConfigError(f"output {out} is a directory; name an output file")
    if not out.parent.is_dir():
        raise ConfigError(f"output directory {out.parent} does not exist")
    files = list_inputs(Path(input_path), opts.input_format)
    if any(p.resolve() == out.resolve() for p, _ in files):
        raise ConfigError(f"output {out} is also an input; name another file")
    # every file's schema (footer, header line or first block) is checked before any row is
    # scored: a bad last file fails in seconds, not after hours
    inputs = [_open_input(p, fmt, opts, model.n_features) for p, fmt in files]
    probe = model.predict(np.full((1, model.n_features), np.nan, np.float32), output=opts.output)
    score_fields = _score_fields(probe, opts.score_column)
    schema = _output_schema(inputs, score_fields, opts.scores_only)
    totals = [i.total_rows for i in inputs]
    total = None if None in totals else sum(t or 0 for t in totals)
    reporter = progress(total) if progress else None

    pipe = _Pipeline()
    to_score: queue.Queue[_Chunk | None] = queue.Queue(QUEUE_CHUNKS)
    to_write: queue.Queue[_Chunk | None] = queue.Queue(QUEUE_CHUNKS)
    rows_done = 0

    def read() -> float:
        builder = RowsBuilder(model.n_features, opts.batch_rows)
        busy = 0.0
        for source in inputs:
            rows_before = 0
            try:  # opening a CSV or JSON reader already decodes its first block
                stream, features = source.batches(feature_only=opts.scores_only)
            except _arrow_error_types() as exc:
                raise source.explain(exc, rows_before) from exc
            groups = _rebatch(stream, opts.batch_rows)
            while True:
                t = time.perf_counter()
                try:
                    group = next(groups)  # pyarrow decodes; releases GIL
                except StopIteration:
                    break
                except _arrow_error_types() as exc:
                    raise source.explain(exc, rows_before) from exc
                n = sum(b.num_rows for b in group)
                X = np.empty((n, model.n_features), np.float32)  # noqa: N806 - allocates
                at = 0
                for b in group:
                    cols = [
                        _float32_column(b.column(i), b.schema.names[i], source.path)
                        for i in features
                    ]
                    builder.fill(cols, X[at : at + b.num_rows])  # releases GIL
                    at += b.num_rows
                busy += time.perf_counter() - t
                pipe.put(to_score, _Chunk(source, group, n, X))
                rows_before += n
        pipe.put(to_score, None)
        return busy

    def score() -> float:
        busy = 0.0
        while (chunk := pipe.get(to_score)) is not None:
            t = time.perf_counter()
            chunk.scores = model.predict(chunk.X, output=opts.output)  # releases GIL; all cores
            chunk.X = None
            busy += time.perf_counter() - t
            pipe.put(to_write, chunk)
        pipe.put(to_write, None)
        return busy

    def write() -> float:
        nonlocal rows_done
        busy = 0.0
        while (chunk := pipe.get(to_write)) is not None:
            t = time.perf_counter()
            sink.write(_output_table(chunk, schema, len(score_fields), opts.scores_only))
            busy += time.perf_counter() - t
            rows_done += chunk.n_rows
            if reporter:
                reporter.update(rows_done)
        return busy

    t0 = time.perf_counter()
    sink = _Sink(out, schema, out_fmt, [f.name for f in score_fields], compression=opts.compression)
    committed = False
    try:
        threads = [pipe.start("read", read), pipe.start("score", score)]
        threads.append(pipe.start("write", write))
        try:
            for thread in threads:
                thread.join()
        except BaseException:  # KeyboardInterrupt: stop the stages, then clean up
            pipe.stop.set()
            for thread in threads:
                thread.join()
            raise
        if pipe.error is not None:
            raise pipe.error
        sink.commit()
        committed = True
    finally:
        if not committed:
            sink.abort()
            if reporter:
                reporter.abandon()
    result = BatchResult(
        rows=rows_done,
        files=len(inputs),
        seconds=time.perf_counter() - t0,
        output=out,
        stage_busy_s=dict(pipe.busy_s),
    )
    if reporter:
        reporter.finish(result)
    return result


def _score_fields(probe: np.ndarray, name: str) -> list[pa.Field]:
    """The score column(s) for ``predict``'s output ``probe``: one, or one per class."""
    pa = _pa()
    dtype = pa.from_numpy_dtype(probe.dtype)
    if probe.ndim == 2 and probe.shape[1] > 1:
        return [pa.field(f"{name}_{k}", dtype) for k in range(probe.shape[1])]
    return [pa.field(name, dtype)]


def _output_schema(inputs: list[_Input], scores: list[pa.Field], scores_only: bool) -> pa.Schema:
    """The first file's columns (as read) and the scores; every file must have its names."""
    pa = _pa()
    if scores_only:
        return pa.schema(scores)
    first = inputs[0]
    clash = [f.name for f in scores if f.name in set(first.names)]
    if clash:
        raise ConfigError(
            f"{first.path} already has a column {clash[0]!r}; name the scores with --score-column"
        )
    for other in inputs[1:]:
        if other.names != first.names:
            raise InvalidInput(
                f"{other.path} has columns {_names_shown(other.names)}, {first.path} has "
                f"{_names_shown(first.names)}: --append writes one schema (or use --scores-only)"
            )
    return pa.schema([*first.schema, *scores])


def _output_table(chunk: _Chunk, schema: pa.Schema, n_scores: int, scores_only: bool) -> pa.Table:
    pa = _pa()
    scores = chunk.scores
    assert scores is not None
    if scores.ndim == 2:
        arrays = [pa.array(np.ascontiguousarray(scores[:, k])) for k in range(scores.shape[1])]
    else:
        arrays = [pa.array(scores)]  # zero-copy
    if scores_only:
        return pa.Table.from_arrays(arrays, schema=schema)
    table = pa.Table.from_batches(chunk.batches)  # zero-copy
    n_in = len(schema) - n_scores
    want = pa.schema(list(schema)[:n_in])
    if not table.schema.equals(want, check_metadata=False):
        try:  # another file's types (int32 where the first had int64): the first file's
            table = table.cast(want)
        except (pa.ArrowException, ValueError) as exc:
            raise InvalidInput(
                f"{chunk.source.path}: its column types {table.schema.types} do not convert to "
                f"the first file's {want.types}: {_short(exc)}"
            ) from exc
    return pa.Table.from_arrays([*table.columns, *arrays], schema=schema)


# --------------------------------------------------------------------------- command line


def add_batch_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``rtbserve batch MODEL INPUT OUTPUT`` to the CLI's subparsers."""
    from rtbserve.predictors import BACKEND_NAMES

    p = subparsers.add_parser(
        "batch",
        help="score files offline: CSV, JSON lines, Arrow or Parquet in; Parquet or CSV out",
        description="Score every row of INPUT (a file, or a directory of files read in name "
        "order) and write OUTPUT (.parquet or .csv) with the scores appended, streaming: INPUT "
        f"may exceed memory; at most {MAX_CHUNKS_IN_FLIGHT} chunks of --batch-rows rows are in "
        "memory at once. OUTPUT appears only when every row is written.",
    )
    p.add_argument("model", metavar="MODEL", help="a model file or its directory")
    p.add_argument("input", metavar="INPUT", help="a file, or a directory of files")
    p.add_argument("output_path", metavar="OUTPUT", help="the output file (.parquet or .csv)")
    p.add_argument("--input-format", choices=INPUT_FORMATS, help="default: from the extension")
    p.add_argument("--output-format", choices=OUTPUT_FORMATS, help="default: from the extension")
    p.add_argument(
        "--output",
        default="probability",
        choices=OUTPUTS,
        help="what the score holds, as Model.predict's output (default probability)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--append",
        dest="scores_only",
        action="store_false",
        help="write the input columns and the scores (default)",
    )
    mode.add_argument("--scores-only", action="store_true", help="write only the scores")
    p.set_defaults(scores_only=False)
    pick = p.add_mutually_exclusive_group()
    pick.add_argument(
        "--columns",
        help="feature columns in model order, comma-separated (default: every "
        "numeric column; for CSV every column)",
    )
    pick.add_argument("--drop-columns", help="columns that are not features, comma-separated")
    p.add_argument(
        "--no-header",
        dest="header",
        action="store_false",
        help="CSV files have no header line (columns are then named f0, f1, ...)",
    )
    p.add_argument("--score-column", default="score", help="name of the score column")
    p.add_argument(
        "--batch-rows",
        type=int,
        default=DEFAULT_BATCH_ROWS,
        help=f"rows per scoring call and Parquet row group (default {DEFAULT_BATCH_ROWS})",
    )
    p.add_argument(
        "--compression",
        default="snappy",
        choices=PARQUET_COMPRESSIONS,
        help="Parquet output codec (default snappy)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument(
        "--progress-interval-s",
        type=float,
        default=10.0,
        help="when stderr is not a terminal, seconds between progress lines (0: every chunk)",
    )
    p.add_argument("--backend", default="auto", choices=BACKEND_NAMES)
    p.add_argument("--autotune", default="fast", choices=("fast", "full"))
    p.add_argument("--cache-dir", default=None, help="compile cache (default ~/.cache/rtbserve)")
    p.add_argument("--threshold", type=float, default=None)
    p.set_defaults(func=cmd_batch)
    return p


def _names_arg(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    if not names:
        raise ConfigError(f"expected comma-separated column names, got {value!r}")
    return names


def cmd_batch(args: argparse.Namespace, *, stderr: IO[str] | None = None) -> int:
    """Run ``rtbserve batch``; 0 on success, 2 (message on stderr) on an rtbserve error."""
    err = stderr if stderr is not None else sys.stderr
    try:
        from rtbserve import load_model

        opts = BatchOptions(
            output=args.output,
            batch_rows=args.batch_rows,
            columns=_names_arg(args.columns),
            drop_columns=_names_arg(args.drop_columns) or (),
            has_header=args.header,
            score_column=args.score_column,
            scores_only=args.scores_only,
            input_format=args.input_format,
            output_format=args.output_format,
            compression=args.compression,
        )
        model = load_model(
            args.model,
            backend=args.backend,
            threshold=args.threshold,
            autotune_policy=args.autotune,
            cache_dir=args.cache_dir,
        )

        def reporter(total: int | None) -> ProgressReporter:
            return ProgressReporter(err, total_rows=total, interval_s=args.progress_interval_s)

        score_files(
            model, args.input, args.output_path, opts, progress=None if args.quiet else reporter
        )
    except RtbError as exc:
        err.write(f"rtbserve batch: error: {exc}\n")
        err.flush()
        return 2
    except KeyboardInterrupt:
        err.write("rtbserve batch: interrupted; no output written\n")
        err.flush()
        return 130
    return 0


__all__ = [
    "BatchOptions",
    "BatchResult",
    "ProgressReporter",
    "RowsBuilder",
    "add_batch_parser",
    "cmd_batch",
    "list_inputs",
    "score_files",
]
