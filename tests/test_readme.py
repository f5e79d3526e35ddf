"""The README's quick start, run exactly as written in a fresh directory: the student it distills moves
towards the teacher on held-out records (lower KL and CE, higher agreement than the pruned student)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start() -> str:
    section = README.read_text().split("## Quick start on tiny local models", 1)[1]
    return section.split("```bash\n", 1)[1].split("\n```", 1)[0]


def eval_row(output: str, model: str) -> dict[str, float]:
    """The numbers of ``model``'s row in an `llm-neo eval` table printed in ``output``."""
    header = next(line for line in output.splitlines() if line.startswith("| | ce |"))
    names = [c.strip() for c in header.strip("|").split("|")][1:]
    row = next(line for line in output.splitlines() if line.startswith(f"| {model} |"))
    cells = [c.strip().replace(",", "") for c in row.strip("|").split("|")][1:]
    return dict(zip(names, map(float, cells), strict=True))


@pytest.mark.slow
def test_the_quick_start_shows_the_student_moving_towards_the_teacher(tmp_path):
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", "-e", "-c", quick_start()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    before, after = eval_row(done.stdout, "tiny/student"), eval_row(done.stdout, "runs/neo/merged")
    assert after["kl_to_teacher"] < 0.8 * before["kl_to_teacher"], (before, after)
    assert after["top1_agreement"] > before["top1_agreement"] and after["ce"] < before["ce"], (before, after)
    # The numbers the README quotes are the ones it prints (same seeds, same CPU kernels).
    quoted = re.search(
        r"`ce` ([\d.]+), `kl_to_teacher` ([\d.]+) and `top1_agreement` ([\d.]+) become", README.read_text()
    )
    assert quoted is not None
    assert [float(x) for x in quoted.groups()] == pytest.approx(
        [before["ce"], before["kl_to_teacher"], before["top1_agreement"]], abs=2e-3
    )
    assert (tmp_path / "runs" / "neo" / "eval.json").is_file()
