"""The environment-configured entry point: ELASTIC_EP_* variables become the flags the
existing commands parse, and the controller runs through it as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from elastic_ep.tools import entrypoint
from elastic_ep.tools.cli import build_parser
from elastic_ep.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {
    "ELASTIC_EP_ETCD_ENDPOINT": "etcd-client:2379",
    "ELASTIC_EP_DEPLOYMENT": "prod",
    "ELASTIC_EP_ETCD_USER": "elastic-ep-rank-{id}",
    "POD_NAME": "moe-serving-3",
    "HOSTNAME": "ignored-host",
}


def test_member_id_prefers_explicit_then_pod_name_then_hostname():
    assert entrypoint.member_id({"ELASTIC_EP_ID": "r7", **ENV}) == "r7"
    assert entrypoint.member_id(ENV) == "moe-serving-3"
    assert entrypoint.member_id({"HOSTNAME": "moe-serving-4"}) == "moe-serving-4"
    assert entrypoint.member_id({})  # the host name
    for bad in ("a/b", "a#1"):
        with pytest.raises(ConfigError, match="must not contain"):
            entrypoint.member_id({"ELASTIC_EP_ID": bad})


def test_controller_argv_from_env_parses_with_the_cli_and_flags_win():
    env = {**ENV, "ELASTIC_EP_ROLE": "controller", "ELASTIC_EP_METRICS_HOST": "0.0.0.0",
           "ELASTIC_EP_ARGS": "--layers 4 --experts 16 --slots 6 --expert-bytes 12288 --min-ranks 3"}
    argv = entrypoint.command_argv(["--min-ranks", "5"], env)
    args = build_parser().parse_args(argv)
    assert args.command == "controller" and args.etcd == "etcd-client:2379" and args.deployment == "prod"
    assert args.id == "moe-serving-3" and args.etcd_user == "elastic-ep-rank-moe-serving-3"
    assert args.metrics_host == "0.0.0.0" and args.metrics_port == 9400
    assert (args.layers, args.experts, args.slots, args.expert_bytes) == (4, 16, 6, 12288)
    assert args.min_ranks == 5, "flags after the role come last and win"


def test_agent_argv_from_env():
    env = {**ENV, "ELASTIC_EP_TRANSPORT": "nixl", "ELASTIC_EP_CHECKPOINT": "/models/ckpt", "ELASTIC_EP_NODE": "n1",
           "ELASTIC_EP_MIRROR_BUDGET_GIB": "48"}
    args = build_parser().parse_args(entrypoint.command_argv(["agent", "--slots", "4"], env))
    assert (args.command, args.id, args.transport, args.ckpt, args.node, args.slots, args.mirror_budget_gib) == (
        "agent", "moe-serving-3", "nixl", "/models/ckpt", "n1", 4, 48.0)


@pytest.mark.parametrize("env, match", [
    ({}, "no role"),
    ({"ELASTIC_EP_ROLE": "scheduler"}, "no role"),
    ({"ELASTIC_EP_ROLE": "agent", "ELASTIC_EP_ETCD_ENDPOINT": "a:2379,b:2379"}, "not a list"),
    ({"ELASTIC_EP_ROLE": "agent", "ELASTIC_EP_ARGS": "--slots 'unterminated"}, "shell"),
])
def test_bad_environment_is_a_config_error(env, match):
    with pytest.raises(ConfigError, match=match):
        entrypoint.command_argv([], env)


def test_etcd_config_reads_the_password_file_named_by_member_id(tmp_path):
    (tmp_path / "moe-serving-3").write_text("s3cret\n")
    cfg = entrypoint.etcd_config_from_env({**ENV, "ELASTIC_EP_ETCD_PASSWORD_FILE": str(tmp_path / "{id}")})
    assert (cfg.endpoint, cfg.root, cfg.user, cfg.password) == (
        "etcd-client:2379", "/elastic-ep/prod", "elastic-ep-rank-moe-serving-3", "s3cret")
    with pytest.raises(ConfigError, match="both cert and key"):
        entrypoint.etcd_config_from_env({"ELASTIC_EP_ETCD_CERT": "/c.pem", "ELASTIC_EP_ETCD_CA": "/ca.pem"})


def test_agent_settings_from_env(tmp_path):
    (tmp_path / "pw").write_text("x")
    env = {**ENV, "ELASTIC_EP_ETCD_PASSWORD_FILE": str(tmp_path / "pw"), "NODE_NAME": "gpu-7",
           "ELASTIC_EP_TRANSPORT": "mooncake", "ELASTIC_EP_TRANSPORT_OPTIONS": '{"interface": "eth0"}',
           "ELASTIC_EP_CHECKPOINT": "/models/m"}
    s = entrypoint.agent_settings_from_env(env, lease_ttl_s=5)
    assert (s.config.id, s.config.node, s.config.lease_ttl_s, s.config.endpoint) == (
        "moe-serving-3", "gpu-7", 5, {"transport": "mooncake"})
    assert (s.transport, s.transport_options, s.checkpoint) == ("mooncake", {"interface": "eth0"}, "/models/m")
    assert s.mirror_bytes == 0
    assert entrypoint.agent_settings_from_env({**env, "ELASTIC_EP_MIRROR_BUDGET_GIB": "1.5"}).mirror_bytes == 3 << 29
    for bad in ("{not json", "[1]"):
        with pytest.raises(ConfigError, match="ELASTIC_EP_TRANSPORT_OPTIONS"):
            entrypoint.agent_settings_from_env({**env, "ELASTIC_EP_TRANSPORT_OPTIONS": bad})
    for bad in ("-1", "nan", "lots", "1e30"):
        with pytest.raises(ConfigError, match="ELASTIC_EP_MIRROR_BUDGET_GIB"):
            entrypoint.agent_settings_from_env({**env, "ELASTIC_EP_MIRROR_BUDGET_GIB": bad})


def test_rank_passwords_from_a_mounted_secret_layout(tmp_path):
    # What the kubelet mounts: a timestamped directory, ..data pointing at it, one
    # symlink per key.
    data = tmp_path / "..2026_01_01_00_00_00.000000001"
    data.mkdir()
    for rid, pw in (("moe-serving-0", "a\n"), ("moe-serving-1", "b")):
        (data / rid).write_text(pw)
    (tmp_path / "..data").symlink_to(data.name)
    for rid in ("moe-serving-0", "moe-serving-1"):
        (tmp_path / rid).symlink_to(f"..data/{rid}")
    assert entrypoint.rank_passwords(str(tmp_path)) == {"moe-serving-0": "a", "moe-serving-1": "b"}
    (data / "moe-serving-2").write_text("")
    (tmp_path / "moe-serving-2").symlink_to("..data/moe-serving-2")
    with pytest.raises(ConfigError, match="empty"):
        entrypoint.rank_passwords(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no password files"):
        entrypoint.rank_passwords(str(tmp_path / "empty"))


def test_main_reports_config_errors_with_status_2(capsys, monkeypatch):
    monkeypatch.delenv("ELASTIC_EP_ROLE", raising=False)
    assert entrypoint.main([]) == 2
    assert "ELASTIC_EP_ROLE" in capsys.readouterr().err
    monkeypatch.setenv("ELASTIC_EP_ROLE", "setup-auth")
    for var in ("ELASTIC_EP_ROOT_PASSWORD_FILE", "ELASTIC_EP_CONTROLLER_PASSWORD_FILE", "ELASTIC_EP_RANK_PASSWORDS_DIR"):
        monkeypatch.delenv(var, raising=False)
    assert entrypoint.main([]) == 2
    assert "ELASTIC_EP_ROOT_PASSWORD_FILE" in capsys.readouterr().err


def test_controller_runs_through_the_entry_point():
    """``python -m elastic_ep.tools.entrypoint`` with only the environment: the controller
    leads, serves /metrics and /healthz where told, and stops on SIGTERM."""
    from elastic_ep.tools.etcd_server import EtcdServer, free_port

    port = free_port()
    with EtcdServer() as srv:
        env = {**os.environ, "ELASTIC_EP_ROLE": "controller", "ELASTIC_EP_ETCD_ENDPOINT": srv.endpoint,
               "POD_NAME": "elastic-ep-controller-0", "ELASTIC_EP_METRICS_HOST": "127.0.0.1",
               "ELASTIC_EP_METRICS_PORT": str(port),
               "ELASTIC_EP_ARGS": "--layers 2 --experts 8 --slots 4 --expert-bytes 12288 --min-ranks 2"}
        proc = subprocess.Popen([sys.executable, "-m", "elastic_ep.tools.entrypoint"], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline, body = time.monotonic() + 60, ""
            while "elastic_ep_is_leader 1.0" not in body:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, f"no leader on :{port}: {body[-500:]}"
                time.sleep(0.2)
                try:
                    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                except (urllib.error.URLError, ConnectionError):
                    continue
            assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            out = proc.stdout.read() if proc.stdout else ""
            assert "elastic-ep-controller-0" in out or "metrics and health" in out
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_model_directory_from_env_for_controller_and_agent():
    env = {**ENV, "ELASTIC_EP_MODEL": "/models/DeepSeek-V3"}
    ctl = build_parser().parse_args(entrypoint.command_argv(["controller", "--slots", "9"], env))
    agent = build_parser().parse_args(entrypoint.command_argv(["agent", "--slots", "9"], env))
    assert ctl.model == agent.model == "/models/DeepSeek-V3" and agent.ckpt is None
