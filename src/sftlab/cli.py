"""`sftlab train|inspect|check|merge|export|generate|chat`: argv -> config -> one call (into runs.py for the run
lifecycle, generate.py, data/). No logic lives here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from sftlab import __version__
from sftlab.config import PAIR_STAGES, Config, load_config
from sftlab.errors import SftlabError

GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
"""export/gguf.py's QUANTS, named here so that `sftlab --help` does not import torch (a test keeps them equal)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if "=" not in item or item.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [item for item in extra if item not in unknown]
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except SftlabError as exc:
        from rich.console import Console
        from rich.text import Text

        # A Text, not markup: the message quotes the user's keys, values and paths, which may hold `[...]`.
        console = Console(stderr=True, highlight=False, soft_wrap=True)
        console.print(Text.assemble(("error:", "bold red"), " ", str(exc)))
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sftlab",
                                     description="Supervised fine-tuning, exact from template to adapter.")
    parser.add_argument("--version", action="version", version=f"sftlab {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _train_parser(commands)
    _merge_parser(commands)
    _export_parser(commands)
    _chat_parsers(commands)
    _data_parsers(commands)
    _eval_parser(commands)
    return parser


def _train_parser(commands: Any) -> None:
    train = commands.add_parser("train", help="fine-tune a model as the config says")
    train.add_argument("config", help="a YAML config (see examples/)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest checkpoint (the default, train.resume=auto)")
    train.add_argument("--no-resume", action="store_true",
                       help="start over even if checkpoints exist (they are removed)")
    train.add_argument("--overwrite", action="store_true",
                       help="output_dir holds a finished run: delete its files and train again")
    train.epilog = "Config overrides may follow as key=value, e.g. train.max_steps=100 lora.rank=8."
    train.set_defaults(run=_train)


def _merge_parser(commands: Any) -> None:
    merge = commands.add_parser("merge", help="fold a LoRA adapter into its base weights: a plain HF model dir")
    merge.add_argument("source", help="a run dir (with adapter/) or a PEFT-format adapter dir")
    merge.add_argument("--output", required=True, help="the merged model dir to write (new or empty; never the run "
                                                        "dir, the base model or a dir holding them)")
    merge.add_argument("--overwrite", action="store_true", help="replace --output if it already holds files")
    merge.add_argument("--base",
                       help="the base model (default: the run's model / the adapter's base_model_name_or_path)")
    merge.add_argument("--onto", choices=("dequantized", "original"),
                       help="QLoRA runs: fold the adapter onto the dequantised NF4 base it trained against "
                            "(default) or onto the base's original-precision weights")
    merge.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                       help="dtype of the merged weights (default: the base model's stored dtype, e.g. bf16 for a "
                            "bf16 release; the merge itself is computed in the loaded model's dtype)")
    merge.set_defaults(run=_merge)


def _export_parser(commands: Any) -> None:
    export = commands.add_parser("export", help="write a run's model where models run: one GGUF file (llama.cpp, "
                                                "Ollama, LM Studio) with an Ollama Modelfile beside it")
    export.add_argument("source", help="a run dir, an adapter dir, or a plain HF model dir")
    export.add_argument("--format", choices=("gguf", "hf"), required=True,
                        help="gguf: one file, the model merged; hf: a plain HF model dir, the adapter merged (what "
                             "sftlab merge writes)")
    export.add_argument("--quant", choices=GGUF_QUANTS,
                        help="weight type (default f16; norms stay f32; K-quants: llama-quantize the f16 file)")
    export.add_argument("--output", required=True, help="gguf: the .gguf file to write (NAME.Modelfile is written "
                                                         "beside it); hf: the model dir to write")
    export.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                        help="hf: dtype of the merged weights (default: the base model's stored dtype); "
                             "gguf: use --quant")
    export.add_argument("--base",
                        help="the base model (default: the run's model / the adapter's base_model_name_or_path)")
    export.add_argument("--overwrite", action="store_true", help="replace --output (and its Modelfile) if they exist")
    export.add_argument("--no-modelfile", action="store_true", help="write the .gguf file only")
    export.set_defaults(run=_export)


def _chat_parsers(commands: Any) -> None:
    for name, help_text in (("generate", "answer one prompt with a model, a run dir or a merged dir"),
                            ("chat", "talk to a model, a run dir or a merged dir (/reset, /exit)")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("model", help="a base model dir / hub id, a run dir, an adapter dir, or a merged dir")
        if name == "generate":
            command.add_argument("--prompt", required=True, help="the user message")
        command.add_argument("--system", help="a system message")
        command.add_argument("--tools", help="a JSON file with a list of tool (function) definitions, rendered "
                                             "through the chat template; tool calls are printed as parsed JSON")
        command.add_argument("--base", help="the base model for an adapter dir (default: the one it names)")
        command.add_argument("--temperature", type=float, default=0.7, help="0 means greedy (default 0.7)")
        command.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
        command.add_argument("--max-new-tokens", type=int, default=256)
        command.add_argument("--seed", type=int, help="makes sampling reproducible")
        command.set_defaults(run=_generate if name == "generate" else _chat)


def _data_parsers(commands: Any) -> None:
    inspect = commands.add_parser("inspect", help="show examples' tokens with the trained ones marked")
    _data_arguments(inspect)
    inspect.add_argument("-n", type=int, default=3, help="number of examples to show (default 3)")
    inspect.add_argument("--format", choices=("text", "json", "html"), default="text")
    inspect.add_argument("--output", help="write to this file instead of the terminal")
    inspect.add_argument("--no-color", action="store_true", help="mark trained spans with [[...]] instead of colour")
    inspect.set_defaults(run=_inspect)

    check = commands.add_parser("check", help="data-quality report (of preference pairs with stage=dpo|orpo|simpo, "
                                              "of feedback with stage=kto); non-zero exit when training would learn "
                                              "nothing")
    _data_arguments(check)
    check.add_argument("--format", choices=("text", "json"), default="text")
    check.add_argument("--rejects", help="where to write rejected rows (default: DATA's name + .rejects.jsonl); an "
                                          "existing file there is replaced only if it is an earlier rejects log")
    check.set_defaults(run=_check)


def _eval_parser(commands: Any) -> None:
    evaluate = commands.add_parser("eval", help="the forgetting probe and your own generation tasks on a base model, "
                                                "a run, an adapter dir or a merged dir: a table and eval.json")
    evaluate.add_argument("model", help="a base model dir / hub id, a run dir, an adapter dir, or a merged dir")
    evaluate.add_argument("--checkpoint", help="a run's kept checkpoint, e.g. step-200 (default: the final model)")
    evaluate.add_argument("--probe", help="builtin, none, or a JSONL file of prompts (default: the run's eval.probe, "
                                          "else builtin)")
    evaluate.add_argument("--tasks", help="a JSONL file of {messages, check} rows; check is contains, regex, exact "
                                          "or facts")
    evaluate.add_argument("--reference", help="a run dir (or its probe_reference.safetensors) whose base answers "
                                              "are the reference (default: the run's own, else the model's own)")
    evaluate.add_argument("--base", help="the base model for an adapter dir (default: the one it names)")
    evaluate.add_argument("--output", help="write eval.json here (default: into a run dir's own files; a model dir "
                                           "is never written to)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    evaluate.set_defaults(run=_eval)


def _eval(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from sftlab import eval as evaluation

    found = evaluation.evaluate(args.model, checkpoint=args.checkpoint, probe=args.probe, tasks=args.tasks,
                                reference=args.reference, base=args.base)
    shown = Table(title=f"sftlab eval {args.model}" + (f" ({args.checkpoint})" if args.checkpoint else ""))
    for column in ("metric", "this model", "base (reference)"):
        shown.add_column(column)
    for row in evaluation.table(found):
        shown.add_row(*row)
    Console().print(shown)
    if "reference" in found:
        print(f"reference answers: {found['reference']}")
    saved = evaluation.save(found, args.model, output=args.output, overwrite=args.overwrite)
    print(f"wrote {saved}" if saved else "eval.json not written (a model dir is never written to); pass --output FILE")
    return 0


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="?" if parser.prog.endswith("check") else None,
                        help="a data source: a .jsonl, .json, .parquet, .arrow or .csv file, a glob, a dataset "
                             "directory or a hub dataset id, of conversations (of preference pairs with "
                             "stage=dpo|orpo|simpo, of feedback rows with stage=kto)"
                             + ("; default: data.train (every source)" if parser.prog.endswith("check") else ""))
    parser.add_argument("--model", help="a local Hugging Face model or tokenizer dir (or a hub id)")
    parser.add_argument("--template", help="chatml | llama3 | auto | path to a .jinja file (default: data.template)")
    parser.add_argument("--config", help="a YAML config whose model and data settings apply")
    parser.epilog = "Config overrides may follow as key=value, e.g. data.train_on=last_assistant data.max_seq_len=1024."


def _config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model={args.model}")
    if args.template:
        overrides.append(f"data.template={args.template}")
    cfg = load_config(args.config, overrides)
    if not cfg.model.path:
        raise SftlabError("no tokenizer given: pass --model PATH (a Hugging Face model or tokenizer dir) "
                          "or set model in the config.")
    return cfg


def _encoder(cfg: Config):  # -> sftlab.data.encode.Encoder
    from sftlab.data.encode import Encoder
    from sftlab.data.templates import load_template
    from sftlab.models.load import load_tokenizer
    from sftlab.models.positions import with_max_seq_len

    tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    template = load_template(cfg.data.template, tokenizer)
    cfg = with_max_seq_len(cfg)  # check and inspect apply the limit training would
    return Encoder(tokenizer, template, train_on=cfg.data.train_on, max_seq_len=cfg.data.max_seq_len,
                   truncation=cfg.data.truncation, add_special_tokens=cfg.data.add_special_tokens,
                   special_tokens_in_content=cfg.data.special_tokens_in_content,
                   max_row_bytes=cfg.data.max_row_bytes)


def _train(args: argparse.Namespace) -> int:
    from sftlab import runs
    from sftlab.train.rundir import RunFinishedError
    from sftlab.train.signals import TrainingInterrupted

    overrides = list(args.overrides)
    if args.no_resume:
        overrides.append("train.resume=never")
    cfg = load_config(args.config, overrides)
    try:
        setup = runs.prepare(cfg, overwrite=args.overwrite)
    except RunFinishedError as exc:
        if not exc.same_config:
            raise
        print(f"nothing to do: {exc.nothing_to_do}", file=sys.stderr)
        return 0
    try:
        result = runs.train(setup)
    except TrainingInterrupted as exc:
        again = " ".join(["sftlab train", args.config, *args.overrides])
        raise TrainingInterrupted(f"{exc} That is: {again}", signum=exc.signum) from None
    finally:
        setup.dist.close()
    if setup.dist.main:
        loss = f", final loss {result.final_loss:.4f}" if result.final_loss is not None else ""
        print(f"done: {result.steps} steps{loss}; wrote {result.export_dir}")
        print(f"try it: sftlab chat {result.output_dir}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from sftlab.runs import merge

    for line in merge(args.source, args.output, base=args.base, onto=args.onto, dtype=args.dtype,
                      overwrite=args.overwrite):
        print(line)
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.format == "hf":  # one entry point for deployment: the same merge, its checks and its fidelity line
        if args.quant is not None or args.no_modelfile:
            raise SftlabError("--quant and --no-modelfile apply to --format gguf; --format hf writes the merged "
                              "model in --dtype (default: the base's stored dtype).")
        args.onto = None
        return _merge(args)
    if args.dtype is not None:
        raise SftlabError(f"--dtype applies to --format hf; a GGUF file's weights are set by --quant "
                          f"({', '.join(GGUF_QUANTS)}).")
    from sftlab.runs import export_gguf

    args.quant = args.quant or "f16"
    info = export_gguf(args.source, args.output, quant=args.quant, base=args.base, overwrite=args.overwrite,
                      with_modelfile=not args.no_modelfile)
    print(f"wrote {info['output']} ({info['architecture']}, {args.quant}, {info['tensors']} tensors; generation stops "
          f"at {info['eos_token']})")
    print(f"run it: llama-cli -m {info['output']} -cnv")
    if "modelfile" in info:
        print(f"or: ollama create {Path(info['output']).stem} -f {info['modelfile']}")
    return 0


def _load_chat(args: argparse.Namespace):  # -> (model, tokenizer, template, method)
    from sftlab.generate import check_sampling
    from sftlab.runs import load_for_inference

    check_sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   seed=args.seed)  # before the model loads

    return load_for_inference(args.model, base=args.base)


def _generate(args: argparse.Namespace) -> int:
    from sftlab.generate import generate, load_tools, show_reply

    model, tokenizer, template, method = _load_chat(args)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    tools = load_tools(args.tools)
    reply = generate(model, tokenizer, template, messages, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_p=args.top_p, seed=args.seed, method=method, tools=tools)
    print(show_reply(reply) if tools else reply)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from sftlab.generate import chat_repl, load_tools

    model, tokenizer, template, method = _load_chat(args)
    chat_repl(model, tokenizer, template, system=args.system, input_fn=lambda prompt: input(prompt),
              max_new_tokens=args.max_new_tokens, tools=load_tools(args.tools),
              temperature=args.temperature, top_p=args.top_p, seed=args.seed, method=method)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from sftlab.data import inspect as views
    from sftlab.data.rejects import RejectLog
    from sftlab.data.sources import read

    cfg = _config(args)
    encoder = _encoder(cfg)
    rejects = RejectLog()
    if cfg.stage in PAIR_STAGES:  # each pair as its two sides, chosen then rejected, the answer scored
        from sftlab.data.preference import PairEncoder, pair_row_limit, read_pairs

        pairs = read_pairs(args.data, role_map=cfg.data.role_map, on_bad_row=cfg.data.on_bad_row, rejects=rejects,
                           max_row_bytes=pair_row_limit(encoder))
        conversations = iter([side for pair in islice(pairs, max(args.n, 0)) for side in pair.conversations()])
        encoder = PairEncoder(encoder).encoder
    elif cfg.stage == "kto":  # each example with its answer scored
        from sftlab.data.feedback import FeedbackEncoder, read_feedback

        rows = read_feedback(args.data, role_map=cfg.data.role_map, on_bad_row=cfg.data.on_bad_row, rejects=rejects,
                             max_row_bytes=encoder.row_limit)
        conversations = (row.conversation() for row in rows)
        encoder = FeedbackEncoder(encoder).encoder
    else:
        from sftlab.data.reasoning import prepare

        conversations = prepare(read(args.data, cfg.data, on_bad_row=cfg.data.on_bad_row, rejects=rejects,
                                     max_row_bytes=encoder.row_limit),
                                encoder.template, reasoning=cfg.data.reasoning,
                                reasoning_turns=cfg.data.reasoning_turns)
    results = encoder.encode_batch(list(islice(conversations, max(args.n, 0) * (2 if cfg.stage in PAIR_STAGES else 1))))
    views.write(results, encoder.tokenizer, fmt=args.format, output=args.output, color=not args.no_color)
    if rejects.total:
        counts = ", ".join(f"{n} {reason}" for reason, n in rejects.counts.items())
        print(f"skipped {rejects.total} bad row(s) before these examples: {counts} "
              "(`sftlab check` lists them)", file=sys.stderr)
    return 0


def _check(args: argparse.Namespace) -> int:
    from sftlab.data import pair_quality, quality
    from sftlab.data.rejects import check_path
    from sftlab.data.sources import resolve_all

    if args.data is not None and "=" in args.data and not Path(args.data).exists():
        args.overrides, args.data = [args.data, *args.overrides], None  # `check data.train=[...]`: an override
    cfg = _config(args)
    value = args.data if args.data is not None else cfg.data.train
    if not value:
        raise SftlabError("no data to check: give DATA, or set data.train (in --config or as data.train=...).")
    sources = resolve_all(value)
    inputs = [path for source in sources for path in (*source.files, source.directory)] + [args.config, cfg.model.path]
    targets = [_rejects_path(args.rejects, s, n if len(sources) > 1 else None) for n, s in enumerate(sources)]
    for rejects in targets:
        check_path(rejects, inputs=inputs)  # before anything is read or written
    encoder = _encoder(cfg)
    ok = True
    for number, (source, rejects) in enumerate(zip(sources, targets)):
        if len(sources) > 1 and args.format == "text":
            print(f"== data source {number + 1} of {len(sources)}: {source.label} ==")
        if cfg.stage == "kto":  # feedback: usable examples, the desirable/undesirable balance and its weights
            from sftlab.data import feedback_quality

            feedback = feedback_quality.analyze_feedback(source, cfg.data, encoder, cfg.kto, rejects_path=rejects)
            feedback_quality.write(feedback, fmt=args.format)
            ok = ok and feedback.ok
            continue
        if cfg.stage in PAIR_STAGES:  # preference pairs: usable pairs, length bias, contradictions
            pairs = pair_quality.analyze_pairs(source, cfg.data, encoder, rejects_path=rejects)
            pair_quality.write(pairs, fmt=args.format)
            ok = ok and pairs.ok
            continue
        report = quality.analyze(source, cfg.data, encoder, rejects_path=rejects)
        quality.write(report, fmt=args.format)
        ok = ok and report.ok
    return 0 if ok else 1


def _rejects_path(given: str | None, source: object, number: int | None) -> Path:
    """--rejects (numbered per source when there are several), else beside a local file, else in the cwd."""
    tail = "" if number is None else f".{number + 1}"
    if given:
        path = Path(given)
        return path if number is None else path.with_name(f"{path.stem}{tail}{path.suffix}")
    files = getattr(source, "files", ())
    if len(files) == 1 and not getattr(source, "builder", None):
        return files[0].with_suffix(f"{tail}.rejects.jsonl")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in getattr(source, "label", "data"))
    return Path(f"{safe}{tail}.rejects.jsonl")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
