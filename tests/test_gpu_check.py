"""tools/gpu_check.py: the dry run goes through every step on the CPU; a step that fails or runs out of
time is reported with its output, and the check goes on."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tools import gpu_check
from tests.test_bench import check_quick_run

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_check_runs_every_step_and_reports_each_run(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--dry", "--work", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    report = (tmp_path / "gpu.md").read_text()
    assert report.strip() == result.stdout.strip()
    steps = dict(re.findall(r"^\| ((?:pytest|bench|synthetic|train)[^|]*?) \| (\w+)", report, re.M))
    runs = [f"train: {name}" + (" (dry: without --compile)" if "--compile" in flags else "")
            for name, flags in gpu_check.RUNS.items()]
    assert steps == dict.fromkeys(["pytest -m cuda", "bench", "synthetic faces", *runs], "ok")
    assert re.search(r"`pytest -m cuda tests`: \d+ skipped", report)  # no GPU here
    assert "| FaceNN | channels_last | eager | " in report  # bench's table
    check_quick_run((tmp_path / "logs" / "bench.log").read_text())
    for name, flags in gpu_check.RUNS.items():
        row = next(line for line in report.splitlines() if line.startswith(f"| {name}"))
        workers, first, later = row.split(" | ")[2:5]
        assert workers == "1" and float(first.replace(",", "")) > 0 and float(later.replace(",", "")) > 0, row
        # each row takes the data path it takes on a GPU: auto decodes and augments on the device
        log = (tmp_path / "logs" / re.sub(r"[^A-Za-z0-9]+", "_", f"train: {row.split(' | ')[0][2:]}").strip("_")).with_suffix(".log")
        on_device = "--augment-on-device" not in flags
        assert ("decoding and augmenting on the device" in log.read_text()) is on_device, row
        assert f"--augment-on-device {'on' if on_device else 'off'}" in row.split(" | ")[1], row
        assert row.split(" | ")[1].count("--augment-on-device") == 1, row  # said once, as the run was told


def alive(pid: int) -> bool:
    for _ in range(50):  # an orphan is gone once init has reaped it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.1)
    return True


def test_a_failed_step_is_reported_with_its_output_and_the_check_goes_on(tmp_path):
    check = gpu_check.Check(gpu_check.SETTINGS["dry"], tmp_path, tmp_path / "gpu.md", budget_s=120, dry=True)
    status, _ = check.run("broken", ["-c", "import sys; print('the reason it broke'); sys.exit(3)"], 60)
    assert status == "failed (exit status 3)"
    started = time.monotonic()  # a step out of time stops, with the processes it started
    status, output = check.run("stuck", ["-c", "import subprocess, sys, time; child = subprocess.Popen([sys.executable, "
                                         "'-c', 'import time; time.sleep(600)']); print('waiting', child.pid, flush=True); "
                                         "time.sleep(600)"], 3)
    assert status == "out of time (3 s)" and time.monotonic() - started < 30
    assert not alive(int(re.search(r"waiting (\d+)", output).group(1)))
    assert check.run("fine", ["-c", "print('ok')"], 60)[0] == "ok"
    check.deadline = time.monotonic()  # the budget spent: the next step does not start
    assert check.run("late", ["-c", "print('too late')"], 60)[0] == "not run"
    report = (tmp_path / "gpu.md").read_text()
    for row in ("| broken | failed (exit status 3) |", "| stuck | out of time (3 s) |", "| fine | ok |", "| late | not run"):
        assert row in report
    assert "the reason it broke" in report and "waiting" in report and "too late" not in report
