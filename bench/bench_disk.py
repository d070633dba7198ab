"""Disk fallback throughput: the safetensors expert loader against a plain sequential read.

Writes (or reuses) a synthetic bf16 checkpoint of about ``--gb`` GB (4 MoE layers x 64
experts of ~8 MiB by default, in ``--shards`` files), then, with the page cache dropped
for its files before each measured read:

- reads every file start to end with large reads (the baseline: what the disk gives);
- for each k, loads k experts of every layer into CPU destination slots with
  :class:`SafetensorsExpertSource`, and checks one loaded slot bit-exactly.

It prints GB/s, seconds and bytes for each, whether the cache was really cold (pages of
the files resident before each read, from ``mincore``), and last::

    disk_throughput_ratio=<loader GB/s at the largest k / sequential GB/s> bytes_read_ratio=<bytes read / bytes requested>

Run: ``python bench/bench_disk.py [--gb 2] [--dir DIR] [--ks 1 8 32]``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loaders.safetensors_format import CheckpointFiles  # noqa: E402
from loaders.safetensors_source import ExpertRequest, SafetensorsExpertSource  # noqa: E402
from loaders.synthetic import SyntheticSpec, expected_row, make_checkpoint  # noqa: E402

SPEC_FILE = "bench_spec.json"
READ_BLOCK = 16 << 20


def bench_spec(gb: float, layers: int, experts: int, hidden: int, shards: int) -> SyntheticSpec:
    """Intermediate size chosen so the experts total ``gb`` GB (a multiple of 64)."""
    per_expert = gb * 1e9 / (layers * experts)
    intermediate = max(64, round(per_expert / (3 * hidden * 2) / 64) * 64)
    return SyntheticSpec(layers=layers, experts=experts, hidden=hidden, intermediate=intermediate, shards=shards)


def prepare(directory: str, spec: SyntheticSpec) -> list[str]:
    """The checkpoint's files, written unless ``directory`` already holds this spec."""
    marker = os.path.join(directory, SPEC_FILE)
    want = {k: getattr(spec, k) for k in ("layers", "experts", "hidden", "intermediate", "dtype", "shards", "seed")}
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == want:
                print(f"reusing {directory}")
                return CheckpointFiles(directory).files()
        raise SystemExit(f"{directory} holds another benchmark checkpoint; pass an empty --dir")
    t0 = time.perf_counter()
    summary = make_checkpoint(directory, spec)
    for path, _ in summary.files:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)  # dirty pages cannot be dropped from the cache
        os.close(fd)
    with open(marker, "w") as f:
        json.dump(want, f)
    print(f"wrote {len(summary.files)} files, {summary.tensor_bytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")
    return [p for p, _ in summary.files]


# -- page cache --------------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_bytes(path: str) -> int | None:
    """Bytes of ``path`` in the page cache (``mincore`` on a mapping), or None if unknown."""
    size = os.path.getsize(path)
    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
            if _libc.mincore(addr, size, vec) != 0:
                return None
            return int(np.frombuffer(vec, dtype=np.uint8).__and__(1).sum()) * page
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def drop_cache(paths: list[str]) -> tuple[str, float | None]:
    """Evict the files from the page cache; returns (method, fraction still resident)."""
    method = "posix_fadvise(DONTNEED)"
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        method += " + drop_caches"
    except OSError:
        pass
    total, resident = 0, 0
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        r = resident_bytes(p)
        total += os.path.getsize(p)
        resident = None if r is None or resident is None else resident + r
    return method, None if resident is None else resident / total


# -- the two readers ---------------------------------------------------------------------
def sequential_read(paths: list[str]) -> tuple[int, float]:
    buf = bytearray(READ_BLOCK)
    view = memoryview(buf)
    n = 0
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while (got := f.readinto(view)) > 0:
                n += got
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=2.0, help="checkpoint size in GB (experts only)")
    ap.add_argument("--dir", help="checkpoint directory (default: a fixed one under the temp dir, reused)")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 8, 32], help="experts loaded per layer")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0, help="which experts are picked")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement (the median is shown)")
    args = ap.parse_args()

    spec = bench_spec(args.gb, args.layers, args.experts, args.hidden, args.shards)
    directory = args.dir or os.path.join(tempfile.gettempdir(), f"elastic-ep-bench-disk-{args.gb:g}gb")
    paths = prepare(directory, spec)
    layout = spec.layout()
    file_bytes = sum(os.path.getsize(p) for p in paths)
    print(f"checkpoint: {directory}, {len(paths)} files, {file_bytes / 1e9:.3f} GB; {spec.layers} layers x "
          f"{spec.experts} experts, hidden {spec.hidden}, intermediate {spec.intermediate}, bf16, "
          f"expert_bytes={layout.expert_bytes}; {args.threads} read threads; torch {torch.__version__}, "
          f"{os.cpu_count()} cpus")

    rng = np.random.default_rng(args.seed)
    ks = sorted(k for k in args.ks if 1 <= k <= spec.experts)
    requests = {
        k: [
            ExpertRequest(layer, int(e), slot)
            for layer in range(spec.layers)
            for slot, e in enumerate(sorted(rng.choice(spec.experts, k, replace=False)))
        ]
        for k in ks
    }
    weights = [layout.allocate(max(ks), fill_byte=0) for _ in range(spec.layers)]  # touched: no page faults timed
    # The disk of a shared or virtual machine varies from second to second: every
    # measurement is repeated, interleaved with the others, and the median is shown.
    seconds: dict[str, list[float]] = {"sequential": [], **{f"loader k={k}": [] for k in ks}}
    got: dict[str, int] = {}
    cold: list[float | None] = []
    method = ""
    for _ in range(args.repeat):
        method, left = drop_cache(paths)
        cold.append(left)
        got["sequential"], s = sequential_read(paths)
        seconds["sequential"].append(s)
        for k in ks:
            src = SafetensorsExpertSource(directory, "deepseek", layout, num_threads=args.threads)
            method, left = drop_cache(paths)
            cold.append(left)
            report = src.load(requests[k], weights)
            src.close()
            check = requests[k][-1]
            want = expected_row(spec, layout, check.layer, check.expert)
            assert all(torch.equal(weights[check.layer][n][check.slot], want[n]) for n in layout.names), "wrong bytes"
            got[f"loader k={k}"] = report.bytes_read
            seconds[f"loader k={k}"].append(report.seconds)
    requested = {"sequential": file_bytes, **{f"loader k={k}": k * spec.layers * layout.expert_bytes for k in ks}}
    median = {name: float(np.median(v)) for name, v in seconds.items()}
    gbps = {name: got[name] / median[name] / 1e9 for name in median}

    print(f"\ncache dropped before each read with {method}; median of {args.repeat} runs")
    print(f"{'read':<14}{'experts':>8}{'requested B':>15}{'read B':>15}{'seconds':>10}{'GB/s':>8}{'min..max GB/s':>16}")
    for name in seconds:
        n = "-" if name == "sequential" else str(len(requests[int(name.split("=")[1])]))
        spread = f"{got[name] / max(seconds[name]) / 1e9:.2f}..{got[name] / min(seconds[name]) / 1e9:.2f}"
        print(f"{name:<14}{n:>8}{requested[name]:>15,}{got[name]:>15,}{median[name]:>10.3f}{gbps[name]:>8.2f}{spread:>16}")
    worst = max((c for c in cold if c is not None), default=None)
    if worst is not None and None not in cold and worst < 0.01:
        print(f"cold cache: ensured (at most {worst:.2%} of the files' pages resident before a read, by mincore)")
    else:
        shown = "unknown" if worst is None else f"{worst:.2%}"
        print(f"cold cache: NOT ensured (up to {shown} of the pages resident); the figures are partly warm")
    loaders = [name for name in seconds if name != "sequential"]
    bytes_read_ratio = sum(got[n] for n in loaders) / sum(requested[n] for n in loaders)
    print(f"disk_throughput_ratio={gbps[loaders[-1]] / gbps['sequential']:.3f} bytes_read_ratio={bytes_read_ratio:.3f}")


if __name__ == "__main__":
    main()
