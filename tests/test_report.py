"""OUTPUT/report.html: written by every run, self-contained, and it renders in headless Chromium without
errors, with the loss curve drawn from metrics.jsonl and the run's numbers on it."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from rich.console import Console

from conftest import tiny_model_dir
from sftlab.config import load_config
from sftlab.data.encode import IGNORE_INDEX
from sftlab.errors import SftlabError
from sftlab.runs import prepare, train
from sftlab.train.loss_curve import MAX_CURVE_POINTS, WIDTH, loss_svg
from sftlab.train.report import write_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
QA = [("What is the capital of France?", "Paris."), ("What is 2+2?", "Four."),
      ("Who wrote <Hamlet>?", "Shakespeare & co."), ("Color of the sky?", "Blue, on a clear day."),
      ("Name a prime number.", "Seven."), ("Say hi.", "Hi there!")]
STEPS = 6
QUIET = Console(quiet=True)
SAMPLES = [{"prompt": "Who wrote <Hamlet>?", "reference": "Shakespeare & co.", "before": "<b>no idea</b>",
            "after": "Shakespeare & co."}]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 6-step LoRA run (eval every 2 steps on held-out rows, one bad row skipped), about a second."""
    root = tmp_path_factory.mktemp("report")
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"messages": []}\n', encoding="utf-8")
    cfg = load_config(overrides=[f"model={tiny_model_dir(root / 'model')}", f"data.train={data}",
                                 f"output_dir={root / 'run'}", "data.cache=false", "data.on_bad_row=skip",
                                 f"train.max_steps={STEPS}", "train.micro_batch_size=2", "data.eval_fraction=0.3",
                                 "train.eval_every_steps=2", "train.lr=1e-2", "method=lora"])
    result = train(prepare(cfg, console=QUIET), console=QUIET)
    assert result.report == root / "run" / "report.html"
    return root / "run"


def browser() -> str:
    found = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    if found is None:
        pytest.fail("headless Chromium is needed to check report.html and none is on PATH: `make test` installs "
                    "Debian's (scripts/install_chromium.sh, as root); or apt-get install -y --no-install-recommends "
                    "chromium / brew install --cask chromium.")
    return found


def chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Load `page` in headless Chromium; fail on any console message (script errors, blocked loads)."""
    command = [browser(), "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run",
               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args, page.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, "the page logged to the console:\n" + "\n".join(console)
    return done


class Elements(HTMLParser):
    """Every element's tag and attributes, in document order, and the text of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def find(self, tag: str, **attrs: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.elements if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]


def test_report_renders_in_chromium_with_the_loss_curve_and_the_numbers(run_dir: Path, tmp_path: Path) -> None:
    page = run_dir / "report.html"
    dom = Elements()
    dom.feed(chromium(page, tmp_path / "profile", "--dump-dom").stdout)
    text = " ".join(" ".join(dom.text).split())
    train_lines, eval_lines = metrics(run_dir)
    assert len(train_lines) == STEPS and len(eval_lines) == STEPS // 2

    assert len(dom.find("svg", id="loss-curve")) == 1
    (curve,) = dom.find("polyline", id="train-loss")
    assert len(curve["points"].split()) == STEPS
    assert len(dom.find("circle", **{"class": "eval-point"})) == len(eval_lines)

    facts = json.loads((run_dir / "report.json").read_text())
    method, stats = facts["method"], facts["data"]["train"]
    tokens_per_s = sum(r["tokens"] for r in train_lines) / sum(r["seconds"] for r in train_lines)
    for expected in (f"final train loss {train_lines[-1]['loss']:.4f}", f"eval loss {eval_lines[-1]['eval_loss']:.4f}",
                     f"tokens/s {tokens_per_s:,.0f}", f"trainable parameters {method['trainable']:,}",
                     f"rows read {stats['rows']}", f"examples {stats['examples']}", f"tokens {stats['tokens']}",
                     f"trained tokens {stats['trained_tokens']}", "rejected: no messages 1", "method lora",
                     "peak RSS", "1 of the 7 rows (14%) are rejected", "turns per conversation"):
        assert expected in text, expected
    assert method["trainable"] < method["total"] and facts["memory"]["peak_rss_bytes"] > 10 * 2**20

    # Three examples, their trained tokens highlighted exactly (the spans `sftlab inspect --format html` makes).
    assert len(dom.find("div", **{"class": "example"})) == 3
    trained = sum(label != IGNORE_INDEX for record in facts["examples"] for label in record["labels"])
    assert len(dom.find("span", **{"class": "t on"})) == trained > 0
    assert "eval_fraction: 0.3" in text  # the resolved config, folded in a <details>


def test_screenshot_shows_the_curve(run_dir: Path, tmp_path: Path) -> None:
    from matplotlib.image import imread

    shot = tmp_path / "report.png"
    chromium(run_dir / "report.html", tmp_path / "profile", "--hide-scrollbars", "--window-size=1200,900",
             f"--screenshot={shot}")
    pixels = imread(shot)[..., :3]  # (H, W, 3) floats in [0, 1]
    assert pixels.shape[:2] == (900, 1200) and pixels.std() > 0.05

    def near(rgb: tuple[int, int, int]) -> int:
        return int((abs(pixels * 255 - rgb).max(axis=-1) < 40).sum())

    assert near((31, 119, 180)) > 200  # the train-loss line's blue
    assert near((214, 39, 40)) > 50    # the eval dots' red


def test_samples_added_after_training_are_shown_escaped(run_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoints", "adapter"))
    before = json.loads((copy / "report.json").read_text())
    assert write_report(copy, samples=SAMPLES) == copy / "report.html"
    after = json.loads((copy / "report.json").read_text())
    assert after["samples"] == SAMPLES and {k: v for k, v in after.items() if k != "samples"} == \
        {k: v for k, v in before.items() if k != "samples"}
    dom = Elements()
    dom.feed(chromium(copy / "report.html", tmp_path / "profile", "--dump-dom").stdout)
    assert [a.get("id") for t, a in dom.elements if t == "section"][-2:] == ["samples", "config"]
    assert not dom.find("b")  # the sample's markup is text, not markup
    text = "".join(dom.text)
    assert "<b>no idea</b>" in text and "Shakespeare & co." in text and "Who wrote <Hamlet>?" in text
    write_report(copy)  # re-rendering keeps the samples
    assert "&lt;b&gt;no idea&lt;/b&gt;" in (copy / "report.html").read_text()


def test_page_is_self_contained(run_dir: Path) -> None:
    page = (run_dir / "report.html").read_text()
    assert "Content-Security-Policy" in page and "<script" not in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)


def test_write_report_errors() -> None:
    with pytest.raises(SftlabError, match="no report.json"):
        write_report(Path("/nonexistent-run"))


def test_bad_samples_are_refused(run_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoints", "adapter"))
    with pytest.raises(SftlabError, match="expected a dict with 'prompt'"):
        write_report(tmp_path / "run", samples=["just text"])
    with pytest.raises(SftlabError, match=r"unknown keys \['output'\]"):
        write_report(tmp_path / "run", samples=[{"prompt": "p", "output": "o"}])


@pytest.mark.parametrize("steps", [1, 2, 7, 2 * MAX_CURVE_POINTS + 3])
def test_curve_has_a_point_per_step_up_to_the_cap(steps: int) -> None:
    train = [(s, 5.0 / s) for s in range(1, steps + 1)]
    svg = loss_svg(train, [])
    (points,) = re.findall(r'id="train-loss" class="train" points="([^"]*)"', svg)
    drawn = points.split()
    stride = -(-steps // MAX_CURVE_POINTS)  # beyond the cap, every stride-th step and the last
    assert len(drawn) == len(range(0, steps, stride)) + ((steps - 1) % stride != 0)
    xs = [float(p.split(",")[0]) for p in drawn]
    assert xs == sorted(xs) and all(0 <= float(v) <= WIDTH for p in drawn for v in p.split(","))
    assert steps == 1 or xs[-1] == max(xs) > xs[0]  # the x axis spans the steps: first left, last right


def test_training_tokenises_each_row_once_and_the_report_reads_the_saved_check(tmp_path, monkeypatch):
    """A whole run (prepare, train, report) tokenises every training row exactly once: the report's `sftlab check`
    summary is the one the dataset writer tallied while encoding, saved beside the examples, and equals what
    `quality.analyze` gives on the file."""
    from collections import Counter

    from sftlab.data import quality
    from sftlab.data.encode import Encoder
    from sftlab.data.templates import load_template

    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = load_config(overrides=[f"model={tiny_model_dir(tmp_path / 'model')}", f"data.train={data}",
                                 f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
                                 "train.max_steps=2", "train.micro_batch_size=2", "method=lora"])
    tokenised: Counter[str] = Counter()
    real = Encoder._tokenize

    def counted(self, texts):
        tokenised.update(texts)
        return real(self, texts)

    monkeypatch.setattr(Encoder, "_tokenize", counted)
    setup = prepare(cfg, console=QUIET)
    train(setup, console=QUIET)
    monkeypatch.setattr(Encoder, "_tokenize", real)
    assert sum(tokenised.values()) == len(QA) and set(tokenised.values()) == {1}
    facts = json.loads((tmp_path / "run" / "report.json").read_text(encoding="utf-8"))
    used = setup.config.data  # max_seq_len filled in from the model
    encoder = Encoder(setup.tokenizer, load_template(used.template, setup.tokenizer), max_seq_len=used.max_seq_len)
    direct = quality.analyze(data, used, encoder)
    assert facts["quality"] == json.loads(json.dumps(direct.to_dict())) and facts["quality"]["examples"] == len(QA)
    text = io.StringIO()
    quality.write(direct, console=Console(file=text, width=100, color_system=None, highlight=False))
    assert facts["quality_text"] == text.getvalue()
