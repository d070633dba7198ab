"""The disk fallback: fill destination slots with experts read from a safetensors checkpoint.

This is the last resort of a transfer plan, used for a logical expert whose every
replica was on dead ranks. It reads only the tensors of the experts asked for, the
exact byte ranges the headers give, with ``os.preadv`` (which releases the GIL) from a
small thread pool, so several reads are in flight at once.

The failure contract: one :meth:`SafetensorsExpertSource.load` call either writes
every requested slot or none. It checks the requests and destinations, resolves and
checks every tensor (file present, name present, shape, dtype, offsets inside the
file), reads all the bytes into a staging buffer, and only then copies them into the
destinations. A caller that loads one layer's missing experts per call (as the agent
does) stages at most that layer's bytes.

Example: 2 logical experts of MoE layer 0 into local slots 4 and 7::

    src = SafetensorsExpertSource(ckpt_dir, "deepseek", moe_layout(7168, 2048),
                                  moe_layer_ids=range(3, 61))
    report = src.load([ExpertRequest(0, 17, 4), ExpertRequest(0, 200, 7)], weights)
    report.bytes_read == 2 * src.layout.expert_bytes
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from threading import Lock
from typing import Mapping, Sequence, Union

import torch

from elastic_ep.errors import (
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
    MissingFileError,
    MissingTensorError,
    TensorMismatchError,
)

from loaders.layout import ExpertLayout, LayerWeights
from loaders.checkpoint.naming import NamingScheme, get_scheme
from loaders.checkpoint.safetensors_format import DTYPE_NAMES, CheckpointFiles, SafetensorsHeader, read_header

log = logging.getLogger(__name__)

Weights = Union[Sequence[LayerWeights], Mapping[int, LayerWeights]]
"""Per MoE layer (placement index), that layer's serving tensors."""

try:
    _IOV_MAX = max(16, min(os.sysconf("SC_IOV_MAX"), 1024))
except (AttributeError, ValueError, OSError):
    _IOV_MAX = 16


@dataclass(frozen=True)
class ExpertRequest:
    """Fill local slot ``slot`` of MoE layer ``layer`` (the placement's index) with
    logical expert ``expert``: ``ExpertRequest(layer=0, expert=17, slot=4)``."""

    layer: int
    expert: int
    slot: int


@dataclass(frozen=True)
class LoadReport:
    """What one :meth:`SafetensorsExpertSource.load` did.

    Attributes:
        slots: destination slots written.
        experts: distinct ``(layer, expert)`` read (one read feeds several slots).
        bytes_read: tensor data bytes read, ``experts * layout.expert_bytes`` exactly.
        header_bytes_read: header bytes read in this call (headers are cached, so 0
            once every file has been seen).
        files: the files data was read from.
        seconds: wall time of the call.
    """

    slots: int
    experts: int
    bytes_read: int
    header_bytes_read: int
    files: tuple[str, ...]
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class _Read:
    """Bytes ``[file_offset, file_offset + nbytes)`` of ``path`` to staging ``dst``."""

    path: str
    file_offset: int
    dst: int
    nbytes: int
    tensor: str


@dataclass
class _Task:
    """One ``preadv``: contiguous file bytes from ``offset`` into several buffers."""

    path: str
    offset: int
    bufs: list[memoryview]
    tensors: list[str]

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.bufs)


class SafetensorsExpertSource:
    """Reads experts of a checkpoint directory into serving slots.

    Args:
        directory: holds one ``.safetensors`` file, or shards and their
            ``model.safetensors.index.json``.
        scheme: a :class:`NamingScheme` or a built-in's name (``"deepseek"``).
        layout: the serving layout of one expert; checkpoint tensors must match its
            parts' shapes and dtypes exactly.
        moe_layer_ids: placement layer index -> checkpoint layer number
            (DeepSeek-V3: ``range(3, 61)``); default: the same number.
        num_threads: reads in flight at once.
        read_chunk_bytes: the largest single read; longer ranges are split so that the
            threads share even one large expert.

    Headers are read once per file and kept while the file is unchanged (same inode,
    size and mtime). Loads on one source run one at a time. :meth:`close` frees the
    staging buffer.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        scheme: NamingScheme | str,
        layout: ExpertLayout,
        moe_layer_ids: Sequence[int] | None = None,
        num_threads: int = 4,
        read_chunk_bytes: int = 4 << 20,
    ) -> None:
        if num_threads < 1 or read_chunk_bytes < 1:
            raise ConfigError(
                f"num_threads={num_threads} and read_chunk_bytes={read_chunk_bytes} must be positive"
            )
        self.files = CheckpointFiles(directory)
        self.scheme = get_scheme(scheme) if isinstance(scheme, str) else scheme
        self.layout = layout
        roles = sorted({s.part.role for s in layout.spans} - set(self.scheme.modules))
        if roles:
            raise ConfigError(
                f"naming scheme {self.scheme.name!r} has no template for the layout's roles {roles} "
                f"(it has {sorted(self.scheme.modules)}); use the scheme the layout was built for"
            )
        self.moe_layer_ids = None if moe_layer_ids is None else [int(i) for i in moe_layer_ids]
        self.num_threads = num_threads
        self.read_chunk_bytes = read_chunk_bytes
        self.header_bytes_read = 0
        self._headers: dict[str, tuple[tuple[int, int, int], SafetensorsHeader]] = {}
        self._staging: torch.Tensor | None = None
        self._lock = Lock()

    def __enter__(self) -> "SafetensorsExpertSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the staging buffer (a later load allocates a new one)."""
        self._staging = None

    def checkpoint_layer(self, layer: int) -> int:
        if self.moe_layer_ids is None:
            return layer
        return self.moe_layer_ids[layer]

    def check(self, experts: Sequence[tuple[int, int]]) -> int:
        """Resolve and check every tensor of each ``(layer, logical expert)`` as a load
        would (file, name, shape, dtype, bytes inside the file) without reading data;
        returns the tensors checked. Raises what :meth:`load` raises for them."""
        with self._lock:
            fds: dict[str, int] = {}
            try:
                return len(self._resolve([(int(layer), int(e)) for layer, e in experts], fds))
            finally:
                for fd in fds.values():
                    os.close(fd)

    # -- the one verb ------------------------------------------------------------------
    def load(self, requests: Sequence[ExpertRequest], weights: Weights) -> LoadReport:
        """Write each request's expert into its slot; all of them, or none on error.

        ``weights[layer]``: the layer's serving tensors (by name or in layout order),
        each ``[slots_per_rank, ...]``, on CPU or CUDA.
        Raises :class:`ConfigError` (requests or destinations), or a
        :class:`CheckpointError` subclass (files, tensors); destinations are then as
        they were.
        """
        t0 = time.perf_counter()
        requests = list(requests)
        with self._lock:
            dest = self._check_requests(requests, weights)
            experts = list(dict.fromkeys((r.layer, r.expert) for r in requests))
            position = {e: i for i, e in enumerate(experts)}
            header_bytes = self.header_bytes_read
            fds: dict[str, int] = {}
            try:
                reads = self._resolve(experts, fds)
                pinned = any(w.is_cuda for named in dest.values() for w in named.values())
                staging = self._staging_buffer(len(experts) * self.layout.expert_bytes, pinned)
                self._read_all(reads, fds, staging)
            finally:
                for fd in fds.values():
                    os.close(fd)
            self._write(requests, dest, position, staging)
            header_bytes = self.header_bytes_read - header_bytes
        report = LoadReport(
            slots=len(requests),
            experts=len(experts),
            bytes_read=sum(r.nbytes for r in reads),
            header_bytes_read=header_bytes,
            files=tuple(sorted({r.path for r in reads})),
            seconds=time.perf_counter() - t0,
        )
        log.info(
            "disk load: %d slots, %d experts, %d bytes from %d files in %.3f s",
            report.slots, report.experts, report.bytes_read, len(report.files), report.seconds,
        )
        return report

    def read_packed(
        self, experts: Sequence[tuple[int, int]], out: torch.Tensor, offsets: Sequence[int]
    ) -> LoadReport:
        """Read each ``(layer, logical expert)`` in packed form (the layout's
        ``expert_bytes``, as peer transports move it) to byte ``offsets[i]`` of ``out``
        (flat uint8, CPU or CUDA): the executor's staging buffer. Checks come first, as
        in :meth:`load`; on error ``out`` may be partly written (it is scratch)."""
        t0 = time.perf_counter()
        experts = [(int(layer), int(e)) for layer, e in experts]
        eb = self.layout.expert_bytes
        if len(offsets) != len(experts):
            raise ConfigError(f"{len(experts)} experts but {len(offsets)} offsets")
        if out.dtype != torch.uint8 or out.dim() != 1 or not out.is_contiguous():
            raise ConfigError(f"out must be a contiguous 1-D uint8 tensor, got {out.dtype} {tuple(out.shape)}")
        for (layer, e), at in zip(experts, offsets):
            if e < 0 or layer < 0 or (self.moe_layer_ids is not None and layer >= len(self.moe_layer_ids)):
                raise ConfigError(f"layer {layer} expert {e}: not a MoE layer index and logical expert")
            if not 0 <= at <= out.numel() - eb:
                raise ConfigError(f"offset {at} + expert_bytes {eb} outside out ({out.numel()} bytes)")
        with self._lock:
            header_bytes = self.header_bytes_read
            fds: dict[str, int] = {}
            try:
                if out.is_cuda:
                    reads = self._resolve(experts, fds)
                    staging = self._staging_buffer(len(experts) * eb, pinned=True)
                    self._read_all(reads, fds, staging)
                else:
                    reads = self._resolve(experts, fds, offsets)
                    self._read_all(reads, fds, out)
            finally:
                for fd in fds.values():
                    os.close(fd)
            if out.is_cuda:
                for i, at in enumerate(offsets):
                    out[at : at + eb].copy_(staging[i * eb : (i + 1) * eb], non_blocking=True)
                torch.cuda.synchronize(out.device)
            header_bytes = self.header_bytes_read - header_bytes
        return LoadReport(
            slots=len(experts),
            experts=len(set(experts)),
            bytes_read=sum(r.nbytes for r in reads),
            header_bytes_read=header_bytes,
            files=tuple(sorted({r.path for r in reads})),
            seconds=time.perf_counter() - t0,
        )

    # -- step 1: requests and destinations ---------------------------------------------
    def _check_requests(
        self, requests: list[ExpertRequest], weights: Weights
    ) -> dict[int, dict[str, torch.Tensor]]:
        dest: dict[int, dict[str, torch.Tensor]] = {}
        slots: dict[int, int] = {}
        seen: dict[tuple[int, int], ExpertRequest] = {}
        for r in requests:
            if r.layer not in dest:
                if r.layer < 0 or (self.moe_layer_ids is not None and r.layer >= len(self.moe_layer_ids)):
                    n = "any" if self.moe_layer_ids is None else len(self.moe_layer_ids)
                    raise ConfigError(f"{r}: layer {r.layer} is not a MoE layer index (0 .. {n} - 1)")
                try:
                    layer_weights = weights[r.layer]
                except (IndexError, KeyError):
                    raise ConfigError(
                        f"{r}: no destination tensors for layer {r.layer}; pass weights[layer] for "
                        "every layer requested"
                    ) from None
                dest[r.layer], slots[r.layer] = self.layout.check_weights(layer_weights, f"layer {r.layer}")
            if not 0 <= r.slot < slots[r.layer]:
                raise ConfigError(
                    f"{r}: destination slot {r.slot} out of range 0 .. {slots[r.layer] - 1} "
                    f"(slots_per_rank of layer {r.layer})"
                )
            if r.expert < 0:
                raise ConfigError(f"{r}: logical expert {r.expert} is negative")
            other = seen.setdefault((r.layer, r.slot), r)
            if other is not r:
                raise ConfigError(f"{r} and {other} write the same slot; give each slot one request")
        return dest

    # -- step 2: every tensor found and checked, before any byte of data is read -------
    def _header(self, path: str, fds: dict[str, int]) -> SafetensorsHeader:
        if path not in fds:
            try:
                fds[path] = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise MissingFileError(
                    f"{path}: checkpoint file not found"
                    + (f" (named by {self.files.index_path})" if self.files.index_path else "")
                    + "; download the missing shard"
                ) from None
            except OSError as e:
                raise CheckpointError(f"{path}: cannot open ({e})") from e
        fd = fds[path]
        st = os.fstat(fd)
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._headers.get(path)
        if cached is None or cached[0] != key:
            header = read_header(fd, path)
            self.header_bytes_read += header.data_start
            self._headers[path] = cached = (key, header)
        return cached[1]

    def _resolve(
        self, experts: list[tuple[int, int]], fds: dict[str, int], bases: Sequence[int] | None = None
    ) -> list[_Read]:
        """Every tensor of ``experts``, checked; expert ``i`` lands at byte ``bases[i]``
        of the buffer (default ``i * expert_bytes``)."""
        reads = []
        eb = self.layout.expert_bytes
        for i, (layer, expert) in enumerate(experts):
            base = i * eb if bases is None else bases[i]
            ckpt_layer = self.checkpoint_layer(layer)
            for span in self.layout.spans:
                p = span.part
                name = self.scheme.tensor_name(ckpt_layer, expert, p.role, p.param)
                path = self.files.file_of(name)
                info = self._header(path, fds).tensor(name)
                stacked = self.scheme.stacked
                shape = info.shape[1:] if stacked else info.shape
                if info.dtype != span.dtype or shape != p.shape:
                    want = f"[num_experts, {', '.join(map(str, p.shape))}]" if stacked else str(list(p.shape))
                    raise TensorMismatchError(
                        f"{path}: tensor {name!r} (layer {layer} = checkpoint layer {ckpt_layer}, "
                        f"expert {expert}) is {info.dtype_str} {list(info.shape)}, the serving "
                        f"layout's {span.tensor} expects {DTYPE_NAMES.get(span.dtype, span.dtype)} "
                        f"{want}; build the layout from the model directory (loaders.checkpoint.hf_model) or "
                        "from the model's config (hidden, intermediate, dtype, fp8 scales)"
                    )
                begin = info.begin
                if stacked:
                    # The expert's slice of a C-contiguous [num_experts, ...] tensor is one
                    # byte range: read it and nothing else of the tensor.
                    if expert >= info.shape[0]:
                        raise MissingTensorError(
                            f"{path}: tensor {name!r} (checkpoint layer {ckpt_layer}) stacks "
                            f"{info.shape[0]} experts, expert {expert} is not among them; the "
                            "placement's expert count does not match the checkpoint"
                        )
                    begin += expert * span.nbytes
                reads.append(_Read(path, begin, base + span.offset, span.nbytes, name))
        return reads

    def _staging_buffer(self, nbytes: int, pinned: bool) -> torch.Tensor:
        """Kept between loads: pinned allocations are slow, and a layer's missing
        experts are usually the same size each time."""
        s = self._staging
        if s is None or s.numel() < nbytes or (pinned and not s.is_pinned()):
            self._staging = s = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pinned)
        return s[:nbytes]

    # -- step 3: the reads, overlapped -------------------------------------------------
    def _tasks(self, reads: list[_Read], staging: torch.Tensor) -> list[_Task]:
        """Sort by file position, cut at ``read_chunk_bytes``, and merge ranges that
        follow each other in the file into one vectored read."""
        buf = memoryview(staging.numpy()).cast("B")
        tasks: list[_Task] = []
        chunk = self.read_chunk_bytes
        for r in sorted(reads, key=lambda r: (r.path, r.file_offset)):
            for at in range(0, r.nbytes, chunk):
                n = min(chunk, r.nbytes - at)
                piece = buf[r.dst + at : r.dst + at + n]
                last = tasks[-1] if tasks else None
                if (
                    last is not None
                    and last.path == r.path
                    and last.offset + last.nbytes == r.file_offset + at
                    and last.nbytes + n <= chunk
                    and len(last.bufs) < _IOV_MAX
                ):
                    last.bufs.append(piece)
                    if last.tensors[-1] != r.tensor:
                        last.tensors.append(r.tensor)
                else:
                    tasks.append(_Task(r.path, r.file_offset + at, [piece], [r.tensor]))
        return tasks

    @staticmethod
    def _run(task: _Task, fd: int) -> None:
        bufs = list(task.bufs)
        offset = task.offset
        while bufs:
            try:
                n = os.preadv(fd, bufs, offset)
            except OSError as e:
                raise CheckpointError(
                    f"{task.path}: read of bytes {offset}.. for {task.tensors} failed ({e})"
                ) from e
            if n == 0:
                raise CorruptCheckpointError(
                    f"{task.path}: file ended at byte {offset} while reading {task.tensors}; it was "
                    "truncated during the load: copy it again"
                )
            offset += n
            while n:
                if n >= len(bufs[0]):
                    n -= len(bufs.pop(0))
                else:
                    bufs[0] = bufs[0][n:]
                    n = 0

    def _read_all(self, reads: list[_Read], fds: dict[str, int], staging: torch.Tensor) -> None:
        tasks = self._tasks(reads, staging)
        if len(tasks) <= 1 or self.num_threads == 1:
            for t in tasks:
                self._run(t, fds[t.path])
            return
        with ThreadPoolExecutor(min(self.num_threads, len(tasks)), thread_name_prefix="disk-read") as pool:
            futures = [pool.submit(self._run, t, fds[t.path]) for t in tasks]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for f in pending:
                f.cancel()
            for f in futures:
                if f.done() and not f.cancelled() and f.exception() is not None:
                    raise f.exception()  # type: ignore[misc]

    # -- step 4: staging -> destinations -----------------------------------------------
    def _write(
        self,
        requests: list[ExpertRequest],
        dest: dict[int, dict[str, torch.Tensor]],
        position: dict[tuple[int, int], int],
        staging: torch.Tensor,
    ) -> None:
        eb = self.layout.expert_bytes
        devices = set()
        for r in requests:
            base = position[(r.layer, r.expert)] * eb
            named = dest[r.layer]
            for t, off in zip(self.layout.tensors, self.layout.offsets):
                row = self.layout.row_bytes_view(named[t.name], r.slot)
                # From pinned staging, the copy runs asynchronously on the current
                # stream; the synchronize below keeps staging alive until it is done.
                row.copy_(staging[base + off : base + off + t.row_bytes], non_blocking=row.is_cuda)
                if row.is_cuda:
                    devices.add(row.device)
        for d in devices:
            torch.cuda.synchronize(d)
