"""The control plane: etcd membership, leader election, fenced plan publication and
commit, metrics, and the local etcd server used by tests and the demo."""
