"""OUTPUT/report.html: one self-contained page about a run (no scripts, no external files).

At the end of training the loop calls `write_report(run_dir, setup=setup)`, which saves what only the
training process knows (data stats and quality, trainable parameters, peak memory, a few encoded
examples) to OUTPUT/report.json and renders report.html from it plus the run dir's own files
(config.yaml, metrics.jsonl). A later call without `setup` re-renders from those files, so a caller can
add before/after generations once training is over:

    write_report(run_dir, samples=[{"prompt": ..., "reference": ..., "before": ..., "after": ...}])

The loss curve is an inline SVG (train/loss_curve.py) drawn from metrics.jsonl; the page carries a
Content-Security-Policy that forbids every fetch, so nothing it shows can come from anywhere else.
"""

from __future__ import annotations

import html
import io
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftlab import __version__, files
from sftlab.config import PAIR_STAGES, sources_of
from sftlab.data.inspect import TOKEN_CSS, example_record, tokens_html
from sftlab.data.quality import QUALITY_MAX_ROWS
from sftlab.data.sources import describe
from sftlab.errors import SftlabError
from sftlab.files import write_text_atomic
from sftlab.train.forgetting import SUMMARY_FILE, forgetting_html
from sftlab.train.loss_curve import loss_svg
from sftlab.train.metrics import PHASES, read_metrics

if TYPE_CHECKING:
    from sftlab.train.setup import Setup

REPORT_DATA, REPORT_PAGE = "report.json", "report.html"
NUM_EXAMPLES = 3
"""Training examples shown with their trained tokens highlighted."""
SAMPLE_FIELDS = ("prompt", "reference", "before", "after")


def write_report(run_dir: str | Path, *, setup: Setup | None = None,
                 samples: Sequence[Mapping[str, str]] | None = None) -> Path:
    """Write run_dir/report.html and return its path.

    With `setup` (the training process, rank 0, after the export): collect the run's facts into
    report.json first, replacing any earlier one. Without it: re-render from the report.json a finished
    run left. `samples` (dicts with `prompt` and optionally `reference`, `before`, `after`) replace the
    samples shown side by side; None keeps the ones already saved."""
    run_dir = Path(run_dir)
    data_path = run_dir / REPORT_DATA
    if setup is not None:
        facts = collect(setup)
    elif data_path.is_file():
        facts = json.loads(data_path.read_text(encoding="utf-8"))
    else:
        raise SftlabError(f"{run_dir} has no {REPORT_DATA}: it is written when `sftlab train` finishes. Train "
                          f"into this dir first, or pass the run's setup.")
    if samples is not None:
        facts["samples"] = _checked_samples(samples)
    write_text_atomic(files.owned(run_dir, REPORT_DATA), json.dumps(facts, indent=1, ensure_ascii=False))
    page = render(facts, run_dir)
    return write_text_atomic(files.owned(run_dir, REPORT_PAGE), page)


def collect(setup: Setup) -> dict[str, Any]:
    """What the page shows that the run dir's files do not hold (plain JSON data)."""
    cfg, model, method = setup.config, setup.model, setup.method
    trainable = sum(p.numel() for p in method.trainable_parameters(model).values())
    total = sum(p.numel() for p in model.parameters())
    shown = range(min(NUM_EXAMPLES, len(setup.train_indices)))
    quality, quality_text = _quality(setup)
    return {
        "sftlab": __version__, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": cfg.model.path, "device": str(setup.device),
        "dtype": str(model.get_input_embeddings().weight.dtype).removeprefix("torch."),
        "method": {"name": method.name, "trainable": trainable, "total": total},
        "data": _data_facts(setup), "quality": quality, "quality_text": quality_text,
        "memory": peak_memory(setup.device),
        "examples": [example_record(example, setup.tokenizer) for i in shown
                     for example in _examples(setup.train_data, int(setup.train_indices[i]))],
        "samples": [],
    }


def _data_facts(setup: Setup) -> dict[str, Any]:
    cfg = setup.config
    train = {"file": describe(cfg.data.train), **asdict(setup.train_data.stats), "used": len(setup.train_indices)}
    if setup.mixture is not None:
        train["sources"] = setup.mixture.table(_part_stats(setup.train_data), pairs=cfg.stage in PAIR_STAGES)
    unit = "pairs" if cfg.stage in PAIR_STAGES else "examples"  # a pair's two sides are two examples in the stats
    if setup.eval_data is None or setup.eval_indices is None:
        return {"train": train, "eval": None, "unit": unit}
    if setup.eval_data is setup.train_data:  # data.eval_fraction: held out of the training file
        return {"train": train, "eval": {"held_out": len(setup.eval_indices)}, "unit": unit}
    return {"train": train, "eval": {"file": describe(cfg.data.eval), **asdict(setup.eval_data.stats),
                                     "used": len(setup.eval_indices)}, "unit": unit}


def _part_stats(data: Any) -> list[Any]:
    """Each source's DatasetStats (one, for a single source)."""
    mixed = getattr(data, "examples", data)
    return [p.stats for p in getattr(mixed, "parts", [mixed])]


def _sources_html(table: list[Mapping[str, Any]]) -> str:
    """The per-source table: what each source read and gave, and its share of an epoch (asked vs got)."""
    rows = [[r["source"], _number(r["rows"]), _number(r["rejected"]), _number(r["examples"]), _number(r["tokens"]),
             _number(r["trained_tokens"]), _number(r["per_epoch"]),
             "—" if r["asked"] is None else f"{r['asked']:.1%}", f"{r['got']:.1%}",
             f"x{r['repeated']:.2f}" if r["repeated"] else ""] for r in table]
    return _table(rows, ["source", "rows", "rejected", "examples", "tokens", "trained tokens", "per epoch",
                         "share asked", "share got", "repeated"])


def _examples(data: Any, index: int) -> list[Any]:
    """Item `index` of the training data as examples: one, or a preference pair's chosen and rejected sides."""
    return list(data.pair(index)) if hasattr(data, "pair") else [data[index]]


def _quality(setup: Setup) -> tuple[dict[str, Any] | None, str | None]:
    """`sftlab check`'s report on the training file (its dict and its text) — of conversations, or of
    preference pairs (stages dpo, orpo, simpo), of feedback (stage kto) — or (None, None) if the file is too big."""
    if setup.train_data.stats.rows > QUALITY_MAX_ROWS or len(sources_of(setup.config.data.train)) != 1:
        return None, None  # several sources: `sftlab check` reports on each
    if setup.config.stage not in PAIR_STAGES and setup.config.stage != "kto":
        return _saved_quality(setup.train_data)
    from rich.console import Console

    data = setup.config.data
    text = io.StringIO()
    if setup.config.stage == "kto":  # counted from the encoded rows and their labels
        from sftlab.data import feedback_quality

        report = feedback_quality.from_dataset(setup.train_data, sources_of(data.train)[0], data, setup.config.kto,
                                               data.special_tokens_in_content)
        feedback_quality.write(report, console=Console(file=text, width=100, color_system=None, highlight=False))
        return report.to_dict(), text.getvalue()
    from sftlab.data import pair_quality
    from sftlab.data.encode import Encoder
    from sftlab.data.templates import load_template

    encoder = Encoder(setup.tokenizer, load_template(data.template, setup.tokenizer), train_on=data.train_on,
                      max_seq_len=data.max_seq_len, truncation=data.truncation,
                      add_special_tokens=data.add_special_tokens, max_row_bytes=data.max_row_bytes,
                      special_tokens_in_content=data.special_tokens_in_content)
    report = pair_quality.analyze_pairs(sources_of(data.train)[0], data, encoder)  # pairs: encoded again (<= 20k rows)
    pair_quality.write(report, console=Console(file=text, width=100, color_system=None, highlight=False))
    return report.to_dict(), text.getvalue()


def _saved_quality(data: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The conversations' report the dataset writer tallied while encoding them (data/quality.py WriterQuality):
    the report reads it and never encodes the training data again."""
    parts = getattr(data, "parts", [data])
    saved = parts[0].quality() if len(parts) == 1 and hasattr(parts[0], "quality") else None
    return (None, None) if saved is None else (saved["report"], saved["text"])


def peak_memory(device: Any) -> dict[str, int]:
    """Peak resident memory of this process (VmHWM) and, on CUDA, the most memory torch allocated."""
    out = {"peak_rss_bytes": _peak_rss()}
    if getattr(device, "type", None) == "cuda":
        import torch

        out["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
        out["cuda_max_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
    return out


def _peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:  # not Linux
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _checked_samples(samples: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    out = []
    for index, sample in enumerate(samples):
        if not isinstance(sample, Mapping) or "prompt" not in sample:
            raise SftlabError(f"sample {index}: expected a dict with 'prompt' and any of reference, before, after; "
                              f"found {sample!r:.80}")
        unknown = set(sample) - set(SAMPLE_FIELDS)
        if unknown:
            raise SftlabError(f"sample {index}: unknown keys {sorted(unknown)}; expected {', '.join(SAMPLE_FIELDS)}")
        out.append({key: str(sample[key]) for key in SAMPLE_FIELDS if sample.get(key) is not None})
    return out


# --- rendering ----------------------------------------------------------------------------------------

def run_records(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train lines, eval lines) of metrics.jsonl, one per step: after a resume the re-run steps' lines
    replace those the killed run wrote."""
    path = run_dir / "metrics.jsonl"
    records = read_metrics(path) if path.is_file() else []
    train = {r["step"]: r for r in records if "loss" in r}
    evals = {r["step"]: r for r in records if "eval_loss" in r}
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def render(facts: Mapping[str, Any], run_dir: Path) -> str:
    """The page, from report.json's facts and the run dir's config.yaml and metrics.jsonl."""
    train, evals = run_records(run_dir)
    config = run_dir / "config.yaml"
    config_text = config.read_text(encoding="utf-8") if config.is_file() else "(no config.yaml)"
    sections = [
        _cards(facts, train, evals),
        _section("loss", "Loss", loss_svg([(r["step"], r["loss"]) for r in train],
                                          [(r["step"], r["eval_loss"]) for r in evals])),
        _section("forgetting", "Forgetting (the probe)", forgetting_html(run_dir))
        if (run_dir / SUMMARY_FILE).is_file() else "",
        _section("data", "Data", _data_html(facts) + _eval_by_source_html(evals)),
        _section("method", "Method", _method_html(facts["method"])),
        _section("throughput", "Throughput and memory", _speed_html(train, facts["memory"])),
        _section("examples", "Training examples", _examples_html(facts["examples"])),
        _section("samples", "Before / after", _samples_html(facts.get("samples", []))) if facts.get("samples") else "",
        _section("config", "Config", f"<details><summary>config.yaml (resolved: every default filled in)"
                                     f"</summary><pre>{html.escape(config_text)}</pre></details>"),
    ]
    title = f"sftlab run: {run_dir.resolve().name}"
    subtitle = (f"{facts['method']['name']} on {facts['model']} · {facts['device']}, {facts['dtype']} · "
                f"sftlab {facts['sftlab']} · {facts['created']} · {run_dir.resolve()}")
    return _PAGE.format(title=html.escape(title), subtitle=html.escape(subtitle), css=_CSS + TOKEN_CSS,
                        body="\n".join(s for s in sections if s))


def _eval_by_source_html(evals: list[dict]) -> str:
    """The last evaluation's loss of each eval source (eval_loss/<source> in metrics.jsonl), if there are several."""
    last = evals[-1] if evals else {}
    rows = [[key.split("/", 1)[1], f"{value:.4f}"] for key, value in last.items() if key.startswith("eval_loss/")]
    if not rows:
        return ""
    return f"<h3>Eval loss per source (step {last['step']:,})</h3>" + _table(
        rows + [["all sources", f"{last['eval_loss']:.4f}"]], ["source", "eval loss"])


def _section(anchor: str, heading: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(heading)}</h2>\n{body}\n</section>'


def _cards(facts: Mapping[str, Any], train: list[dict], evals: list[dict]) -> str:
    method, speed = facts["method"], _throughput(train)
    cards = [("steps", f"{train[-1]['step']:,}" if train else "—"),
             ("final train loss", f"{train[-1]['loss']:.4f}" if train else "—")]
    if evals:
        last = evals[-1]
        extra = f"ppl {last['eval_perplexity']:.2f}" if "eval_perplexity" in last else \
            f"preference accuracy {last.get('eval_accuracy', 0):.3f}"  # stage dpo
        cards.append(("eval loss", f"{last['eval_loss']:.4f} ({extra})"))
    cards += [("tokens/s", f"{speed['tokens_per_s']:,.0f}" if speed else "—"),
              ("supervised tokens/s", f"{speed['supervised_per_s']:,.0f}" if speed else "—"),
              ("trainable", f"{_share(method)} — {_count(method['trainable'])}"),
              ("peak RSS", _bytes(facts["memory"]["peak_rss_bytes"]))]
    items = "".join(f'<div class="card"><div class="k">{html.escape(k)}</div>'
                    f'<div class="v">{html.escape(v)}</div></div>' for k, v in cards)
    return f'<div class="cards" id="summary">{items}</div>'


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _data_html(facts: Mapping[str, Any]) -> str:
    data, names = facts["data"], ["train"]
    splits = [data["train"]]
    if data["eval"] is not None and "rows" in data["eval"]:
        names.append("eval")
        splits.append(data["eval"])
    pairs = data.get("unit") == "pairs"
    trained = "scored" if pairs else "trained"
    fields = [("file", "file"), ("rows read", "rows"),
              ("pair sides (chosen + rejected)" if pairs else "examples", "examples"),
              ("pairs used" if pairs else "examples used", "used"),
              ("tokens", "tokens"), (f"{trained} tokens", "trained_tokens"), ("truncated", "truncated")]
    rows = [[label] + [_number(s.get(key)) for s in splits] for label, key in fields]
    rows.append([f"{trained} share of tokens"] + [f"{s['trained_tokens'] / max(s['tokens'], 1):.1%}" for s in splits])
    reasons = sorted({reason for s in splits for reason in s["rejected"]})
    rows += [[f"rejected: {reason}"] + [_number(s["rejected"].get(reason, 0)) for s in splits] for reason in reasons]
    parts = [_table(rows, ["", *names])]
    if data["train"].get("sources"):
        parts.append(_sources_html(data["train"]["sources"]))
    if data["eval"] is not None and "held_out" in data["eval"]:
        parts.append(f"<p>eval: {data['eval']['held_out']:,} {data.get('unit', 'examples')} held out of the "
                     "training file (data.eval_fraction).</p>")
    if reasons:
        parts.append('<p>Every rejected row is listed with its reason in <code>rejects.jsonl</code>.</p>')
    parts.append(_quality_html(facts.get("quality"), facts.get("quality_text")))
    return "\n".join(parts)


def _quality_html(quality: Mapping[str, Any] | None, text: str | None) -> str:
    if quality is None or text is None:
        return (f"<p>Quality summary left out: the training data has more than {QUALITY_MAX_ROWS:,} rows, or several "
                "sources. Run <code>sftlab check</code> on it for the full report (per source).</p>")
    notes = [f'<li class="bad">{html.escape(p)}</li>' for p in quality["problems"]]
    notes += [f'<li class="warn">{html.escape(w)}</li>' for w in quality["warnings"]]
    verdict = "no problems found" if not notes else f"{len(notes)} finding(s)"
    listing = f"<ul>{''.join(notes)}</ul>" if notes else ""
    return (f"<h3>Quality (<code>sftlab check</code>): {html.escape(verdict)}</h3>{listing}"
            f"<details><summary>the full check report</summary><pre>{html.escape(text)}</pre></details>")


def _method_html(method: Mapping[str, Any]) -> str:
    return _table([["method", method["name"]], ["trainable parameters", f"{method['trainable']:,}"],
                   ["all parameters", f"{method['total']:,}"], ["trainable share", _share(method)]])


def _throughput(train: list[dict]) -> dict[str, float] | None:
    """Over the logged steps: their tokens and supervised tokens over their seconds."""
    seconds = sum(r.get("seconds", 0.0) for r in train)
    if not train or seconds <= 0:
        return None
    return {"tokens_per_s": sum(r.get("tokens", 0) for r in train) / seconds,
            "supervised_per_s": sum(r.get("supervised_tokens", 0) for r in train) / seconds,
            "seconds_per_step": statistics.mean(r.get("seconds", 0.0) for r in train),
            "seconds": seconds}


def _speed_html(train: list[dict], memory: Mapping[str, int]) -> str:
    speed = _throughput(train)
    rows: list[list[str]] = []
    if speed:
        rows += [["tokens/s", f"{speed['tokens_per_s']:,.1f}"],
                 ["supervised tokens/s", f"{speed['supervised_per_s']:,.1f}"],
                 ["seconds per step (mean)", f"{speed['seconds_per_step']:.3f}"],
                 ["over", f"{len(train):,} logged steps, {speed['seconds']:,.2f} s"]]
        for phase in PHASES:
            if f"time_{phase}" in train[-1]:
                mean = statistics.mean(r.get(f"time_{phase}", 0.0) for r in train)
                rows.append([f"  {phase} (train.profile, mean)", f"{1000 * mean:,.1f} ms"])
    rows.append(["peak RSS (this process)", _bytes(memory["peak_rss_bytes"])])
    if "cuda_max_allocated_bytes" in memory:
        rows += [["CUDA max allocated", _bytes(memory["cuda_max_allocated_bytes"])],
                 ["CUDA max reserved", _bytes(memory["cuda_max_reserved_bytes"])]]
    return _table(rows)


def _examples_html(examples: Sequence[Mapping[str, Any]]) -> str:
    from sftlab.data.encode import IGNORE_INDEX

    blocks = [("<p>Green tokens are trained (the loss sees them); grey ones are not. Hover a token for its "
               "position and id.</p>")]
    for record in examples:
        trained = sum(1 for label in record["labels"] if label != IGNORE_INDEX)
        blocks.append(f'<div class="example"><div class="head">{html.escape(record["where"])} — '
                      f'{len(record["labels"])} tokens, {trained} trained</div>'
                      f"<pre>{tokens_html(record)}</pre></div>")
    return "\n".join(blocks)


def _samples_html(samples: Sequence[Mapping[str, str]]) -> str:
    columns = [key for key in SAMPLE_FIELDS if any(key in s for s in samples)]
    head = "".join(f"<th>{key}</th>" for key in columns)
    rows = "".join("<tr>" + "".join(f'<td><pre class="sample">{html.escape(s.get(key, "—"))}</pre></td>'
                                    for key in columns) + "</tr>" for s in samples)
    return f'<table class="samples"><tr>{head}</tr>{rows}</table>'


def _share(method: Mapping[str, Any]) -> str:
    return f"{100 * method['trainable'] / max(method['total'], 1):.2f}%"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"


def _number(value: Any) -> str:
    if isinstance(value, list):  # several sources
        return ", ".join(map(str, value))
    return f"{value:,}" if isinstance(value, int) else "—" if value is None else str(value)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 76rem;
       padding: 0 1rem; color: #222; }
h1 { margin-bottom: .2rem; } .subtitle { color: #666; margin-top: 0; font-size: 14px; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2rem; }
.cards { display: flex; flex-wrap: wrap; gap: .75rem; margin: 1rem 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: .5rem .9rem; min-width: 9rem; }
.card .k { color: #666; font-size: 12px; } .card .v { font-size: 20px; font-weight: 600; }
table { border-collapse: collapse; margin: .5rem 0; font-size: 14px; }
th, td { border: 1px solid #e3e3e3; padding: .25rem .6rem; text-align: left; vertical-align: top; }
td:not(:first-child) { font-variant-numeric: tabular-nums; }
table.samples { width: 100%; table-layout: fixed; } pre.sample { margin: 0; }
.example { border: 1px solid #ddd; border-radius: 6px; margin: 1rem 0; padding: .5rem 1rem; }
.head { font-weight: 600; color: #333; }
li.bad { color: #b00; } li.warn { color: #8a5a00; }
svg .plot { fill: #fff; stroke: #bbb; } svg .grid { stroke: #eee; }
svg .tick { font-size: 11px; fill: #555; } svg .label { font-size: 12px; fill: #333; }
svg .train { fill: none; stroke: #1f77b4; stroke-width: 1.6; } svg .train-dot { fill: #1f77b4; }
svg .eval { fill: none; stroke: #d62728; stroke-width: 1.4; stroke-dasharray: 5 3; }
svg .eval-point { fill: #d62728; }
.caption { color: #666; font-size: 13px; margin-top: .2rem; }
details pre { background: #f7f7f7; padding: .5rem; overflow-x: auto; }
"""

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<title>{title}</title>
<style>{css}</style></head><body>
<h1>{title}</h1>
<p class="subtitle">{subtitle}</p>
{body}
</body></html>
"""
