"""Which process this is among several: the cluster named by TF_CONFIG or Vertex AI's CLUSTER_SPEC.

The trainer (data parallelism) and batch prediction (sharding the list) both
read it; with neither variable set, or one that names no cluster
(TF_CONFIG='{}'), this process is the whole cluster.
"""

import dataclasses
import json
import os

from trainer.cli import UserError

# Chief first, then workers: TensorFlow's "chief"/"master"/"worker", Vertex AI's "workerpool0"/"workerpool1".
ROLES = ("chief", "master", "workerpool0", "worker", "workerpool1")


@dataclasses.dataclass(frozen=True)
class Cluster:
    addresses: tuple  # host:port of every process, chief first; () for a lone process
    index: int  # this process's position in addresses

    @property
    def is_chief(self):
        return self.index == 0

    @property
    def size(self):
        return max(len(self.addresses), 1)


def cluster_from_env(env=os.environ):
    """Reads TF_CONFIG or CLUSTER_SPEC; raises UserError naming the variable when it is not a cluster spec."""
    source = "TF_CONFIG" if env.get("TF_CONFIG") else "CLUSTER_SPEC"
    raw = env.get(source)
    if not raw:
        return Cluster((), 0)
    try:
        spec = json.loads(raw)
        cluster, task = spec.get("cluster", {}), spec.get("task", {})
        roles = [r for r in ROLES if r in cluster]
        addresses = tuple(address for role in roles for address in cluster[role])
        if not addresses:
            return Cluster((), 0)
        role, index = task.get("type", roles[0]), int(task.get("index", 0))
        if role not in roles or not 0 <= index < len(cluster[role]):
            raise ValueError(f"this process is task {role!r} index {index}, not one of the cluster's "
                             f"{', '.join(roles)} processes")
        offset = sum(len(cluster[r]) for r in roles[: roles.index(role)])
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise UserError(f"${source} is not a valid cluster spec ({e}); expected JSON with 'cluster' and 'task'") from None
    return Cluster(addresses, offset + index)
