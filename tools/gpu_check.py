"""One command that turns a GPU at hand into measured figures, in one markdown report:

    make gpu-check PYTHON=python3     # python -m tools.gpu_check: on a GPU machine, with its own python
    make gpu-check-dry                # python -m tools.gpu_check --dry: the same steps, tiny, on the CPU

The steps: the tests marked `cuda`; tools/bench.py; a synthetic face set generated on the machine; then
run_training.py once for each row of RUNS, reported from the run's metrics.csv. A GPU is lent for
minutes, so each step is a subprocess with its own time limit under one budget for the whole check:
a step that fails or runs out of time goes into the report with the tail of its output, and the check
goes on. The report is rewritten after every step, so a check stopped from outside keeps what it
finished. It installs nothing and needs no venv: the machine's torch, torchvision, lightning,
torchmetrics, matplotlib and pytest.
"""

import argparse
import os
import platform
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import torch

import config
from cli import ArgumentParser, atomic_write, log
from training import epoch_metrics

ROOT = Path(__file__).resolve().parents[1]  # the repository: where every step runs

# The end-to-end runs, in the order they run: name -> run_training.py flags (the only place that
# names data-path flags). --compile goes last: its first epoch compiles, the longest warm-up. The
# peak-memory goal is checked on the runs with the default data path.
RUNS = {
    "defaults": [],
    "CPU workers augment": ["--augment-on-device", "off"],
    "--recompute-gelu": ["--recompute-gelu"],
    "--compile": ["--compile"],
}
# What a real check runs, and the tiny stand-in of --dry. Seconds are each step's own time limit.
# The GPU's face set: 50 batches of 256 an epoch and one dev batch of 256, so that torch.compile
# meets one batch shape in training and one in validation.
SETTINGS = {
    "gpu": dict(
        pytest_s=100,
        bench=["--device", "cuda", "--batch-size", "128", "--repeats", "5", "--warmup", "2", "--no-compile"],
        bench_s=100,
        faces=dict(identities=128, train_per_identity=100, dev_per_identity=2, image_size=224), faces_s=60,
        train=["--batch-size", "256", "--epochs", "3"], run_s=75, compiled_run_s=150,
        budget_s=390,
    ),
    "dry": dict(
        pytest_s=60,
        bench=["--device", "cpu", "--quick"], bench_s=90,
        faces=dict(identities=4, train_per_identity=8, dev_per_identity=1, image_size=32), faces_s=60,
        train=["--batch-size", "8", "--epochs", "2", "--accelerator", "cpu", "--num-workers", "1",
               "--widths", "8,16,24,32", "--depths", "1,1,1,1"], run_s=90, compiled_run_s=90,
        budget_s=400,
    ),
}
GOAL_IMG_PER_S, GOAL_MEMORY = 5000, 12e9  # end-to-end training at 224 px, batch 256; peak memory there


class Check:
    """Runs the steps against one deadline and keeps the report up to date."""

    def __init__(self, settings: dict, work: Path, report: Path, budget_s: float, dry: bool):
        self.settings, self.work, self.report, self.dry = settings, work, report, dry
        self.start = time.monotonic()
        self.deadline = self.start + budget_s
        self.steps: list[tuple[str, str, float]] = []  # (step, status, seconds)
        self.sections: list[str] = []
        self.failures: list[str] = []
        self.header = environment(dry)

    def run(self, name: str, argv: list[str], limit_s: float) -> tuple[str, str]:
        """Runs argv (a command of this repository) as a step: returns (status, its output)."""
        left = self.deadline - time.monotonic()
        if left < 10:
            self.record(name, "not run: the check's time budget was spent", 0.0, "")
            return "not run", ""
        log_path = self.work / "logs" / f"{slug(name)}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        limit = min(limit_s, left)
        log(f"[{self.elapsed():.0f} s] {name}: {' '.join(argv)} (limit {limit:.0f} s)")
        started = time.monotonic()
        with open(log_path, "w") as out:
            # a session of its own, so that a step out of time goes with its data workers and compilers
            process = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"})
            try:
                code = process.wait(timeout=limit)
                status = "ok" if code == 0 else f"failed (exit status {code})"
            except subprocess.TimeoutExpired:
                stop(process)
                status = f"out of time ({limit:.0f} s)"
        output = log_path.read_text(errors="replace")
        self.record(name, status, time.monotonic() - started, output)
        return status, output

    def record(self, name: str, status: str, seconds: float, output: str) -> None:
        self.steps.append((name, status, seconds))
        log(f"[{self.elapsed():.0f} s] {name}: {status} after {seconds:.0f} s")
        if status != "ok" and output:
            self.failures.append(f"### {name}: {status}\n\n```text\n{tail(output)}\n```\n")
        self.write()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def markdown(self) -> str:
        steps = ["| step | status | seconds |", "|---|---|---:|"]
        steps += [f"| {name} | {status} | {seconds:.0f} |" for name, status, seconds in self.steps]
        parts = [self.header, f"Whole check: {self.elapsed():.0f} s.\n", "## Steps\n",
                 "\n".join(steps) + "\n", *self.sections]
        if self.failures:
            parts += ["## What failed (the end of each output)\n", *self.failures]
        return "\n".join(parts)

    def write(self) -> None:
        with atomic_write(self.report) as f:
            f.write(self.markdown())


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def tail(output: str, lines: int = 40) -> str:
    """The last lines of a step's output, each progress-bar redraw its own line, long lines cut."""
    rows = [row.rstrip() for row in re.split(r"[\r\n]+", output) if row.strip()]
    return "\n".join(row if len(row) <= 300 else row[:300] + " ..." for row in rows[-lines:])


def environment(dry: bool) -> str:
    device = "no GPU"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = (f"{torch.cuda.device_count()} x {props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA "
                  f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    title = "# GPU check (dry run on the CPU: tiny sizes, figures mean nothing)" if dry else "# GPU check"
    return (f"{title}\n\n`{' '.join(['python', *sys.argv])}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
            f"- device: {device}\n"
            f"- CPU: {os.cpu_count()} cores, {platform.machine()}, python {platform.python_version()}\n"
            f"- torch {torch.__version__}, torchvision {version('torchvision')}, lightning {version('lightning')}, "
            f"torchmetrics {version('torchmetrics')}\n")


# -----------------------------------------------------------------------------
# the steps

def cuda_tests(check: Check) -> None:
    # without the repository's addopts: a GPU machine has no nbmake
    argv = ["-m", "pytest", "-o", "addopts=", "-m", "cuda", "-q", "-rfEs", "-p", "no:cacheprovider", "tests"]
    status, output = check.run("pytest -m cuda", argv, check.settings["pytest_s"])
    summary = [row for row in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", row)]
    outcome = summary[-1].strip("= ") if summary else status
    check.sections.append(f"## Tests marked cuda\n\n`pytest -m cuda tests`: {outcome}\n")


def bench(check: Check) -> None:
    argv = ["-m", "tools.bench", *check.settings["bench"]]
    status, output = check.run("bench", argv, check.settings["bench_s"])
    if status == "ok":  # its report, without the progress lines before it
        report = output[output.index("bench.py: "):] if "bench.py: " in output else output
        check.sections.append(f"## tools/bench.py\n\n`python {' '.join(argv)}`\n\n{report.strip()}\n")


def synthetic_faces(check: Check) -> Path | None:
    data = check.work / "faces"
    argv = ["synthetic_faces.py", "--out", str(data), "--test-per-identity", "0",
            *config.as_flags(check.settings["faces"])]
    status, _ = check.run("synthetic faces", argv, check.settings["faces_s"])
    return data if status == "ok" else None


def training_runs(check: Check, data: Path | None) -> None:
    rows = []
    for name, flags in RUNS.items():
        if check.dry:
            name, flags = rehearsal(name, flags)
        if data is None:
            check.record(f"train: {name}", "not run: no data set", 0.0, "")
            continue
        out = check.work / "runs" / slug(name)
        argv = ["run_training.py", "--data-dir", str(data), "--out", str(out), "--overwrite", "--wandb", "off",
                "--warmup-epochs", "1", *check.settings["train"], *flags]
        limit = check.settings["compiled_run_s" if "--compile" in flags else "run_s"]
        status, _ = check.run(f"train: {name}", argv, limit)
        rows.append(run_row(name, flags, status, out / "metrics.csv"))
    faces = check.settings["faces"]
    check.sections += [
        f"## End-to-end training\n\nrun_training.py on {faces['identities'] * faces['train_per_identity']:,} "
        f"synthetic {faces['image_size']} px faces ({faces['identities']} identities), "
        f"`{' '.join(check.settings['train'])}`, its default precision (16-mixed on a GPU), data path "
        "(`--augment-on-device auto`: decoded and augmented on a GPU) and data workers. img/s and FLOP/s over whole "
        "epochs (train_img_per_s and train_flop_per_s of metrics.csv, data loading included, validation not); the "
        "first epoch holds the warm-up (cuDNN's kernel search, torch.compile).\n\n"
        "| run | flags | data workers | img/s, first epoch | img/s, later epochs | TFLOP/s, later epochs "
        "| peak memory GB | status |\n|---|---|---:|---:|---:|---:|---:|---|\n"
        + "\n".join(row["line"] for row in rows) + "\n",
        goals(rows)]


def rehearsal(name: str, flags: list[str]) -> tuple[str, list[str]]:
    """A row's name and flags for the dry run: without --compile (inductor would compile for minutes on a
    small CPU), and with the data path that `--augment-on-device auto` takes on a GPU made explicit, so that
    the CPU rehearses the path of the real check, not the CPU's."""
    if "--compile" in flags:
        name, flags = f"{name} (dry: without --compile)", [flag for flag in flags if flag != "--compile"]
    if "--augment-on-device" in flags:
        return name, flags
    _, _, on = config.parse_args(["--accelerator", "cuda", *flags]).hardware()
    return name, [*flags, "--augment-on-device", "on" if on else "off"]


def run_row(name: str, flags: list[str], status: str, metrics_csv: Path) -> dict:
    """One row of the end-to-end table, from the run's metrics.csv: img/s of the first epoch, and img/s and
    FLOP/s over all images and seconds of the later ones."""
    series = {key: dict(values) for key, values in epoch_metrics(metrics_csv).items()} if metrics_csv.is_file() else {}
    images, rates, flops = (series.get(key, {}) for key in ("train_images", "train_img_per_s", "train_flop_per_s"))
    steady = [epoch for epoch in rates if epoch > 0 and epoch in images]
    seconds = {epoch: images[epoch] / rates[epoch] for epoch in steady}
    later = sum(images[epoch] for epoch in steady) / sum(seconds.values()) if steady else None
    flop_rate = (sum(seconds[e] * flops[e] for e in steady) / sum(seconds.values())
                 if steady and all(e in flops for e in steady) else None)
    # the workers of the last epoch, and the peak memory over the whole run: its last epoch's
    workers, memory = (list(series[key].values())[-1] if series.get(key) else None
                       for key in ("data_workers", "peak_gpu_memory"))
    cells = [name, f"`{' '.join(flags)}`" if flags else "(defaults)", cell(workers, ".0f"), cell(rates.get(0), ",.0f"),
             cell(later, ",.0f"), cell(flop_rate and flop_rate / 1e12, ".1f"),
             cell(memory / 1e9 if memory else None, ".2f"), status]
    return dict(name=name, flags=flags, later=later, memory=memory, line="| " + " | ".join(cells) + " |")


def cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def goals(rows: list[dict]) -> str:
    """The issue's goals against what the runs measured."""
    lines = ["## Goals\n", "| goal | measured | |", "|---|---|---|"]
    fastest = max((row for row in rows if row["later"]), key=lambda row: row["later"], default=None)
    if fastest:
        lines.append(f"| end-to-end training >= {GOAL_IMG_PER_S:,} img/s | {fastest['later']:,.0f} img/s "
                     f"({fastest['name']}) | {'met' if fastest['later'] >= GOAL_IMG_PER_S else 'NOT met'} |")
    for row in rows:
        if set(row["flags"]) <= {"--recompute-gelu"} and row["memory"]:
            lines.append(f"| peak memory <= {GOAL_MEMORY / 1e9:.0f} GB ({row['name']}) | {row['memory'] / 1e9:.2f} GB "
                         f"| {'met' if row['memory'] <= GOAL_MEMORY else 'NOT met'} |")
    lines.append("| FaceNN train img/s >= torchvision ConvNeXt's | see tools/bench.py's `target:` lines | |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m tools.gpu_check", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry", action="store_true",
                        help="the same steps at tiny sizes on the CPU (the cuda tests skip themselves)")
    parser.add_argument("--work", type=Path,
                        help="data, runs and logs (default: gpu_check/ or gpu_check_dry/ under the system's temp dir)")
    parser.add_argument("--report", type=Path,
                        help="the markdown report (default: docs/gpu-check.md; with --dry, WORK/gpu.md)")
    parser.add_argument("--budget", type=float, help="seconds for the whole check (default: 390, or 400 with --dry)")
    args = parser.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        parser.error("no GPU visible: run it on a GPU machine, or try the script with --dry")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = SETTINGS["dry" if args.dry else "gpu"]
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / ("gpu_check_dry" if args.dry else "gpu_check")
    report = args.report or (work / "gpu.md" if args.dry else ROOT / "docs" / "gpu-check.md")
    check = Check(settings, work, report, args.budget or settings["budget_s"], args.dry)
    cuda_tests(check)
    bench(check)
    training_runs(check, synthetic_faces(check))
    check.write()
    print(check.markdown())
    log(f"report: {report}")
    return 0 if all(status == "ok" for _, status, _ in check.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
