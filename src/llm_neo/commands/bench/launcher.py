"""The whole runs' launcher: ``python -S -I PATH/launcher.py RESULT LOG INTERVAL -- COMMAND...``.

Started by path with ``-S -I`` (no site-packages, not even this package: a few MiB) between the bench and
each whole run. Any process started from the bench itself (fork, or vfork + exec) would report at least
the bench's peak RSS as its ru_maxrss: the kernel keeps the larger of the old and new address spaces'
peaks across exec. Started from this launcher, the run inherits the launcher's few MiB. The launcher
samples the run's VmRSS and VmHWM (KiB) every INTERVAL seconds, timestamps its log lines, reaps it with
os.wait4 and writes what it saw to RESULT as JSON: start, end, returncode, ru_maxrss_kib, ru_utime_s,
ru_stime_s, launcher_hwm_kib, samples ``[[t, VmRSS, VmHWM]]`` and lines ``[[t, text]]``.

Standard library only, and no import of llm_neo: ``python -m llm_neo.commands.bench.launcher`` would work
but import the bench (torch and all) into the launcher first, which is what it exists to avoid.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

# Only what the standard library has loaded anyway or costs little: pathlib and typing would add MiB.
PATH = os.path.realpath(__file__)


def vm(pid: int | str) -> tuple[int, int]:
    """VmRSS and VmHWM (KiB) of process ``pid`` ("self": this one)."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def main(argv: list[str]) -> int:
    """Run ``COMMAND`` (after ``--``) to its end, sampling it; write RESULT. The exit status is 0 once
    RESULT is written, whatever the command's (RESULT says that)."""
    result, log_path, interval, command = argv[0], argv[1], float(argv[2]), argv[4:]
    launcher_hwm = vm("self")[1]
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    start = time.time()
    pid = os.fork()
    if pid == 0:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        try:
            os.execv(command[0], command)
        finally:
            os._exit(127)
    os.close(fd)
    log = open(log_path, "rb")  # noqa: SIM115 (read while the run writes it, to the end)
    pending, lines, samples = b"", [], []
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        now = time.time()
        data = log.read()
        if data:
            *complete, pending = (pending + data).replace(b"\r", b"\n").split(b"\n")
            lines += [[round(now - start, 3), s.decode("utf-8", "replace")] for s in complete if s.strip()]
        if done:
            break
        with contextlib.suppress(OSError, KeyError, ValueError):  # the run just exited
            samples.append([round(now - start, 3), *vm(pid)])
        time.sleep(interval)
    out: dict[str, object] = {
        "start": start,
        "end": now,
        "returncode": os.waitstatus_to_exitcode(status),
        "ru_maxrss_kib": usage.ru_maxrss,
        "ru_utime_s": usage.ru_utime,
        "ru_stime_s": usage.ru_stime,
        "launcher_hwm_kib": launcher_hwm,
        "samples": samples,
        "lines": lines,
    }
    with open(result + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(result + ".tmp", result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
