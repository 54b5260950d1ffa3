"""`merino-pl slurm`: the rendered sbatch script, bad input, and real jobs on a local SLURM cluster.

The cluster tests start munged + slurmctld + slurmd on localhost (``slurm_cluster.py``; installed
by ``make slurm-deps``) and submit through ``merino-pl slurm submit`` itself: a 2-task DDP (gloo,
CPU) run of ``merino-pl fit`` on the tiny recipe, and a second one that gets SIGUSR1 mid-run,
checkpoints, requeues itself and finishes from that checkpoint. They skip with the reason where
SLURM cannot run (not root, packages missing); ``MERINO_REQUIRE_SLURM=1`` turns the skip into a
failure (CI on a machine that must run them).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from merino_pl.cli import main as merino_main
from merino_pl.slurm.jobs import job_fields, time_limit_seconds, write_new_script
from merino_pl.slurm.render import JobSpec, render
from slurm_cluster import LocalSlurmCluster, unavailable_reason

REPO = Path(__file__).resolve().parents[1]
FIT_CONFIG = REPO / "recipes" / "fit" / "cpu-demo.yaml"
PAPER_CONFIG = "recipes/fit/pile-8xh100.yaml"
# The shipped job scripts: what `merino-pl slurm submit --dry-run` prints for these (from the repo
# root); each script's header line is that command.
SHIPPED_COMMON = dict(
    config=PAPER_CONFIG,
    recipe="recipes/merino-64m.yaml",
    run_dir="runs/pile-merino-64m",
    gpus_per_node=8,
    time="24:00:00",
    setup=("source .venv/bin/activate",),
)
SHIPPED = {
    "slurm/merino-64m-1node.sbatch": JobSpec(**SHIPPED_COMMON, nodes=1),
    # 4 x 8 GPUs x 32 sequences: no gradient accumulation keeps the paper's 1024 sequences a step
    "slurm/merino-64m-4nodes.sbatch": JobSpec(
        **SHIPPED_COMMON, nodes=4, partition="gpu", fit_args=("--trainer.accumulate_grad_batches", "1")
    ),
}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = merino_main(["slurm", *argv])
    except SystemExit as e:  # argparse's own errors (a flag's type)
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def sbatch_lines(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


@pytest.fixture
def train_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text("trainer:\n  default_root_dir: runs/from-config\n")
    return path


# -- the rendered script ------------------------------------------------------------------
def test_dry_run_one_node_of_8_h100(capsys, train_yaml, tmp_path):
    rc, out, err = run_cli(
        capsys,
        "submit",
        "--config",
        str(train_yaml),
        "--recipe",
        "merino-52m",
        "--nodes",
        "1",
        "--gpus-per-node",
        "8",
        "--dry-run",
    )
    assert (rc, err) == (0, "")
    assert sbatch_lines(out) == [
        "--job-name=merino-fit",
        "--nodes=1",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--cpus-per-task=8",
        "--time=24:00:00",
        "--signal=SIGUSR1@90",
        "--requeue",
        "--open-mode=append",
        "--output=runs/from-config/slurm/%j.out",
    ]
    assert "srun --kill-on-bad-exit=1 merino-pl fit" in out
    assert f"--config {train_yaml}" in out and "--model.recipe merino-52m" in out
    assert "--trainer.accelerator gpu --trainer.devices 8 --trainer.num_nodes 1" in out
    assert '--ckpt_path "${CKPT:-last}"' in out and "RUN_DIR=runs/from-config" in out
    assert not (tmp_path / "runs").exists() and not Path("runs/from-config").exists()  # dry run writes nothing


def test_dry_run_several_nodes_with_options(capsys, train_yaml):
    rc, out, _ = run_cli(
        capsys,
        "submit",
        "--config",
        str(train_yaml),
        "--recipe",
        "merino-52m",
        "--nodes",
        "4",
        "--partition",
        "h100",
        "--account",
        "lm",
        "--time",
        "2-00:00:00",
        "--signal-seconds",
        "300",
        "--run-dir",
        "/scratch/my run",
        "--setup",
        "module load cuda",
        "--dry-run",
        "--",
        "--trainer.max_steps",
        "1000",
        "--data.batch_size=32",
    )
    assert rc == 0
    lines = sbatch_lines(out)
    assert {
        "--nodes=4",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--partition=h100",
        "--account=lm",
        "--time=2-00:00:00",
        "--signal=SIGUSR1@300",
        "--requeue",
    } <= set(lines)
    assert "--output='/scratch/my run/slurm/%j.out'" in lines  # sbatch splits #SBATCH lines at blanks
    assert "RUN_DIR='/scratch/my run'" in out and "\nmodule load cuda\n" in out
    assert "--trainer.devices 8 --trainer.num_nodes 4" in out
    assert out.rstrip().endswith("--trainer.max_steps 1000 --data.batch_size=32")


def test_cpu_job_runs_one_process_per_task(capsys, train_yaml):
    rc, out, _ = run_cli(
        capsys,
        "submit",
        "--config",
        str(train_yaml),
        "--recipe",
        "merino-tiny",
        "--gpus-per-node",
        "0",
        "--tasks-per-node",
        "2",
        "--python",
        "/opt/py 3/bin/python",
        "--dry-run",
    )
    assert rc == 0
    lines = sbatch_lines(out)
    assert "--ntasks-per-node=2" in lines and "--cpus-per-task=1" in lines
    assert not any(line.startswith("--gpus") for line in lines)
    assert "srun --kill-on-bad-exit=1 '/opt/py 3/bin/python' -m merino_pl.cli fit" in out
    assert "--trainer.accelerator cpu --trainer.devices 2 --trainer.num_nodes 1" in out


def test_cpu_job_defaults_to_one_task(capsys, train_yaml):
    rc, out, _ = run_cli(
        capsys, "submit", "--config", str(train_yaml), "--recipe", "merino-tiny", "--gpus-per-node", "0", "--dry-run"
    )
    assert rc == 0 and "--ntasks-per-node=1" in sbatch_lines(out)
    assert "--trainer.accelerator cpu --trainer.devices 1 --trainer.num_nodes 1" in out


def test_rendered_script_is_valid_bash(tmp_path):
    spec = JobSpec(
        config="a b.yaml",
        recipe="r'x.yaml",
        run_dir="runs/$HOME",
        setup=("echo hi",),
        fit_args=("--data.source", "a;b"),
    )
    path = tmp_path / "job.sbatch"
    path.write_text(render(spec))
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert "'runs/$HOME'" in path.read_text()  # quoted: no expansion of user text


def test_rendered_header_command_reproduces_the_script(capsys, train_yaml):
    spec = JobSpec(
        config=str(train_yaml),
        recipe="merino-tiny",
        run_dir="runs/x",
        nodes=2,
        partition="p",
        time="1:00:00",
        fit_args=("--trainer.max_steps", "5"),
    )
    command = shlex.split(spec.command_line())
    assert command[:3] == ["merino-pl", "slurm", "submit"]
    cut = command.index("--")
    rc, out, _ = run_cli(capsys, *command[2:cut], "--dry-run", *command[cut:])
    assert rc == 0 and out == render(spec)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_scripts_are_current(capsys, monkeypatch, name):
    text = (REPO / name).read_text()
    assert text == render(SHIPPED[name]), f"regenerate {name} with the command in its header"
    # ... and that command, run from the repo root, prints exactly this script
    command = shlex.split(re.search(r"^# Rendered by: (.*)$", text, re.M).group(1))
    monkeypatch.chdir(REPO)
    rc, out, err = run_cli(capsys, "submit", "--dry-run", *command[3:])
    assert (rc, err, out) == (0, "", text)


# -- bad input ----------------------------------------------------------------------------
def test_bad_input_reports_every_problem_in_one_line(capsys, tmp_path):
    rc, out, err = run_cli(
        capsys,
        "submit",
        "--config",
        str(tmp_path / "missing.yaml"),
        "--recipe",
        "nope",
        "--nodes",
        "0",
        "--gpus-per-node",
        "-1",
        "--time",
        "soon",
        "--job-name",
        "bash",
        "--dry-run",
        "--",
        "--trainer.devices",
        "3",
        "--ckpt_path=x",
    )
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    for needle in (
        "missing.yaml: no such file",
        "'nope'",
        "--nodes 0",
        "--gpus-per-node -1",
        "--time 'soon'",
        "--job-name bash",
        "--trainer.devices after `--`",
        "--ckpt_path after `--`",
    ):
        assert needle in err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--time", "00:01:00"], "longer than --signal-seconds 90"),
        (["--tasks-per-node", "4"], "--tasks-per-node is for CPU jobs"),
        (["--cpus-per-task", "0"], "--cpus-per-task 0"),
    ],
)
def test_inconsistent_options_are_rejected(capsys, train_yaml, argv, needle):
    rc, _, err = run_cli(capsys, "submit", "--config", str(train_yaml), "--recipe", "merino-tiny", *argv, "--dry-run")
    assert rc == 2 and needle in err


def test_sbatch_missing_suggests_dry_run(capsys, monkeypatch, train_yaml, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(capsys, "submit", "--config", str(train_yaml), "--recipe", "merino-tiny")
    assert rc == 2 and "sbatch not found" in err and "--dry-run" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_status_and_logs_need_a_submitted_run(capsys, tmp_path):
    for action in ("status", "logs"):
        rc, _, err = run_cli(capsys, action, str(tmp_path))
        assert rc == 2 and "no jobs recorded" in err


def test_time_limit_forms():
    assert time_limit_seconds("90") == 90 * 60
    assert time_limit_seconds("10:30") == 630
    assert time_limit_seconds("24:00:00") == 86400
    assert time_limit_seconds("2-00:00:00") == 2 * 86400
    assert time_limit_seconds("1-6") == 30 * 3600
    assert time_limit_seconds("1:2:3:4") is None and time_limit_seconds("soon") is None


def test_scripts_are_numbered_never_overwritten(tmp_path):
    first = write_new_script(tmp_path / "slurm", "one\n")
    (tmp_path / "slurm" / "job-005.sbatch").write_text("five\n")
    second = write_new_script(tmp_path / "slurm", "two\n")
    assert (first.name, second.name) == ("job-001.sbatch", "job-006.sbatch")
    assert first.read_text() == "one\n" and second.read_text() == "two\n"
    assert sorted(p.name for p in (tmp_path / "slurm").iterdir()) == [
        "job-001.sbatch",
        "job-005.sbatch",
        "job-006.sbatch",
    ]


# -- a recipe other than the config's ------------------------------------------------------
@pytest.mark.parametrize("action", ["submit", "chain"])
@pytest.mark.parametrize(
    "recipe, root, run_dir",
    [
        ("merino-64m", "runs/paper-64m", "runs/paper-64m"),  # the config's own recipe: the config's run
        (str(REPO / "recipes" / "merino-64m.yaml"), "runs/paper-64m", "runs/paper-64m"),  # the same, by path
        ("merino-52m", "runs/paper-64m", "runs/paper-merino-52m"),  # another: never the 64M run's checkpoints
        ("merino-52m", None, "runs/merino-52m"),  # no default_root_dir: runs/<recipe>, as fit does
    ],
)
def test_another_recipe_gets_its_own_run_dir(capsys, tmp_path, action, recipe, root, run_dir):
    config = tmp_path / "paper.yaml"
    config.write_text("model: {recipe: merino-64m}\n" + (f"trainer: {{default_root_dir: {root}}}\n" if root else ""))
    rc, out, err = run_cli(capsys, action, "--config", str(config), "--recipe", recipe, "--dry-run")
    assert (rc, err) == (0, "")
    assert f"\nRUN_DIR={run_dir}\n" in out and f"--output={run_dir}/slurm/%j.out" in sbatch_lines(out)
    if action == "chain":
        assert f"merino-pl export {run_dir}/checkpoints/last.ckpt --out {run_dir}/model" in out


# -- the chain ------------------------------------------------------------------------------
def chain_scripts(out: str) -> dict[str, tuple[str, str]]:
    """`slurm chain --dry-run`'s output as {stage: (its afterok line, its script)}."""
    parts = re.split(r"^# ---- (\S+)(?: \(afterok: ([^)]*)\))?\n", out, flags=re.M)[1:]
    return {parts[i]: (parts[i + 1] or "", parts[i + 2]) for i in range(0, len(parts), 3)}


def test_chain_dry_run_renders_every_stage_with_its_resources(capsys, train_yaml, tmp_path):
    stages = tmp_path / "stages.yaml"
    stages.write_text(
        "quantize: {bits: [8, 4], mem: 64G, time: '3:00:00', args: [--nsamples, '256']}\n"
        "eval: {partition: gpu-short, cpus: 4, args: [--tasks, none]}\n"
        "latency: {gpus: 0, cpus: 1, args: [--runs, '32']}\n"
    )
    run_dir = tmp_path / "my run"
    argv = ["--config", str(train_yaml), "--recipe", "merino-tiny", "--run-dir", str(run_dir), "--partition", "h100"]
    rc, out, err = run_cli(
        capsys, "chain", *argv, "--stages", str(stages), "--dry-run", "--", "--trainer.max_steps", "9"
    )
    assert (rc, err) == (0, "")
    scripts = chain_scripts(out)
    assert list(scripts) == ["fit", "export", "quantize-int8", "quantize-int4", "eval", "latency"]
    after = {name: deps for name, (deps, _) in scripts.items()}
    assert after == {
        "fit": "",
        "export": "fit",
        "quantize-int8": "export",
        "quantize-int4": "export",
        "eval": "export, quantize-int8, quantize-int4",
        "latency": "export, quantize-int8, quantize-int4",
    }

    def q(rel: str) -> str:
        return shlex.quote(f"{run_dir}/{rel}")

    fit, export, q8, q4, ev, lat = (script for _, script in scripts.values())
    assert fit == render(
        JobSpec(str(train_yaml), "merino-tiny", str(run_dir), partition="h100", fit_args=("--trainer.max_steps", "9"))
    )
    assert f"merino-pl export {q('checkpoints/last.ckpt')} --out {q('model')} --overwrite\n" in export
    assert "--cpus-per-task=4" in sbatch_lines(export) and "--gpus=1" not in sbatch_lines(export)
    assert f"merino-pl quantize {q('model')} --bits 4 --out {q('quantized/int4')} --overwrite --nsamples 256" in q4
    assert {"--gpus=1", "--mem=64G", "--time=3:00:00", "--partition=h100"} <= set(sbatch_lines(q8))
    assert {"--gpus=1", "--cpus-per-task=4", "--partition=gpu-short"} <= set(sbatch_lines(ev))
    for label, model in (("fp32", "model"), ("int8", "quantized/int8"), ("int4", "quantized/int4")):
        assert f"merino-pl eval {q(model)} --out {q('eval/' + label)} --tasks none\n" in ev
        assert f"merino-pl latency {q(model)} --precision {label} --out {q('latency/' + label)} --runs 32\n" in lat
    assert not any(line.startswith("--gpus") for line in sbatch_lines(lat))
    for name, (_, script) in scripts.items():
        assert f"--output={q('slurm/%j.out')}" in sbatch_lines(script), name  # quoted: the path has a blank
        path = tmp_path / f"{name}.sbatch"
        path.write_text(script)
        subprocess.run(["bash", "-n", str(path)], check=True)
    assert not run_dir.exists()  # a dry run writes nothing


def test_chain_of_a_cpu_fit_asks_for_no_gpus(capsys, train_yaml):
    rc, out, _ = run_cli(
        capsys, "chain", "--config", str(train_yaml), "--recipe", "merino-tiny", "--gpus-per-node", "0", "--dry-run"
    )
    assert rc == 0 and not any(line.startswith("--gpus") for line in sbatch_lines(out))


def test_shipped_chain_stages_load_and_render(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = ["--config", PAPER_CONFIG, "--recipe", "merino-64m", "--stages", "slurm/chain-pile.yaml", "--dry-run"]
    rc, out, err = run_cli(capsys, "chain", *argv)
    assert (rc, err) == (0, "")
    scripts = chain_scripts(out)
    assert "--calib EleutherAI/the_pile_deduplicated" in scripts["quantize-int4"][1]
    assert {"--gpus=1", "--mem=64G"} <= set(sbatch_lines(scripts["eval"][1]))
    # the config's W&B project reaches the stages that log their reports there (eval, quantize, latency)
    assert re.search(r"--out \S+/eval/int4 --wandb merino-pl --tasks paper", scripts["eval"][1])
    assert re.search(r"--out \S+/quantized/int8 --overwrite --wandb merino-pl --calib", scripts["quantize-int8"][1])
    assert re.search(r"--out \S+/latency/int4 --wandb merino-pl", scripts["latency"][1])


@pytest.mark.parametrize(
    "text, needles",
    [
        ("fit: {gpus: 1}\neval: {gpu: 1}\n", ["unknown stage 'fit'", "eval.gpu: unknown key"]),
        (
            "quantize: {bits: [3], cpus: 0, time: soon}\n",
            ["quantize.bits [3]", "quantize.cpus 0", "quantize.time 'soon'"],
        ),
        ("eval: {args: --tasks none}\nlatency: 3\n", ["eval.args '--tasks none'", "latency: expected a mapping"]),
        ("- export\n", ["expected a mapping of stages"]),
    ],
)
def test_chain_bad_stages_file_is_one_line(capsys, train_yaml, tmp_path, text, needles):
    stages = tmp_path / "stages.yaml"
    stages.write_text(text)
    argv = ["--config", str(train_yaml), "--recipe", "merino-tiny", "--stages", str(stages), "--dry-run"]
    rc, out, err = run_cli(capsys, "chain", *argv)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    for needle in needles:
        assert needle in err


def test_chain_refuses_an_earlier_chains_outputs_without_overwrite(capsys, train_yaml, tmp_path):
    (tmp_path / "run" / "quantized" / "int4").mkdir(parents=True)
    (tmp_path / "run" / "quantized" / "int4" / "model.safetensors").write_text("mine")
    argv = ["--config", str(train_yaml), "--recipe", "merino-tiny", "--run-dir", str(tmp_path / "run"), "--dry-run"]
    rc, _, err = run_cli(capsys, "chain", *argv)
    assert rc == 2 and "quantized/int4" in err and "--overwrite" in err
    rc, out, _ = run_cli(capsys, "chain", *argv, "--overwrite")
    assert rc == 0 and re.search(r"^# Rendered by: merino-pl slurm chain .* --overwrite", out, re.M)
    assert (tmp_path / "run" / "quantized" / "int4" / "model.safetensors").read_text() == "mine"


# -- the array prepare ----------------------------------------------------------------------
def test_prepare_dry_run_renders_the_array_and_its_merge(capsys, tmp_path):
    out_dir = tmp_path / "pile neox"
    argv = ["prepare", "data/*.jsonl", "--out", str(out_dir), "--tasks", "64", "--workers", "16", "--mem", "32G"]
    rc, out, err = run_cli(capsys, *argv, "--text-field", "body", "--dry-run")
    assert (rc, err) == (0, "")
    assert re.findall(r"^# ---- (.*)$", out, re.M) == ["prepare (array of 64)", "merge (afterok: prepare)"]
    array, merge = re.split(r"^# ---- .*\n", out, flags=re.M)[1:]
    q = shlex.quote(str(out_dir))
    assert {"--array=0-63", "--cpus-per-task=16", "--mem=32G", "--ntasks=1"} <= set(sbatch_lines(array))
    assert f"--output={shlex.quote(f'{out_dir}/slurm/%A_%a.out')}" in sbatch_lines(array)  # one log per task
    assert (
        f"\nmerino-pl prepare 'data/*.jsonl' --out {q} --num-tasks 64 --task-index \"$SLURM_ARRAY_TASK_ID\" "
        "--workers 16 --text-field body\n"
    ) in array
    assert merge.endswith(f"\nmerino-pl prepare --merge {q}\n")
    assert not any(line.startswith("--array") for line in sbatch_lines(merge))
    for name, script in (("array", array), ("merge", merge)):
        (tmp_path / name).write_text(script)
        subprocess.run(["bash", "-n", str(tmp_path / name)], check=True)
    # the header's command prints the same two scripts
    command = shlex.split(re.search(r"^# Rendered by: (.*)$", array, re.M).group(1))
    rc, again, _ = run_cli(capsys, *command[2:], "--dry-run")
    assert (rc, again) == (0, out) and not out_dir.exists()


def test_shipped_prepare_scripts_are_current(capsys, monkeypatch):
    """slurm/prepare-pile.sbatch and its -merge twin: what their header's command prints."""
    array, merge = (
        (REPO / "slurm" / name).read_text() for name in ("prepare-pile.sbatch", "prepare-pile-merge.sbatch")
    )
    command = shlex.split(re.search(r"^# Rendered by: (.*)$", array, re.M).group(1))
    monkeypatch.chdir(REPO)
    rc, out, err = run_cli(capsys, *command[2:], "--dry-run")
    assert (rc, err) == (0, "") and re.split(r"^# ---- .*\n", out, flags=re.M)[1:] == [array, merge]


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--tasks", "0", "--workers", "0", "--time", "soon"], ["--tasks 0", "--workers 0", "--time 'soon'"]),
        (["--tasks", "2", "--shard-tokens", "x"], ["--shard-tokens", "'x'"]),
    ],
)
def test_prepare_bad_input_is_one_line(capsys, tmp_path, argv, needles):
    rc, out, err = run_cli(capsys, "prepare", "embedded", "--out", str(tmp_path / "o"), *argv, "--dry-run")
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    for needle in needles:
        assert needle in err


def test_prepare_refuses_a_one_task_set(capsys, tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    rc, _, err = run_cli(capsys, "prepare", "embedded", "--out", str(tmp_path), "--tasks", "2", "--dry-run")
    assert rc == 2 and "one-task shard set" in err


# -- status / logs on a damaged jobs.json ------------------------------------------------
@pytest.mark.parametrize("text", ["{", "", "[1]", '{"a": 1}', '[{"x": 1}]', '[{"job_id": 7}]'])
@pytest.mark.parametrize("action", ["status", "logs"])
def test_malformed_jobs_file_is_one_line(capsys, tmp_path, action, text):
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "jobs.json").write_text(text)
    rc, out, err = run_cli(capsys, action, str(tmp_path))
    assert (rc, out) == (2, "") and len(err.strip().splitlines()) == 1
    assert "jobs.json" in err and "Traceback" not in err


# -- a real cluster -----------------------------------------------------------------------
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node cluster; SLURM_CONF points clients at it for the whole session."""
    reason = unavailable_reason()
    if reason:
        if os.environ.get("MERINO_REQUIRE_SLURM") == "1":
            pytest.fail(f"MERINO_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    cluster = LocalSlurmCluster(cpus=2)
    with cluster, pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(cluster.conf))
        yield cluster


def submit(tmp_path: Path, *argv: str) -> tuple[str, Path]:
    """`merino-pl slurm submit` in a subprocess (as a user would); returns (job id, run dir)."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "merino_pl.cli",
            "slurm",
            "submit",
            "--run-dir",
            str(run_dir),
            "--python",
            sys.executable,
            *argv,
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    return job_id, run_dir


def wait_for(job_id: str, run_dir: Path, timeout: float = 240, until=None) -> dict[str, str]:
    """Poll until the job ends (or ``until()`` is true); fail with the job's log on a timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = job_fields(job_id) or {}
        if fields.get("JobState") in TERMINAL or (until is not None and until()):
            return fields
        time.sleep(0.2 if until is not None else 1)  # `until` gates a signal: react quickly
    log = run_dir / "slurm" / f"{job_id}.out"
    pytest.fail(
        f"job {job_id} still {fields.get('JobState')} after {timeout} s; log:\n"
        + (log.read_text()[-4000:] if log.exists() else "(none)")
    )


def job_log(job_id: str, run_dir: Path) -> str:
    return (run_dir / "slurm" / f"{job_id}.out").read_text(errors="replace")


@pytest.mark.slurm
def test_srun_starts_two_tasks(slurm_cluster, tmp_path):
    """The cluster itself (seconds; the fit tests below need minutes): srun starts 2 ranks."""
    script = tmp_path / "probe.sbatch"
    script.write_text(
        "#!/bin/bash\n#SBATCH --job-name=probe\n#SBATCH --ntasks-per-node=2\n"
        f"#SBATCH --output={tmp_path}/%j.out\n"
        "srun bash -c 'echo rank $SLURM_PROCID of $SLURM_NTASKS on $SLURMD_NODENAME'\n"
    )
    job_id = subprocess.run(
        ["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert wait_for(job_id, tmp_path, timeout=60)["JobState"] == "COMPLETED"
    out = (tmp_path / f"{job_id}.out").read_text()
    assert "rank 0 of 2 on localhost" in out and "rank 1 of 2 on localhost" in out


# Tiny and short: 2 CPU tasks (DDP over gloo), 32-token sequences, no logger, no validation.
FIT_TINY = [
    "--config",
    str(FIT_CONFIG),
    "--recipe",
    "merino-tiny",
    "--gpus-per-node",
    "0",
    "--tasks-per-node",
    "2",
    "--cpus-per-task",
    "1",
    "--time",
    "15:00",
    "--",
    "--trainer.logger",
    "false",
    "--trainer.limit_val_batches",
    "0",
    "--trainer.log_every_n_steps",
    "2",
    "--data.seq_len",
    "32",
    "--data.batch_size",
    "2",
    "--model.warmup_steps",
    "2",
]


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


@pytest.fixture
def fit_available():
    if not FIT_CONFIG.exists():
        pytest.skip(f"{FIT_CONFIG.relative_to(REPO)} not in this checkout (training stage)")


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_trains_with_two_ddp_tasks_and_checkpoint_loads(slurm_cluster, fit_available, tmp_path, capsys):
    from merino_pl.core.checkpoint import load_model

    job_id, run_dir = submit(tmp_path, *FIT_TINY, "--trainer.max_steps", "4", "--checkpoint.every_n_train_steps", "2")
    fields = wait_for(job_id, run_dir)
    log = job_log(job_id, run_dir)
    assert fields["JobState"] == "COMPLETED", log[-4000:]
    assert "Starting with 2 processes" in log and "distributed_backend=gloo" in log  # DDP world of 2
    last = run_dir / "checkpoints" / "last.ckpt"
    assert ckpt_step(last) == 4
    loaded = load_model(last)
    assert loaded.kind == "lightning-ckpt" and loaded.recipe.name == "merino-tiny"
    assert sorted(p.name for p in (run_dir / "slurm").glob("job-*.sbatch")) == ["job-001.sbatch"]
    # status / logs read the recorded job
    assert merino_main(["slurm", "status", str(run_dir)]) == 0
    assert re.search(rf"^{job_id}\s+fit\s+-\s+COMPLETED\s", capsys.readouterr().out, re.M)
    assert merino_main(["slurm", "logs", str(run_dir), "-n", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


@pytest.mark.slurm
@pytest.mark.slow
def test_sigusr1_checkpoints_requeues_and_resumes(slurm_cluster, fit_available, tmp_path):
    """SIGUSR1 (what `--signal=SIGUSR1@90` sends before the time limit) mid-run: the ranks agree
    at a step boundary, save hpc_ckpt_1.ckpt together and requeue (Lightning's own handler saves
    inside the signal handler and can deadlock DDP: a CI run hung here); the job runs again and
    continues from that step to the end."""
    max_steps = 30
    job_id, run_dir = submit(
        tmp_path, *FIT_TINY, "--trainer.max_steps", str(max_steps), "--checkpoint.every_n_train_steps", "10"
    )
    # Training is under way once the first periodic checkpoint exists (step 10 of 30).
    fields = wait_for(job_id, run_dir, until=lambda: (run_dir / "checkpoints" / "last.ckpt").exists())
    assert fields.get("JobState") == "RUNNING", f"job ended before the signal: {job_log(job_id, run_dir)[-3000:]}"
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    fields = wait_for(job_id, run_dir, timeout=300)
    log = job_log(job_id, run_dir)
    assert fields["JobState"] == "COMPLETED", log[-4000:]
    assert fields["Restarts"] == "1", log[-4000:]
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert f"saved {hpc} at step" in log, log[-4000:]
    assert "Requeued SLURM job" in log and f"resuming from {hpc}" in log
    assert f"Restored all states from the checkpoint at {hpc}" in log
    resumed_at = ckpt_step(hpc)
    assert 10 <= resumed_at < max_steps  # the second run started there, not at 0 ...
    assert ckpt_step(run_dir / "checkpoints" / "last.ckpt") == max_steps  # ... and finished


# The chain's stages, as small as they go: INT4 only (the INT8 job is the same script with
# --bits 8, rendered in test_chain_dry_run_...), 2 calibration windows, 2 perplexity documents,
# one timed run. 1 CPU each: the 2-CPU cluster runs eval and latency side by side.
CHAIN_STAGES = """\
export: {cpus: 1, time: '10:00'}
quantize:
  {bits: [4], cpus: 1, time: '10:00', args: [--nsamples, '2', --seq-len, '32', --holdout, '1', --group-size, '64']}
eval: {cpus: 1, time: '10:00', args: [--tasks, none, --ppl, wikitext2, --data-files, wikitext2=embedded, --limit, '2']}
latency: {cpus: 1, time: '10:00', args: [--runs, '1', --warmup, '0', --generate-tokens, '0', --no-fast, --seq, '16']}
"""


@pytest.mark.slurm
@pytest.mark.slow
def test_chain_runs_every_stage_as_dependent_jobs(slurm_cluster, fit_available, tmp_path, capsys):
    """fit -> export -> quantize -> eval / latency on the local cluster, into a run directory with
    a blank in its name (the quoted --output): every job completes and every report is written."""
    stages = tmp_path / "stages.yaml"
    stages.write_text(CHAIN_STAGES)
    run_dir = tmp_path / "my run"
    fit_tiny = list(FIT_TINY)
    fit_tiny[fit_tiny.index("--tasks-per-node") + 1] = "1"  # one process: the chain is what is tested here
    proc = subprocess.run(
        [sys.executable, "-m", "merino_pl.cli", "slurm", "chain", "--run-dir", str(run_dir), "--python", sys.executable]
        + ["--stages", str(stages), *fit_tiny, "--trainer.max_steps", "2"],
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    ids = dict(re.findall(r"^submitted (\S+)\s+job (\d+)", proc.stdout, re.M))
    assert list(ids) == ["fit", "export", "quantize-int4", "eval", "latency"]
    for stage in ("eval", "latency"):  # the last two: once they ended, every job has
        wait_for(ids[stage], run_dir, timeout=600)
    states = {stage: (job_fields(job) or {}).get("JobState") for stage, job in ids.items()}
    logs = {
        stage: job_log(job, run_dir)[-2000:]
        for stage, job in ids.items()
        if (run_dir / "slurm" / f"{job}.out").exists()
    }
    assert states == dict.fromkeys(ids, "COMPLETED"), logs
    reports = ["model/config.json", "quantized/int4/quantize_report.json"]
    reports += [f"{stage}/{label}/{stage}.json" for stage in ("eval", "latency") for label in ("fp32", "int4")]
    assert [r for r in reports if not (run_dir / r).is_file()] == []
    capsys.readouterr()
    assert merino_main(["slurm", "status", str(run_dir)]) == 0
    out = capsys.readouterr().out
    for stage, job in ids.items():
        assert re.search(rf"^{job}\s+{stage}\s+\S+\s+COMPLETED\s", out, re.M), out
    assert merino_main(["slurm", "logs", str(run_dir), "-n", "1"]) == 0
    heads = re.findall(r"^==> (\S+) job (\d+): ", capsys.readouterr().out, re.M)
    assert heads == list(ids.items())


def split_tokens(out: Path, split: str) -> bytes:
    """A split's token stream as bytes: its shard files back to back, in manifest order."""
    manifest = json.loads((out / "manifest.json").read_text())
    return b"".join((out / entry["file"]).read_bytes() for entry in manifest["splits"][split])


@pytest.mark.slurm
def test_array_prepare_gives_the_one_task_shards(slurm_cluster, tmp_path, capsys):
    """`slurm prepare --tasks 2` on the local cluster (2 array tasks, then the merge job): the
    merged set's train and validation streams are byte-identical to a one-task `prepare`."""
    from test_data import write_corpus

    write_corpus(tmp_path / "corpus", n_docs=90, n_files=3)
    common = ["--shard-tokens", "300", "--val-fraction", "0.1", "--docs-per-batch", "7"]
    assert (
        merino_main(["prepare", str(tmp_path / "corpus"), "--out", str(tmp_path / "one"), "--workers", "1", *common])
        == 0
    )
    two = tmp_path / "two parts"
    proc = subprocess.run(
        [sys.executable, "-m", "merino_pl.cli", "slurm", "prepare", str(tmp_path / "corpus"), "--out", str(two)]
        + ["--tasks", "2", "--workers", "1", "--time", "10:00", "--python", sys.executable, *common],
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    array_id, merge_id = re.search(r"submitted prepare job (\d+) \(array of 2\); merge job (\d+)", proc.stdout).groups()
    fields = wait_for(merge_id, two, timeout=300)
    logs = {p.name: p.read_text()[-1500:] for p in (two / "slurm").glob("*.out")}
    assert fields["JobState"] == "COMPLETED", logs
    assert sorted(logs) == sorted([f"{array_id}_0.out", f"{array_id}_1.out", f"{merge_id}.out"])
    assert json.loads((two / "manifest.json").read_text())["parts"] == 2
    for split in ("train", "val"):
        assert split_tokens(two, split) == split_tokens(tmp_path / "one", split), split
    capsys.readouterr()
    assert merino_main(["slurm", "status", str(two)]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^{array_id}\s+prepare\s+-\s+COMPLETED", out, re.M), out
    assert re.search(rf"^{merge_id}\s+merge\s+{array_id}\s+COMPLETED", out, re.M), out


@pytest.mark.slurm
def test_chain_is_all_or_nothing_when_sbatch_refuses_a_job(slurm_cluster, tmp_path):
    """The last job's partition does not exist: sbatch refuses it, the five jobs already queued
    (fit held) are cancelled before any ran, and the error is sbatch's message in one line."""
    stages = tmp_path / "stages.yaml"
    stages.write_text("latency: {partition: no-such-partition}\n")
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "merino_pl.cli", "slurm", "chain", "--run-dir", str(run_dir), "--stages", str(stages)]
        + ["--config", str(FIT_CONFIG), "--recipe", "merino-tiny", "--gpus-per-node", "0", "--time", "10:00"],
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "sbatch rejected job-006.sbatch" in proc.stderr and "partition" in proc.stderr.lower()
    jobs = json.loads((run_dir / "slurm" / "jobs.json").read_text())
    assert [j["stage"] for j in jobs] == ["fit", "export", "quantize-int8", "quantize-int4", "eval"]
    states = {(job_fields(j["job_id"]) or {}).get("JobState") for j in jobs}
    assert states == {"CANCELLED"}, states
    assert sorted(p.name for p in (run_dir / "slurm").glob("*.sbatch"))[-1] == "job-005.sbatch"
    assert list((run_dir / "slurm").glob("*.out")) == []  # none of them started
