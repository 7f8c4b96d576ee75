"""The table of every benchmark result, benchmarks/results/results.csv: one row per measured mode per run.

benchmarks/speed.py and benchmarks/distributed.py append their rows when they run (to DIR/results.csv with
--results DIR); docs/performance.md cites rows by their `run`. Print the rows whose columns match, a value ending
in * matching by prefix:

    python benchmarks/results_table.py gpu=h200 mode=qlora
    python benchmarks/results_table.py run=2026-12-04-h200-effe784* --columns run,mode,tokens_per_second,losses
    python benchmarks/results_table.py --add OTHER/results.csv   # rows measured elsewhere (a GPU machine's --results)

Columns: run (date, GPU and commit, then -2, -3 ... for more runs of one commit on one day; a word where the commit
was not recorded), date, gpu (h100, h200), gpu_name, num_gpus, commit (of the code measured; empty where not
recorded), model (the architecture's shape, random weights), mode (benchmarks/speed.py's modes: baseline_* are the
plain stack, unsloth is Unsloth, the rest `lora train`; benchmarks/distributed.py's single, ddp, fsdp, resume-*),
data (fixed: rows of seq_len tokens; varied: chat-like lengths), seq_len, batch_size (per GPU), tokens_per_second
(real tokens), peak_gib (torch.cuda.max_memory_allocated during training; per GPU), reserved_gib
(max_memory_reserved), graph_pool_gib (CUDA graphs' memory pools), mfu, losses (logged at steps 5 and 10),
baseline_mode, baseline_tokens_per_second and baseline_peak_gib (that mode's figures in the same run), gpu_power_w and
gpu_sm_clock_mhz (means over the timed steps), host_cpu and host_python_loop_ms (the host, the same for a run's rows),
peak_host_gib (the process's peak resident host memory, VmHWM), pinned_host_gib (its peak VmPin, pages pinned for the
GPU's copies where the driver accounts them), seconds_per_step (mean of the timed steps), outcome (ok, gpu_oom,
host_oom, refused, timeout, failed; empty in rows from before it was recorded), command, notes (for lora train's
modes, the levers it chose).
"""

import argparse
import csv
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TABLE = REPO / "benchmarks" / "results" / "results.csv"
COLUMNS = [
    "run", "date", "gpu", "gpu_name", "num_gpus", "commit", "model", "mode", "data", "seq_len", "batch_size",
    "tokens_per_second", "peak_gib", "reserved_gib", "graph_pool_gib", "mfu", "losses",
    "baseline_mode", "baseline_tokens_per_second", "baseline_peak_gib",
    "gpu_power_w", "gpu_sm_clock_mhz", "host_cpu", "host_python_loop_ms",
    "peak_host_gib", "pinned_host_gib", "seconds_per_step", "outcome", "command", "notes",
]
SHOWN = "run,mode,tokens_per_second,peak_gib,baseline_mode,baseline_tokens_per_second,baseline_peak_gib,losses"


def read_rows(path: Path = TABLE) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def append_rows(rows: list[dict], path: Path = TABLE) -> None:
    """Rows as dicts keyed by COLUMNS (missing ones left empty, lists written space-separated). A table written
    with fewer columns is rewritten with all of them first (its rows keep their values, new columns empty)."""
    new = not path.is_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    if not new:
        with path.open(newline="") as handle:
            header = next(csv.reader(handle), [])
        if header != COLUMNS:
            old_rows = read_rows(path)
            with path.open("w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
                writer.writeheader()
                writer.writerows({key: row.get(key, "") for key in COLUMNS} for row in old_rows)
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({key: cell(value) for key, value in row.items()})
    print(f"{path}: {len(rows)} {'row' if len(rows) == 1 else 'rows'} added")


def cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def run_id(date: str, gpu: str, commit: str, *tables: Path) -> str:
    """DATE-GPU-COMMIT, with -2, -3 ... when the tables already hold a run of that commit on that GPU that day."""
    base = f"{date}-{gpu}-{commit or 'unrecorded'}"
    taken = {row["run"] for table in tables for row in read_rows(table)}
    number, run = 1, base
    while run in taken:
        number += 1
        run = f"{base}-{number}"
    return run


def gpu_tag(gpu: str, count: int = 1) -> str:
    """'NVIDIA H100 80GB HBM3' -> h100, two H200s -> h200x2, 'cpu' -> cpu."""
    words = gpu.split()
    model = next((word.lower() for word in words if word[:1].isalpha() and word[1:].isdigit()), words[0].lower())
    return model + (f"x{count}" if count > 1 else "")


def current_commit() -> str:
    """The checkout's short commit, '+' when lora_cli/ or the benchmarks differ from it; empty outside a clone."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", "lora_cli",
                                  "benchmarks", ":!benchmarks/results"]).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return ""
    return commit + ("+" if changed else "")


def matches(row: dict, filters: list[str]) -> bool:
    for item in filters:
        key, _, wanted = item.partition("=")
        value = row.get(key, "")
        if not (value.startswith(wanted[:-1]) if wanted.endswith("*") else value == wanted):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("filters", nargs="*", help="column=value (value* matches a prefix)")
    parser.add_argument("--columns", default=SHOWN, help=f"columns to print (default {SHOWN}); 'all' for every one")
    parser.add_argument("--table", type=Path, default=TABLE)
    parser.add_argument("--add", type=Path, help="append this table's rows (their run ids must be new here)")
    args = parser.parse_args()
    if args.add:
        rows = read_rows(args.add)
        clash = {row["run"] for row in rows} & {row["run"] for row in read_rows(args.table)}
        if clash:
            sys.exit(f"runs already in {args.table}: {', '.join(sorted(clash))}")
        append_rows(rows, args.table)
        return
    columns = COLUMNS if args.columns == "all" else args.columns.split(",")
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(columns)
    for row in read_rows(args.table):
        if matches(row, args.filters):
            writer.writerow([row.get(column, "") for column in columns])


if __name__ == "__main__":
    main()
