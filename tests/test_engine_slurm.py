"""``engine.slurm`` without a cluster: resources -> sbatch options and submitit executors, submission, waiting.

``sbatch`` and ``squeue`` are replaced by small scripts on ``PATH`` that record their arguments and answer
as SLURM does; the real cluster runs in ``tests/test_slurm.py`` and the comparison's sbatch test.
"""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
from hangs import run_watched

from engine import slurm
from engine.slurm import SlurmError, SlurmResources, sbatch_args, submitit_executor, time_minutes

RES = SlurmResources(nodes=2, tasks_per_node=4, gpus_per_node=4, cpus_per_task=6, time="12:00:00", mem_gb=64,
                     partition="gpu", account="acc", qos="high", extra_args=("--constraint=a100",))


def test_engine_slurm_imports_neither_timm_nor_the_stages() -> None:
    code = ("import engine.slurm, sys; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'timm', 'backbone', 'segmentation', 'experiments', 'torch'}); assert not bad, bad")
    proc = run_watched([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr[-2000:]


# --- sbatch options -------------------------------------------------------------------------------------------
def test_sbatch_args_exact_list() -> None:
    assert sbatch_args(RES) == [
        "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=6", "--time=12:00:00",
        "--mem=64G", "--partition=gpu", "--account=acc", "--qos=high", "--signal=USR1@300", "--requeue",
        "--constraint=a100"]


def test_sbatch_args_defaults_are_the_stage_scripts_warning_and_requeue() -> None:
    # slurm/imagenet_pretrain.sh and slurm/segmentation_finetune.sh: #SBATCH --requeue, --signal=USR1@300
    assert sbatch_args(SlurmResources()) == ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0",
                                             "--cpus-per-task=1", "--time=24:00:00", "--signal=USR1@300", "--requeue"]
    assert slurm.SBATCH_SIGNAL == "USR1" and slurm.SIGNAL_DELAY_S == 300
    for script in ("imagenet_pretrain.sh", "segmentation_finetune.sh"):
        text = (Path(__file__).resolve().parents[1] / "slurm" / script).read_text()
        assert f"#SBATCH --signal={slurm.SBATCH_SIGNAL}@{slurm.SIGNAL_DELAY_S}" in text and "#SBATCH --requeue" in text


@pytest.mark.parametrize("kwargs, tail", [
    (dict(signal="USR2", signal_delay_s=120), ["--signal=USR2@120", "--requeue"]),
    (dict(signal="B:USR1"), ["--signal=B:USR1@300", "--requeue"]),
    (dict(signal_delay_s=None), ["--requeue"]),
    (dict(requeue=False), ["--signal=USR1@300"]),
    (dict(signal_delay_s=None, requeue=False), []),
    (dict(time=90), ["--signal=USR1@300", "--requeue"]),
])
def test_sbatch_args_signal_delay_and_requeue(kwargs: dict, tail: list[str]) -> None:
    args = sbatch_args(SlurmResources(**kwargs))
    assert args[5:] == tail
    assert args[4] == f"--time={kwargs.get('time', '24:00:00')}"


@pytest.mark.parametrize("text, minutes", [
    (90, 90), ("90", 90), ("1:30", 2), ("1:30:00", 90), ("24:00:00", 1440), ("1-06", 1800), ("1-06:30", 1830),
    ("2-00:00:01", 2881),
])
def test_time_minutes(text: str | int, minutes: int) -> None:
    assert time_minutes(text) == minutes


@pytest.mark.parametrize("text", ["", "1:2:3:4", "ten", "1-2-3", "-5"])
def test_time_minutes_rejects_what_slurm_would(text: str) -> None:
    with pytest.raises(ValueError, match="not a SLURM time"):
        time_minutes(text)


def test_dependency_output_and_log_follow_one_rule(tmp_path: Path) -> None:
    assert slurm.dependency_arg(["1", "2"]) == ["--dependency=afterok:1:2"] and slurm.dependency_arg([]) == []
    assert slurm.output_arg(tmp_path) == f"--output={tmp_path}/%x-%j.out"
    assert slurm.job_log(tmp_path, "lkm-collect", "7") == tmp_path / "lkm-collect-7.out"


# --- submitit executors ---------------------------------------------------------------------------------------
def test_submitit_executor_parameters_per_cluster(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    res = SlurmResources(nodes=2, tasks_per_node=4, gpus_per_node=4, cpus_per_task=6, time=90, mem_gb=32,
                         partition="gpu", account="acc", qos="high", signal_delay_s=120,
                         extra_args=("--constraint=a100", "--exclusive"))
    ex = submitit_executor(res, "slurm", tmp_path, name="job", max_requeues=3)._executor
    assert type(ex).__name__ == "SlurmExecutor" and ex.max_num_timeout == 3
    p = ex.parameters
    assert (p["job_name"], p["nodes"], p["ntasks_per_node"], p["gpus_per_node"], p["cpus_per_task"], p["time"],
            p["mem"]) == ("job", 2, 4, 4, 6, 90, "32GB")
    assert (p["partition"], p["account"], p["qos"], p["signal_delay_s"]) == ("gpu", "acc", "high", 120)
    assert p["additional_parameters"] == {"requeue": True, "constraint": "a100", "exclusive": True}

    local = submitit_executor(res, "local", tmp_path, name="job")._executor
    assert type(local).__name__ == "LocalExecutor"
    lp = local.parameters
    assert (lp["tasks_per_node"], lp["nodes"], lp["timeout_min"]) == (4, 1, 90)
    assert "--nodes 2 ignored" in capsys.readouterr().err  # local processes run on this machine only
    debug = submitit_executor(res, "debug", tmp_path, name="job")._executor
    assert type(debug).__name__ == "DebugExecutor" and debug.parameters["tasks_per_node"] == 1


def test_submitit_job_script_gives_srun_the_jobs_cpus_per_task(tmp_path: Path) -> None:
    # SLURM >= 22.05: srun does not inherit the job's --cpus-per-task; the srun line of submitit's script must say it
    ex = submitit_executor(RES, "slurm", tmp_path, name="job")._executor
    lines = ex._make_submission_file_text("python -m x", "uid").splitlines()
    assert "#SBATCH --cpus-per-task=6" in lines
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert srun.split()[1:] == ["--unbuffered", "--output", f"{tmp_path}/%j_%t_log.out", "--error",
                                f"{tmp_path}/%j_%t_log.err", "--cpus-per-task=6", "python", "-m", "x"]
    assert lines.index("export OMP_NUM_THREADS=6") < lines.index(srun)  # the tasks' threads, as slurm/launch.sh


def test_submitit_executor_requeue_off_and_time_string(tmp_path: Path) -> None:
    ex = submitit_executor(SlurmResources(time="1:30:00", requeue=False), "slurm", tmp_path, name="j")._executor
    assert ex.parameters["time"] == 90 and "additional_parameters" not in ex.parameters
    assert ex.parameters["signal_delay_s"] == slurm.SIGNAL_DELAY_S and "gpus_per_node" not in ex.parameters


@pytest.mark.parametrize("kwargs, message", [
    (dict(signal="USR1"), "submitit sends its own warning signal"),
    (dict(signal_delay_s=None), "always sends its warning signal"),
    (dict(extra_args=("-C", "a100")), "only long options"),
])
def test_submitit_executor_refuses_what_submitit_cannot_do(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        submitit_executor(SlurmResources(**kwargs), "slurm", tmp_path, name="j")


def test_submitit_executor_accepts_its_own_signal(tmp_path: Path) -> None:
    ex = submitit_executor(SlurmResources(signal="SIGUSR2"), "slurm", tmp_path, name="j")._executor
    assert ex.parameters["signal_delay_s"] == 300


def test_submit_maps_resources_to_each_executor() -> None:
    from backbone.submit import make_executor, parse_args

    common = ["--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "6", "--timeout-min", "90"]
    slurm_ex = make_executor(parse_args([*common, "--partition", "gpu", "--account", "acc"]))._executor
    assert type(slurm_ex).__name__ == "SlurmExecutor"
    p = slurm_ex.parameters
    assert (p["nodes"], p["ntasks_per_node"], p["gpus_per_node"], p["cpus_per_task"], p["time"]) == (2, 4, 4, 6, 90)
    assert (p["partition"], p["account"], p["signal_delay_s"]) == ("gpu", "acc", 300)
    assert p["additional_parameters"] == {"requeue": True}
    local = make_executor(parse_args(["--local", *common]))._executor
    assert type(local).__name__ == "LocalExecutor" and local.parameters["tasks_per_node"] == 4
    debug = make_executor(parse_args(["--debug", *common]))._executor
    assert type(debug).__name__ == "DebugExecutor" and debug.parameters["tasks_per_node"] == 1


# --- slurm/launch.sh --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("job_cpus", ["6", None])
def test_lkm_launch_gives_srun_the_jobs_cpus_per_task(fake_bin: Path, job_cpus: str | None) -> None:
    # SLURM >= 22.05: srun reads SRUN_CPUS_PER_TASK, not the job's SLURM_CPUS_PER_TASK; without --cpus-per-task on
    # sbatch both are unset and srun's default (1) is the job's
    _fake(fake_bin, "srun", 'echo "SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK-unset} OMP_NUM_THREADS=$OMP_NUM_THREADS"\n'
                            'printf "%s\\n" "$@"\n')
    env = {**os.environ, "SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"}
    env.pop("SRUN_CPUS_PER_TASK", None)
    env.pop("SLURM_CPUS_PER_TASK", None)
    if job_cpus:
        env["SLURM_CPUS_PER_TASK"] = job_cpus
    root = Path(__file__).resolve().parents[1]
    proc = run_watched(["bash", "-c", "set -euo pipefail; source slurm/launch.sh; lkm_launch configs/demo.yaml "
                        "'python x' -- python -m x -- a=1"], env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-8:] == [
        f"SRUN_CPUS_PER_TASK={job_cpus or 'unset'} OMP_NUM_THREADS={job_cpus or 1}",  # what srun was started with
        "--kill-on-bad-exit=1", "python", "-m", "x", "--config", "configs/demo.yaml", "a=1"], proc.stdout


# --- sbatch, squeue ---------------------------------------------------------------------------------------------
def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def test_sbatch_returns_the_job_id_and_passes_the_arguments(fake_bin: Path) -> None:
    _fake(fake_bin, "sbatch", f'printf "%s\\n" "$@" > {fake_bin}/args; echo "PYTHON=$PYTHON" >> {fake_bin}/args\n'
                              'echo "4711;cluster"\n')
    assert slurm.sbatch(["--job-name=x", "job.sh"], env=slurm.python_env("/venv/python")) == "4711"
    assert (fake_bin / "args").read_text().split("\n") == [
        "--parsable", "--kill-on-invalid-dep=yes", "--job-name=x", "job.sh", "PYTHON=/venv/python", ""]


def test_refused_sbatch_is_an_error_naming_the_command(fake_bin: Path) -> None:
    _fake(fake_bin, "sbatch", 'echo "sbatch: error: invalid partition specified: nope" >&2; exit 1\n')
    with pytest.raises(SlurmError) as e:
        slurm.sbatch(["--partition=nope", "job.sh", "a b"])
    assert "sbatch refused the job: sbatch: error: invalid partition specified: nope" in str(e.value)
    assert "sbatch --partition=nope job.sh 'a b'" in str(e.value)


@pytest.mark.parametrize("state, queued", [("PENDING", True), ("RUNNING", True), ("REQUEUED", True),
                                           ("COMPLETED", False), ("FAILED", False), ("", False)])
def test_job_queued_reads_squeue(fake_bin: Path, state: str, queued: bool) -> None:
    _fake(fake_bin, "squeue", f'[ "$*" = "-h -j 12 -o %T" ] && echo "{state}"\n')
    assert slurm.job_queued("12") is queued


def test_wait_for_jobs_prints_a_line_whenever_the_running_set_changes(fake_bin: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    # one answer per squeue call: pending, started, unchanged, the second one started, one left, none
    answers = ["1 PENDING pre\\n2 PENDING ft", "1 RUNNING pre\\n2 PENDING ft", "1 RUNNING pre\\n2 PENDING ft",
               "1 RUNNING pre\\n2 RUNNING ft", "2 RUNNING ft", ""]
    for i, answer in enumerate(answers):
        (tmp_path / f"answer{i}").write_text(answer)
    _fake(fake_bin, "squeue", f'[ "$*" = "-h -j 1,2 -o %i %T %j" ] || exit 1\n'
                              f'n=$(cat {tmp_path}/n 2>/dev/null || echo 0); echo $((n + 1)) > {tmp_path}/n\n'
                              f'printf "$(cat {tmp_path}/answer$n)"\n')
    slurm.wait_for_jobs(["1", "2"], tmp_path / "logs", poll_s=0)
    lines = [line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    log = tmp_path / "logs"
    assert lines == [
        "2 SLURM job(s) left; running: none yet",
        f"2 SLURM job(s) left; running: 1 (pre, log {log}/pre-1.out)",
        f"2 SLURM job(s) left; running: 1 (pre, log {log}/pre-1.out); 2 (ft, log {log}/ft-2.out)",
        f"1 SLURM job(s) left; running: 2 (ft, log {log}/ft-2.out)",
    ]
    assert (tmp_path / "n").read_text().strip() == str(len(answers))
