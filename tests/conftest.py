"""Shared test fixtures: tiny configs on CPU, one thread (2 threads on 2 busy cores made tiny
steps 4x slower), offline hubs, W&B never prompting."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

from merino_pl.core.config import BlockConfig, MerinoConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def tiny_arch(vocab_size: int = 512, **kw) -> MerinoConfig:
    """A 4-block model small enough for ~ms forwards; widths change so projections exist."""
    blocks = (
        BlockConfig(embed_dim=64, ffn_ratio=2, num_layers=2),
        BlockConfig(embed_dim=64, ffn_dim=96, num_layers=1),
        BlockConfig(embed_dim=128, ffn_ratio=1.5, num_layers=3),
        BlockConfig(embed_dim=128, ffn_ratio=1, num_layers=1),
    )
    return MerinoConfig(blocks=blocks, vocab_size=vocab_size, d_model=96, max_position_embeddings=128, **kw)


def quantize_argv(src, out=None, *extra, **flags) -> list[str]:
    """``quantize SRC --flag value ... EXTRA... [--out OUT]`` for the CLI, flags in the order given:
    keyword ``group_size=32`` -> ``--group-size 32``; ``True`` -> the bare flag (``desc_act=True`` ->
    ``--desc-act``); ``None`` / ``False`` -> left out; every value through ``str()`` untouched (so a
    bad value stays bad); ``extra``: raw args appended as given, before ``--out``."""
    argv = ["quantize", str(src)]
    for key, value in flags.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    argv += [str(a) for a in extra]
    if out is not None:
        argv += ["--out", str(out)]
    return argv


@pytest.fixture
def arch() -> MerinoConfig:
    return tiny_arch()


@pytest.fixture
def wikitext_raw() -> Path:
    """WikiText-2 raw test split: the copy shipped in the package (tests need nothing outside the repository)."""
    from merino_pl.core.assets import embedded_wikitext2

    return embedded_wikitext2()


@pytest.fixture(autouse=True)
def _no_leaked_ddp_rendezvous():
    """Lightning's in-process DDP sets MASTER_PORT / MASTER_ADDR in os.environ and leaves them; a later
    `sbatch` exports them into its job, whose DDP then binds a port a SLURM daemon holds by now."""
    yield
    for name in ("MASTER_PORT", "MASTER_ADDR"):
        os.environ.pop(name, None)


@pytest.fixture
def mount_tmpfs(tmp_path: Path):
    """``mount_tmpfs(size, name=None)``: a fresh tmpfs of ``size`` (e.g. "64k") under ``tmp_path``,
    by default named with a space and non-ASCII letters; unmounted after the test. The test skips
    where mounting is not allowed."""
    import subprocess

    mounted: list[Path] = []

    def mount(size: str, name: str | None = None) -> Path:
        mnt = tmp_path / (name or f"full disk ü{len(mounted)}")
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``pytest -n N`` (pytest-xdist, as `make test` runs it): the tests that start a local
    SLURM cluster or a multi-process DDP run share one worker (``--dist loadgroup``), so no two of
    them hold the cluster's or DDP's ports at once."""
    for item in items:
        if item.path.name in ("test_slurm.py", "test_data_scale.py") or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("cluster"))
