"""The control plane: etcd membership, leader election, fenced plan publication and
commit, etcd authentication, metrics.

``decide`` holds the leader's decisions (pure, over a ``view`` of the keys); ``controller``
carries them out; ``store`` is the ``torch.distributed.Store`` over etcd that plan
execution uses (the only module here that imports torch)."""
