"""The driver: runs a config on a cluster (``dbnode train``), and asks nodes how they are.

==============  ==========================================================
module          holds
==============  ==========================================================
``inputs``      data and initial model, checked before any node is contacted
``run``         :func:`train`: placement, launch, monitoring, failover
``outputs``     :class:`Progress`, :class:`Summary` and the run's files
``ending``      how a run ends: why it stopped, its final model and summary
``stopping``    early stopping and reduce-on-plateau: the figures watched
``health``      :class:`FailureDetector`: heartbeats, dead and rejoined nodes
``recovery``    the driver's shard backups; what a lost shard comes back from
``checkpoint``  checkpoint directories: atomic, verified, pruned
``cluster``     :class:`LocalCluster`: the embedded cluster on loopback
``status``      :func:`status`: each node's identity, partitions and shard
``plan``        :func:`plan`: where a run's roles go, and the traffic predicted
==============  ==========================================================
"""

from .._lazy import lazy

_EXPORTS = {
    "train": ".run",
    "Summary": ".outputs",
    "Progress": ".outputs",
    "write_outputs": ".outputs",
    "new_run_dir": ".outputs",
    "read_metrics": ".outputs",
    "status": ".status",
    "dumps": ".status",
    "FailureDetector": ".health",
    "LocalCluster": ".cluster",
    "write_secret": ".cluster",
    "check_data": ".inputs",
    "load_data": ".inputs",
    "prepare": ".inputs",
    "plan": ".planning",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy(__name__, _EXPORTS)
