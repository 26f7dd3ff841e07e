"""What a Ray Train driver prints: expblip's lines from the workers, each once, and one progress display per stage.

Workers log through ``expblip.log`` into a ``RelayHandler``; it sends each record (its text and, for the loop's step
lines, a ``progress`` dict: step, total, loss, samples/s, ETA) to a small Ray actor. The driver's ``Console`` drains
that actor from a thread while ``trainer.fit()`` runs: other lines are printed as they are, step lines update one
tqdm bar on a terminal, or print a line at every tenth of the stage (and its last step) elsewhere, so a stage's
output fits on a screen whatever its ``train.log_every``.

    with Console("tiny_stage2") as console:      # console.actor goes to the workers in train_loop_config
        trainer.fit()
"""

from __future__ import annotations

import logging
import sys
import threading

POLL_S = 0.5


class _Mailbox:
    """The Ray actor between workers and driver: a list the workers append to and the driver takes from."""

    def __init__(self) -> None:
        self.items: list[dict] = []

    def put(self, item: dict) -> None:
        self.items.append(item)

    def take(self) -> list[dict]:
        items, self.items = self.items, []
        return items


class RelayHandler(logging.Handler):
    """A worker's handler: every record it formats goes to the driver's mailbox (fire and forget)."""

    def __init__(self, actor) -> None:
        super().__init__()
        self.actor = actor

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.actor.put.remote({"text": self.format(record), "progress": getattr(record, "progress", None)})
        except Exception:  # the driver is gone: nothing to tell
            self.handleError(record)


class Progress:
    """One stage's progress: a tqdm bar on a terminal, else a line at every tenth of the steps (and the last)."""

    def __init__(self, stage: str, out=None) -> None:
        self.stage, self.out = stage, out or sys.stdout
        self.bar, self.tenth = None, -1
        self.tty = hasattr(self.out, "isatty") and self.out.isatty()

    def update(self, p: dict) -> None:
        text = f"loss {p['loss']:.4f} {p['samples_per_s']:.1f} samples/s ETA {p['eta']}"
        if self.tty:
            self._bar(p).set_postfix_str(text, refresh=False)
            self.bar.update(p["step"] - self.bar.n)
            return
        tenth = 10 * p["step"] // max(1, p["total"])
        if tenth > self.tenth or p["step"] == p["total"]:
            self.tenth = tenth
            self.out.write(f"[expblip] {self.stage}: step {p['step']}/{p['total']} {text}\n")
            self.out.flush()

    def _bar(self, p: dict):
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=p["total"], initial=0, desc=self.stage, unit="step", file=self.out, leave=True)
        return self.bar

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.out)
        else:
            self.out.write(text + "\n")
            self.out.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Console:
    """Driver side: the mailbox actor, and a thread that prints what arrives until the block ends."""

    def __init__(self, stage: str, out=None) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # on the driver's node: a worker node may be lost mid-run (elastic training), the driver's node is not.
        # Where Ray cannot tell which node that is (several nodes on one host), a lost node may take the mailbox
        # with it: Ray then restarts it on another node, under the same handle, and the workers' lines go on
        # arriving (what it held is lost).
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self.actor = ray.remote(num_cpus=0, scheduling_strategy=here, max_restarts=-1,
                                max_task_retries=-1)(_Mailbox).remote()
        self.progress = Progress(stage, out)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="expblip-console", daemon=True)

    def __enter__(self) -> Console:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()  # what arrived after the last poll
        self.progress.close()
        import ray

        ray.kill(self.actor)

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            self._drain()

    def _drain(self) -> None:
        import ray

        try:
            items = ray.get(self.actor.take.remote(), timeout=30)
        except Exception:  # the actor died with the cluster: the failure surfaces through fit()
            return
        for item in items:
            if item.get("progress"):
                self.progress.update(item["progress"])
            else:
                self.progress.write(item["text"])
