from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from merino_pl.cli import main

# Paper Table 8 (params) and the paper's FLOPs budgets by the FLOPs convention (core/costs.py), vocab 50272
PAPER = {"merino-52m": (52.6e6, 60e9), "merino-61m": (61.3e6, 107e9), "merino-64m": (64.1e6, 163e9)}


@pytest.mark.parametrize("name", PAPER)
def test_info_reproduces_paper_sizes(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(REPO / "recipes" / f"{name}.yaml"), "--vocab-size", "50272", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    params, flops = PAPER[name]
    assert abs(s["params"] - params) <= 0.2e6
    assert abs(s["flops"] - flops) / flops <= 0.03
    assert s["flops_with_lm_head"] == s["flops"] + 2 * 1024 * 768 * 50272
    assert len(s["blocks"]) == 4 and s["kv_cache_bytes_fp16"] > 0


def test_info_table_and_shipped_vocab(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "merino-52m"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "FLOPs (paper convention)" in out and "KV cache @ 2048" in out


BAD_ARGS = {
    "missing-file": (["info", "does/not/exist.yaml"], "does/not/exist.yaml"),
    "unknown-command": (["infos"], "unknown command 'infos'"),
    "bad-vocab": (["info", "merino-tiny", "--vocab-size", "0"], "--vocab-size"),
}


@pytest.mark.parametrize("case", BAD_ARGS, ids=list(BAD_ARGS))
def test_bad_cli_input_is_one_line_exit_2(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv, needle = BAD_ARGS[case]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_recipe_through_console_script(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "recipes" / "merino-tiny.yaml").read_text().replace("embed_dim: 128", "embed_dim: 100", 1))
    exe = Path(sys.executable).with_name("merino-pl")
    proc = subprocess.run([str(exe), "info", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and str(bad) in proc.stderr and "100" in proc.stderr
    assert "Traceback" not in proc.stderr


# Commands that must start without the deep-learning stack: run as `python -m merino_pl.cli ...`
# in a fresh interpreter, then report which heavy packages ended up in sys.modules.
LIGHT_COMMANDS = {
    "help": ["--help"],
    "info": ["info", "recipes/merino-52m.yaml"],
    "info-json": ["info", "recipes/merino-52m.yaml", "--json"],
    "prepare-help": ["prepare", "--help"],
    # the model stages load torch to run, not to show their options
    **{
        f"{c}-help": [c, "--help"]
        for c in ("search", "demo", "export", "eval", "quantize", "latency", "slurm", "pipeline")
    },
    "latency-plot-help": ["latency", "plot", "--help"],
}
HEAVY = ("torch", "transformers", "lightning", "datasets")
_REPORT_HEAVY = """
import json, runpy, sys
argv = json.loads(sys.argv[1])
sys.argv = ["merino-pl", *argv]
try:
    runpy.run_module("merino_pl.cli", run_name="__main__", alter_sys=True)
except SystemExit as e:
    assert e.code in (0, None), e.code
print("HEAVY=" + json.dumps([m for m in {heavy!r} if m in sys.modules]))
"""


@pytest.mark.parametrize("case", LIGHT_COMMANDS, ids=list(LIGHT_COMMANDS))
def test_light_commands_import_no_torch(case: str) -> None:
    code = _REPORT_HEAVY.format(heavy=HEAVY)
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(LIGHT_COMMANDS[case])], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last == "HEAVY=[]", f"{case} imported {last}"


def test_import_merino_pl_is_light_and_lazy() -> None:
    code = (
        "import sys, merino_pl; assert not {'torch', 'transformers'} & set(sys.modules); "
        "assert merino_pl.load_recipe('merino-tiny').name == 'merino-tiny'; "
        "assert 'torch' not in sys.modules; print(merino_pl.MerinoForCausalLM.__name__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "MerinoForCausalLM"
