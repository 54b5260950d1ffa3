"""A local lm-eval task YAML that lm-eval cannot read is named with what is wrong with it, not
reported as an "unknown task" (issue 28, messages)."""

from __future__ import annotations

from pathlib import Path

import pytest

from merino_pl.cli import main

pytest.importorskip("lm_eval")

GOOD = "task: ppl_good\ndataset_path: json\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\n"


@pytest.mark.parametrize(
    "text,needles",
    [
        ("task: ppl_local\ndataset_path: json\n  output_type: [unclosed\n", ["not a readable task YAML"]),
        ("task: ppl_local\noutput_type: loglikelihood_rolling\n", ["task 'ppl_local' has no dataset_path"]),
        ("task: [ppl_local]\ndataset_path: json\n", ["`task:` must be a task name"]),
    ],
    ids=["syntax", "no-dataset", "task-not-a-name"],
)
def test_bad_local_task_yaml_says_what_is_wrong(tmp_path: Path, capsys, text: str, needles: list[str]) -> None:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "good.yaml").write_text(GOOD)
    (tasks / "bad.yaml").write_text(text)
    argv = ["eval", "merino-tiny", "--tasks", "ppl_local", "--ppl", "none", "--include-path", str(tasks)]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "unknown task" not in err, err
    for needle in ["bad local task YAML", str(tasks / "bad.yaml"), *needles]:
        assert needle in err, (needle, err)
    assert not (tmp_path / "out").exists()
