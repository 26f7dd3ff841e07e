"""make_shards --workers 2 against one process on the same label table, and the peak memory of a conversion as the
table grows tenfold.

    python bench/convert.py [--rows 20000] [--size 256] [--resize 112] [--rounds 3]
    python bench/convert.py --rss-rows 20000,200000 --rss-workers 1,2     # the memory part's defaults

The script builds its data in a temporary directory: ``--faces`` synthetic faces drawn at ``--size`` px and saved as
JPEG (quality 90), then a ``table`` CSV of ``--rows`` rows (image, AU list, emotion), each row naming its own image
file, a hard link to one of the faces (distinct paths and keys, no extra disk). Both sides run
``expblip.data.sources.convert.convert`` in this process on that table with ``--resize``. Every image is read,
decoded in full (the truncation check), decoded again at reduced scale, resized bicubic and re-encoded as JPEG q95,
and the records are written as 1000-sample shards:

"one process"  ``ConvertRequest(..., workers=1)``: the source reads and checks each image as it streams the table,
               and write_shards resizes and encodes it.
"workers 2"    ``ConvertRequest(..., workers=2)``: the same conversion through expblip.data.sources.parallel (this
               process streams rows; 2 worker processes read, check, resize and encode; the writer writes in
               order). The pool's start is inside the timed region.

Rounds alternate their order (bench/rounds.py) after one untimed warm-up of each on 200 rows, and every round's
output is checked to be the same bytes on both sides (a mismatch makes the timing meaningless). The speed-up is the
median of the rounds' one-process/workers-2 time ratios, which is also the ratio of samples/s: target >= 1.7 on
2 cores. Other jobs on a shared machine take cores from the two workers but rarely from the lone process, so the
script also prints each side's CPU seconds per 1000 rows (this process plus its workers, polled from /proc) and
2 x one / two, the speed-up two otherwise idle cores could give at most, with the load average.

Memory: for each of ``--rss-rows`` (small ``--rss-size`` px faces, so the large table converts in about a minute)
and ``--rss-workers``, one conversion runs in a child process (this script with ``--rss-child``), which reports its
own peak RSS and its workers' (``getrusage``'s ru_maxrss of the process and of its waited-for children). The line
``rss ratio`` divides the largest table's peak by the smallest's (target: within 1.2x).

The last line is ``ratio: <workers-2 samples/s / one-process samples/s>``. It never asserts a time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from rounds import alternating, median, median_ratio  # noqa: E402 - bench/rounds.py, beside this script

SAMPLES_PER_SHARD = 1000


def draw_faces(folder: Path, count: int, size: int) -> list[tuple[Path, dict]]:
    """``count`` synthetic faces as JPEG files in ``folder``, with their labels."""
    from expblip.data.synthetic import synthetic_records

    folder.mkdir(parents=True, exist_ok=True)
    faces = []
    for i, record in enumerate(synthetic_records(count, seed=0, image_size=size)):
        path = folder / f"face{i:04d}.jpg"
        record["image"].save(path, format="JPEG", quality=90)
        faces.append((path, record["labels"]))
    return faces


def write_table(root: Path, rows: int, faces: list[tuple[Path, dict]]) -> Path:
    """A CSV of ``rows`` rows under ``root``; row i's image is images/i.jpg, a hard link to face i % len(faces)."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    table = root / "faces.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "aus", "emotion"])
        for i in range(rows):
            face, labels = faces[i % len(faces)]
            name = f"images/{i:07d}.jpg"
            os.link(face, root / name)
            aus = ",".join(str(au) for au in labels["aus"]) or "none"
            writer.writerow([name, aus, ",".join(labels["emotions"] or [])])
    return table


def make_table(root: Path, rows: int, faces: int, size: int) -> Path:
    return write_table(root, rows, draw_faces(root / "faces", faces, size))


def convert_table(table: Path, out: Path, workers: int, resize: int) -> float:
    """Seconds of one conversion of ``table`` into a fresh ``out``."""
    from expblip.data.sources.convert import ConvertRequest, convert
    from expblip.data.sources.table import TableOptions

    shutil.rmtree(out, ignore_errors=True)
    request = ConvertRequest("table", out=str(out), table_options=TableOptions(table=str(table)), resize=resize,
                             samples_per_shard=SAMPLES_PER_SHARD, progress=False, workers=workers)
    start = time.perf_counter()
    convert(request)
    return time.perf_counter() - start


def same_output(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def speed(tmp: Path, args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(seconds, CPU seconds of the process and its workers) per round of each side on ``--rows`` rows, checking
    both wrote the same bytes."""
    warm = make_table(tmp / "warm", 200, 8, args.size)
    for workers in (1, 2):
        convert_table(warm, tmp / f"warm-out{workers}", workers, args.resize)
    table = make_table(tmp / "speed", args.rows, args.faces, args.size)
    outs = {"one": tmp / "out-one", "two": tmp / "out-two"}
    cpu: dict[str, list[float]] = {"one": [], "two": []}

    def timed(name: str, workers: int) -> float:
        with Watch() as watch:
            seconds = convert_table(table, outs[name], workers, args.resize)
        cpu[name].append(watch.cpu)
        return seconds

    seconds = alternating({"one": lambda: timed("one", 1), "two": lambda: timed("two", 2)}, args.rounds)
    if not same_output(outs["one"], outs["two"]):  # the conversion is deterministic: the last round's stand for all
        raise SystemExit("error: workers 2 wrote different shards from one process; the timing is meaningless")
    return seconds, cpu


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (the pool's fork server and its workers), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state, past the command's parentheses
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _usage(pid: int) -> tuple[float, float]:
    """(CPU seconds, peak RSS MiB) of a process so far; (0, 0) once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0.0, 0.0
    hwm = next((int(ln.split()[1]) / 1024 for ln in status if ln.startswith("VmHWM:")), 0.0)
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK"), hwm  # utime + stime


class Watch:
    """CPU seconds of this process plus its worker processes, and the workers' peak RSS, during the block. A fork
    server's workers are not this process's children, so getrusage misses them: they are polled from /proc every
    0.1 s (a worker's last 0.1 s of CPU may be missed)."""

    def __init__(self) -> None:
        self.cpu, self.worker_mib = 0.0, 0.0
        self._cpu: dict[int, float] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._done.wait(0.1):
            for pid in _descendants(os.getpid()):
                cpu, mib = _usage(pid)
                self._cpu[pid] = max(self._cpu.get(pid, 0.0), cpu)
                self.worker_mib = max(self.worker_mib, mib)

    def __enter__(self) -> Watch:
        self._start = os.times()
        self._before = {pid: _usage(pid)[0] for pid in _descendants(os.getpid())}  # the fork server's past CPU
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        end = os.times()
        own = end.user - self._start.user + end.system - self._start.system
        self.cpu = own + sum(cpu - self._before.get(pid, 0.0) for pid, cpu in self._cpu.items())


def rss_child(table: str, out: str, workers: int, resize: int) -> int:
    """In a child process: convert, then print the peak RSS (MiB) of this process and of its worker processes."""
    with Watch() as watch:
        seconds = convert_table(Path(table), Path(out), workers, resize)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"main_mib": own, "worker_mib": watch.worker_mib, "seconds": seconds}))
    return 0


def memory(tmp: Path, args: argparse.Namespace) -> dict[tuple[int, int], dict]:
    """{(rows, workers): the child's figures} for every table size and worker count."""
    faces = draw_faces(tmp / "rss-faces", args.faces, args.rss_size)
    figures = {}
    for rows in args.rss_rows:
        table = write_table(tmp / f"rss{rows}", rows, faces)
        for workers in args.rss_workers:
            cmd = [sys.executable, __file__, "--rss-child", str(table), str(tmp / "rss-out"), str(workers),
                   str(args.rss_resize)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"error: the memory run failed ({rows} rows, workers {workers}):\n{done.stderr}")
            figures[rows, workers] = json.loads(done.stdout.strip().splitlines()[-1])
        shutil.rmtree(tmp / f"rss{rows}")
    return figures


def report_memory(figures: dict[tuple[int, int], dict], rows: list[int], workers: list[int]) -> None:
    for (n, w), fig in sorted(figures.items()):
        pool = f"workers {fig['worker_mib']:.0f} MiB each at most" if w > 1 else "no workers"
        print(f"peak RSS, {n} rows, workers {w}: main {fig['main_mib']:.0f} MiB, {pool} "
              f"({n / fig['seconds']:.0f} samples/s)")
    small, large = min(rows), max(rows)
    for w in workers:
        a, b = figures[small, w], figures[large, w]
        pool = f", workers {b['worker_mib'] / a['worker_mib']:.3f}" if w > 1 and a["worker_mib"] else ""
        print(f"rss ratio, workers {w}: {large} rows / {small} rows: main {b['main_mib'] / a['main_mib']:.3f}{pool}")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20000, help="rows of the timed table")
    p.add_argument("--size", type=int, default=256, help="side of the timed table's JPEG faces, px")
    p.add_argument("--resize", type=int, default=112, help="make_shards --resize of the timed conversions")
    p.add_argument("--faces", type=int, default=64, help="distinct faces drawn (rows link to them in turn)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rss-rows", type=_ints, default=[20000, 200000], help="table sizes of the memory part (0: skip)")
    p.add_argument("--rss-workers", type=_ints, default=[1, 2], help="worker counts of the memory part")
    p.add_argument("--rss-size", type=int, default=48, help="side of the memory part's faces, px")
    p.add_argument("--rss-resize", type=int, default=24, help="--resize of the memory part")
    p.add_argument("--rss-child", nargs=4, metavar=("TABLE", "OUT", "WORKERS", "RESIZE"), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.rss_child:
        table, out, workers, resize = args.rss_child
        return rss_child(table, out, int(workers), int(resize))
    if min(args.rows, args.rounds, args.faces, args.size) < 1 or args.resize < 0:
        p.error("need --rows, --rounds, --faces, --size >= 1 and --resize >= 0")
    with tempfile.TemporaryDirectory() as tmp:
        rss_rows = [n for n in args.rss_rows if n > 0]
        figures = memory(Path(tmp), args) if len(rss_rows) >= 2 else {}
        seconds, cpu = speed(Path(tmp), args)
    if figures:
        report_memory(figures, rss_rows, args.rss_workers)
    rates = {name: [args.rows / s for s in values] for name, values in seconds.items()}
    per_k = {name: median(values) / args.rows * 1000 for name, values in cpu.items()}
    print(f"CPU seconds per 1000 rows (process + workers, median): one process {per_k['one']:.2f}, workers 2 "
          f"{per_k['two']:.2f}; 2 idle cores could give at most {2 * per_k['one'] / per_k['two']:.2f}x "
          f"(load average {os.getloadavg()[0]:.1f} after the runs)")
    print(f"one process: {median(rates['one']):.0f} samples/s   workers 2: {median(rates['two']):.0f} samples/s   "
          f"(medians of {args.rounds} alternating rounds of {args.rows} rows, {args.size}-px JPEG, --resize "
          f"{args.resize}, {os.cpu_count()} cores; same bytes on both sides)")
    print("per-round ratios: " + " ".join(f"{o / t:.3f}" for o, t in zip(seconds["one"], seconds["two"], strict=True)))
    print(f"ratio: {median_ratio(seconds, 'one', 'two'):.3f}", flush=True)  # rates: workers 2 / one = one's time / two's
    return 0


if __name__ == "__main__":
    sys.exit(main())
