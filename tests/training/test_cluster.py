"""The cluster description (idc.training.cluster) from fake Slurm and PBS environments, and the job scripts
of examples/cluster run under bash with a fake srun / pbsdsh that start each "node" here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from idc.core.errors import ClusterError
from idc.training import cluster
from idc.training.cluster import cluster_config, expand_hostlist, is_chief
from tests.paths import ROOT

SCHEDULER_VARIABLES = ("TF_CONFIG", "PBS_NODEFILE", "PBS_VNODENUM", "PBS_NODENUM", "PBS_TASKNUM", "PBS_O_WORKDIR",
                       *cluster.SLURM_NODELISTS, *cluster.SLURM_TASK_COUNTS, "SLURM_PROCID", "SLURM_SUBMIT_DIR",
                       *cluster.MPI_RANKS)


def workers(*hosts, port=12345):
    return [f"{host}:{port}" for host in hosts]


# --- Slurm -----------------------------------------------------------------------------------------

def test_slurm_gives_every_task_the_same_cluster_and_its_own_index():
    configs = [cluster_config({"SLURM_JOB_NODELIST": "node[01-02],gpu5", "SLURM_NTASKS": "3",
                               "SLURM_PROCID": str(rank)}, port=2222) for rank in range(3)]
    for rank, config in enumerate(configs):
        assert config == {"cluster": {"worker": workers("node01", "node02", "gpu5", port=2222)},
                          "task": {"type": "worker", "index": rank}}
    assert [is_chief(c) for c in configs] == [True, False, False]


def test_slurm_step_nodes_come_before_the_jobs():
    env = {"SLURM_JOB_NODELIST": "n[1-4]", "SLURM_NTASKS": "4",  # an srun step on two of the job's nodes
           "SLURM_STEP_NODELIST": "n[3-4]", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}
    assert cluster_config(env) == {"cluster": {"worker": workers("n3", "n4")}, "task": {"type": "worker", "index": 1}}
    assert cluster_config({"SLURM_NODELIST": "a,b", "SLURM_PROCID": "0"})["cluster"]["worker"] == workers("a", "b")


@pytest.mark.parametrize("hostlist, hosts", [
    ("node01", ["node01"]),
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("n[8-10]", ["n8", "n9", "n10"]),  # no padding: the lower bound has none
    ("c[098-101]", ["c098", "c099", "c100", "c101"]),
    ("r[1-2]n[1-2]-ib", ["r1n1-ib", "r1n2-ib", "r2n1-ib", "r2n2-ib"]),
    ("a[1],b,a[1]", ["a1", "b"]),
])
def test_slurm_hostlists_expand(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("hostlist", ["node[01-03", "node]01[", "n[[1-2]]", "n[3-1]", "n[a-b]", "a,,b", "n[1-2],"])
def test_bad_slurm_hostlist_names_the_variable(hostlist):
    with pytest.raises(ClusterError, match=r"SLURM_JOB_NODELIST=.* is not a Slurm host list"):
        cluster_config({"SLURM_JOB_NODELIST": hostlist, "SLURM_PROCID": "0"})


@pytest.mark.parametrize("env, message", [
    ({"SLURM_JOB_NODELIST": "n[1-2]"}, "SLURM_PROCID is not set although SLURM_JOB_NODELIST is"),
    ({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_PROCID": "one"}, "SLURM_PROCID='one' is not a whole number"),
    ({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_PROCID": "2"}, "SLURM_PROCID=2 is not a position in SLURM_JOB_NODELIST"),
    ({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_PROCID": "0", "SLURM_NTASKS": "8"},
     "SLURM_NTASKS=8 but SLURM_JOB_NODELIST names 2 nodes: run one training process per node"),
])
def test_slurm_errors_name_the_variable(env, message):
    with pytest.raises(ClusterError, match=message):
        cluster_config(env)


# --- PBS -------------------------------------------------------------------------------------------

@pytest.fixture
def nodefile(tmp_path):
    """Torque's node file for nodes=3:ppn=2 (one line per slot), with stray blank lines."""
    path = tmp_path / "nodefile"
    path.write_text("c1.local\nc1.local\nc2.local\n\nc2.local\nc3.local\n  c3.local \n")
    return str(path)


def test_pbs_gives_every_node_the_same_cluster_and_its_own_index(nodefile):
    # pbsdsh -u starts one task per host, on the host's first slot: PBS_VNODENUM 0, 2, 4 (one line per slot)
    configs = [cluster_config({"PBS_NODEFILE": nodefile, "PBS_VNODENUM": str(slot), "PBS_TASKNUM": "7"})
               for slot in (0, 2, 4)]
    for index, config in enumerate(configs):
        assert config == {"cluster": {"worker": workers("c1.local", "c2.local", "c3.local")},
                          "task": {"type": "worker", "index": index}}
    assert cluster_config({"PBS_NODEFILE": nodefile, "PBS_VNODENUM": "3"})["task"]["index"] == 1  # c2's 2nd slot


def test_pbs_mpi_rank_comes_before_the_job_shells_vnodenum(nodefile):
    # mpiexec -ppn 1 passes the job shell's PBS_VNODENUM=0 to every rank: the rank is what tells them apart
    for rank_variable in cluster.MPI_RANKS:
        env = {"PBS_NODEFILE": nodefile, "PBS_VNODENUM": "0", rank_variable: "2"}
        assert cluster_config(env, port=4000) == {"cluster": {"worker": workers("c1.local", "c2.local", "c3.local",
                                                                                 port=4000)},
                                                  "task": {"type": "worker", "index": 2}}


@pytest.mark.parametrize("env, message", [
    ({"PBS_NODEFILE": "/nonexistent/nodefile"}, "PBS_NODEFILE=/nonexistent/nodefile cannot be read"),
    ({}, "PBS_VNODENUM is not set .* although PBS_NODEFILE lists 3 hosts: .* pbsdsh -u"),
    ({"PBS_VNODENUM": "6"}, "PBS_VNODENUM=6 but PBS_NODEFILE has 6 lines"),
    ({"PMI_RANK": "3"}, "PMI_RANK=3 but PBS_NODEFILE lists 3 hosts: start one MPI rank per node"),
])
def test_pbs_errors_name_the_variable(nodefile, env, message):
    with pytest.raises(ClusterError, match=message):
        cluster_config({"PBS_NODEFILE": nodefile, **env})


def test_an_empty_nodefile_is_an_error(tmp_path):
    (tmp_path / "nodefile").write_text("\n")
    with pytest.raises(ClusterError, match="PBS_NODEFILE=.* lists no hosts"):
        cluster_config({"PBS_NODEFILE": str(tmp_path / "nodefile"), "PBS_VNODENUM": "0"})


# --- a single machine, TF_CONFIG, is_chief -----------------------------------------------------------

def test_a_single_machine_or_host_is_no_cluster(tmp_path):
    (tmp_path / "nodefile").write_text("c1\nc1\nc1\n")
    assert cluster_config({}) is None
    assert cluster_config({"HOME": "/home/me", "TF_CONFIG": "  "}) is None
    assert cluster_config({"SLURM_JOB_NODELIST": "node01", "SLURM_NTASKS": "1"}) is None  # no PROCID needed
    assert cluster_config({"PBS_NODEFILE": str(tmp_path / "nodefile")}) is None  # nor PBS_VNODENUM
    assert cluster_config({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1"]},
                                                    "task": {"type": "worker", "index": 0}})}) is None
    assert is_chief(None)


def test_tf_config_is_used_as_it_is_before_any_scheduler():
    given = {"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]}, "task": {"type": "worker", "index": 1}}
    assert cluster_config({"TF_CONFIG": json.dumps(given), "SLURM_JOB_NODELIST": "n[1-9]"}) == given


@pytest.mark.parametrize("tf_config, message", [
    ("{'cluster': 1}", "TF_CONFIG is not valid JSON"),
    ("[1, 2]", 'TF_CONFIG must be a JSON object with "cluster" and "task"'),
    ('{"task": {"type": "worker", "index": 0}}', 'TF_CONFIG has no valid "cluster"'),
    ('{"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}', 'TF_CONFIG has no valid "cluster"'),
    ('{"cluster": {"worker": ["a:1", "b:1"]}}', 'TF_CONFIG has no "task"'),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"index": 0}}', 'TF_CONFIG has no "task"'),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "ps", "index": 0}}',
     r"TF_CONFIG's task type 'ps' is not in its cluster \(worker\)"),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 2}}',
     r"TF_CONFIG's task index 2 is not a position in its cluster's 'worker' list \(0..1\)"),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": "1"}}',
     "TF_CONFIG's task index '1' is not a position"),
])
def test_bad_tf_config_is_a_clear_error(tf_config, message):
    with pytest.raises(ClusterError, match=message):
        cluster_config({"TF_CONFIG": tf_config})


@pytest.mark.parametrize("cluster_spec, task, chief", [
    ({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": 0}, True),
    ({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": 1}, False),
    ({"chief": ["a:1"], "worker": ["b:1"]}, {"type": "chief", "index": 0}, True),
    ({"chief": ["a:1"], "worker": ["b:1"]}, {"type": "worker", "index": 0}, False),
    ({"worker": ["a:1"], "ps": ["p:1"]}, {"type": "ps", "index": 0}, False),
    ({"worker": ["a:1", "b:1"]}, {"type": "evaluator", "index": 0}, False),
])
def test_is_chief(cluster_spec, task, chief):
    assert is_chief({"cluster": cluster_spec, "task": task}) is chief


# --- the command line, in this process (starting Python costs a TensorFlow import each time) ----------

@pytest.fixture
def no_scheduler(monkeypatch):
    for name in SCHEDULER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["cluster", *args])
    with pytest.raises(SystemExit) as done:
        from idc.core.cli import run
        run(cluster.main)
    out, err = capsys.readouterr()
    return done.value.code, out, err


def test_cli_prints_tf_config_for_a_job_script(no_scheduler, capsys):
    no_scheduler.setenv("SLURM_JOB_NODELIST", "n[1-2]")
    no_scheduler.setenv("SLURM_PROCID", "1")
    code, out, err = run_cli(no_scheduler, capsys, "--port", "2000")
    assert code == 0 and json.loads(out) == {"cluster": {"worker": workers("n1", "n2", port=2000)},
                                             "task": {"type": "worker", "index": 1}}
    assert out.count("\n") == 1 and "worker 1 of 2 tasks" in err


def test_cli_prints_nothing_on_a_single_machine(no_scheduler, capsys):
    code, out, err = run_cli(no_scheduler, capsys)
    assert (code, out) == (0, "") and "single machine" in err


def test_cli_error_is_one_line_naming_the_variable(no_scheduler, capsys):
    no_scheduler.setenv("TF_CONFIG", "{not json")
    code, out, err = run_cli(no_scheduler, capsys)
    assert (code, out) == (2, "") and err.startswith("error: TF_CONFIG is not valid JSON")


# --- the job scripts, under bash, with a fake scheduler ----------------------------------------------

FAKE_SRUN = r"""#!/bin/bash
# srun as Slurm runs it in a job step: the command once per node of $FAKE_NODES, all at once
[[ " $* " == *" --ntasks-per-node=1 "* ]] || { echo "srun: not one task per node: $*" >&2; exit 1; }
while [[ $1 == -* ]]; do shift; done
pids=(); rank=0
for node in $FAKE_NODES; do
    SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST SLURM_STEP_NUM_TASKS=$SLURM_NTASKS SLURM_PROCID=$rank \
        SLURMD_NODENAME=$node "$@" & pids+=($!)
    rank=$((rank + 1))
done
status=0; for pid in "${pids[@]}"; do wait "$pid" || status=1; done; exit $status
"""
FAKE_PBSDSH = r"""#!/bin/bash
# pbsdsh -u as Torque runs it: the command once per host of $PBS_NODEFILE, PBS_VNODENUM = its first slot
[ "$1" = -u ] || { echo "pbsdsh: not once per node (-u): $*" >&2; exit 1; }
shift
mapfile -t slots < "$PBS_NODEFILE"
declare -A started; pids=()
for slot in "${!slots[@]}"; do
    host=${slots[$slot]}
    [ -n "${started[$host]:-}" ] && continue
    started[$host]=1
    PBS_VNODENUM=$slot PBS_NODENUM=$((${#started[@]} - 1)) PBS_TASKNUM=$((slot + 100)) "$@" & pids+=($!)
done
status=0; for pid in "${pids[@]}"; do wait "$pid" || status=1; done; exit $status
"""
# Stands in for the project's Python: the cluster module runs for real, everything else is only recorded.
RECORDING_PYTHON = f"""#!/bin/bash
if [ "$1 $2" = "-m idc.training.cluster" ]; then exec {sys.executable} "$@"; fi
line="ran:$(printf ' %q' "$@") | TF_CONFIG=${{TF_CONFIG:-}}"
echo "$line"  # one write: the nodes print at the same time
"""


def fake_bin(tmp_path: Path, **scripts: str) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, text in scripts.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def run_job(script: str, env: dict, bin_dir: Path) -> list[str]:
    base = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": os.environ.get("HOME", "/tmp"),
            "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(["bash", str(ROOT / "examples" / "cluster" / script)], env={**base, **env},
                          capture_output=True, text=True, timeout=300, cwd="/")
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()


def test_job_scripts_are_valid_bash():
    for script in ("slurm_job.sh", "pbs_job.sh", "node.sh", "folds_job.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "examples" / "cluster" / script)], check=True, timeout=30)


def test_slurm_job_sorts_trains_on_every_node_with_its_tf_config_then_evaluates(tmp_path):
    bin_dir = fake_bin(tmp_path, srun=FAKE_SRUN, python=RECORDING_PYTHON)
    lines = run_job("slurm_job.sh", {"SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_NODELIST": "gpu[07-08],cpu1",
                                     "SLURM_NTASKS": "3", "SLURM_PROCID": "0", "FAKE_NODES": "gpu07 gpu08 cpu1",
                                     "PYTHON": str(bin_dir / "python"), "DATA": "/shared/idc data"}, bin_dir)
    assert lines[0] == r"ran: trainer.py sort --config confs.json --data /shared/idc\ data | TF_CONFIG="
    assert lines[-1] == "ran: evaluate.py --config confs.json | TF_CONFIG="
    trained = [line.split(" | TF_CONFIG=") for line in lines[1:-1]]
    assert {command for command, _ in trained} == {"ran: trainer.py train --config confs.json"}
    configs = sorted((json.loads(tf_config) for _, tf_config in trained), key=lambda c: c["task"]["index"])
    assert configs == [{"cluster": {"worker": workers("gpu07", "gpu08", "cpu1")}, "task": {"type": "worker",
                                                                                           "index": index}}
                       for index in range(3)]


def test_pbs_job_dry_run_prints_each_nodes_tf_config(tmp_path):
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("c1\nc1\nc2\nc2\nc3\nc3\n")  # qsub -l nodes=3:ppn=2
    lines = run_job("pbs_job.sh", {"PBS_O_WORKDIR": str(ROOT), "PBS_NODEFILE": str(nodefile), "PBS_VNODENUM": "0",
                                   "PYTHON": sys.executable, "IDC_DRY_RUN": "1"}, fake_bin(tmp_path, pbsdsh=FAKE_PBSDSH))
    assert lines[0] == f"+ {sys.executable} trainer.py sort --config confs.json"
    assert lines[-1] == f"+ {sys.executable} evaluate.py --config confs.json"
    configs = sorted((json.loads(line.removeprefix("TF_CONFIG=")) for line in lines[1:-1]),
                     key=lambda c: c["task"]["index"])
    assert configs == [{"cluster": {"worker": workers("c1", "c2", "c3")}, "task": {"type": "worker", "index": index}}
                       for index in range(3)]
