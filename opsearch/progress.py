"""What a person sees during a search: one line per candidate, running counts, best so far.

The end-of-search summary draws with the functions the command passes in (the leaderboard
tables of `opsearch show`, the plots of `opsearch plot`), so that this module needs no command.
"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter
from typing import Any, Callable, Sequence

from rich.console import Console
from rich.markup import escape

from opsearch.config import SearchConfig
from opsearch.errors import UserError
from opsearch.study import Run, TrialRecord


class SearchProgress:
    """Prints each finished trial and, at the end, the leaderboard and where the plots went."""

    def __init__(self, config: SearchConfig, quiet: bool = False, console: Console | None = None,
                 command: str = "search"):
        self.config = config
        self.quiet = quiet
        self.command = command  # "rerank": no search header
        # A log file or CI gets long lines, not rich's 80-column wrap.
        self.console = console or Console(stderr=True, highlight=False,
                                          width=None if sys.stderr.isatty() else 200)
        self.counts: Counter[str] = Counter()
        self.best: dict[str, float] = {}
        self.start_time = time.time()
        self.candidate_seconds: list[float] = []
        self.rerank_seconds: list[float] = []

    # -- during the search ------------------------------------------------------------------

    def start(self, run: Run) -> None:
        done = run.candidates_counted()
        finished = sum(1 for r in run.trials() if r.kind == "candidate" and r.state.is_finished()
                       and r.counts_toward_budget)
        for r in run.trials():
            if r.kind == "candidate" and r.state.is_finished():
                self._count(r)
        if self.quiet or self.command != "search":
            return
        c = self.config
        where = c.storage or f"runs/{c.name}/study.db"
        self.console.print(f"[bold]opsearch search[/] run [cyan]{escape(c.name)}[/] "
                           f"({escape(where)}): space {c.space}, algorithm {c.algorithm}, "
                           f"dataset {c.dataset}, archs {', '.join(c.archs)}, budget {c.budget}, "
                           f"workers {c.workers or 1}")
        if finished:
            self.console.print(f"resuming: {finished} candidates already finished, "
                               f"{done - finished} queued or in flight")

    def on_result(self, record: TrialRecord, outcome) -> None:
        record.user_attrs.update(outcome.attrs)
        record.values = tuple(outcome.values) if outcome.values else None
        self.on_record(record)

    def on_record(self, record: TrialRecord) -> None:
        self._count(record)
        if record.kind == "rerank" and isinstance(record.user_attrs.get("elapsed_s"), (int, float)):
            self.rerank_seconds.append(float(record.user_attrs["elapsed_s"]))
        if self.quiet:
            return
        attrs = record.user_attrs
        verdict = attrs.get("verdict", "?")
        elapsed = attrs.get("elapsed_s")
        took = f"{elapsed:6.2f}s" if isinstance(elapsed, (int, float)) else "      "
        accs = "  ".join(f"{a} {attrs[f'acc/{a}']:.3f}" for a in self.config.archs
                         if isinstance(attrs.get(f"acc/{a}"), (int, float)))
        formula = escape(str(attrs.get("formula", ""))[:90])
        if record.kind == "baseline":
            self.console.print(f"[blue]baseline[/] {attrs.get('layer', '?'):<12} {took}  {accs}")
            return
        if record.kind == "rerank":
            what = attrs.get("layer") or f"#{attrs.get('of_trial')} {formula[:60]}"
            if verdict.startswith("failed:"):
                accs = escape(f"{verdict} {str(attrs.get('reason', ''))[:80]}")
            self.console.print(f"[magenta]rerank[/] seed {attrs.get('seed')} {what:<14} {took}  {accs}")
            return
        n = sum(v for k, v in self.counts.items() if k != "failed:worker_lost")
        head = f"[{n:>4}/{self.config.budget}] #{record.number:<5}"
        if verdict == "evaluated":
            self.console.print(f"{head} [green]evaluated[/]  {took}  {accs}  [dim]{formula}[/]")
        elif verdict.startswith("duplicate:"):
            self.console.print(f"{head} [yellow]{verdict}[/] {took}  {accs}  [dim]{formula}[/]")
        elif verdict.startswith("failed:"):
            reason = escape(str(attrs.get("reason", ""))[:80])
            self.console.print(f"{head} [red]{escape(verdict)}[/] {took}  {reason}")
        else:
            self.console.print(f"{head} [dim]{escape(verdict):<22} {took}  {formula}[/]")

    def _count(self, record: TrialRecord) -> None:
        if record.kind != "candidate":
            return
        verdict = str(record.user_attrs.get("verdict", "?"))
        self.counts[verdict.split(":")[0] if not verdict.startswith("failed:worker") else verdict] += 1
        if isinstance(record.user_attrs.get("elapsed_s"), (int, float)):
            self.candidate_seconds.append(float(record.user_attrs["elapsed_s"]))
        for arch in self.config.archs:
            acc = record.user_attrs.get(f"acc/{arch}")
            if isinstance(acc, (int, float)) and acc > self.best.get(arch, -1.0):
                self.best[arch] = float(acc)

    # -- at the end -------------------------------------------------------------------------

    def summary(self, run: Run, seconds: float, *,
                print_summary: Callable[..., None],
                write_plots: Callable[[Sequence[Any], dict, str], list[str]]) -> None:
        """Leaderboard beside the known layers, counts, and the PNG plots: `print_summary(summary,
        title=...)` prints `report.summary`, `write_plots(trials, study_attrs, out_dir)` draws."""
        from opsearch import report

        trials = run.frozen_trials()
        paths: list[str] = []
        if self.config.plots:
            try:
                paths = write_plots(trials, run.attrs, os.path.join(_run_dir(self.config, run), "plots"))
            except Exception as e:  # plots are a convenience: never lose a finished search
                self.console.print(f"[yellow]plots not written: {escape(str(e))}[/]")
        if self.quiet:
            return
        attrs = run.storage.get_study_user_attrs(run.study_id)  # with the rerank stages' tasks
        print_summary(report.summary(trials, attrs), title=f"run {self.config.name}")
        per = (sum(self.candidate_seconds) / len(self.candidate_seconds)) if self.candidate_seconds else 0
        self.console.print(
            f"done in {seconds:.0f} s: " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
            + f"; mean {per:.2f} s per candidate"
            + (f"; re-ranking: {len(self.rerank_seconds)} evaluations, mean "
               f"{sum(self.rerank_seconds) / len(self.rerank_seconds):.2f} s" if self.rerank_seconds else ""))
        if paths:
            self.console.print(f"plots: {', '.join(paths)}")
        target = escape(_hint(self.config, run))
        commands = [f"opsearch show {target}"]
        if report.best_trial(trials, report.archs_of(trials, run.attrs)) is not None:
            commands.append(f"opsearch export {target} -o layer.py")  # only what can work
        commands.append(f"opsearch plot {target}")
        self.console.print("next: " + "   |   ".join(commands), soft_wrap=True)



class BarProgress(SearchProgress):
    """A progress bar (tqdm.auto: a widget in Jupyter, text elsewhere) instead of one line per
    trial, for notebooks, where hundreds of lines bury the cell's result. The end writes the
    plots like the lines do and prints nothing: the notebook shows the run's tables itself."""

    def __init__(self, config: SearchConfig, console: Console | None = None, command: str = "search"):
        super().__init__(config, quiet=True, console=console, command=command)
        self.bar = None
        self.best_mean: float | None = None

    def start(self, run: Run) -> None:
        import warnings

        super().start(run)
        with warnings.catch_warnings():  # no ipywidgets: tqdm.auto warns, then draws text
            warnings.simplefilter("ignore")
            from tqdm.auto import tqdm
            self.bar = tqdm(total=self.config.budget, initial=min(self._done(), self.config.budget),
                            desc=f"opsearch {self.config.name}", unit="candidate")

    def _done(self) -> int:
        return sum(v for k, v in self.counts.items() if k != "failed:worker_lost")

    def _count(self, record: TrialRecord) -> None:
        super()._count(record)
        accs = [record.user_attrs.get(f"acc/{a}") for a in self.config.archs]
        if record.kind == "candidate" and all(isinstance(a, (int, float)) for a in accs):
            mean = sum(accs) / len(accs)
            self.best_mean = mean if self.best_mean is None else max(self.best_mean, mean)

    def on_record(self, record: TrialRecord) -> None:
        super().on_record(record)
        if self.bar is None:
            return
        if record.kind == "candidate":
            self.bar.n = min(self._done(), self.config.budget)
        postfix = {}
        if self.best_mean is not None:  # the best candidate's mean accuracy over the archs
            postfix["best"] = f"{self.best_mean:.3f}"
        if self.rerank_seconds:
            postfix["rerank"] = len(self.rerank_seconds)
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def summary(self, run: Run, seconds: float, **draw) -> None:
        if self.bar is not None:
            self.bar.close()
        super().summary(run, seconds, **draw)


PROGRESS_MODES = ("auto", "lines", "bar", "none")


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (IPython's shell talks to a notebook)."""
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return type(shell).__name__ == "ZMQInteractiveShell"


def make_progress(config: SearchConfig, mode: str = "auto", command: str = "search") -> SearchProgress:
    """The progress of a search or stage run from Python: `mode` auto (a bar in a notebook,
    lines elsewhere), lines (what the command prints), bar, or none."""
    if mode not in PROGRESS_MODES:
        raise UserError(f"progress must be one of {', '.join(PROGRESS_MODES)}, got {mode!r}")
    if mode == "auto":
        mode = "bar" if in_notebook() else "lines"
    if mode == "bar":
        return BarProgress(config, command=command)
    return SearchProgress(config, quiet=(mode == "none"), command=command)


def _hint(config: SearchConfig, run: Run) -> str:
    """The RUN arguments that select this search's study again (they work when copied, also in
    a storage that holds several studies)."""
    from opsearch.study import run_hint
    from opsearch.study import run_url

    return run_hint(run.url or run_url(config.name), run.study_name, default_url=run_url(config.name))


def _run_dir(config: SearchConfig, run: Run) -> str:
    """Where the search's plots go: beside its study (runs/<name> for the default storage)."""
    from opsearch.study import run_dir
    from opsearch.study import run_url

    return run_dir(run.url or run_url(config.name), run.study_name)
