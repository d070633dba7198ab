"""The ``elastic-ep`` command line refuses bad input cleanly: exit status 2 and one line
``elastic-ep: <Type>: <message>`` naming the flag or path and the fix, never a traceback;
``make-checkpoint`` never overwrites a user's files or follows a symlink out of its
directory; ``inspect`` turns damaged JSON (nested deep, garbage) into checkpoint errors."""

from __future__ import annotations

import json
import os
import struct

import pytest

from elastic_ep.tools.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """``elastic-ep argv`` in this process: (exit status, stderr)."""
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def assert_refused(capsys, argv: list[str], *texts: str, kind: str = "ConfigError") -> str:
    rc, err = run_cli(capsys, *argv)
    assert rc == 2, err
    assert err.startswith(f"elastic-ep: {kind}: "), err
    for t in texts:
        assert t in err, (t, err)
    return err


# -- make-checkpoint ---------------------------------------------------------------------
SMALL = ["--layers", "1", "--experts", "2", "--hidden", "16", "--intermediate", "8"]


def test_make_checkpoint_refuses_a_non_empty_directory(tmp_path, capsys):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"mine": true}')
    assert_refused(capsys, ["make-checkpoint", str(d), *SMALL], str(d), "not empty", "--force")
    assert (d / "config.json").read_text() == '{"mine": true}'
    assert os.listdir(d) == ["config.json"]


def test_make_checkpoint_never_follows_a_symlink_out(tmp_path, capsys):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    for name in ("config.json", "model.safetensors"):
        d = tmp_path / f"with-{name}"
        d.mkdir()
        os.symlink(outside, d / name)
        for force in ([], ["--force"]):
            assert_refused(capsys, ["make-checkpoint", str(d), *SMALL, *force], str(d), name)
        assert outside.read_text() == "keep me"
        assert os.path.islink(d / name)


def test_make_checkpoint_into_a_file_is_a_clean_error(tmp_path, capsys):
    f = tmp_path / "a-file"
    f.write_text("x")
    assert_refused(capsys, ["make-checkpoint", str(f), *SMALL], str(f), "not a directory")
    assert_refused(capsys, ["make-checkpoint", str(f / "below"), *SMALL], str(f / "below"))
    assert f.read_text() == "x"


def test_make_checkpoint_force_replaces_only_the_checkpoint(tmp_path, capsys):
    d = tmp_path / "model"
    assert main(["make-checkpoint", str(d), *SMALL, "--shards", "2"]) == 0
    (d / "README.md").write_text("notes")
    assert_refused(capsys, ["make-checkpoint", str(d), *SMALL], "not empty")
    assert main(["make-checkpoint", str(d), *SMALL, "--force"]) == 0
    # The old shards and index are gone: two checkpoints never mix.
    assert sorted(os.listdir(d)) == ["README.md", "config.json", "model.safetensors"]
    assert (d / "README.md").read_text() == "notes"
    assert oct(os.stat(d / "model.safetensors").st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- flags -------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,texts", [
    (["plan", "--ranks", "-4"], ["--ranks", "-4", ">= 1"]),
    (["plan", "--ranks", "4", "--slots", "64", "--fail", "5"], ["--fail 5", "--ranks 4"]),
    (["plan", "--ranks", "4", "--slots", "64", "--dead", "1", "1"], ["--dead", "[1] more than once"]),
    (["plan", "--ranks", "4", "--slots", "64", "--dead", "9"], ["--dead", "[9]", "0..3"]),
    (["plan", "--slots", "0"], ["--slots", "'0'"]),
    (["plan", "--slots", "-3"], ["--slots"]),
    (["plan", "--layers", "0"], ["--layers"]),
    (["plan", "--experts", "0"], ["--experts"]),
    (["plan", "--join", "-1"], ["--join"]),
    (["plan", "--ranks", "8", "--slots", "2"], ["--ranks 8 x --slots 2", "--experts 256", "add ranks or slots"]),
    (["plan", "--ranks", "32", "--dead", "3", "--leave", "3", "5"], ["[3]", "--dead and --leave"]),
    (["plan", "--ranks", "32", "--leave", "4", "4"], ["--leave", "more than once"]),
    (["plan", "--ranks", "32", "--slots", "8", "--fail", "1"], ["--slots 8", "--join"]),
    (["plan", "--ranks", "4", "--slots", "64", "--fail", "4"], ["no rank is left"]),
    (["plan", "--zipf", "nan"], ["--zipf"]),
    (["plan", "--seed", "-1"], ["--seed"]),
    (["plan", "--groups", "0"], ["--groups"]),
    (["plan", "--experts", "250"], ["--experts 250", "--groups 8"]),
    (["controller", "--slots", "0"], ["--slots"]),
    (["controller", "--slots", "4", "--leader-ttl", "0"], ["--leader-ttl"]),
    (["controller", "--slots", "4", "--settle", "-1"], ["--settle"]),
    (["controller", "--slots", "4", "--min-ranks", "0"], ["--min-ranks"]),
    (["controller", "--slots", "4", "--max-joiners", "0"], ["--max-joiners"]),
    (["controller", "--slots", "4", "--imbalance-threshold", "1.5"], ["--imbalance-threshold"]),
    (["controller", "--slots", "4", "--metrics-port", "70000"], ["--metrics-port"]),
    (["controller", "--slots", "4", "--layers", "-2"], ["--layers"]),
    (["controller", "--slots", "4", "--expert-bytes", "0"], ["--expert-bytes"]),
    (["agent", "--id", "a", "--ckpt", "x", "--slots", "4", "--lease-ttl", "0"], ["--lease-ttl"]),
    (["agent", "--id", "a", "--ckpt", "x", "--slots", "-1"], ["--slots"]),
    (["agent", "--id", "a", "--ckpt", "x", "--slots", "4", "--experts", "0"], ["--experts"]),
    (["agent", "--id", "a", "--ckpt", "x", "--slots", "4", "--dense-layers", "-1"], ["--dense-layers"]),
    (["demo", "--ranks", "0"], ["--ranks"]),
    (["demo", "--slots", "0"], ["--slots"]),
    (["demo", "--lease-ttl", "0"], ["--lease-ttl"]),
    (["demo", "--timeout", "0"], ["--timeout"]),
    (["demo", "--fail", "-1"], ["--fail"]),
    (["demo", "--join", "-1"], ["--join"]),
    (["demo", "--ranks", "2", "--fail", "2"], ["--ranks 2", "--fail 2"]),
    (["demo", "--ranks", "3", "--fail", "1", "--slots", "2", "--experts", "16"], ["--slots", "too few"]),
    (["make-checkpoint", "d", "--shards", "0"], ["--shards"]),
    (["make-checkpoint", "d", "--hidden", "-64"], ["--hidden"]),
])
def test_every_flag_refuses_bad_values_by_name(capsys, argv, texts):
    assert_refused(capsys, argv, *texts)


def test_controller_checks_its_shape_and_passes_max_joiners(monkeypatch, capsys):
    import controller.controller as ctl

    seen = {}

    class Recorder:
        def __init__(self, cfg, metrics=None):
            seen["cfg"] = cfg

        def run(self, stop):
            return None

    monkeypatch.setattr(ctl, "Controller", Recorder)
    base = ["controller", "--slots", "4", "--layers", "2", "--experts", "8", "--expert-bytes", "64",
            "--metrics-port", "-1", "--etcd", "127.0.0.1:1"]
    assert_refused(capsys, [*base, "--min-ranks", "1"], "--min-ranks 1", "--slots 4", "8 experts")
    assert main([*base, "--min-ranks", "2", "--max-joiners", "3"]) == 0
    assert seen["cfg"].max_joiners_per_plan == 3
    assert main([*base, "--min-ranks", "2"]) == 0
    assert seen["cfg"].max_joiners_per_plan == ctl.ControllerConfig.__dataclass_fields__["max_joiners_per_plan"].default


# -- inspect: damaged JSON ---------------------------------------------------------------
DEEP = b"[" * 200_000 + b"]" * 200_000


@pytest.fixture
def model(tmp_path) -> str:
    d = str(tmp_path / "model")
    assert main(["make-checkpoint", d, *SMALL]) == 0
    return d


def test_inspect_a_header_nested_deep(model, capsys):
    path = os.path.join(model, "model.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(DEEP)) + DEEP)
    assert_refused(capsys, ["inspect", model], path, "nested deeper", "copy it again", kind="CorruptCheckpointError")


@pytest.mark.parametrize("raw,texts", [
    (b'{"model_type": ' + DEEP + b"}", ["nested deeper", "copy it again"]),
    (b"\xff\xfe{", ["not a JSON config", "utf-8"]),
    (b'{"a": ' + b"9" * 5000 + b"}", ["not a JSON config", "digits"]),
    (b"[1, 2]", ["a JSON list, expected an object"]),
])
def test_inspect_a_damaged_config(model, capsys, raw, texts):
    path = os.path.join(model, "config.json")
    with open(path, "wb") as f:
        f.write(raw)
    assert_refused(capsys, ["inspect", model], path, *texts, kind="CorruptCheckpointError")


@pytest.mark.parametrize("cfg,kind,text", [
    ({"model_type": [1], "architectures": 5}, "UnsupportedModelError", "'?'"),
    ({"model_type": {"a": 1}, "architectures": [[1]]}, "UnsupportedModelError", "naming template"),
    ({"model_type": "deepseek_v3", "num_hidden_layers": 10**12, "n_routed_experts": 2}, "ConfigError",
     "num_hidden_layers"),
    ({"model_type": "qwen3_moe", "num_hidden_layers": 2, "num_experts": 2, "mlp_only_layers": [[0] * 3] * 3},
     "ConfigError", "mlp_only_layers"),
])
def test_inspect_a_config_of_garbage_types(model, capsys, cfg, kind, text):
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(cfg, f)
    assert_refused(capsys, ["inspect", model], text, kind=kind)


def test_inspect_an_index_naming_shards_outside(tmp_path, capsys):
    d = str(tmp_path / "model")
    assert main(["make-checkpoint", d, *SMALL, "--shards", "2"]) == 0
    index = os.path.join(d, "model.safetensors.index.json")
    with open(index) as f:
        doc = json.load(f)
    name = next(iter(doc["weight_map"]))
    doc["weight_map"][name] = "../../etc/passwd"
    with open(index, "w") as f:
        json.dump(doc, f)
    assert_refused(capsys, ["inspect", d], index, "outside the checkpoint directory", kind="CorruptCheckpointError")
