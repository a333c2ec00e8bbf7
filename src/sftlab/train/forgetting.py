"""The probe inside a run (train/probe.py measures; this decides): the reference written once before training
and read back on resume, the probe's fields on the eval lines, the forgetting flag, and the recommended
checkpoint at the end.

Forgetting is flagged when probe_kl passes eval.probe_kl_threshold while the task's eval loss has stopped
improving (no better than the best before it; without eval data, the threshold alone): the model is now paying
in general ability for no gain on the task. The recommended checkpoint is the best eval loss whose probe_kl
stays under the threshold; a checkpoint is saved at that step and kept whatever train.keep_checkpoints says.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.text import Text

from sftlab import files
from sftlab.config import Config
from sftlab.files import atomic_file, write_text_atomic
from sftlab.models.attention import PACKED_EAGER, PACKED_SDPA
from sftlab.train.probe import REFERENCE_FILE, Prober, Reference, load_reference, read_prompts, save_reference

SUMMARY_FILE = "probe.json"
"""OUTPUT/<this>: the probe's history, the recommended checkpoint and base vs fine-tuned sample answers."""


@dataclass
class Watch:
    """(step, eval_loss or None, probe_kl) at each probe point; kept in the checkpoints' state (resume)."""
    threshold: float
    history: list[list[Any]] = field(default_factory=list)

    def observe(self, step: int, eval_loss: float | None, kl: float) -> str | None:
        """Record a point; the forgetting message when this point is flagged."""
        earlier = [e for _, e, _ in self.history if e is not None]
        self.history = [h for h in self.history if h[0] < step] + [[step, eval_loss, kl]]
        if not kl > self.threshold:
            return None
        if eval_loss is not None and (not earlier or eval_loss < min(earlier)):
            return None  # improving on the task (a first eval point has none to stall against): drift buys something
        fix = ("Lower train.lr or the steps (with full fine-tuning, an adapter method such as LoRA also drifts "
               "less).")
        if eval_loss is None:  # no eval data: the threshold alone, and nothing to say about the task
            return (f"forgetting: probe_kl {kl:.3f} passed eval.probe_kl_threshold {self.threshold:g}; without eval "
                    "data sftlab cannot tell whether the task still gains from it (set data.eval or "
                    f"data.eval_fraction to weigh the two). {fix}")
        return (f"forgetting: probe_kl {kl:.3f} passed eval.probe_kl_threshold {self.threshold:g} while the eval "
                f"loss stopped improving (best {min(earlier or [eval_loss]):.4f}); later steps trade general ability "
                f"for no task gain. {fix}")

    def recommended(self) -> int | None:
        """The step of the best eval loss whose probe_kl stays under the threshold (without eval losses: the
        last such step)."""
        under = [(s, e) for s, e, kl in self.history if kl <= self.threshold]
        scored = [(e, s) for s, e in under if e is not None and math.isfinite(e)]
        if scored:
            return min(scored)[1]
        return under[-1][0] if under else None


class RunProbe:
    """The probe of one run (rank 0): created before the first step, called at eval points and at the end."""

    def __init__(self, prober: Prober, reference: Reference, cfg: Config, out: Path, console: Console) -> None:
        self.prober, self.reference, self.cfg, self.out, self.console = prober, reference, cfg, out, console
        self.watch = Watch(cfg.eval.probe_kl_threshold)
        self.flagged: str | None = None
        self.seconds = 0.0
        self.last: dict[str, Any] = {}

    @classmethod
    def start(cls, setup: Any, out: Path, console: Console, state: Any, *, pad_id: int) -> RunProbe | None:
        """Read the reference back (resume) or make it (the base answers, before any step); None when eval.probe
        is none, on ranks other than 0, or under FSDP (a forward on one rank alone would wait for the others)."""
        cfg = setup.config
        if cfg.eval.probe == "none" or not setup.dist.main or setup.dist.sharded:
            if setup.dist.sharded and setup.dist.main and cfg.eval.probe != "none":
                console.print("probe: skipped under FSDP (each forward needs every rank); run `sftlab eval` on the "
                              "finished run instead.")
            return None
        started = time.perf_counter()
        prober = Prober(setup.model, setup.tokenizer, setup.method, cfg, device=setup.device,
                        pad_id=pad_id)
        path = out / REFERENCE_FILE
        if path.is_file() and REFERENCE_FILE in (files.manifest(out) or []):
            reference, made = load_reference(path), False
        else:
            with plain_attention(setup.model):
                reference, made = prober.reference(read_prompts(cfg.eval.probe)), True
            with atomic_file(files.owned(out, REFERENCE_FILE), what="the probe's base answers") as tmp:
                save_reference(reference, tmp)
        probe = cls(prober, reference, cfg, out, console)
        probe.watch.history = list(state.extra.get("probe", {}).get("history", []))
        probe.seconds = time.perf_counter() - started
        probe._say_start(made, path)
        return probe

    def _say_start(self, made: bool, path: Path) -> None:
        base, prompts = self.reference.base, self.reference.prompts
        tax = (f", distinct-2 {base['probe_distinct2']:.3f}, repetition {base['probe_repetition']:.3f}, "
               f"length {base['probe_length']:.1f}") if "probe_distinct2" in base else ""
        what = "base answers saved in" if made else "base answers read back from"
        self.console.print(f"probe: {len(prompts)} prompts ({sum(p.open for p in prompts)} open-ended), {what} {path}; "
                           f"base probe_nll {base['probe_nll']:.3f}{tax} ({self.seconds:.1f}s)", markup=False)

    def at_step(self, state: Any, total: int, eval_loss: float | None, evaluated: bool) -> dict[str, Any]:
        """The probe's fields for this step's eval line (an eval point, or the last step); {} otherwise."""
        last = state.step == total
        if not (evaluated or last):
            return {}
        started = time.perf_counter()
        generate = last or self.cfg.eval.probe_generate
        with plain_attention(self.prober.model):
            found = self.prober.measure(self.reference, generate=generate)
        self.seconds += time.perf_counter() - started
        samples = found.pop("samples", None)
        if samples is not None:
            self.last = {"step": state.step, "samples": samples}
        message = self.watch.observe(state.step, eval_loss if evaluated else None, found["probe_kl"])
        state.extra["probe"] = {"history": self.watch.history}
        state.extra["keep_steps"] = [s for s in [self.watch.recommended()] if s is not None]
        if message:
            self.flagged = message
            self.console.print(Text(f"step {state.step}: {message}", style="yellow"))
        return found

    def wants_checkpoint(self, state: Any) -> bool:
        """Whether this step is now the recommended one (so it needs a checkpoint that is kept)."""
        return (self.watch.recommended() == state.step and bool(self.watch.history)
                and self.watch.history[-1][0] == state.step)

    def should_stop(self) -> bool:
        return self.cfg.eval.probe_stop and self.flagged is not None

    def finish(self, train_seconds: float) -> dict[str, Any]:
        """probe.json and the end-of-run lines: the last numbers against the base's, the flag, the recommended
        checkpoint, and the probe's share of the run's time."""
        recommended = self.watch.recommended()
        summary = {"base": {k: v for k, v in self.reference.base.items() if k != "samples"},
                   "history": self.watch.history, "threshold": self.watch.threshold, "flagged": self.flagged,
                   "recommended_step": recommended, "probe_seconds": self.seconds, "run_seconds": train_seconds,
                   "samples": self._samples()}
        write_text_atomic(files.owned(self.out, SUMMARY_FILE), json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
        if self.flagged:
            self.console.print(Text(self.flagged, style="yellow"))
        else:
            self._say_unjudged()
        if recommended is None and self.watch.history:
            self.console.print(Text(f"probe: no checkpoint kept probe_kl under {self.watch.threshold:g}, so none is "
                                    "recommended; lower train.lr or the steps to find one.", style="yellow"))
        if recommended is not None:
            self.console.print(f"probe: recommended checkpoint step-{recommended} (best eval loss with probe_kl under "
                               f"{self.watch.threshold:g})", markup=False)
        share = self.seconds / train_seconds if train_seconds > 0 else 0.0
        self.console.print(f"probe: {self.seconds:.1f}s of the run's {train_seconds:.1f}s ({share:.0%}: the base's "
                           f"answers before step 1, the measurements at eval points and at the end)", markup=False)
        return summary

    def _say_unjudged(self) -> None:
        """The end of a run whose drift passed the threshold without being flagged: with fewer than two eval
        points nobody can tell whether the task still gained, so say what was measured and how to find out."""
        evaluated = [e for _, e, _ in self.watch.history if e is not None]
        step, _, kl = self.watch.history[-1] if self.watch.history else (0, None, 0.0)
        if kl > self.watch.threshold and len(evaluated) < 2:
            self.console.print(Text(f"probe: probe_kl {kl:.3f} at step {step} is above eval.probe_kl_threshold "
                                    f"{self.watch.threshold:g}, but with {len(evaluated)} eval point(s) sftlab cannot "
                                    "tell whether the task still gained from it: set train.eval_every_steps to see "
                                    "the trade-off.", style="yellow"))

    def _samples(self) -> list[dict[str, str]]:
        """Open-ended prompts with the base's sampled answer and the fine-tuned one, side by side."""
        chosen = [p for p in self.reference.prompts if p.open]
        base = self.reference.base.get("samples", [])
        tuned = self.last.get("samples", [])
        return [{"prompt": p.messages[-1]["content"], "base": b, "tuned": t} for p, b, t in zip(chosen, base, tuned)]


@contextmanager
def plain_attention(model: torch.nn.Module) -> Iterator[None]:
    """The model's own attention for the probe's padded batches while the loop trains packed (the packed
    kernels refuse a call without example boundaries)."""
    config = model.config
    original = getattr(config, "_attn_implementation", None)
    plain = {PACKED_SDPA: "sdpa", PACKED_EAGER: "eager"}.get(original)
    if plain is None:
        yield
        return
    config._attn_implementation = plain
    try:
        yield
    finally:
        config._attn_implementation = original


def forgetting_html(run_dir: Path) -> str:
    """report.html's Forgetting section: eval loss against probe_kl step by step (the threshold marked), the
    probe's numbers per eval point, the recommended checkpoint, and three probe answers base vs fine-tuned.
    Empty when the run had no probe."""
    import html

    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        return ""
    summary = json.loads(path.read_text(encoding="utf-8"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
               if line.strip()] if (run_dir / "metrics.jsonl").is_file() else []
    probed = {r["step"]: r for r in records if "probe_kl" in r}
    rows = [[str(s), _fmt(r.get("eval_loss")), _fmt(r["probe_nll"]), _fmt(r["probe_kl"]),
             _fmt(r.get("probe_distinct2")), _fmt(r.get("probe_repetition")), _fmt(r.get("probe_length"))]
            for s, r in sorted(probed.items())]
    base = summary["base"]
    rows.insert(0, ["base", "—", _fmt(base.get("probe_nll")), "0", _fmt(base.get("probe_distinct2")),
                    _fmt(base.get("probe_repetition")), _fmt(base.get("probe_length"))])
    header = ["step", "eval loss", "probe_nll", "probe_kl", "distinct-2", "repetition", "length"]
    table = "<table>" + "<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>"
    verdict = html.escape(summary["flagged"]
                          or f"probe_kl stayed under eval.probe_kl_threshold {summary['threshold']:g} "
                          "whenever the eval loss had stopped improving.")
    recommended = summary.get("recommended_step")
    advice = (f"<p>Recommended checkpoint: <code>checkpoints/step-{recommended}</code> (kept).</p>"
              if recommended else "")
    samples = "".join(f"<tr><td><pre class=\"sample\">{html.escape(s['prompt'])}</pre></td><td><pre class=\"sample\">"
                      f"{html.escape(s['base'])}</pre></td><td><pre class=\"sample\">"
                      f"{html.escape(s['tuned'])}</pre></td></tr>"
                      for s in summary.get("samples", [])[:3])
    points = [(r["probe_kl"], r["eval_loss"], s) for s, r in sorted(probed.items()) if "eval_loss" in r]
    return (trajectory_svg(points, summary["threshold"]) + f"<p>{verdict}</p>{advice}{table}"
            + ("<h3>Probe answers, base vs fine-tuned (sampled, fixed seed)</h3><table class=\"samples\"><tr><th>prompt"
               f"</th><th>base</th><th>fine-tuned</th></tr>{samples}</table>" if samples else ""))


def trajectory_svg(points: list[tuple[float, float, int]], threshold: float) -> str:
    """Eval loss (y) against probe_kl (x), one dot per eval point joined in step order, each labelled with its
    step; the threshold as a dashed vertical line."""
    if not points:
        return ""
    width, height, left, bottom, top, right = 760, 300, 64, 40, 20, 20
    xs, ys = [p[0] for p in points] + [threshold], [p[1] for p in points]
    x_hi, y_lo, y_hi = max(xs) * 1.05 or 1.0, min(ys), max(ys)
    spread = (y_hi - y_lo) or 1.0

    def at(kl: float, loss: float) -> tuple[float, float]:
        return (left + kl / x_hi * (width - left - right),
                top + (y_hi - loss) / spread * (height - top - bottom))

    dots = [at(kl, loss) for kl, loss, _ in points]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in dots)
    marks = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="#1f77b4"/><text x="{x + 5:.1f}" y="{y - 5:.1f}" '
                    f'font-size="10">{step}</text>' for (x, y), (_, _, step) in zip(dots, points))
    tx = at(threshold, y_lo)[0]
    return (f'<svg id="forgetting-curve" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
            f'xmlns="http://www.w3.org/2000/svg"><polyline points="{line}" fill="none" stroke="#1f77b4"/>{marks}'
            f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{top}" y2="{height - bottom}" stroke="#d62728" '
            'stroke-dasharray="4"/>'
            f'<text x="{tx + 4:.1f}" y="{top + 10}" font-size="10" fill="#d62728">threshold {threshold:g}</text>'
            f'<text x="{width / 2}" y="{height - 8}" font-size="11" text-anchor="middle">probe_kl (forgetting)</text>'
            f'<text x="14" y="{height / 2}" font-size="11" transform="rotate(-90 14 {height / 2})" '
            'text-anchor="middle">'
            f'eval loss ({y_lo:.3f} – {y_hi:.3f})</text></svg>')


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
