"""Where this process stands in a training cluster: the TF_CONFIG that tf.distribute reads.

TF_CONFIG names every task of the cluster and this process's own, e.g.
{"cluster": {"worker": ["node01:12345", "node02:12345"]}, "task": {"type": "worker", "index": 1}}.
Every worker must get the same cluster list and its own index. It comes from, in this order:

1. $TF_CONFIG, when set: used as it is, after a check (a bad one is an error naming TF_CONFIG).
2. Slurm, one task per node (`srun --ntasks-per-node=1`): the nodes from $SLURM_STEP_NODELIST,
   $SLURM_JOB_NODELIST or $SLURM_NODELIST, in Slurm's compressed form (`node[01-03,07],gpu5`,
   expanded here: no `scontrol` needed); the index from $SLURM_PROCID; $SLURM_STEP_NUM_TASKS or
   $SLURM_NTASKS must equal the number of nodes.
3. PBS/Torque, one process per node: the hosts in the file $PBS_NODEFILE (one line per slot, so a
   host repeats: it counts once, in order of first appearance). The index is the MPI launcher's
   rank when there is one ($PMI_RANK, $OMPI_COMM_WORLD_RANK or $PMIX_RANK: `mpiexec -ppn 1`),
   else the host on line $PBS_VNODENUM of $PBS_NODEFILE (`pbsdsh -u` sets PBS_VNODENUM to the slot
   it started the task on). The rank comes first because mpiexec passes the job shell's own
   PBS_VNODENUM (0) to every rank. $PBS_TASKNUM is not used: it is the task manager's task id,
   not a position.
4. Otherwise, or when there is a single host (task): None, a single machine.

As with MultiWorkerMirroredStrategy, worker 0 is the chief unless the cluster has a "chief" task.
Standard library only. In a job script, on each node:

    tf_config=$(.venv/bin/python -m idc.training.cluster)   # prints nothing on a single machine
    [ -n "$tf_config" ] && export TF_CONFIG=$tf_config
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

from idc.core.errors import ClusterError

DEFAULT_PORT = 12345
SLURM_NODELISTS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")  # the step's nodes first
SLURM_TASK_COUNTS = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
MPI_RANKS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")  # MPICH/Intel MPI, Open MPI, PMIx


def cluster_config(env: Mapping[str, str] = os.environ, port: int = DEFAULT_PORT) -> dict | None:
    """This process's TF_CONFIG as a dict, or None on a single machine (see the module's docstring)."""
    if env.get("TF_CONFIG", "").strip():
        config = _checked_tf_config(env["TF_CONFIG"])
        return config if sum(len(tasks) for tasks in config["cluster"].values()) > 1 else None
    slurm_nodelist = next((name for name in SLURM_NODELISTS if env.get(name)), None)
    if slurm_nodelist:
        hosts = expand_hostlist(env[slurm_nodelist], slurm_nodelist)
        index = _slurm_index(env, slurm_nodelist, hosts) if len(hosts) > 1 else 0
    elif env.get("PBS_NODEFILE"):
        slots = _read_nodefile(env["PBS_NODEFILE"])
        hosts = list(dict.fromkeys(slots))
        index = _pbs_index(env, slots, hosts) if len(hosts) > 1 else 0
    else:
        return None
    if len(hosts) < 2:
        return None
    return {"cluster": {"worker": [f"{host}:{port}" for host in hosts]},
            "task": {"type": "worker", "index": index}}


def is_chief(cfg: dict | None) -> bool:
    """Whether this process writes the model, logs and checkpoints: always on a single machine; in a
    cluster the "chief" task, or worker 0 when the cluster has no chief."""
    if not cfg:
        return True
    kind, index = cfg["task"]["type"], cfg["task"].get("index", 0)
    return kind == "chief" or (kind == "worker" and index == 0 and "chief" not in cfg["cluster"])


def expand_hostlist(hostlist: str, variable: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Slurm's compressed host list, expanded in order: "node[01-03,07],gpu5" -> node01, node02,
    node03, node07, gpu5. Zero padding follows each range's lower bound; several bracket groups in
    one name multiply ("r[1-2]n[1-2]" -> r1n1, r1n2, r2n1, r2n2)."""
    hosts = []
    for name in _split_outside_brackets(hostlist.strip(), variable):
        hosts += _expand_name(name, hostlist, variable)
    return list(dict.fromkeys(hosts))


def _split_outside_brackets(text: str, variable: str) -> list[str]:
    names, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ClusterError(f"{variable}={text!r} is not a Slurm host list: unbalanced brackets")
        if char == "," and depth == 0:
            names.append(text[start:i])
            start = i + 1
    if depth:
        raise ClusterError(f"{variable}={text!r} is not a Slurm host list: unbalanced brackets")
    names.append(text[start:])
    if not all(name.strip() for name in names):
        raise ClusterError(f"{variable}={text!r} is not a Slurm host list: an empty host name")
    return [name.strip() for name in names]


def _expand_name(name: str, hostlist: str, variable: str) -> list[str]:
    """One name with bracket groups ("n[1-3]-ib") -> its hosts."""
    match = re.search(r"\[([^\]]*)\]", name)
    if not match:
        return [name]
    prefix, rest = name[:match.start()], name[match.end():]
    numbers = []
    for part in match[1].split(","):
        bounds = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
        if not bounds or (bounds[2] and int(bounds[2]) < int(bounds[1])):
            raise ClusterError(f"{variable}={hostlist!r} is not a Slurm host list: bad range {part!r} in {name!r}")
        low, high = bounds[1], bounds[2] or bounds[1]
        numbers += [f"{n:0{len(low)}d}" for n in range(int(low), int(high) + 1)]
    return [prefix + number + tail for number in numbers for tail in _expand_name(rest, hostlist, variable)]


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    if name not in env:
        return None
    try:
        return int(env[name])
    except ValueError:
        raise ClusterError(f"{name}={env[name]!r} is not a whole number") from None


def _slurm_index(env: Mapping[str, str], nodelist: str, hosts: list[str]) -> int:
    index = _env_int(env, "SLURM_PROCID")
    if index is None:
        raise ClusterError(f"SLURM_PROCID is not set although {nodelist} is: start the training processes "
                           "with srun --ntasks-per-node=1")
    counted = next((name for name in SLURM_TASK_COUNTS if name in env), None)
    tasks = _env_int(env, counted) if counted else None
    if tasks is not None and tasks != len(hosts):  # several tasks per node would get one node's address
        raise ClusterError(f"{counted}={tasks} but {nodelist} names {len(hosts)} nodes: run one training process "
                           "per node (srun --ntasks-per-node=1); TensorFlow uses all of a node's cores and GPUs")
    if not 0 <= index < len(hosts):
        raise ClusterError(f"SLURM_PROCID={index} is not a position in {nodelist} ({len(hosts)} nodes)")
    return index


def _read_nodefile(path: str) -> list[str]:
    try:
        slots = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as err:
        raise ClusterError(f"PBS_NODEFILE={path} cannot be read: {err.strerror}") from None
    if not slots:
        raise ClusterError(f"PBS_NODEFILE={path} lists no hosts")
    return slots


def _pbs_index(env: Mapping[str, str], slots: list[str], hosts: list[str]) -> int:
    rank_name = next((name for name in MPI_RANKS if name in env), None)
    if rank_name:
        rank = _env_int(env, rank_name)
        if not 0 <= rank < len(hosts):
            raise ClusterError(f"{rank_name}={rank} but PBS_NODEFILE lists {len(hosts)} hosts: start one MPI rank "
                               "per node (mpiexec -ppn 1)")
        return rank
    slot = _env_int(env, "PBS_VNODENUM")
    if slot is None:
        raise ClusterError(f"PBS_VNODENUM is not set (nor an MPI rank: {', '.join(MPI_RANKS)}) although PBS_NODEFILE "
                           f"lists {len(hosts)} hosts: start one training process per node with pbsdsh -u "
                           "(or mpiexec -ppn 1)")
    if not 0 <= slot < len(slots):
        raise ClusterError(f"PBS_VNODENUM={slot} but PBS_NODEFILE has {len(slots)} lines")
    return hosts.index(slots[slot])


def _checked_tf_config(text: str) -> dict:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise ClusterError(f"TF_CONFIG is not valid JSON ({err.msg}, character {err.pos}): {text[:200]!r}") from None
    if not isinstance(config, dict):
        raise ClusterError('TF_CONFIG must be a JSON object with "cluster" and "task"')
    cluster = config.get("cluster")
    if not (isinstance(cluster, dict) and cluster and all(
            isinstance(tasks, list) and tasks and all(isinstance(a, str) and a for a in tasks)
            for tasks in cluster.values())):
        raise ClusterError('TF_CONFIG has no valid "cluster": give each task type a list of addresses, '
                           'e.g. {"cluster": {"worker": ["node01:12345", "node02:12345"]}, ...}')
    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task:
        raise ClusterError('TF_CONFIG has no "task": add {"task": {"type": "worker", "index": N}}, N being this '
                           'process\'s position in the cluster\'s "worker" list')
    kind, index = task["type"], task.get("index", 0)
    if kind == "evaluator":  # TensorFlow's side evaluator is not part of the cluster
        return config
    if kind not in cluster:
        raise ClusterError(f"TF_CONFIG's task type {kind!r} is not in its cluster ({', '.join(cluster)})")
    if type(index) is not int or not 0 <= index < len(cluster[kind]):
        raise ClusterError(f"TF_CONFIG's task index {index!r} is not a position in its cluster's {kind!r} list "
                           f"(0..{len(cluster[kind]) - 1})")
    return config


def main() -> int:
    from idc.core.cli import ArgumentParser

    p = ArgumentParser(description="Print this process's TF_CONFIG (JSON) for a job script to export; "
                                   "nothing on a single machine.")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help="the port each worker listens on (default: %(default)s)")
    args = p.parse_args()
    if not 0 < args.port < 65536:
        p.error(f"--port {args.port} is not a TCP port (1..65535)")
    config = cluster_config(port=args.port)
    if config is None:
        print("single machine: no TF_CONFIG needed", file=sys.stderr)
        return 0
    task = config["task"]
    size = sum(len(tasks) for tasks in config["cluster"].values())
    print(f"{task['type']} {task.get('index', 0)} of {size} tasks{' (chief)' if is_chief(config) else ''}",
          file=sys.stderr)
    print(json.dumps(config, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    from idc.core.cli import run

    run(main)
