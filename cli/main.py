"""Argument parsing, logging and exit codes for the ``dbnode`` command.

Thin by design: each subcommand turns its arguments into engine objects and
calls into ``dbnode``; the engine never reads ``argv``.

Exit codes: 0 success, 1 the run failed, 2 bad usage or configuration,
130 interrupted.
"""

from __future__ import annotations

import argparse
import csv
import ipaddress
import json
import logging
import os
import shlex
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import trio

import dbnode
from dbnode.aio import first_error
from dbnode.config import RunConfig, format_address, parse_address
from dbnode.data import load_inputs
from dbnode.driver import dumps, load_data, new_run_dir, plan, status, train, write_secret
from dbnode.dump import dump_text
from dbnode.errors import ConfigError, DBNodeError, RunInterrupted
from dbnode.metrics import CLASSIFICATION, per_class
from dbnode.node import ready_line, run_node
from dbnode.plot import plot as plot_runs
from dbnode.runs import parse_bytes
from dbnode.saved import load as load_model
from dbnode.threads import available_cores, environment_threads, limit_threads
from dbnode.wire import load_secret

from .progress import ProgressPrinter, summary_text
from .status_view import render as render_status

log = logging.getLogger("dbnode")

#: The port ``dbnode serve --listen HOST`` takes when none is given.
DEFAULT_PORT = 7070


def build_parser() -> argparse.ArgumentParser:
    """The ``dbnode`` command's arguments: ``serve``, ``train``, ``status``,
    ``eval``, ``predict``.

    Returns:
        The parser; ``args.command`` is None when no command was given.
    """
    parser = argparse.ArgumentParser(
        prog="dbnode", description="Downpour SGD on a cluster of plain CPU machines."
    )
    parser.add_argument("--version", action="version", version=f"dbnode {dbnode.__version__}")
    # -v works before the command and after it: the same flag on every level.
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
    )
    parser.add_argument("-v", "--verbose", action="store_true", default=False, help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[verbose], **kwargs)

    serve = command("serve", help="run a node that hosts parameter shards and layer partitions")
    serve.add_argument(
        "--listen",
        default=f"127.0.0.1:{DEFAULT_PORT}",
        help="HOST:PORT to listen on (default %(default)s; port 0 picks one)",
    )
    serve.add_argument("--secret-file", help="shared cluster secret (default: $DBNODE_SECRET)")
    serve.add_argument("--name", default="", help="the node's name in logs")
    serve.add_argument(
        "--snapshot-dir", help="directory SNAPSHOT requests write to (default: snapshots refused)"
    )
    serve.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="memory budget of all the runs the node holds, e.g. 4G or 512M; a start "
        "or INIT that would exceed it is refused (default: 3/4 of the machine's RAM)",
    )
    serve.add_argument(
        "--threads",
        type=int,
        default=0,
        metavar="N",
        help="compute threads (BLAS and kernels) of this node: its share of the host's "
        "cores when several nodes share a host (default: $OMP_NUM_THREADS or "
        "$OPENBLAS_NUM_THREADS if set, else every core)",
    )
    serve.add_argument(
        "--spin-us",
        type=float,
        default=0.0,
        metavar="US",
        help="busy-poll sockets this many microseconds before sleeping: lower "
        "round-trip latency for some CPU (default 0: off; at most 10000)",
    )
    serve.add_argument(
        "--log-level",
        choices=("debug", "info", "warning"),
        default="info",
        help="what the node logs (default %(default)s: runs, partitions, connections)",
    )
    serve.add_argument(
        "--exit-on-eof",
        action="store_true",
        help="exit when standard input closes (used by the embedded cluster)",
    )

    train = command("train", help="run a training job (the driver)")
    train.add_argument("config", help="run config (TOML)")
    train.add_argument(
        "--hosts",
        help="comma-separated HOST:PORT of running nodes "
        "(default: [cluster] hosts, else an embedded local cluster)",
    )
    train.add_argument(
        "--out",
        help="directory for model.npz, metrics.csv, summary.json (default: a new "
        "runs/CONFIG-TIME/); one that already holds files is refused",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run's outputs in --out",
    )
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config key (repeatable), e.g. --set train.seed=3",
    )
    train.add_argument(
        "--secret-file",
        help="cluster secret for --hosts (default: [cluster] secret_file, else $DBNODE_SECRET)",
    )
    train.add_argument(
        "--plan",
        action="store_true",
        help="print where the run's shards and partitions would go and the bytes per "
        "step the placement predicts between processes, then exit without training",
    )
    train.add_argument(
        "--quiet", "-q", action="store_true", help="no progress (events and errors only)"
    )
    train.add_argument(
        "--log-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="off a terminal, seconds between progress lines (default %(default)s)",
    )
    train.add_argument(
        "--log-format",
        choices=("text", "jsonl"),
        default="text",
        help="progress as text, or one JSON object per line (default %(default)s)",
    )
    train.add_argument(
        "--json",
        action="store_true",
        help="print the summary as JSON on a terminal too (it is always so when standard "
        "output is not a terminal, and in OUT/summary.json)",
    )
    train.add_argument(
        "--resume",
        metavar="DIR",
        help="continue from the newest checkpoint of an earlier run (its --out directory)",
    )

    st = command("status", help="what running nodes host and how far their partitions are")
    st.add_argument("--hosts", required=True, help="comma-separated HOST:PORT of nodes")
    st.add_argument("--secret-file", help="cluster secret (default: $DBNODE_SECRET)")
    st.add_argument(
        "--dump",
        action="store_true",
        help="print each node's task tree and thread stacks (what SIGUSR1 logs)",
    )
    st.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per node, as the nodes answer (no rates)",
    )
    st.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="the table's rates are measured over this long (default %(default)s)",
    )

    ev = command("eval", help="score a trained model: its run's held-out set, or a data set")
    ev.add_argument("model", metavar="RUN", help="a run directory, or its model.npz")
    ev.add_argument(
        "--data",
        help="data source to score on (built-in name or path; default: the run's held-out set)",
    )
    ev.add_argument(
        "--config",
        help="the run config, for a model.npz written before models carried theirs",
    )

    pl = command("plot", help="draw runs' learning curves (needs dbnode[plot])")
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    pl.add_argument(
        "--out",
        help="image file (default: RUN/run.png for one run, runs.png for several)",
    )
    pl.add_argument(
        "--metric",
        help="metrics.csv column of the upper panels (default: test_accuracy, "
        "else test_r2, else test_loss)",
    )

    pr = command("predict", help="a trained model's predictions for a data set, as CSV")
    pr.add_argument("model", metavar="RUN", help="a run directory, or its model.npz")
    pr.add_argument(
        "--data",
        required=True,
        help="inputs (built-in name or path; a .csv may have just the feature columns)",
    )
    pr.add_argument("--out", help="CSV file to write (default: standard output)")
    pr.add_argument(
        "--config",
        help="the run config, for a model.npz written before models carried theirs",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``dbnode`` command.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 success, 1 the run failed, 2 bad usage or
        configuration, 130 interrupted. Errors are printed, not raised.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    # A node logs its runs, partitions and connections (INFO) by default; a
    # driver only what needs attention, its progress is on its own line.
    quiet_level = logging.WARNING
    if args.command == "serve":
        quiet_level = getattr(logging, args.log_level.upper())
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else quiet_level,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 2
    command = {
        "serve": cmd_serve,
        "train": cmd_train,
        "eval": cmd_eval,
        "predict": cmd_predict,
        "plot": cmd_plot,
        "status": cmd_status,
    }[args.command]
    try:
        try:
            return command(args)
        except BaseExceptionGroup as group:  # what trio's nurseries raise
            raise first_error(group) from None
    except ConfigError as exc:
        print(f"dbnode {args.command}: {exc}", file=sys.stderr)
        return 2
    except (DBNodeError, OSError) as exc:
        print(f"dbnode {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dbnode {args.command}: interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------- serve


def _is_loopback(host: str) -> bool:
    try:
        return all(
            ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None)
        )
    except (socket.gaierror, ValueError):
        return False


def serve_secret(secret_file: str | None, host: str) -> tuple[bytes, str | None]:
    """The secret ``dbnode serve`` uses.

    Args:
        secret_file: ``--secret-file``, or None for ``$DBNODE_SECRET``.
        host: the address it listens on.

    Returns:
        The secret, and the path of a fresh one made for a loopback node
        started without any (None otherwise).

    Raises:
        ConfigError: no secret was given and ``host`` is reachable from
            other machines.
    """
    if secret_file or os.environ.get("DBNODE_SECRET"):
        return load_secret(secret_file), None
    if not _is_loopback(host):
        raise ConfigError(
            "--listen",
            host,
            "a node reachable from other machines needs a secret: "
            "pass --secret-file or set DBNODE_SECRET",
        )
    path = write_secret(Path(tempfile.mkdtemp(prefix="dbnode-")) / "secret")
    return path.read_bytes(), str(path)


def cmd_serve(args) -> int:
    """``dbnode serve``: run a node until SIGINT or SIGTERM (or, with
    ``--exit-on-eof``, until standard input closes).

    Prints :func:`~dbnode.node.ready_line` once it listens.

    Returns:
        0.
    """
    host, port = parse_address(args.listen, key="--listen", default_port=DEFAULT_PORT)
    secret, made = serve_secret(args.secret_file, host)
    try:
        max_memory = parse_bytes(args.max_memory) if args.max_memory else None
    except ValueError as exc:
        raise ConfigError("--max-memory", args.max_memory, str(exc)) from None
    if args.threads < 0:
        raise ConfigError("--threads", args.threads, "must be >= 1 (0: the default)")
    threads = args.threads or environment_threads() or available_cores()
    limit_threads(threads)

    async def serve_until_stopped() -> None:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(
                lambda task_status: run_node(
                    host,
                    port,
                    secret,
                    name=args.name,
                    snapshot_dir=args.snapshot_dir,
                    max_memory=max_memory,
                    threads=threads,
                    spin=args.spin_us * 1e-6,
                    task_status=task_status,
                )
            )
            # Catch the signals before saying we are ready: a SIGINT sent as
            # soon as the ready line is read is a clean stop, not a traceback.
            catch = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
            with trio.open_signal_receiver(*catch) as signals:
                if made:
                    print(f"dbnode serve: secret written to {made}", flush=True)
                print(ready_line(bound), flush=True)
                if args.exit_on_eof:
                    nursery.start_soon(_cancel_on_stdin_eof, nursery.cancel_scope)
                async for signum in signals:
                    if signum != signal.SIGUSR1:
                        break
                    # What the node is doing, for an operator: it keeps serving.
                    print(dump_text(), file=sys.stderr, flush=True)
            nursery.cancel_scope.cancel()

    trio.run(serve_until_stopped)
    return 0


async def _cancel_on_stdin_eof(scope) -> None:

    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stream:
        while await stream.receive_some(4096):
            pass
    scope.cancel()


# ------------------------------------------------------------------- train


def cmd_train(args) -> int:
    """``dbnode train``: run a config, show progress on stderr, print the summary.

    Returns:
        0 (a failed run raises; :func:`main` makes it exit code 1).
    """
    config = RunConfig.load(args.config, args.set)
    hosts = _hosts(args.hosts, "--hosts") if args.hosts else None
    secret = load_secret(args.secret_file) if args.secret_file else None
    if args.plan:
        hosts = hosts or [parse_address(h, key="cluster.hosts") for h in config.cluster.hosts]
        if hosts and secret is None:
            secret = load_secret(config.cluster.secret_file or None)
        print(plan(config, hosts, secret).describe())
        return 0
    if not args.log_interval > 0:
        raise ConfigError("--log-interval", args.log_interval, "must be > 0 seconds")
    show = ProgressPrinter(sys.stderr, args.log_interval, args.log_format, args.quiet)
    name = f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.out is None and args.resume:
        args.out = args.resume  # go on in the same directory
    elif args.out is None:  # every run keeps its outputs, in a directory of its own
        args.out = str(new_run_dir(Path(args.config).stem))
        print(f"dbnode train: writing to {args.out}", file=sys.stderr)
    try:
        summary = train(
            config,
            hosts=hosts,
            out_dir=args.out,
            secret=secret,
            progress=show,
            resume=args.resume,
            name=name,
            overwrite=args.overwrite,
        )
    except RunInterrupted as stop:
        show.close()
        print(f"dbnode train: {stop}", file=sys.stderr)
        if stop.checkpoint is not None:
            print(f"dbnode train: resume with: {_resume_command(args, stop)}", file=sys.stderr)
        else:
            print(
                "dbnode train: no checkpoint (checkpointing is off: set checkpoint.interval "
                "to make a run resumable)",
                file=sys.stderr,
            )
        return 130
    finally:
        show.close()  # a failure's message then starts on a line of its own
    # The config and the curve are in the run directory (summary.json, metrics.csv).
    shown = {k: v for k, v in summary.__dict__.items() if k not in ("config", "history")}
    # Scripts read the JSON (standard output piped); a person reads a few lines.
    print(json.dumps(shown, indent=2) if args.json or not sys.stdout.isatty()
          else summary_text(shown))  # fmt: skip
    return 0


def _resume_command(args, stop: RunInterrupted) -> str:
    """The command that goes on from an interrupted run's final checkpoint."""
    words = ["dbnode", "train", args.config]
    for item in args.set:
        words += ["--set", item]
    if args.hosts:
        words += ["--hosts", args.hosts]
    if args.secret_file:
        words += ["--secret-file", args.secret_file]
    checkpoints = stop.checkpoint.parent
    if args.out and checkpoints.resolve().parent == Path(args.out).resolve():
        words += ["--resume", args.out]  # on in the same directory
    else:  # checkpoints kept elsewhere (checkpoint.dir): the run goes on in a new one
        words += ["--resume", str(checkpoints)]
    return shlex.join(words)


# ------------------------------------------------------------------ status


def _hosts(text: str, key: str) -> list[tuple[str, int]]:
    return [parse_address(h.strip(), key=key) for h in text.split(",") if h.strip()]


def cmd_status(args) -> int:
    """``dbnode status``: a table of every node, its runs, their partitions
    and shards with their rates; or, with ``--json``, one JSON line per node.

    Returns:
        0, or 1 when a node could not be reached.
    """
    hosts, secret = _hosts(args.hosts, "--hosts"), load_secret(args.secret_file)
    if args.dump:
        failed = False
        for host, text in zip(hosts, dumps(hosts, secret)):
            print(f"==== {format_address(host)}\n{text}")
            failed = failed or text.startswith("error: ")
        return 1 if failed else 0
    report = status(hosts, secret)
    if args.json:
        for entry in report:
            print(json.dumps(entry))
    else:
        if not args.interval > 0:
            raise ConfigError("--interval", args.interval, "must be > 0 seconds")
        time.sleep(args.interval)
        later = status(hosts, secret)
        print(render_status(report, later, args.interval))
        report = later
    return 1 if any("error" in entry for entry in report) else 0


# -------------------------------------------------------------------- eval


def _model_for(args):
    """The model ``eval`` and ``predict`` name: a run directory or a file."""
    config = RunConfig.load(args.config) if args.config else None
    return load_model(args.model, config)


def cmd_eval(args) -> int:
    """``dbnode eval``: print a trained model's figures as JSON: on ``--data``,
    or on its run's held-out set (the same split the run made).

    Returns:
        0.

    Raises:
        ConfigError: no model or config, a run without a held-out set and
            no ``--data``, or data that does not fit the model.
    """
    model = _model_for(args)
    if args.data:
        x, y = load_inputs(args.data, model.spec.layers[0], seed=model.config.train.seed)
        if y is None:
            raise ConfigError("--data", args.data, "holds inputs only: eval needs their targets")
        where = args.data
    else:
        if not model.config.data.train:
            raise ConfigError("--data", "", "the run trained on in-memory arrays: give --data")
        _, _, x, y = load_data(model.config)
        if x is None:
            raise ConfigError(
                "--data", "", "the run held nothing out (data.test_fraction = 0): give --data"
            )
        where = model.config.data.test or f"{model.config.data.train} (held out)"
    try:
        figures = model.evaluate(x, y)
    except ValueError as exc:
        raise ConfigError("--data", where, str(exc)) from None
    report = {"data": where, "examples": len(x), "task": model.task, **figures}
    if model.task == CLASSIFICATION:
        report["per_class"] = per_class(model.spec, model.outputs(x), y)
    print(json.dumps(report))
    return 0


def cmd_predict(args) -> int:
    """``dbnode predict``: write a ``prediction`` column per example (the
    class, or the value; ``prediction0``... for several outputs) and, for a
    classifier, its class probabilities ``p0``, ``p1``...

    Returns:
        0.

    Raises:
        ConfigError: no model or config, or inputs that do not fit it.
    """
    model = _model_for(args)
    x, _ = load_inputs(args.data, model.spec.layers[0], seed=model.config.train.seed)
    predicted = model.predict(x)
    if predicted.ndim == 1:
        columns, table = ["prediction"], [predicted[:, None]]
    else:
        columns = [f"prediction{k}" for k in range(predicted.shape[1])]
        table = [predicted]
    if model.classes:
        columns += [f"p{k}" for k in range(model.classes)]
        table.append(model.predict_proba(x))
    rows = np.hstack([np.asarray(t, dtype=np.float64) for t in table])
    out = open(args.out, "w", newline="") if args.out else sys.stdout
    try:
        writer = csv.writer(out)
        writer.writerow(columns)
        integer = model.classes > 0  # a class is written as an integer
        for row in rows:
            cells = [f"{v:.9g}" for v in row]
            if integer:
                cells[0] = str(int(row[0]))
            writer.writerow(cells)
    finally:
        if args.out:
            out.close()
    if args.out:
        print(f"dbnode predict: {len(rows)} predictions written to {args.out}", file=sys.stderr)
    return 0


def cmd_plot(args) -> int:
    """``dbnode plot``: draw runs' curves into an image file; print its path.

    Returns:
        0.

    Raises:
        ConfigError: a run without metrics, a metric no run has, or no matplotlib.
    """
    print(plot_runs(args.runs, args.out, args.metric))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
