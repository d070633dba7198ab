"""The container entry point: ``python -m elastic_ep.tools.entrypoint [ROLE] [ARGS...]`` runs
``elastic-ep controller``, ``elastic-ep agent`` or the etcd role setup, configured by
``ELASTIC_EP_*`` environment variables (a Kubernetes ConfigMap, the downward API and
mounted Secrets) instead of flags.

The environment only becomes the flags the existing commands already parse
(:func:`command_argv`), so there is one parser and one meaning per setting; flags given
after ``ROLE`` (and ``ELASTIC_EP_ARGS``) come last and win.

===============================  ===============================  ========================
variable                         flag / meaning                   example
===============================  ===============================  ========================
ELASTIC_EP_ROLE                  ``controller``, ``agent`` or     ``controller``
                                 ``setup-auth`` (or argv[1])
ELASTIC_EP_ETCD_ENDPOINT         ``--etcd`` (one host:port: the   ``etcd-client:2379``
                                 client Service spreads members)
ELASTIC_EP_PREFIX                ``--prefix``                     ``/elastic-ep``
ELASTIC_EP_DEPLOYMENT            ``--deployment``                 ``default``
ELASTIC_EP_ETCD_CA               ``--etcd-ca``                    ``/etc/elastic-ep/tls/ca.crt``
ELASTIC_EP_ETCD_CERT, _KEY       ``--etcd-cert``, ``--etcd-key``  ``.../tls.crt``
ELASTIC_EP_ETCD_USER             ``--etcd-user``                  ``elastic-ep-rank-{id}``
ELASTIC_EP_ETCD_PASSWORD_FILE    ``--etcd-password-file``         ``/etc/elastic-ep/pw/{id}``
ELASTIC_EP_ID                    ``--id``; default ``POD_NAME``,  ``moe-serving-0``
                                 then ``HOSTNAME``, then the host
ELASTIC_EP_NODE                  ``--node`` (agent); default      ``gpu-node-7``
                                 ``NODE_NAME``
ELASTIC_EP_TRANSPORT             ``--transport`` (agent)          ``nixl``
ELASTIC_EP_TRANSPORT_OPTIONS     JSON options of the transport    ``{"interface": "eth0"}``
                                 (embedded agents)
ELASTIC_EP_CHECKPOINT            ``--ckpt`` (agent); the model    ``/models/ckpt``
                                 directory of embedded agents
ELASTIC_EP_MODEL                 ``--model`` (controller, agent): ``/models/DeepSeek-V3``
                                 a Hugging Face model directory
ELASTIC_EP_MIRROR_BUDGET_GIB     ``--mirror-budget-gib`` (agent): ``48``
                                 host memory for expert mirrors
ELASTIC_EP_METRICS_HOST, _PORT   ``--metrics-host``,              ``0.0.0.0``, ``9400``
                                 ``--metrics-port`` (controller)
ELASTIC_EP_ARGS                  more flags, shell-split          ``--layers 2 --slots 4``
===============================  ===============================  ========================

``{id}`` in the user name and the password file path becomes the member id, so the pods
of one StatefulSet each pick their own etcd user and password from one mounted Secret.
``ELASTIC_EP_ETCD_PASSWORD`` (the password itself) is read by the commands as before.

``setup-auth`` creates the roles of ``docs/etcd-security.md`` and enables auth (see
:func:`setup_auth_from_env` for its variables): a Kubernetes Job runs it once per
deployment, connected with an admin certificate whose CN is ``root``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import sys
from typing import Any, Mapping, Sequence

from elastic_ep.errors import ConfigError, ElasticEPError
from elastic_ep.runtime.agent import AgentConfig
from elastic_ep.runtime.wiring import AgentSettings  # what agent_settings_from_env returns; importable from here

ROLES = ("controller", "agent", "setup-auth")

# (variable, flag) pairs every role takes: where etcd is and who this process is to it.
_ETCD_FLAGS = (
    ("ELASTIC_EP_ETCD_ENDPOINT", "--etcd"),
    ("ELASTIC_EP_PREFIX", "--prefix"),
    ("ELASTIC_EP_DEPLOYMENT", "--deployment"),
    ("ELASTIC_EP_ETCD_CA", "--etcd-ca"),
    ("ELASTIC_EP_ETCD_CERT", "--etcd-cert"),
    ("ELASTIC_EP_ETCD_KEY", "--etcd-key"),
    ("ELASTIC_EP_ETCD_USER", "--etcd-user"),
    ("ELASTIC_EP_ETCD_PASSWORD_FILE", "--etcd-password-file"),
)
_ROLE_FLAGS = {
    "controller": (("ELASTIC_EP_METRICS_HOST", "--metrics-host"), ("ELASTIC_EP_METRICS_PORT", "--metrics-port"),
                   ("ELASTIC_EP_MODEL", "--model")),
    "agent": (("ELASTIC_EP_NODE", "--node"), ("ELASTIC_EP_TRANSPORT", "--transport"),
              ("ELASTIC_EP_CHECKPOINT", "--ckpt"), ("ELASTIC_EP_MODEL", "--model"),
              ("ELASTIC_EP_MIRROR_BUDGET_GIB", "--mirror-budget-gib")),
}


def _get(env: Mapping[str, str], var: str) -> str:
    return env.get(var, "").strip()


def member_id(env: Mapping[str, str] | None = None) -> str:
    """This process's id in etcd: ``ELASTIC_EP_ID``, else ``POD_NAME`` (the downward
    API), else ``HOSTNAME`` (a StatefulSet pod's name), else the host name.

    Example: pod ``moe-serving-2`` of a StatefulSet -> ``"moe-serving-2"``.
    """
    env = os.environ if env is None else env
    rid = _get(env, "ELASTIC_EP_ID") or _get(env, "POD_NAME") or _get(env, "HOSTNAME") or socket.gethostname()
    # '/' would leave the rank's own keys; '#' separates id and incarnation in members.
    if "/" in rid or "#" in rid:
        raise ConfigError(f"member id {rid!r} (ELASTIC_EP_ID / POD_NAME / HOSTNAME) must not contain '/' or '#'")
    return rid


def etcd_argv(env: Mapping[str, str] | None = None, ident: str | None = None) -> list[str]:
    """The etcd flags the environment sets, ``{id}`` expanded:
    ``["--etcd", "etcd-client:2379", "--etcd-user", "elastic-ep-rank-moe-serving-0", ...]``."""
    env = os.environ if env is None else env
    ident = member_id(env) if ident is None else ident
    endpoint = _get(env, "ELASTIC_EP_ETCD_ENDPOINT")
    if "," in endpoint:
        raise ConfigError(
            f"ELASTIC_EP_ETCD_ENDPOINT={endpoint!r}: give one host:port (a Service in front of "
            "the etcd members), not a list"
        )
    out: list[str] = []
    for var, flag in _ETCD_FLAGS:
        value = _get(env, var)
        if value:
            out += [flag, value.replace("{id}", ident)]
    return out


def _role_of(argv: Sequence[str], env: Mapping[str, str]) -> tuple[str, list[str]]:
    if argv and argv[0] in ROLES:
        return argv[0], list(argv[1:])
    role = _get(env, "ELASTIC_EP_ROLE")
    if role not in ROLES:
        raise ConfigError(
            f"no role: pass one of {list(ROLES)} as the first argument or set ELASTIC_EP_ROLE (got {role!r})"
        )
    return role, list(argv)


def command_argv(argv: Sequence[str] = (), env: Mapping[str, str] | None = None) -> list[str]:
    """The ``elastic-ep`` command line the environment and ``argv`` stand for.

    Example: ``ELASTIC_EP_ETCD_ENDPOINT=etcd-client:2379 ELASTIC_EP_METRICS_HOST=0.0.0.0
    ELASTIC_EP_ARGS="--layers 2 --experts 8 --slots 4 --expert-bytes 12288"`` with
    ``argv=["controller"]`` -> ``["controller", "--etcd", "etcd-client:2379", "--id",
    "<pod name>", "--metrics-host", "0.0.0.0", "--layers", "2", ...]``.
    """
    env = os.environ if env is None else env
    role, rest = _role_of(argv, env)
    if role == "setup-auth":
        raise ConfigError("setup-auth is not an elastic-ep command; run it through main()")
    ident = member_id(env)
    out = [role] + etcd_argv(env, ident) + ["--id", ident]
    for var, flag in _ROLE_FLAGS[role]:
        value = _get(env, var)
        if value:
            out += [flag, value]
    try:
        extra = shlex.split(env.get("ELASTIC_EP_ARGS", ""))
    except ValueError as e:
        raise ConfigError(f"ELASTIC_EP_ARGS cannot be split like a shell would: {e}") from e
    return out + extra + rest


def etcd_config_from_env(env: Mapping[str, str] | None = None, ident: str | None = None) -> Any:
    """An :class:`~controller.etcd_client.EtcdConfig` from the environment, through the
    same flags and reader (password file, ``ELASTIC_EP_ETCD_PASSWORD``) as the CLI."""
    from elastic_ep.tools.cli import add_etcd_args, etcd_config

    parser = argparse.ArgumentParser(prog="elastic-ep (environment)", add_help=False)
    add_etcd_args(parser)
    try:
        args = parser.parse_args(etcd_argv(env, ident))
    except SystemExit as e:  # argparse's way of saying the values are bad
        raise ConfigError(f"etcd settings from the environment do not parse: {etcd_argv(env, ident)}") from e
    return etcd_config(args)


def agent_settings_from_env(env: Mapping[str, str] | None = None, **agent_fields: Any) -> AgentSettings:
    """:class:`~elastic_ep.runtime.wiring.AgentSettings` from ``ELASTIC_EP_*``;
    ``agent_fields`` override fields of the :class:`~elastic_ep.runtime.agent.AgentConfig`
    (``lease_ttl_s=5``)."""
    env = os.environ if env is None else env
    ident = member_id(env)
    transport = _get(env, "ELASTIC_EP_TRANSPORT") or "torch"
    raw = _get(env, "ELASTIC_EP_TRANSPORT_OPTIONS") or "{}"
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"ELASTIC_EP_TRANSPORT_OPTIONS={raw!r} is not JSON: {e}") from e
    if not isinstance(options, dict):
        raise ConfigError(f"ELASTIC_EP_TRANSPORT_OPTIONS={raw!r} must be a JSON object")
    fields: dict[str, Any] = {"node": _get(env, "ELASTIC_EP_NODE") or _get(env, "NODE_NAME"),
                              "endpoint": {"transport": transport}}
    fields.update(agent_fields)
    cfg = AgentConfig(etcd_config_from_env(env, ident), ident, **fields)
    checkpoint = _get(env, "ELASTIC_EP_MODEL") or _get(env, "ELASTIC_EP_CHECKPOINT") or None
    return AgentSettings(cfg, transport, options, checkpoint, mirror_bytes=_mirror_bytes(env))


def _mirror_bytes(env: Mapping[str, str]) -> int:
    """``ELASTIC_EP_MIRROR_BUDGET_GIB`` in bytes (0 when unset)."""
    raw = _get(env, "ELASTIC_EP_MIRROR_BUDGET_GIB") or "0"
    try:
        gib = float(raw)
    except ValueError:
        gib = -1.0
    if not 0 <= gib < 1 << 20:  # also refuses nan
        raise ConfigError(f"ELASTIC_EP_MIRROR_BUDGET_GIB={raw!r} must be a number of GiB, 0 or more")
    return int(gib * (1 << 30))


def _read_secret(path: str, what: str) -> str:
    try:
        with open(path) as f:
            value = f.read().strip()
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e}") from e
    if not value:
        raise ConfigError(f"{what} {path} is empty")
    return value


def rank_passwords(directory: str) -> dict[str, str]:
    """Rank id -> password, one file per rank named by its id (a mounted Secret whose keys
    are the pod names). Kubernetes' own entries (``..data``, dot-names) are skipped."""
    try:
        names = sorted(n for n in os.listdir(directory) if not n.startswith("."))
    except OSError as e:
        raise ConfigError(f"ELASTIC_EP_RANK_PASSWORDS_DIR {directory}: {e}") from e
    out = {n: _read_secret(os.path.join(directory, n), "rank password file") for n in names
           if os.path.isfile(os.path.join(directory, n))}
    if not out:
        raise ConfigError(f"ELASTIC_EP_RANK_PASSWORDS_DIR {directory} holds no password files")
    return out


def setup_auth_from_env(env: Mapping[str, str] | None = None) -> list[Any]:
    """Run :func:`controller.security.setup_auth` configured by the environment.

    Connects with the etcd settings above (an admin certificate whose CN is ``root``
    works before and after auth is on) and reads:
    ``ELASTIC_EP_ROOT_PASSWORD_FILE``, ``ELASTIC_EP_CONTROLLER_USER`` (default
    ``<role prefix>-controller``), ``ELASTIC_EP_CONTROLLER_PASSWORD_FILE``,
    ``ELASTIC_EP_RANK_PASSWORDS_DIR`` (:func:`rank_passwords`), ``ELASTIC_EP_ROLE_PREFIX``
    (default ``elastic-ep``). Returns the roles.
    """
    from controller.etcd_client import connect
    from controller.security import controller_role_name, setup_auth

    env = os.environ if env is None else env
    missing = [v for v in ("ELASTIC_EP_ROOT_PASSWORD_FILE", "ELASTIC_EP_CONTROLLER_PASSWORD_FILE",
                           "ELASTIC_EP_RANK_PASSWORDS_DIR") if not _get(env, v)]
    if missing:
        raise ConfigError(f"setup-auth needs {missing}")
    role_prefix = _get(env, "ELASTIC_EP_ROLE_PREFIX") or "elastic-ep"
    cfg = etcd_config_from_env(env)
    client = connect(cfg)
    try:
        return setup_auth(
            client, cfg.root,
            _get(env, "ELASTIC_EP_CONTROLLER_USER") or controller_role_name(role_prefix),
            _read_secret(_get(env, "ELASTIC_EP_CONTROLLER_PASSWORD_FILE"), "controller password file"),
            rank_passwords(_get(env, "ELASTIC_EP_RANK_PASSWORDS_DIR")),
            root_password=_read_secret(_get(env, "ELASTIC_EP_ROOT_PASSWORD_FILE"), "root password file"),
            role_prefix=role_prefix,
        )
    finally:
        client.close()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        role, _ = _role_of(argv, os.environ)
        if role == "setup-auth":
            import logging

            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
            roles = setup_auth_from_env()
            print(f"etcd auth set up: roles {[r.name for r in roles]}")
            return 0
        cmd = command_argv(argv)
    except (ElasticEPError, PermissionError) as e:
        print(f"elastic-ep entrypoint: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    from elastic_ep.tools.cli import main as cli_main

    return cli_main(cmd)


if __name__ == "__main__":
    sys.exit(main())
