"""The decision core: placement, rank mapping, EPLB, rebalance policies, transfer plans
and load statistics. Pure functions over numpy/torch arrays; no I/O."""
