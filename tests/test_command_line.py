"""The command line before Hydra reads it: `-m` is taken anywhere, as users type it."""

from __future__ import annotations

import pytest

from lmstack.config.argv import multirun_flag_first

from conftest import run_cli


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["run.py", "a=1", "-m", "b=2"], ["run.py", "-m", "a=1", "b=2"]),
        (["run.py", "a=1", "b=2", "--multirun"], ["run.py", "--multirun", "a=1", "b=2"]),
        (["run.py", "-m", "a=1"], ["run.py", "-m", "a=1"]),
        (["run.py", "a=1", "b=2"], ["run.py", "a=1", "b=2"]),
        # a "-m" that is another flag's value stays where it is
        (["run.py", "-cn", "-m", "a=1"], ["run.py", "-cn", "-m", "a=1"]),
        # said twice: once is enough
        (["run.py", "-m", "a=1", "-m"], ["run.py", "-m", "a=1"]),
    ],
)
def test_the_multirun_flag_moves_to_the_front(argv, expected):
    assert multirun_flag_first(argv) == expected


def test_the_headline_sweep_takes_an_override_after_the_flag(tmp_path):
    """`python run.py objective=dpo adapter=qlora -m hydra.sweep.dir=...`: Hydra's own parser
    stops at such a command with "unrecognized arguments"; lmstack runs the sweep (a plan, to
    stay quick) into the named sweep dir."""
    sweep_dir = tmp_path / "my-sweep"
    result = run_cli(
        "objective=dpo",
        "adapter=qlora",
        "-m",
        f"hydra.sweep.dir={sweep_dir}",
        "phase=plan",
        "logger=none",
        output_dir=tmp_path,
    )
    assert "unrecognized arguments" not in result.stderr
    assert "1 points: 1 finished" in result.stdout
    assert (sweep_dir / "summary.md").is_file()
