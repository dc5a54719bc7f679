"""One configuration of a comparison in a fresh process (`python -m mmpeft.cli train`), and what it measured.

A configuration with nothing to train (few-shot `zero_shot`: the prompt head as built) runs the same command with
`train.evaluate_only=true`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..config import load_config
from ..errors import MmpeftError
from ..training.run_folder import TEST_PREDICTIONS

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "head.safetensors")


# A process's ru_maxrss starts at the high-water mark of the image it was exec'd from: a child spawned by this
# process (torch loaded, half a GiB or more) would report at least that much whatever it did itself. So a bare
# interpreter of a few MiB spawns the run, reaps it with wait4 (that child's own rusage, not RUSAGE_CHILDREN's
# maximum over every earlier run) and writes the status and ru_maxrss to a file.
_LAUNCHER = """
import json, os, sys
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"status": status, "ru_maxrss": usage.ru_maxrss}, f)
"""


def run_child(cmd: list[str], log_path: Path, timeout: float | None = None, env: dict | None = None) -> dict:
    """Run `cmd` (in `env`, else this process's environment) with its output in `log_path`; its exit code, wall
    time and own peak resident set (GiB)."""
    start = time.perf_counter()
    report = log_path.with_name(log_path.name + ".rusage.json")
    report.unlink(missing_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        # Its own session: a timeout or Ctrl-C here ends the launcher, the run and its loader workers together.
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, str(report), *cmd], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)
    timed_out = False
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if proc.poll() is None:  # timed out, or this process was interrupted
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wall = time.perf_counter() - start
    if timed_out or not report.is_file():
        return {"exit_code": proc.returncode or -signal.SIGKILL, "timed_out": timed_out, "wall_seconds": wall,
                "peak_rss_gib": None}
    child = json.loads(report.read_text())
    report.unlink()
    scale = 2**30 if sys.platform == "darwin" else 2**20  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"exit_code": os.waitstatus_to_exitcode(child["status"]), "timed_out": False, "wall_seconds": wall,
            "peak_rss_gib": child["ru_maxrss"] / scale}


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    kept = [line.split("\r")[-1] for line in text.splitlines() if line.strip()]  # last state of progress bars
    return "\n".join(kept[-lines:])


def collect(run_dir: Path, child: dict, cuda: bool) -> dict:
    """The numbers of one finished run: its metrics.json plus what the parent measured."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    test, evaluation = metrics.get("test") or {}, metrics.get("eval") or {}
    parts = metrics.get("trainable_parameters") or {}
    record = {
        "test_macro_f1": test.get("macro_f1"), "test_accuracy": test.get("accuracy"),
        "eval_macro_f1": evaluation.get("macro_f1"), "train_seconds": metrics.get("train_seconds"),
        "steps": metrics.get("steps"), "best_step": metrics.get("best_step"),
        "trainable_parameters": sum(p["trainable"] for p in parts.values()),
        "trainable_by_part": {part: p["trainable"] for part, p in parts.items()},
        "adapter_bytes": sum((run_dir / f).stat().st_size for f in ADAPTER_WEIGHTS if (run_dir / f).is_file()),
        "peak_rss_gib": child["peak_rss_gib"],
        "train_examples": ((metrics.get("data") or {}).get("train") or {}).get("examples"),
        "test_predictions": (run_dir / TEST_PREDICTIONS).is_file(),
    }
    if "feature_cache" in metrics:  # what the loop actually did: {tower: cached where, or why not}
        cached = [tower for tower, what in (metrics["feature_cache"] or {}).items() if what.startswith("cached")]
        record["feature_cache"] = f"on ({', '.join(cached)})" if cached else "off"
    if cuda:
        record["peak_cuda_gib"] = metrics.get("peak_memory_gib")
    record["peak_memory_gib"] = record["peak_cuda_gib"] if cuda else child["peak_rss_gib"]
    return record


def run_one(name: str, overrides: list[str], run_dir: Path, *, base: str | None, seed: int, shots: int | None,
            cuda: bool, timeout: float | None = None, comparison: str | Path | None = None) -> dict:
    """One (configuration, shots, seed) in a fresh process; a failure is recorded, never raised. `comparison` is
    the `mmpeft compare` output folder, recorded in the run's `mmpeft.json` (through `MMPEFT_COMPARISON`) for its
    model card."""
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = [*overrides, f"train.output_dir={run_dir}", f"train.seed={seed}", "train.progress=false",
                 "train.overwrite=true"]
    record = {"config": name, "shots": shots, "seed": seed, "output_dir": str(run_dir), "overrides": overrides,
              "status": "failed", "error": None}
    try:
        cfg = load_config(base, overrides)
    except MmpeftError as err:  # the config itself is wrong: no process to start
        record["error"] = str(err)
        return record
    record["feature_cache"] = str(getattr(cfg.train, "feature_cache", None) or "off")  # the key, where it exists
    record["trained"] = not cfg.train.evaluate_only  # e.g. few-shot `zero_shot`: the prompt head as built
    (run_dir / "metrics.json").unlink(missing_ok=True)  # a stale one must not pass for this run's result
    cmd = [sys.executable, "-m", "mmpeft.cli", "train", *(["--config", str(base)] if base else []), *overrides]
    record["command"] = cmd
    origin = {"config": name, "shots": shots, "seed": seed, "folder": str(Path(comparison).resolve())} \
        if comparison else None
    env = {**os.environ, "MMPEFT_COMPARISON": json.dumps(origin)} if origin else None
    child = run_child(cmd, run_dir / "log.txt", timeout, env=env)
    record.update(exit_code=child["exit_code"], wall_seconds=child["wall_seconds"])
    if child["timed_out"]:
        record["error"] = f"timed out after {timeout:g} s\n{_log_tail(run_dir / 'log.txt')}"
    elif child["exit_code"] != 0 or not (run_dir / "metrics.json").is_file():
        record["error"] = _log_tail(run_dir / "log.txt") or f"exit code {child['exit_code']}, no output"
    else:
        record.update(collect(run_dir, child, cuda), status="ok")
    return record
