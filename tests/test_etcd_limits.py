"""etcd's and gRPC's size limits against a real etcd 3.4 at its defaults: a refusal for
size is a :class:`RecordTooLargeError` naming the key and the sizes, never "etcd
unavailable" (which callers retry forever)."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from controller.etcd_client import EtcdConfig, call, connect, grpc_options
from controller.metrics import ControllerMetrics
from elastic_ep.errors import EtcdUnavailableError, RecordTooLargeError
from elastic_ep.tools.etcd_server import EtcdServer, free_port

MiB = 1 << 20


@pytest.fixture(scope="module")
def server() -> Iterator[EtcdServer]:
    with EtcdServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: EtcdServer) -> Any:
    return connect(EtcdConfig(server.endpoint))


def test_a_put_over_etcds_request_limit(client: Any) -> None:
    value = b"x" * int(1.6 * MiB)
    with pytest.raises(RecordTooLargeError) as info:
        call(client.put, "store set big", "/t/big", value)
    e = info.value
    assert (e.key, e.operation, e.direction) == ("/t/big", "put", "request")
    assert e.size == len(value) + len("/t/big") and e.limit == 0  # etcd does not say its limit
    assert "--max-request-bytes" in str(e) and "/t/big" in str(e) and str(e.size) in str(e)


def test_a_transaction_over_grpcs_server_limit(client: Any) -> None:
    tx = client.transactions
    value = b"x" * int(2.5 * MiB)
    with pytest.raises(RecordTooLargeError) as info:
        call(client.transaction, "publish plan", compare=[], success=[tx.put("/t/plan", value)], failure=[])
    e = info.value
    assert (e.key, e.operation, e.direction) == ("/t/plan", "transaction", "request")
    assert e.size > len(value) and e.limit == 2 * MiB  # gRPC names both sizes
    assert "publish plan" in str(e) and "smaller records" in str(e)


def test_a_reply_over_the_clients_receive_limit(server: EtcdServer, client: Any) -> None:
    for i in range(4):
        call(client.put, "fill", f"/t/range/{i}", b"y" * (64 << 10))
    small = connect(EtcdConfig(server.endpoint, max_receive_bytes=128 << 10))
    with pytest.raises(RecordTooLargeError) as info:
        call(small.get_prefix, "read range", "/t/range/")
    e = info.value
    assert (e.key, e.direction) == ("/t/range/", "response")
    assert e.size > 4 * (64 << 10) and e.limit == 128 << 10
    assert "receive limit" in str(e)


def test_both_message_limits_are_explicit() -> None:
    opts = dict(grpc_options(EtcdConfig(max_send_bytes=8 * MiB, max_receive_bytes=16 * MiB)))
    assert opts == {"grpc.max_send_message_length": 8 * MiB, "grpc.max_receive_message_length": 16 * MiB}


def test_an_etcd_that_is_not_there_is_still_unavailable() -> None:
    with pytest.raises(EtcdUnavailableError):
        connect(EtcdConfig(f"127.0.0.1:{free_port()}", timeout_s=1.0))


def test_the_metric_counts_each_refusal_and_says_when_to_log() -> None:
    m = ControllerMetrics()
    assert m.record_too_large("put", "store set big", 10) is True
    assert m.record_too_large("put", "store set big", 10) is False
    assert m.record_too_large("put", "store set big", 11) is True
    assert b'elastic_ep_record_too_large_total{operation="put"} 3.0' in m.text()
