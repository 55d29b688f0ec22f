"""The `zeray` command line: parse, load the config, call one function of one package.

Exit codes: 0 success, 2 a user error (one `error: ...` line on stderr, no traceback), 1 anything else.
"""

import argparse
import os
import sys

from core.console import say
from core.errors import UserError, find_user_error
from core.fs import is_uri


def main(argv: list[str] | None = None) -> int:
    try:
        return run(list(sys.argv[1:] if argv is None else argv))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2


def run(argv: list[str]) -> int:
    """The command's exit code; a user error is raised as UserError."""
    parser = _parser()
    after = []
    if "--" in argv:  # `zeray submit CONFIG -- COMMAND`: what follows is the job's command, verbatim
        at = argv.index("--")
        argv, after = argv[:at], argv[at + 1 :]
    args = parser.parse_args(argv)
    if after and args.command != "submit":
        parser.error(f"only `zeray submit` takes a command after --, not `zeray {args.command}`")
    args.job = after
    if args.command in CONSOLE_COMMANDS:
        from cluster.client import client_address, run_through_client
        from cluster.console import relayed_workers
        from core.console import quiet_console
        from zeray.config import load_config

        cfg = load_config(args.config, args.overrides, check_paths=False)  # the paths are the cluster's
        if address := client_address(cfg):  # a ray:// cluster: the command runs there
            return run_through_client(run, address, argv, cfg, watch_placement=args.command in ("train", "eval"))
        if not _ray_running():
            # the whole config checked (its files too) before a log folder appears for it
            cfg = load_config(args.config, args.overrides, prep_only=args.command in ("prep", "eval"))
            path = _log_path(cfg.run_dir, cfg.name, args.command)
            fresh = not os.path.exists(os.path.dirname(os.path.dirname(path)))
            if not args.verbose:
                say(f"logs: {path} (Ray's, DeepSpeed's and transformers' output; --verbose shows it here)")
            try:
                with quiet_console(path, verbose=args.verbose) as log, relayed_workers(log):
                    return args.func(args) or 0
            except UserError:
                if fresh:  # refused before it wrote anything (storage checks, say): no run folder of logs alone
                    _remove_if_only_logs(os.path.dirname(os.path.dirname(path)))
                raise
    return args.func(args) or 0


def _remove_if_only_logs(folder: str) -> None:
    import shutil

    if os.path.isdir(folder) and os.listdir(folder) == ["logs"]:
        shutil.rmtree(folder, ignore_errors=True)


# the commands that start (or connect to) a Ray and run work on it: their library output goes to a log file
CONSOLE_COMMANDS = ("train", "prep", "tune", "eval", "plan")


def _ray_running() -> bool:
    """Ray already initialised in this process (a test's, or a caller's): its console is theirs to manage."""
    import ray

    return ray.is_initialized()


def _log_path(run_dir: str, name: str, command: str) -> str:
    """<run>/logs/<command>.log for a run on a local path; for a run in an object store (and for `plan`, which
    writes no run folder) a local file in the user's cache directory."""
    if command != "plan" and not is_uri(run_dir):
        return os.path.join(run_dir, "logs", f"{command}.log")
    return os.path.join(_cache_logs(), name, f"{command}.log")


def _cache_logs() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "zeray", "logs")


def cmd_train(args) -> int:
    from cluster.local import ray_session
    from cluster.storage import check_storage
    from trainers.run import train
    from zeray.config import load_config

    cfg = load_config(args.config, args.overrides)
    t = cfg.train
    with ray_session(cfg.cluster, t.max_workers * t.cpus_per_worker) as where:
        say(f"zeray train {cfg.name}: {where}, results in {cfg.run_dir}")
        check_storage(cfg)
        summary = _unwrap_user_errors(train, cfg)
    say(
        f"done in {summary['wall_s']:.0f}s: eval_loss {summary['eval_loss']:.4f} ("
        + (f"base model {summary['base_eval_loss']:.4f}, " if summary["base_eval_loss"] is not None else "")
        + f"first train loss {summary['first_loss']:.4f}), test_loss {summary['test_loss']:.4f}; "
        f"model in {summary['model_dir']}",
    )
    return 0


def cmd_tune(args) -> int:
    from cluster.local import ray_session
    from cluster.storage import check_storage
    from tuning.campaign import check_campaign, run_campaign
    from zeray.config import load_config

    cfg = load_config(args.config, args.overrides)
    t = cfg.train
    if t.elastic:
        raise UserError(
            "train.num_workers: a campaign runs trials side by side at a fixed size; give a number of "
            "workers (an elastic [min, max] range is for zeray train)"
        )
    if not is_uri(cfg.run_dir):  # at once, before Ray starts (storage in an object store is checked first, below)
        check_campaign(cfg, args.resume)
    # embedded Ray: as many trial slots as the machine has cores (at least one trial), plus the data pipeline's
    trial_cpus = max(os.cpu_count() or 1, t.max_workers * t.cpus_per_worker)
    with ray_session(cfg.cluster, trial_cpus) as where:
        say(f"zeray tune {cfg.name}: {where}")
        check_storage(cfg)
        _unwrap_user_errors(run_campaign, cfg, args.resume)
    return 0


def cmd_submit(args) -> int:
    from cluster.submit import submit
    from zeray.config import load_config

    # validated here, before anything is uploaded; the paths in it are the cluster's to check
    cfg = load_config(args.config, args.overrides, check_paths=False)
    return submit(cfg, args.config, args.overrides, args.job, args.address, args.follow, args.install)


def cmd_plan(args) -> int:
    from cluster.local import describe_fit, ray_session
    from cluster.resources import worker_request
    from trainers.plan import format_plan, make_memory_plan
    from zeray.config import load_config

    cfg = load_config(args.config, args.overrides)
    t = cfg.train
    with ray_session(cfg.cluster, t.max_workers * t.cpus_per_worker) as where:
        say(
            f"zeray plan {cfg.name}: {where}; {t.workers_label()} workers x micro-batch {t.micro_batch_size} x "
            f"accumulation {t.grad_accum} x {cfg.data.max_length} tokens",
        )
        gpu, per_worker = worker_request(cfg)
        say(describe_fit(t.max_workers, per_worker, cfg.cluster.data_cpus))
        if t.elastic:
            say(describe_fit(t.min_workers, per_worker, cfg.cluster.data_cpus, minimum=True))
        say(format_plan(make_memory_plan(cfg, gpu)))
    return 0


def cmd_prep(args) -> int:
    from cluster.local import placement_timeout, ray_session
    from cluster.storage import check_storage
    from pipelines.prep import prepare, source_lines, summary_line
    from zeray.config import load_config

    cfg = load_config(args.config, args.overrides, prep_only=True)
    if not cfg.data.train:
        raise UserError(f"data.train is not set in {args.config}: `zeray prep` prepares it (into data.prepared's form)")
    out_dir = f"{cfg.run_dir}/data"
    with ray_session(cfg.cluster, train_cpus=0) as where:
        say(f"zeray prep {cfg.name}: {where}, writing {out_dir}")
        check_storage(cfg)
        report = _unwrap_user_errors(
            prepare,
            cfg.data,
            cfg.model.name_or_path,
            out_dir,
            cfg.model.trust_remote_code,
            placement_timeout(cfg.cluster),
        )
    say(f"prepared: {summary_line(report)}")
    for line in source_lines(report):
        say(line)
    say(f"report: {os.path.join(out_dir, 'report.json')}; rejects: {os.path.join(out_dir, 'rejects.jsonl')}")
    return 0


def cmd_eval(args) -> int:
    import json

    from cluster.local import ray_session
    from cluster.storage import check_storage
    from trainers.evaluate import evaluate_model
    from zeray.config import load_config

    cfg = load_config(args.config, args.overrides, prep_only=True)
    if is_uri(args.model):
        raise UserError(
            f"--model {args.model}: give a local model directory (`zeray export RUN --out DIR` copies "
            "a run's model from its storage)"
        )
    model_dir = os.path.abspath(args.model)
    t = cfg.train
    with ray_session(cfg.cluster, t.max_workers * t.cpus_per_worker) as where:
        say(f"zeray eval {model_dir} on the test split of {args.config}: {where}")
        check_storage(cfg)
        result = _unwrap_user_errors(evaluate_model, cfg, model_dir)
    say(json.dumps(result, indent=2))
    return 0


def cmd_export(args) -> int:
    import pyarrow.fs as pafs

    from core.console import quiet_console
    from core.fs import kind, resolve
    from trainers.checkpoints import export

    if kind(*resolve(args.run_dir, "run directory")) != pafs.FileType.Directory:
        raise UserError(f"run directory {args.run_dir} does not exist")
    # DeepSpeed's and transformers' lines (the shards it reads, progress bars) go to a log, as for `zeray train`
    log = _log_path(args.run_dir, os.path.basename(args.run_dir.rstrip("/")), "export")
    with quiet_console(log):
        chosen = export(args.run_dir, args.out, args.checkpoint, args.lora)
    print(f"exported {chosen} to {args.out} (log: {log})")
    return 0


def cmd_generate(args) -> int:
    from transformers.utils import logging as hf_logging

    from trainers.generate import generate_many

    hf_logging.disable_progress_bar()  # a second's load: a bar would only add lines
    replies = generate_many(
        args.model_dir,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        repetition_penalty=args.repetition_penalty,
        trust_remote_code=args.trust_remote_code,
        seed=args.seed,
    )
    for prompt, reply in zip(args.prompt, replies):
        print(f"> {prompt}\n{reply}" if len(args.prompt) > 1 else reply)
    return 0


def cmd_demo_data(args) -> int:
    from pipelines.corpus import write_demo_data

    count = write_demo_data(args.out)
    print(f"wrote {count} conversations (chatterbot-corpus, English and Chinese) to {args.out}")
    return 0


def cmd_init_model(args) -> int:
    from trainers.tiny_model import build_model

    if not os.path.isfile(args.data):
        raise UserError(f"--data {args.data} does not exist (write it first with `zeray demo-data {args.data}`)")
    params = build_model(args.data, args.out, size=args.size, seed=args.seed)
    print(f"built a {params / 1e6:.1f}M-parameter Llama chat model with its tokenizer in {args.out}")
    return 0


def cmd_import_gguf(args) -> int:
    from core.console import quiet_console
    from trainers.import_gguf import check_inputs, import_gguf

    check_inputs(args.file, args.out)
    log = os.path.join(_cache_logs(), "import-gguf.log")
    say(f"importing {args.file} (dequantizing to {args.dtype}; a minute for a small model; transformers' log: {log})")
    with quiet_console(log):
        info = import_gguf(args.file, args.out, args.dtype)
    say(
        f"wrote a {info['parameters'] / 1e6:.1f}M-parameter {info['architecture']} (vocabulary {info['vocab_size']}, "
        f"{info['dtype']}) with its tokenizer"
        + (" and chat template" if info["chat_template"] else " (no chat template in the file)")
        + f" to {args.out}"
    )
    return 0


def _unwrap_user_errors(fn, *args):
    """A UserError raised inside a Ray task or Train worker arrives wrapped; surface it as the user error it is."""
    try:
        return fn(*args)
    except Exception as exc:
        found = find_user_error(exc)
        if found is exc:
            raise
        if found is not None:
            raise UserError(str(found)) from None
        raise


# one example per command, shown by `zeray COMMAND --help` (tests/test_docs.py parses them like the docs' commands)
EXAMPLES = {
    "train": ["zeray train configs/demo.yaml", "zeray train configs/demo.yaml train.lr=1e-3 train.max_steps=100"],
    "tune": ["zeray tune configs/tune.yaml", "zeray tune configs/tune.yaml --resume"],
    "submit": [
        "zeray submit configs/demo.yaml --address http://127.0.0.1:8265 --follow -- zeray train configs/demo.yaml"
    ],
    "plan": ["zeray plan configs/demo.yaml train.zero_stage=3"],
    "prep": ["zeray prep configs/demo.yaml", "zeray train configs/demo.yaml data.prepared=runs/chat-demo/data"],
    "eval": ["zeray eval configs/demo.yaml --model runs/chat-demo/model"],
    "export": ["zeray export runs/chat-demo --out exported/"],
    "generate": ['zeray generate runs/chat-demo/model --prompt "Hello, how are you?" --temperature 0.7'],
    "demo-data": ["zeray demo-data artifacts/chatterbot.jsonl"],
    "init-model": ["zeray init-model --data artifacts/chatterbot.jsonl --out artifacts/tiny-chat"],
    "import-gguf": [
        "zeray import-gguf artifacts/SmolLM2-135M-Instruct.Q4_1.gguf --out artifacts/smollm2",
        "zeray train configs/smollm2.yaml",
    ],
}


def _command(sub, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with its examples (and which takes --verbose if it runs work on Ray)."""
    examples = "\n".join(f"  {example}" for example in EXAMPLES[name])
    parser = sub.add_parser(
        name, epilog=f"examples:\n{examples}", formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs
    )
    if name in CONSOLE_COMMANDS:
        parser.add_argument(
            "--verbose",
            action="store_true",
            help="show Ray's, DeepSpeed's and transformers' output on the console too (else: in the run's logs/)",
        )
    return parser


def _parser() -> argparse.ArgumentParser:
    from zeray import __version__

    parser = argparse.ArgumentParser(prog="zeray", description="Fine-tune language models on Ray.")
    parser.add_argument("--version", action="version", version=f"zeray {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(sub, "train", help="preprocess (streamed) and train with Ray Train + DeepSpeed, then export")
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=3e-4")
    p.set_defaults(func=cmd_train)

    p = _command(sub, "tune", help="a Ray Tune campaign (tune: section) around the same training run")
    p.add_argument("config", help="run config YAML with a tune: section")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--resume", action="store_true", help="continue the campaign of this config after a stop")
    p.set_defaults(func=cmd_tune)

    p = _command(
        sub,
        "submit",
        help="run a command of this project on a Ray cluster as a Ray Job",
        usage="zeray submit CONFIG [k=v ...] [--address URL] [--follow] [--install] [-- COMMAND ...]",
    )
    p.add_argument("config", help="run config YAML inside the project (validated here before anything is sent)")
    p.add_argument(
        "overrides", nargs="*", help="section.key=value overrides: validated here, and given to the default command"
    )
    p.add_argument(
        "--address", help="the cluster's dashboard, http://<head>:8265 (default: cluster.address, then RAY_ADDRESS)"
    )
    p.add_argument("--follow", action="store_true", help="stream the job's logs and exit with its status")
    p.add_argument(
        "--install",
        action="store_true",
        help="install pyproject.toml's dependencies in the job (runtime_env pip) instead of using the cluster image's",
    )
    p.set_defaults(func=cmd_submit)

    p = _command(sub, "plan", help="memory per device for each ZeRO stage and offload, and whether the run fits")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="k=v")
    p.set_defaults(func=cmd_plan)

    p = _command(sub, "prep", help="Ray Data preprocessing only: writes Parquet splits, rejects and a report")
    p.add_argument("config", help="run config YAML")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=cmd_prep)

    p = _command(sub, "eval", help="loss, perplexity and token accuracy of a model on the config's test split")
    p.add_argument("config", help="run config YAML (its data: section names the data)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--model", required=True, help="Hugging Face model directory, e.g. <storage>/<name>/model")
    p.set_defaults(func=cmd_eval)

    p = _command(sub, "export", help="turn a run's checkpoint (any ZeRO stage) into a Hugging Face model directory")
    p.add_argument("run_dir", help="<storage>/<name> of a run (a path or a URI such as s3://bucket/runs/x)")
    p.add_argument("--checkpoint", help="a checkpoint_* folder of that run (default: the newest)")
    p.add_argument("--out", required=True, help="output model directory (a path or a URI)")
    p.add_argument(
        "--lora",
        choices=["merged", "adapter"],
        help="for a LoRA run: the base model with the adapters merged in, or the adapters alone "
        "(default: the run's model.lora.export)",
    )
    p.set_defaults(func=cmd_export)

    p = _command(sub, "generate", help="reply from an exported model, using its chat template")
    p.add_argument("model_dir")
    p.add_argument("--prompt", required=True, action="append", help="a user message; give several to ask each")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help=">1 discourages repeating tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = _command(sub, "demo-data", help="write the chatterbot-corpus conversations as messages JSON Lines")
    p.add_argument("out", help="output .jsonl path")
    p.set_defaults(func=cmd_demo_data)

    p = _command(sub, "init-model", help="build the tiny demo chat model (tokenizer trained on --data)")
    p.add_argument("--data", required=True, help="JSON Lines conversations to train the tokenizer on")
    p.add_argument("--out", required=True, help="output model directory (a path or a URI)")
    p.add_argument(
        "--size",
        choices=["demo", "tiny", "small"],
        default="demo",
        help="demo: ~4M parameters; tiny: ~0.2M (tests); small: ~27M",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init_model)

    from trainers.import_gguf import DTYPES  # (a light module: its heavy imports are inside its functions)

    p = _command(sub, "import-gguf", help="a GGUF model file (llama.cpp) as a Hugging Face model folder to fine-tune")
    p.add_argument("file", help="the .gguf file")
    p.add_argument("--out", required=True, help="a new (or empty) model directory")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="the weights' dtype on disk (default: bf16)")
    p.set_defaults(func=cmd_import_gguf)
    return parser
