"""The `hgrn2` console script and `python -m hgrn2` answer --help and --print_config."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HGRN2 = str(Path(sys.executable).with_name("hgrn2"))


@pytest.mark.parametrize(
    "args, expected",
    [
        ([HGRN2, "--help"], "{fit,validate,test,predict"),
        ([HGRN2, "fit", "--help"], "--trainer.max_steps"),
        ([HGRN2, "fit", "--print_config"], "trainer:"),
        ([sys.executable, "-m", "hgrn2", "--help"], "{fit,validate,test,predict"),
    ],
)
def test_cli_answers_help_and_print_config(args, expected):
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected in result.stdout


def test_cli_rejects_an_unknown_config_key_with_its_name():
    result = subprocess.run(
        [HGRN2, "fit", "--trainer.max_stepz", "3", "--print_config"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode != 0
    assert "max_stepz" in result.stderr
