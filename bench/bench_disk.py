"""Disk fallback throughput: the safetensors expert loader against a plain sequential read.

For each of two layouts, bf16 and DeepSeek-V3's FP8 (e4m3 weights beside float32
``weight_scale_inv`` per 128x128 block: four tensors of two dtypes per expert), writes
(or reuses) a model directory of about ``--gb`` GB of experts (``config.json``, 4 MoE
layers x 64 experts by default, in ``--shards`` files), opens it as a model directory
(:func:`loaders.checkpoint.hf_model.open_model`), then, with the page cache dropped for its files
before each measured read:

- reads every file start to end with large reads (the baseline: what the disk gives);
- for each k, loads k experts of every layer into CPU destination slots with the
  model's :class:`SafetensorsExpertSource`, and checks one loaded slot bit-exactly.

It prints GB/s, seconds and bytes for each, whether the cache was really cold (pages of
the files resident before each read, from ``mincore``), and last::

    disk_throughput_ratio=<loader GB/s at the largest k / sequential GB/s> bytes_read_ratio=<bytes read / bytes requested>
    fp8_disk_throughput_ratio=... fp8_bytes_read_ratio=...

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
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loaders.checkpoint.safetensors_format import CheckpointFiles  # noqa: E402
from loaders.checkpoint.safetensors_source import ExpertRequest  # noqa: E402
from loaders.checkpoint.synthetic import SyntheticSpec, expected_row, hf_config, make_checkpoint  # noqa: E402

SPEC_FILE = "bench_spec.json"
READ_BLOCK = 16 << 20


def bench_spec(gb: float, layers: int, experts: int, hidden: int, shards: int, dtype: str = "bf16") -> SyntheticSpec:
    """Intermediate size chosen so the experts total about ``gb`` GB (a multiple of 64;
    fp8 experts are 1 byte per weight plus their block scales)."""
    per_expert = gb * 1e9 / (layers * experts)
    itemsize = 1 if dtype == "fp8" else 2
    intermediate = max(64, round(per_expert / (3 * hidden * itemsize) / 64) * 64)
    return SyntheticSpec(layers=layers, experts=experts, hidden=hidden, intermediate=intermediate, shards=shards,
                         dtype=dtype)


def prepare(directory: str, spec: SyntheticSpec) -> list[str]:
    """The checkpoint's files, written unless ``directory`` already holds this spec."""
    marker = os.path.join(directory, SPEC_FILE)
    want = {k: getattr(spec, k) for k in ("layers", "experts", "hidden", "intermediate", "dtype", "shards", "seed")}
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == want:
                print(f"reusing {directory}")
                config = os.path.join(directory, "config.json")
                if not os.path.exists(config):  # written by an older make_checkpoint
                    with open(config, "w") as c:
                        json.dump(hf_config(spec), c)
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


def measure(
    directory: str, paths: list[str], model: Any, spec: SyntheticSpec, ks: list[int], threads: int, repeat: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """The sequential read and the loader at each k, cold, interleaved ``repeat`` times;
    the loader opened from the model directory (``loaders.checkpoint.hf_model``) as an operator's
    would be. Returns per read: bytes requested and read, median seconds, GB/s, spread."""
    layout = model.layout()
    requests = {
        k: [
            ExpertRequest(layer, int(e), slot)
            for layer in range(model.layers)
            for slot, e in enumerate(sorted(rng.choice(model.experts, k, replace=False)))
        ]
        for k in ks
    }
    weights = [layout.allocate(max(ks), fill_byte=0) for _ in range(model.layers)]  # touched: no page faults timed
    # The disk of a shared or virtual machine varies from second to second: every
    # measurement is repeated, interleaved with the others, and the median is shown.
    seconds: dict[str, list[float]] = {"sequential": [], **{f"loader k={k}": [] for k in ks}}
    got: dict[str, int] = {}
    cold: list[float | None] = []
    method = ""
    file_bytes = sum(os.path.getsize(p) for p in paths)
    for _ in range(repeat):
        method, left = drop_cache(paths)
        cold.append(left)
        got["sequential"], sec = sequential_read(paths)
        seconds["sequential"].append(sec)
        for k in ks:
            src = model.source(num_threads=threads)
            method, left = drop_cache(paths)
            cold.append(left)
            report = src.load(requests[k], weights)
            src.close()
            check = requests[k][-1]
            want = expected_row(spec, layout, check.layer, check.expert)
            assert all(torch.equal(weights[check.layer][n][check.slot].view(torch.uint8), want[n].view(torch.uint8))
                       for n in layout.names), "wrong bytes"
            got[f"loader k={k}"] = report.bytes_read
            seconds[f"loader k={k}"].append(report.seconds)
    requested = {"sequential": file_bytes, **{f"loader k={k}": k * model.layers * layout.expert_bytes for k in ks}}
    rows = {}
    for name, v in seconds.items():
        med = float(np.median(v))
        rows[name] = {"experts": "-" if name == "sequential" else len(requests[int(name.split("=")[1])]),
                      "requested": requested[name], "read": got[name], "seconds": med, "gbps": got[name] / med / 1e9,
                      "spread": f"{got[name] / max(v) / 1e9:.2f}..{got[name] / min(v) / 1e9:.2f}"}
    return {"rows": rows, "cold": cold, "method": method}


def report(title: str, r: dict[str, Any], repeat: int) -> tuple[float, float]:
    """Print one table; returns (loader GB/s at the largest k / sequential GB/s,
    bytes read / bytes requested over every loader run)."""
    rows = r["rows"]
    print(f"\n{title}: cache dropped before each read with {r['method']}; median of {repeat} runs")
    print(f"{'read':<14}{'experts':>8}{'requested B':>15}{'read B':>15}{'seconds':>10}{'GB/s':>8}{'min..max GB/s':>16}")
    for name, x in rows.items():
        print(f"{name:<14}{x['experts']:>8}{x['requested']:>15,}{x['read']:>15,}{x['seconds']:>10.3f}"
              f"{x['gbps']:>8.2f}{x['spread']:>16}")
    cold = r["cold"]
    worst = max((c for c in cold if c is not None), default=None)
    if worst is not None and None not in cold and worst < 0.01:
        print(f"cold cache: ensured (at most {worst:.2%} of the files' pages resident before a read, by mincore)")
    else:
        shown = "unknown" if worst is None else f"{worst:.2%}"
        print(f"cold cache: NOT ensured (up to {shown} of the pages resident); the figures are partly warm")
    loaders = [name for name in rows if name != "sequential"]
    bytes_ratio = sum(rows[n]["read"] for n in loaders) / sum(rows[n]["requested"] for n in loaders)
    return rows[loaders[-1]]["gbps"] / rows["sequential"]["gbps"], bytes_ratio


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
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"],
                    help="fp8: DeepSeek-V3's layout, e4m3 weights with float32 weight_scale_inv per 128x128 block")
    args = ap.parse_args()

    from loaders.checkpoint.hf_model import open_model

    print(f"torch {torch.__version__}, {os.cpu_count()} cpus, {args.threads} read threads")
    ratios = {}
    for dtype in args.dtypes:
        spec = bench_spec(args.gb, args.layers, args.experts, args.hidden, args.shards, dtype)
        base = args.dir or os.path.join(tempfile.gettempdir(), f"elastic-ep-bench-disk-{args.gb:g}gb")
        directory = base if dtype == "bf16" else f"{base}-{dtype}"
        paths = prepare(directory, spec)
        model = open_model(directory)
        layout = model.layout()
        file_bytes = sum(os.path.getsize(p) for p in paths)
        print(f"\n[{dtype}] {directory}: {len(paths)} files, {file_bytes / 1e9:.3f} GB; {model.family}, "
              f"{model.quantization}; {model.layers} MoE layers x {model.experts} experts, hidden {spec.hidden}, "
              f"intermediate {spec.intermediate}; one expert = {len(layout.spans)} tensors, "
              f"expert_bytes={layout.expert_bytes}")
        ks = sorted(k for k in args.ks if 1 <= k <= spec.experts)
        r = measure(directory, paths, model, spec, ks, args.threads, args.repeat, np.random.default_rng(args.seed))
        ratios[dtype] = report(f"[{dtype}]", r, args.repeat)
    line = []
    for dtype, (tput, nbytes) in ratios.items():
        prefix = "" if dtype == "bf16" else f"{dtype}_"
        line.append(f"{prefix}disk_throughput_ratio={tput:.3f} {prefix}bytes_read_ratio={nbytes:.3f}")
    print("\n" + " ".join(line))


if __name__ == "__main__":
    main()
