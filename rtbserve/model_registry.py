"""SageMaker multi-model endpoints: which models the server holds, shared by every worker.

SageMaker loads and unloads models through the container's management API (``POST /models``,
``DELETE /models/NAME``), and each call lands on one worker, chosen by the kernel among those
sharing the port; yet every worker must then serve the model. So the truth lives in the run
directory the supervisor shares with its workers (``RUN/models/``), and each worker's
``ModelRegistry`` reconciles its own dataplane with it:

    models.json ── {"generation": g, "models": [{"name", "url", "load_id"}, ...]}, replaced
                   atomically (write a temporary file, ``os.replace``): readers take no lock
    generation ─── 8 bytes, memory-mapped by every worker; bumped after each change of
                   models.json, so "anything new?" is one integer comparison (``sync``)
    models.lock ── flock held for a read-modify-write of models.json (microseconds)
    loading/ ───── one flock file per model name, held while that name is compiled and
                   registered: two concurrent POSTs of one name (on one worker or two) load once,
                   the second then answers 409

Timeline of a model's life, two workers A and B::

    POST /models {a, url} ─> A: 409 if registered; 404 if url is missing; 507 if a bound is
                             reached; else, in a thread (A's loop keeps serving): flock
                             loading/a, compile + verify into the shared compile cache, record
                             the entry, bump the generation; A serves a; 200
    B's next request ──────> generation differs: read models.json, start loading a in the
                             background (from the cache: fast); ``POST /models/a/invoke`` on
                             B awaits that load; gRPC and /v2 on B see a once it is loaded
    (no request on B) ─────> the same within ~1 s (``run_periodic_sync``)
    DELETE /models/a ──────> A: remove the entry, bump the generation, drop a and collect its
                             memory; 200. B drops a on its next request or within ~1 s.
                             Requests already holding a finish.

``load_id`` (the generation that recorded an entry) tells a reload under the same name from the
copy a worker still holds. A worker restarted by the supervisor reads models.json at start and
loads every model again, from the cache.

Bounds (``MultiModelSettings``): past ``max_models`` models, or when this worker's resident memory
is over ``memory_budget_mb`` before a load or after it, the load answers 507
(``InsufficientMemory``), as it does on a ``MemoryError``: SageMaker then unloads a model and
retries. Each worker holds every model, so the budget is per worker.

Concurrency: ``ModelRegistry`` runs on its worker's event loop, except the ``_*_in_thread``
methods, which run in its loader threads and touch no loop state. ``SharedRegistry`` is safe
across processes and threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import gc
import hashlib
import logging
import mmap
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from rtbserve.config import ModelSettings, MultiModelSettings, discover_models
from rtbserve.dataplane import DataPlane, ServedModel
from rtbserve.errors import ArtifactError, ConfigError, InvalidInput, ModelNotFound, RtbError
from rtbserve.metrics import MAX_MODEL_NAME_BYTES

log = logging.getLogger("rtbserve.models")

REGISTRY_DIR = "models"
SYNC_INTERVAL_S = 1.0
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class ModelAlreadyLoaded(RtbError):
    """``POST /models`` for a name that is already loaded (SageMaker expects 409)."""

    code = "model_already_loaded"


class InsufficientMemory(RtbError):
    """A load would exceed the memory or model-count bound, or ran out of memory (507)."""

    code = "insufficient_memory"


class ModelUrlNotFound(ModelNotFound):
    """``POST /models`` names a url that does not exist (404)."""


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    name: str
    url: str
    load_id: int  # the generation that recorded it: a reload under the same name differs


class SharedRegistry:
    """``RUN/models/``: the loaded models' entries and their generation counter (see the module
    docstring). Safe across processes and threads; ``generation`` is one memory read."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.directory = Path(run_dir) / REGISTRY_DIR
        (self.directory / "loading").mkdir(parents=True, exist_ok=True)
        self._entries_path = self.directory / "models.json"
        fd = os.open(self.directory / "generation", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < 8:
                os.ftruncate(fd, 8)  # zeros; another process doing the same changes nothing
            self._map = mmap.mmap(fd, 8)
        finally:
            os.close(fd)
        # an aligned 8-byte cell: read and written whole, never torn
        self.generation_cell = memoryview(self._map).cast("q")

    @property
    def generation(self) -> int:
        return int(self.generation_cell[0])

    def read(self) -> tuple[int, dict[str, RegistryEntry]]:
        """(generation, entries by name). The generation is read first: when a change lands in
        between, the caller sees the newer entries with the older number and reads again on its
        next ``sync``, never the reverse."""
        generation = int(self.generation_cell[0])
        try:
            doc = orjson.loads(self._entries_path.read_bytes())
        except FileNotFoundError:
            return generation, {}
        entries = {
            m["name"]: RegistryEntry(m["name"], m["url"], m["load_id"]) for m in doc["models"]
        }
        return generation, entries

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, RegistryEntry]]:
        with open(self.directory / "models.lock", "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # syscall; held for a read and a write
            try:
                yield self.read()[1]
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def loading(self, name: str) -> Iterator[None]:
        """Exclusive, across processes and threads, while ``name`` is compiled and registered."""
        digest = hashlib.blake2b(name.encode(), digest_size=12).hexdigest()
        with open(self.directory / "loading" / f"{digest}.lock", "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)  # blocks while another load of this name runs
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def add(
        self, name: str, url: str, check: Callable[[dict[str, RegistryEntry]], None]
    ) -> RegistryEntry:
        """Record ``name``; ``check(entries)`` may refuse (raise) first. ``ModelAlreadyLoaded``
        when it is recorded already."""
        with self._locked() as entries:
            if name in entries:
                raise ModelAlreadyLoaded(f"model {name!r} is already loaded")
            check(entries)
            generation = int(self.generation_cell[0]) + 1
            entries[name] = entry = RegistryEntry(name, url, generation)
            self._write(generation, entries)
            return entry

    def remove(self, name: str) -> RegistryEntry:
        """Forget ``name``; ``ModelNotFound`` when it is not recorded."""
        with self._locked() as entries:
            entry = entries.pop(name, None)
            if entry is None:
                raise ModelNotFound(f"model {name!r} is not loaded; loaded: {_names(entries)}")
            self._write(int(self.generation_cell[0]) + 1, entries)
            return entry

    def _write(self, generation: int, entries: dict[str, RegistryEntry]) -> None:
        doc = {
            "generation": generation,
            "models": [
                {"name": e.name, "url": e.url, "load_id": e.load_id}
                for e in sorted(entries.values(), key=lambda e: e.name)
            ],
        }
        tmp = self._entries_path.with_name(f".models.json.{os.getpid()}.tmp")
        tmp.write_bytes(orjson.dumps(doc))
        os.replace(tmp, self._entries_path)
        self.generation_cell[0] = generation  # after the file: readers never miss a change

    def close(self) -> None:
        self.generation_cell.release()
        self._map.close()


def _names(entries: dict[str, Any]) -> str:
    return ", ".join(sorted(entries)) or "none"


def resident_mb() -> float:
    """This process's resident memory in MiB (``/proc/self/statm``)."""
    with open("/proc/self/statm", "rb") as fh:
        return int(fh.read().split()[1]) * _PAGE_SIZE / (1 << 20)


def _release_freed_memory() -> None:
    """Collect cycles and hand freed heap pages back to the OS (glibc's ``malloc_trim``)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class ModelRegistry:
    """One worker's side of a multi-model endpoint: load, unload, list and reconcile its
    dataplane with the ``SharedRegistry`` in ``run_dir`` (see the module docstring).

    settings: the bounds. cache_dir: the compile cache (None: ``$RTBSERVE_CACHE_DIR``).
    Callbacks the HTTP app adds: ``validators`` (``f(ModelSettings)`` raising ``RtbError`` to
    refuse a model before it is registered) and ``removed`` (``f(name)`` once a model is dropped).
    Not thread-safe: use it on the worker's event loop.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        dataplane: DataPlane,
        settings: MultiModelSettings,
        *,
        cache_dir: str | None = None,
        max_load_threads: int = 2,
    ) -> None:
        self.shared = SharedRegistry(run_dir)
        self.dataplane = dataplane
        self.settings = settings
        self.cache_dir = cache_dir
        self.validators: list[Callable[[ModelSettings], None]] = []
        self.removed: list[Callable[[str], None]] = []
        self._generation_cell = self.shared.generation_cell
        self._seen = -1  # no generation yet: the first sync reads the entries
        self._entries: dict[str, RegistryEntry] = {}
        self._local: dict[str, int] = {}  # name -> load_id of the copy this worker serves
        # name -> (load_id, task): entries loading in this worker
        self._loading: dict[str, tuple[int, asyncio.Task[ServedModel]]] = {}
        self._registering: set[str] = set()  # POST /models in progress here
        self._executor = ThreadPoolExecutor(max_load_threads, thread_name_prefix="model-load")

    # -- reconciling ----------------------------------------------------------------------

    def sync(self) -> None:
        """Catch up with the other workers' loads and unloads: one integer comparison when
        nothing changed."""
        if self._generation_cell[0] != self._seen:
            self._reconcile()

    def _reconcile(self) -> None:
        self._seen, self._entries = self.shared.read()
        for name, load_id in list(self._local.items()):
            entry = self._entries.get(name)
            if entry is None or entry.load_id != load_id:
                self._drop_local(name)
        for name, entry in self._entries.items():
            if name in self._local or name in self._registering:
                continue
            loading = self._loading.get(name)
            if loading is None or loading[0] != entry.load_id:
                self._start_load(entry)  # background: gRPC and /v2 see it once loaded

    async def run_periodic_sync(self, interval_s: float = SYNC_INTERVAL_S) -> None:
        """``sync`` every ``interval_s`` seconds, so a worker that gets no request still drops
        unloaded models (and loads new ones) promptly. Runs until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.sync()
            except Exception:  # a bad registry read must not end the loop
                log.exception("multi-model registry sync failed")

    # -- the management API ---------------------------------------------------------------

    @property
    def entries(self) -> list[RegistryEntry]:
        """Every loaded model of the endpoint, by name (call ``sync`` first)."""
        return [self._entries[name] for name in sorted(self._entries)]

    def entry(self, name: str) -> RegistryEntry:
        """The loaded model ``name`` (call ``sync`` first); ``ModelNotFound`` otherwise."""
        entry = self._entries.get(name)
        if entry is None:
            raise ModelNotFound(f"model {name!r} is not loaded; loaded: {_names(self._entries)}")
        return entry

    async def load(self, name: str, url: str) -> RegistryEntry:
        """``POST /models``: compile and verify ``url``'s model into the cache (in a thread),
        register it for every worker and serve it here. Raises ``ModelAlreadyLoaded``,
        ``ModelUrlNotFound``, ``InvalidInput`` (name, or no usable model at url) and
        ``InsufficientMemory``."""
        check_model_name(name)
        self.sync()
        if name in self._entries:
            raise ModelAlreadyLoaded(f"model {name!r} is already loaded")
        if not Path(url).exists():
            raise ModelUrlNotFound(f"model url {url!r} does not exist")
        self._check_bounds(self._entries)
        self._registering.add(name)
        try:
            entry, settings, model = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._register_in_thread, name, url
            )
        except BaseException:
            self._registering.discard(name)
            # another worker may have registered this name meanwhile (our 409): the sync that
            # saw it skipped it, so look again and load theirs
            self._seen = -1
            self.sync()
            raise
        self._registering.discard(name)
        self._add_local(entry, settings, model)
        self.sync()  # drops it again if it was unloaded elsewhere meanwhile
        return entry

    def unload(self, name: str) -> RegistryEntry:
        """``DELETE /models/NAME``: unregister ``name`` for every worker, drop it here and hand
        its memory back before returning. ``ModelNotFound`` when it is not loaded."""
        entry = self.shared.remove(name)  # a microseconds-long flock: fine on the loop
        self.sync()  # drops the local copy (and anything else that changed)
        _release_freed_memory()
        return entry

    async def served(self, name: str) -> ServedModel:
        """The model to score ``name`` with in this worker, loading it from the cache first when
        another worker registered it (``POST /models/NAME/invoke`` on a fresh worker).
        ``ModelNotFound`` when the endpoint has no such model; ``InsufficientMemory``."""
        self.sync()
        entry = self.entry(name)
        if self._local.get(name) == entry.load_id:
            return self.dataplane.get(name)
        loading = self._loading.get(name)
        if loading is not None and loading[0] == entry.load_id:
            task = loading[1]
        else:
            task = self._start_load(entry)
        return await asyncio.shield(task)  # one waiter cancelled never cancels the load

    # -- loading and dropping ---------------------------------------------------------------

    def _check_bounds(self, entries: dict[str, RegistryEntry]) -> None:
        self._check_count(entries)
        self._check_memory("before loading")

    def _check_memory(self, when: str) -> None:
        budget = self.settings.memory_budget_mb
        if budget is None:
            return
        used = resident_mb()
        if used > budget:
            raise InsufficientMemory(
                f"worker memory {used:.0f} MiB {when} is over the budget of {budget} MiB "
                "(RTBSERVE_MEMORY_BUDGET_MB); unload a model first"
            )

    def _settings_of(self, name: str, url: str) -> ModelSettings:
        """The one model at ``url`` (its rtbserve.toml applied), served under ``name``."""
        from rtbserve.deploy import seed_cache

        try:
            found = discover_models(url)
        except ConfigError as exc:
            raise InvalidInput(f"model url {url!r}: {exc}") from None
        if len(found) != 1:
            raise InvalidInput(
                f"model url {url!r} holds {len(found)} models "
                f"({', '.join(m.name for m in found)}); expected one"
            )
        (settings,) = found
        if settings.handler_script is not None:
            raise InvalidInput(
                f"model url {url!r} has a handler script ({settings.handler_script}); "
                "multi-model endpoints serve rtbserve's own handling only"
            )
        seed_cache(url, self.cache_dir)  # a packaged model's precompiled cache, if any
        return replace(settings, name=name)

    def _load_in_thread(self, settings: ModelSettings) -> Any:
        from rtbserve import load_model

        self._check_memory("before loading")
        try:
            model = load_model(
                settings.path,
                backend=settings.backend,
                threshold=settings.threshold,
                cache_dir=self.cache_dir,
            )
        except MemoryError:
            raise InsufficientMemory(
                f"out of memory loading model {settings.name!r}; unload a model first"
            ) from None
        except ArtifactError as exc:
            raise InvalidInput(f"model {settings.name!r} at {str(settings.path)!r}: {exc}") from exc
        try:
            self._check_memory("after loading it")
        except InsufficientMemory:
            del model
            _release_freed_memory()
            raise
        return model

    def _register_in_thread(self, name: str, url: str) -> tuple[RegistryEntry, ModelSettings, Any]:
        with self.shared.loading(name):
            _, entries = self.shared.read()
            if name in entries:  # a concurrent POST of the same name won
                raise ModelAlreadyLoaded(f"model {name!r} is already loaded")
            settings = self._settings_of(name, url)
            for validate in self.validators:
                validate(settings)
            model = self._load_in_thread(settings)
            entry = self.shared.add(name, url, self._check_count)
        return entry, settings, model

    def _check_count(self, entries: dict[str, RegistryEntry]) -> None:
        bound = self.settings.max_models
        if bound is not None and len(entries) >= bound:
            raise InsufficientMemory(
                f"{len(entries)} models are loaded, the most this endpoint holds "
                f"(RTBSERVE_MAX_MODELS={bound}); unload one first"
            )

    def _entry_in_thread(self, entry: RegistryEntry) -> tuple[ModelSettings, Any]:
        settings = self._settings_of(entry.name, entry.url)
        return settings, self._load_in_thread(settings)

    def _start_load(self, entry: RegistryEntry) -> asyncio.Task[ServedModel]:
        task = asyncio.get_running_loop().create_task(self._load_entry(entry))
        self._loading[entry.name] = (entry.load_id, task)
        task.add_done_callback(self._log_failed_load)
        return task

    async def _load_entry(self, entry: RegistryEntry) -> ServedModel:
        try:
            settings, model = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._entry_in_thread, entry
            )
        finally:
            loading = self._loading.get(entry.name)
            if loading is not None and loading[1] is asyncio.current_task():
                del self._loading[entry.name]
        current = self._entries.get(entry.name)
        if current is None or current.load_id != entry.load_id:
            raise ModelNotFound(f"model {entry.name!r} was unloaded while it loaded")
        return self._add_local(entry, settings, model)

    def _log_failed_load(self, task: asyncio.Task[ServedModel]) -> None:
        if task.cancelled():
            return
        exc = task.exception()  # retrieved here, so a load nobody awaits logs once
        if exc is not None and not isinstance(exc, ModelNotFound):
            log.warning("loading a registered model failed in this worker: %s", exc)

    def _add_local(self, entry: RegistryEntry, settings: ModelSettings, model: Any) -> ServedModel:
        if entry.name in self._local:
            self._drop_local(entry.name)
        served = self.dataplane.add(settings, model)
        self._local[entry.name] = entry.load_id
        return served

    def _drop_local(self, name: str) -> None:
        del self._local[name]
        self.dataplane.remove(name)
        for callback in self.removed:
            callback(name)

    def close(self) -> None:
        for _, task in self._loading.values():
            task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.shared.close()


def check_model_name(name: object) -> str:
    """``name`` when it can name a model (a URL path segment and a metrics label); else
    ``InvalidInput``."""
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"model_name must be a non-empty string, got {name!r}")
    if "/" in name or len(name.encode()) > MAX_MODEL_NAME_BYTES or not name.isprintable():
        raise InvalidInput(
            f"model_name must be printable, hold no '/' and fit {MAX_MODEL_NAME_BYTES} UTF-8 "
            f"bytes, got {name!r}"
        )
    return name
