"""Train the default demo's teacher and ship it: ``python -m llm_neo.demo.ship_teacher``.

A maintainer's tool, run once per change of what shapes the teacher (``demo.run.teacher_key``): it
trains the teacher exactly as ``llm-neo demo --train-teacher`` does (the same code, ``ensure_teacher``,
into a fresh cache directory), scores it on the default demo's held-out split, and writes it into the
package (``llm_neo/demo/teacher/``) with its recipe, the sha256 of every file and its held-out score in
``teacher.json``. ``llm-neo demo`` then uses it instead of training it (see ``demo.run.shipped_teacher``);
tests/demo/test_shipped_teacher.py checks the files against their checksums and the score.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from llm_neo.demo.run import DEFAULT, SHIPPED_TEACHER, ensure_teacher, heldout_score, ship, write_task_data


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the training (default 2)")
    parser.add_argument("--dest", type=Path, default=SHIPPED_TEACHER, help="where to write the teacher")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llm-neo-ship-") as tmp:
        root = Path(tmp)
        train, _, heldout = write_task_data(root / "data", DEFAULT, 0)
        meta = ensure_teacher(
            DEFAULT, seed=0, data=train, cache=root / "cache", device="cpu", threads=args.threads, train=True
        )
        score = heldout_score(Path(meta["path"]), heldout)
        print(
            f"held-out exact match: {100 * score['accuracy']:.1f}% ({score['correct']} of {score['total']})"
        )
        ship(Path(meta["path"]), args.dest, heldout=score)
        shutil.rmtree(root / "cache", ignore_errors=True)
    print(f"shipped: {args.dest}")


if __name__ == "__main__":
    main()
