"""`search --tokens`: the study evidence for the chosen proxy at the planned regime, in the recipe and
the output; the paper's proxy stays the default unless that evidence is decisive against it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _evidence(path: Path, entropy_ci: tuple[float, float], params_ci: tuple[float, float]) -> Path:
    """Evidence whose points cover every regime from 1 to ~1e6 tokens per parameter (one per octave)."""

    def corr(ci):
        return {
            "n": 8,
            "spearman": round(sum(ci) / 2, 4),
            "spearman_ci": list(ci),
            "kendall": 0.0,
            "kendall_ci": [0, 0],
        }

    points = [
        {
            "tokens": 0,
            "tokens_per_decoder_param": 2.0**k,
            "proxies": {"entropy:paper": corr(entropy_ci), "decoder_params": corr(params_ci)},
            "noise_ceiling": corr((0.8, 1.0)),
        }
        for k in range(21)
    ]
    path.write_text(
        json.dumps(
            {
                "format": "merino-proxy-evidence/1",
                "source": "a test",
                "entropy": {"paper": {"beta": 0.0625}},
                "points": points,
            }
        )
    )
    return path


def _search(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = ["--budget", "flops=5G", "--space", str(ROOT / "search/space-study.yaml"), "--exhaustive", "--no-plot"]
    return subprocess.run(
        [sys.executable, "-m", "merino_pl.cli", "search", *base, *args], capture_output=True, text=True, env=env
    )


def test_tokens_records_and_prints_the_evidence(tmp_path):
    ev = _evidence(tmp_path / "ev.json", (-0.2, 0.6), (0.1, 0.9))
    r = _search(tmp_path, "--tokens", "4.9M", "--evidence", str(ev), "--out", str(tmp_path / "r.yaml"))
    assert r.returncode == 0, r.stderr[-2000:]
    prov = yaml.safe_load((tmp_path / "r.yaml").read_text())["provenance"]
    assert prov["proxy"] == "entropy" and "proxy_choice" not in prov  # not decisive: the paper's default stays
    e = prov["evidence"]
    assert e["planned_tokens"] == 4_900_000 and e["status"] == "measured" and e["rho"] == 0.2
    assert e["tokens_per_decoder_param"] == 4_900_000 / (prov["costs"]["params"] - 2048 * 128 - 256 * 128)
    assert "evidence for proxy entropy at" in r.stdout and "not distinguishable from chance" in r.stdout
    fit = tmp_path / "fit.yaml"  # the planned tokens read from a fit config
    fit.write_text(
        yaml.safe_dump({"trainer": {"max_steps": 10000, "devices": 2}, "data": {"batch_size": 4, "seq_len": 64}})
    )
    r = _search(tmp_path, "--tokens", str(fit), "--evidence", str(ev), "--proxy", "params")
    assert r.returncode == 0 and "planned_tokens: 5120000" in r.stdout and "ranks forwards" in r.stdout


def test_decisive_evidence_changes_only_the_default(tmp_path):
    ev = _evidence(tmp_path / "ev.json", (-0.9, -0.3), (0.4, 0.95))
    r = _search(tmp_path, "--tokens", "2M", "--evidence", str(ev), "--out", str(tmp_path / "d.yaml"))
    assert r.returncode == 0, r.stderr[-2000:]
    prov = yaml.safe_load((tmp_path / "d.yaml").read_text())["provenance"]
    assert prov["proxy"] == "params" and "ranks backwards" in prov["proxy_choice"]
    assert "searched with params" in r.stdout and prov["evidence"]["proxy"] == "params"
    r = _search(
        tmp_path, "--tokens", "2M", "--evidence", str(ev), "--proxy", "entropy", "--out", str(tmp_path / "u.yaml")
    )
    prov = yaml.safe_load((tmp_path / "u.yaml").read_text())["provenance"]
    assert prov["proxy"] == "entropy" and prov["evidence"]["rho"] == -0.6 and "proxy_choice" not in prov


def test_bad_tokens_and_evidence_are_one_line(tmp_path):
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    fit = tmp_path / "fit.yaml"
    fit.write_text(yaml.safe_dump({"trainer": {"max_steps": "many"}, "data": {"batch_size": 4}}))
    for args, named in [
        (["--tokens", "12x"], "'12x'"),
        (["--tokens", "0"], "'0'"),
        (["--tokens", str(fit)], "trainer.max_steps='many'"),
        (["--tokens", "1M", "--evidence", str(tmp_path / "bad.json")], "bad.json is not a proxy evidence file"),
        (["--tokens", "1M", "--evidence", str(tmp_path / "none.json")], "none.json"),
    ]:
        r = _search(tmp_path, *args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and named in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
