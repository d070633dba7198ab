"""A toy vLLM-style MoE engine with the elastic-ep agent embedded, configured by the
environment: what a serving process adds to take part in elastic expert parallelism.

The engine keeps its experts as vLLM does (``expert_weights[layer] = [w13_weight [S, 2I, H],
w2_weight [S, H, I]]``, ``physical_to_logical_map``, ``logical_to_physical_map``,
``logical_replica_count``) and runs forward steps that route tokens to logical experts,
pick a replica through the maps and apply the experts held on this rank. The lines
marked ``# elastic-ep`` are the integration; everything else stands in for the engine.

Run next to a controller (see deploy/README.md), with a checkpoint from
``elastic-ep make-checkpoint /tmp/ckpt --layers 2 --experts 8``::

    ELASTIC_EP_ETCD_ENDPOINT=127.0.0.1:2379 ELASTIC_EP_MODEL=/tmp/ckpt ELASTIC_EP_ID=r0 \\
        python examples/vllm_style_engine.py --layers 2 --experts 8 --slots 4

SIGTERM drains the rank (its peers copy its experts before it goes), as a StatefulSet
scale-down or a rolling update sends it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

import numpy as np
import torch

from elastic_ep.core.placement import ExpertPlacement
from elastic_ep.errors import AgentStateError, EtcdUnavailableError  # elastic-ep
from elastic_ep.runtime.agent import AgentState, RankAgent  # elastic-ep
from elastic_ep.runtime.vllm_adapter import VllmExpertAdapter  # elastic-ep
from elastic_ep.tools.entrypoint import agent_settings_from_env  # elastic-ep

log = logging.getLogger("vllm_style_engine")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ToyMoEEngine:
    """Expert tensors and EPLB maps shaped like vLLM's, on the CPU, and a forward step
    over them.

    ``expert_weights[layer]``: ``[w13_weight [S, 2I, H], w2_weight [S, H, I]]``;
    ``physical_to_logical_map``: ``[L, ep_size * S]``; ``logical_to_physical_map``:
    ``[L, E, ep_size * S - E + 1]``; ``logical_replica_count``: ``[L, E]``.
    """

    def __init__(self, layers: int, experts: int, hidden: int, intermediate: int, slots: int,
                 ep_size: int, dtype: torch.dtype) -> None:
        self.layers, self.experts, self.hidden, self.slots = layers, experts, hidden, slots
        self.expert_weights = [
            [torch.zeros(slots, 2 * intermediate, hidden, dtype=dtype),
             torch.zeros(slots, hidden, intermediate, dtype=dtype)]
            for _ in range(layers)
        ]
        physical = ep_size * slots
        self.physical_to_logical_map = torch.full((layers, physical), -1, dtype=torch.int64)
        self.logical_to_physical_map = torch.full((layers, experts, max(physical - experts + 1, 1)), -1,
                                                  dtype=torch.int64)
        self.logical_replica_count = torch.zeros(layers, experts, dtype=torch.int64)
        self.rank = 0
        self.rng = np.random.default_rng()
        self.tokens = 0

    def step(self, tokens: int = 32) -> torch.Tensor:
        """Route ``tokens`` tokens per layer; returns ``[L, num_physical]`` token counts
        per slot (vLLM's ``expert_load_pass``)."""
        physical = self.physical_to_logical_map.shape[1]
        counts = torch.zeros(self.layers, physical, dtype=torch.int64)
        popularity = 1.0 / np.arange(1, self.experts + 1)
        popularity /= popularity.sum()
        for layer in range(self.layers):
            w13, w2 = self.expert_weights[layer]
            x = torch.randn(tokens, self.hidden).to(w13.dtype)
            chosen = self.rng.choice(self.experts, tokens, p=popularity)
            for t, e in enumerate(chosen.tolist()):
                n = int(self.logical_replica_count[layer, e])
                slot = int(self.logical_to_physical_map[layer, e, int(self.rng.integers(n))])
                counts[layer, slot] += 1
                if slot // self.slots != self.rank:
                    continue  # another rank's expert: the all-to-all would send it there
                local = slot % self.slots
                gate, up = w13[local].float().chunk(2, dim=0)
                h = torch.nn.functional.silu(gate @ x[t].float()) * (up @ x[t].float())
                _ = w2[local].float() @ h
                self.tokens += 1
        return counts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=32)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--slots", type=int, required=True, help="slots per rank")
    p.add_argument("--ep-size", type=int, default=1, help="ranks the maps are sized for at start")
    p.add_argument("--scheme", help="checkpoint naming scheme (default: read the model directory's config.json)")
    p.add_argument("--dense-layers", type=int, default=0, help="dense layers before the first MoE layer")
    p.add_argument("--verify", action="store_true", help="check every slot against the checkpoint in each ack")
    p.add_argument("--drain-timeout", type=float, default=60.0, help="seconds a SIGTERM drain may take")
    p.add_argument("--step-interval", type=float, default=0.05, help="seconds between forward steps")
    return p.parse_args(argv)


def leave(agent: RankAgent, timeout_s: float) -> None:
    """Leave gracefully so peers copy this rank's experts; an engine that never got a
    placement just goes (its lease expiry tells the controller)."""
    if agent.state is not AgentState.ACTIVE:  # elastic-ep
        return
    try:
        agent.drain()  # elastic-ep
        if not agent.left.wait(timeout_s):  # elastic-ep
            log.warning("drain not committed within %.0f s; leaving anyway", timeout_s)
    except (EtcdUnavailableError, AgentStateError) as e:  # etcd gone, or fenced meanwhile
        log.warning("cannot drain: %s", e)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    engine = ToyMoEEngine(args.layers, args.experts, args.hidden, args.intermediate, args.slots,
                          args.ep_size, DTYPES[args.dtype])

    def on_placement(placement: ExpertPlacement, rank: int) -> None:  # the controller's member order is the EP order
        log.info("committed: EP rank %d of %d", rank, placement.ep_size)

    adapter = VllmExpertAdapter(  # elastic-ep
        engine.expert_weights, engine.physical_to_logical_map,
        logical_to_physical_map=engine.logical_to_physical_map,
        logical_replica_count=engine.logical_replica_count,
        on_placement=on_placement,
    )
    settings = agent_settings_from_env()  # elastic-ep
    layer_ids = range(args.dense_layers, args.dense_layers + args.layers) if args.scheme else None
    agent = adapter.agent(settings, scheme=args.scheme, moe_layer_ids=layer_ids, verify=args.verify)  # elastic-ep
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    runner = threading.Thread(target=agent.run, name="elastic-ep-agent", daemon=True)  # elastic-ep
    runner.start()
    last = time.monotonic()
    while not stop.is_set():
        with adapter.step(timeout_s=0.5) as ok:  # elastic-ep: no step while weights change
            if ok:
                engine.rank = adapter.rank  # elastic-ep: switches with the maps, before the commit
                adapter.record_physical_load(engine.step())  # elastic-ep
        stop.wait(args.step_interval)
        if time.monotonic() - last > 10:
            last = time.monotonic()
            log.info("rank %s: %d tokens on local experts, state %s", adapter.rank, engine.tokens, adapter.state.value)
    leave(agent, args.drain_timeout)
    agent.stop()
    runner.join(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
