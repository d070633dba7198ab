import json
import os
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_ep.errors import CheckpointError, ConfigError, CorruptCheckpointError, MissingFileError
from elastic_ep.errors import MissingTensorError, TensorMismatchError
from loaders.layout import moe_layout
from loaders.checkpoint.naming import get_scheme
from loaders.checkpoint.safetensors_format import INDEX_SUFFIX, read_header
from loaders.checkpoint.safetensors_source import ExpertRequest, SafetensorsExpertSource
from loaders.checkpoint.synthetic import SyntheticSpec, expected_row, make_checkpoint

TEMPLATES = {
    "gate": "blocks.{layer}.moe.experts.{expert}.wi_0",
    "up": "blocks.{layer}.moe.experts.{expert}.wi_1",
    "down": "blocks.{layer}.moe.experts.{expert}.wo",
}
FILL = 0x5A
SLOTS = 6


def scheme_of(name):
    return get_scheme("template", TEMPLATES) if name == "template" else name


def destinations(layout, layers, device="cpu"):
    return [layout.allocate(SLOTS, device, fill_byte=FILL) for _ in range(layers)]


def snapshot(weights):
    return [{n: t.clone() for n, t in w.items()} for w in weights]


def bytes_of(t):
    return t.contiguous().reshape(-1).view(torch.uint8).cpu()


def assert_slots(spec, layout, weights, requests, before):
    """Requested slots hold their expert bit-exactly; every other slot is as before."""
    written = {(r.layer, r.slot): r.expert for r in requests}
    for layer, (w, b) in enumerate(zip(weights, before)):
        for slot in range(SLOTS):
            expert = written.get((layer, slot))
            want = expected_row(spec, layout, layer, expert) if expert is not None else None
            for name in layout.names:
                ref = want[name] if want is not None else b[name][slot]
                assert torch.equal(bytes_of(w[name][slot]), bytes_of(ref)), (layer, slot, expert, name)


def assert_fails_cleanly(src, requests, weights, error):
    before = snapshot(weights)
    with pytest.raises(error) as info:
        src.load(requests, weights)
    for w, b in zip(weights, before):
        for name in w:
            assert torch.equal(bytes_of(w[name]), bytes_of(b[name])), f"{name} changed by a failed load"
    return info.value


def some_requests(rng, spec, per_layer):
    out = []
    for layer in range(spec.layers):
        slots = rng.choice(SLOTS, per_layer, replace=False)
        experts = rng.choice(spec.experts, per_layer, replace=True)  # repeats: one read, several slots
        out += [ExpertRequest(layer, int(e), int(s)) for e, s in zip(experts, slots)]
    return out


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("scheme", ["deepseek", "qwen", "mixtral", "template"])
def test_loads_bit_exact(tmp_path, rng, scheme, fused, shards):
    spec = SyntheticSpec(layers=3, experts=8, hidden=32, intermediate=16, shards=shards, scheme=scheme_of(scheme))
    make_checkpoint(tmp_path, spec)
    layout = spec.layout(fused)
    src = SafetensorsExpertSource(tmp_path, scheme_of(scheme), layout)
    weights = destinations(layout, spec.layers)
    before = snapshot(weights)
    requests = some_requests(rng, spec, 4)
    report = src.load(requests, weights)
    assert_slots(spec, layout, weights, requests, before)
    distinct = len({(r.layer, r.expert) for r in requests})
    assert (report.slots, report.experts) == (len(requests), distinct)
    assert report.bytes_read == distinct * layout.expert_bytes
    assert report.header_bytes_read > 0 and len(report.files) <= shards
    # Headers are read once per file, data again on every load.
    again = src.load(requests[:1], weights)
    assert again.header_bytes_read == 0 and again.bytes_read == layout.expert_bytes


@pytest.mark.parametrize("fused", [True, False])
def test_fp8_weights_with_float32_scales(tmp_path, rng, fused):
    spec = SyntheticSpec(layers=2, experts=6, hidden=64, intermediate=32, dtype="fp8", scale_block=16, shards=2)
    make_checkpoint(tmp_path, spec)
    layout = spec.layout(fused)
    assert {t.dtype for t in layout.tensors} == {torch.float8_e4m3fn, torch.float32}
    weights = destinations(layout, spec.layers)
    before = snapshot(weights)
    requests = some_requests(rng, spec, 3)
    report = SafetensorsExpertSource(tmp_path, "deepseek", layout).load(requests, weights)
    assert_slots(spec, layout, weights, requests, before)
    assert report.bytes_read == len({(r.layer, r.expert) for r in requests}) * layout.expert_bytes


def test_moe_layer_ids_map_to_checkpoint_layers(tmp_path):
    spec = SyntheticSpec(layers=2, experts=4, dense_layers=3, shards=2)  # MoE layers are 3 and 4
    make_checkpoint(tmp_path, spec)
    layout = spec.layout()
    weights = destinations(layout, spec.layers)
    before = snapshot(weights)
    requests = [ExpertRequest(0, 1, 0), ExpertRequest(1, 3, 5)]
    SafetensorsExpertSource(tmp_path, "deepseek", layout, moe_layer_ids=range(3, 5)).load(requests, weights)
    assert_slots(spec, layout, weights, requests, before)
    # Without the mapping, MoE layer 0 would be checkpoint layer 0: a dense layer.
    err = assert_fails_cleanly(SafetensorsExpertSource(tmp_path, "deepseek", layout), requests, weights,
                               MissingTensorError)
    assert "model.layers.0.mlp.experts.1.gate_proj.weight" in str(err)
    src = SafetensorsExpertSource(tmp_path, "deepseek", layout, moe_layer_ids=[3, 4])
    err = assert_fails_cleanly(src, [ExpertRequest(2, 0, 0)], weights + weights[:1], ConfigError)
    assert "not a MoE layer index" in str(err)


def test_reads_only_the_requested_byte_ranges(tmp_path, monkeypatch):
    spec = SyntheticSpec(layers=2, experts=8, hidden=32, intermediate=16, shards=3)
    make_checkpoint(tmp_path, spec)
    layout = spec.layout()
    src = SafetensorsExpertSource(tmp_path, "deepseek", layout, read_chunk_bytes=1000)
    weights = destinations(layout, spec.layers)
    src.load([ExpertRequest(0, 0, 0)], weights)  # headers now cached
    ranges = []
    real = os.preadv

    def counting(fd, bufs, offset):
        n = real(fd, bufs, offset)
        ranges.append((os.readlink(f"/proc/self/fd/{fd}"), offset, offset + n))
        return n

    monkeypatch.setattr(os, "preadv", counting)
    requests = [ExpertRequest(0, 5, 1), ExpertRequest(1, 2, 2), ExpertRequest(1, 2, 4), ExpertRequest(1, 7, 3)]
    report = src.load(requests, weights)
    assert report.bytes_read == sum(b - a for _, a, b in ranges) == 3 * layout.expert_bytes
    # The union of ranges read is exactly the requested experts' tensors, each once.
    wanted = set()
    for layer, expert in [(0, 5), (1, 2), (1, 7)]:
        for s in layout.spans:
            name = spec.naming.tensor_name(layer, expert, s.part.role, s.part.param)
            path = src.files.file_of(name)
            info = src._headers[path][1].tensor(name)
            wanted |= {(os.path.realpath(path), b) for b in range(info.begin, info.end)}
    read = [(os.path.realpath(p), b) for p, a, e in ranges for b in range(a, e)]
    assert len(read) == len(set(read)) and set(read) == wanted
    assert len(ranges) > 3  # chunks of at most 1000 bytes, several threads


def test_short_reads_resume_and_read_errors_fail_cleanly(tmp_path, monkeypatch):
    spec = SyntheticSpec(layers=2, experts=4, hidden=32, intermediate=16, shards=2)
    make_checkpoint(tmp_path, spec)
    layout = spec.layout(fused=False)
    src = SafetensorsExpertSource(tmp_path, "deepseek", layout, num_threads=3, read_chunk_bytes=3000)
    weights = destinations(layout, spec.layers)
    before = snapshot(weights)
    requests = [ExpertRequest(0, 3, 0), ExpertRequest(1, 1, 2), ExpertRequest(1, 2, 3)]
    real = os.preadv

    def at_most_7_bytes(fd, bufs, offset):  # a kernel may return fewer bytes than asked
        return real(fd, [bufs[0][:7]], offset)

    monkeypatch.setattr(os, "preadv", at_most_7_bytes)
    assert src.load(requests, weights).bytes_read == 3 * layout.expert_bytes
    assert_slots(spec, layout, weights, requests, before)

    again = [ExpertRequest(0, 0, 0), ExpertRequest(1, 0, 5)]
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, offset: 0)  # the file ended under us
    assert "file ended" in str(assert_fails_cleanly(src, again, weights, CorruptCheckpointError))

    def eio(fd, bufs, offset):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "preadv", eio)
    assert "Input/output error" in str(assert_fails_cleanly(src, again, weights, CheckpointError))


@settings(max_examples=25, deadline=None)
@given(
    picks=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 7), st.integers(0, SLOTS - 1)), max_size=10,
                   unique_by=lambda p: (p[0], p[2])),
    threads=st.integers(1, 5),
    chunk=st.sampled_from([64, 1000, 4096, 1 << 20]),
)
def test_any_requests_any_threads(shared_checkpoint, picks, threads, chunk):
    path, spec = shared_checkpoint
    layout = spec.layout(fused=True)
    weights = destinations(layout, spec.layers)
    before = snapshot(weights)
    requests = [ExpertRequest(*p) for p in picks]
    src = SafetensorsExpertSource(path, "mixtral", layout, num_threads=threads, read_chunk_bytes=chunk)
    report = src.load(requests, weights)
    assert_slots(spec, layout, weights, requests, before)
    assert report.bytes_read == len({(r.layer, r.expert) for r in requests}) * layout.expert_bytes


@pytest.fixture(scope="module")
def shared_checkpoint(tmp_path_factory):
    spec = SyntheticSpec(layers=2, experts=8, hidden=24, intermediate=40, shards=2, scheme="mixtral", dtype="fp16")
    path = tmp_path_factory.mktemp("shared")
    make_checkpoint(path, spec)
    return path, spec


def test_vllm_list_form_weights(tmp_path):
    spec = SyntheticSpec(layers=1, experts=3)
    make_checkpoint(tmp_path, spec)
    layout = spec.layout()
    named = destinations(layout, 1)
    before = snapshot(named)
    SafetensorsExpertSource(tmp_path, "deepseek", layout).load(
        [ExpertRequest(0, 2, 5)], [[named[0]["w13_weight"], named[0]["w2_weight"]]]
    )
    assert_slots(spec, layout, named, [ExpertRequest(0, 2, 5)], before)


# -- bad inputs: each fails with its type and leaves every destination as it was --------
def rewrite_header(path, edit):
    """Rewrite a safetensors file's header with ``edit(entries)`` (in place, or the new
    header returned), keeping its data."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        entries = json.loads(f.read(n))
        data = f.read()
    new = edit(entries)
    raw = json.dumps(entries if new is None else new).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def replace_header(path, raw):
    """Put ``raw`` where the header of a safetensors file is, keeping its data."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + n)
        data = f.read()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def patch_bytes(path, offset, raw):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(raw)


GATE = "model.layers.1.mlp.experts.2.gate_proj.weight"
LAST = "model-00002-of-00002.safetensors"


def shard_of(d, name):
    with open(os.path.join(d, "model" + INDEX_SUFFIX)) as f:
        return os.path.join(d, json.load(f)["weight_map"][name])


def break_entry(**fields):
    def edit(d):
        rewrite_header(shard_of(d, GATE), lambda e: e[GATE].update(fields))
    return edit


def truncate(d):
    """Cut the shard in the middle of GATE's bytes."""
    path = shard_of(d, GATE)
    fd = os.open(path, os.O_RDONLY)
    try:
        info = read_header(fd, path).tensor(GATE)
    finally:
        os.close(fd)
    os.truncate(path, info.begin + 10)


def stale_index(d):
    index = os.path.join(d, "model" + INDEX_SUFFIX)
    with open(index) as f:
        doc = json.load(f)
    first = doc["weight_map"]["model.embed_tokens.weight"]
    assert doc["weight_map"][GATE] != first
    doc["weight_map"][GATE] = first
    with open(index, "w") as f:
        json.dump(doc, f)


BAD_FILES = {
    "deleted shard": (lambda d: os.remove(shard_of(d, GATE)), MissingFileError, LAST),
    "stale index": (stale_index, MissingTensorError, "index is stale"),
    "truncated": (truncate, CorruptCheckpointError, "truncated"),
    "header length": (lambda d: patch_bytes(shard_of(d, GATE), 0, struct.pack("<Q", 1 << 40)),
                      CorruptCheckpointError, "header length"),
    "invalid json": (lambda d: patch_bytes(shard_of(d, GATE), 8, b"[{"), CorruptCheckpointError, "not a JSON object"),
    "json array": (lambda d: rewrite_header(shard_of(d, GATE), lambda e: [e]), CorruptCheckpointError,
                   "not a JSON object"),
    "json nested deep": (lambda d: replace_header(shard_of(d, GATE), b"[" * 200_000 + b"]" * 200_000),
                         CorruptCheckpointError, "nested deeper"),
    "json huge integer": (lambda d: replace_header(shard_of(d, GATE), b'{"a": ' + b"9" * 5000 + b"}"),
                          CorruptCheckpointError, "not a JSON object"),
    "entry huge shape": (break_entry(shape=[1] * 100_000), CorruptCheckpointError, "malformed"),
    "entry huge dims": (break_entry(shape=[2**64, 1]), CorruptCheckpointError, "malformed"),
    "entry huge value": (break_entry(data_offsets=[[0] * 100_000, 0]), CorruptCheckpointError, "malformed"),
    "offsets vs shape": (break_entry(shape=[16, 33]), CorruptCheckpointError, "span"),
    "offsets past end": (break_entry(data_offsets=[0, 1 << 30], shape=[1 << 29]), CorruptCheckpointError, "truncated"),
    "entry malformed": (break_entry(data_offsets="0-1024"), CorruptCheckpointError, "malformed"),
    "unknown dtype": (break_entry(dtype="F4"), TensorMismatchError, "F4"),
    "wrong dtype": (break_entry(dtype="F16"), TensorMismatchError, "F16 [16, 32]"),
    "wrong shape": (break_entry(shape=[32, 16]), TensorMismatchError, "[32, 16]"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_checkpoint_files(tmp_path, case):
    breaker, error, text = BAD_FILES[case]
    spec = SyntheticSpec(layers=2, experts=4, hidden=32, intermediate=16, shards=2)
    make_checkpoint(tmp_path, spec)
    layout = spec.layout()
    cached = SafetensorsExpertSource(tmp_path, "deepseek", layout)
    weights = destinations(layout, spec.layers)
    # Valid experts from both shards come first: a load that wrote as it went would show.
    good = [ExpertRequest(0, 0, 0), ExpertRequest(1, 3, 1)]
    cached.load(good, weights)  # headers cached before the damage: it must still be seen
    breaker(str(tmp_path))
    # The index is read when a source opens; shard headers again whenever a file changes.
    sources = [SafetensorsExpertSource(tmp_path, "deepseek", layout)] + ([cached] if case != "stale index" else [])
    for src in sources:
        err = assert_fails_cleanly(src, good + [ExpertRequest(1, 2, 4)], weights, error)
        assert text in str(err) and isinstance(err, CheckpointError)
        assert len(str(err)) < 2000, "a message quotes what it refuses in brief"
        # Every message names the file; those about one tensor name it too.
        assert os.path.basename(shard_of(str(tmp_path), GATE)) in str(err)
        assert GATE in str(err) or case in ("deleted shard", "truncated", "header length", "invalid json",
                                            "json array", "json nested deep", "json huge integer")


def test_missing_tensor_names_the_tensor_and_fix(tmp_path):
    spec = SyntheticSpec(layers=1, experts=4, shards=2)
    make_checkpoint(tmp_path, spec)
    layout = spec.layout()
    weights = destinations(layout, 1)
    err = assert_fails_cleanly(SafetensorsExpertSource(tmp_path, "deepseek", layout),
                               [ExpertRequest(0, 1, 0), ExpertRequest(0, 4, 1)], weights, MissingTensorError)
    assert "model.layers.0.mlp.experts.4.gate_proj.weight" in str(err) and "expert count" in str(err)
    # The same checkpoint read with the wrong scheme: names are not found either.
    assert_fails_cleanly(SafetensorsExpertSource(tmp_path, "mixtral", layout), [ExpertRequest(0, 1, 0)],
                         weights, MissingTensorError)
    # A layout of other sizes than the checkpoint's.
    other = moe_layout(spec.hidden, spec.intermediate * 2)
    assert_fails_cleanly(SafetensorsExpertSource(tmp_path, "deepseek", other), [ExpertRequest(0, 1, 0)],
                         destinations(other, 1), TensorMismatchError)


def test_bad_requests_and_destinations(tmp_path):
    spec = SyntheticSpec(layers=2, experts=4, shards=1)
    make_checkpoint(tmp_path, spec)
    layout = spec.layout()
    src = SafetensorsExpertSource(tmp_path, "deepseek", layout)
    weights = destinations(layout, 2)
    ok = ExpertRequest(0, 1, 0)
    cases = [
        ([ok, ExpertRequest(1, 0, SLOTS)], "out of range"),
        ([ok, ExpertRequest(1, 0, -1)], "out of range"),
        ([ok, ExpertRequest(2, 0, 0)], "no destination tensors for layer 2"),
        ([ok, ExpertRequest(1, -3, 0)], "negative"),
        ([ok, ExpertRequest(0, 2, 0)], "write the same slot"),
    ]
    for requests, text in cases:
        assert text in str(assert_fails_cleanly(src, requests, weights, ConfigError))
    wrong = [weights[0], {**weights[1], "w2_weight": weights[1]["w2_weight"].float()}]
    assert "w2_weight" in str(assert_fails_cleanly(src, [ok, ExpertRequest(1, 0, 0)], wrong, ConfigError))


def test_bad_directories(tmp_path):
    layout = moe_layout(64, 32)
    with pytest.raises(MissingFileError, match="not found"):
        SafetensorsExpertSource(tmp_path / "nope", "deepseek", layout)
    with pytest.raises(MissingFileError, match="found 0"):
        SafetensorsExpertSource(tmp_path, "deepseek", layout)
    make_checkpoint(tmp_path / "a", SyntheticSpec(layers=1, experts=2, shards=2))
    index = tmp_path / "a" / ("model" + INDEX_SUFFIX)
    os.rename(index, tmp_path / "index.bak")
    with pytest.raises(MissingFileError, match="found 2 .safetensors files and no index"):
        SafetensorsExpertSource(tmp_path / "a", "deepseek", layout)
    index.write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="not a valid index"):
        SafetensorsExpertSource(tmp_path / "a", "deepseek", layout)
    index.write_text(json.dumps({"weight_map": ["a"]}))
    with pytest.raises(CorruptCheckpointError, match="weight_map"):
        SafetensorsExpertSource(tmp_path / "a", "deepseek", layout)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA destinations need a GPU (pinned staging, async H2D)")
def test_cuda_destinations(tmp_path, rng):
    spec = SyntheticSpec(layers=2, experts=8, hidden=64, intermediate=32, dtype="fp8", scale_block=16, shards=2)
    make_checkpoint(tmp_path, spec)
    layout = spec.layout()
    weights = destinations(layout, spec.layers, "cuda")
    before = snapshot(weights)
    requests = some_requests(rng, spec, 4)
    src = SafetensorsExpertSource(tmp_path, "deepseek", layout)
    report = src.load(requests, weights)
    assert src._staging is not None and src._staging.is_pinned()
    assert_slots(spec, layout, weights, requests, before)
    assert report.bytes_read == len({(r.layer, r.expert) for r in requests}) * layout.expert_bytes
    os.truncate(shard_of(str(tmp_path), GATE), 100)
    assert_fails_cleanly(src, [ExpertRequest(0, 0, 0), ExpertRequest(1, 2, 1)], weights, CorruptCheckpointError)
