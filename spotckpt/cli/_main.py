"""The ``spotckpt`` command line: ``run``, ``spot``, ``ls``, ``status``, ``verify``, ``pull``, ``push``.

Exit status: for ``run``, 143 after an interruption notice whatever the command returned,
else the command's own (128+N if signal N killed it); 0 only for Completed for ``spot``; 1 for damage
(``verify``) or a failed upload (``push``); 3 for a local dir older than the remote (``push``,
``run --no-pull``: refused, nothing written); 2 for bad input (unknown option, a number out of
range, a command that does not exist, max-wait <= max-run, a --local-dir that is a file, an
unreachable remote, or for the read-only commands a remote that does not exist), always as
one line. With ``--json`` stdout is one JSON document, errors included.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, NoReturn

from spotckpt._config import number
from spotckpt._errors import SpotckptError, StaleLocalError
from spotckpt._notices import EXIT_STALE, EXIT_USAGE, _exit
from spotckpt._version import __version__

_MAIN = """\
Keep training state safe on preemptible machines: commit checkpoints locally, sync them to
S3 (or any fsspec URL), flush on SIGTERM, resume exactly.

Settings come from options, then SPOTCKPT_* variables (SPOTCKPT_LOCAL_DIR, SPOTCKPT_REMOTE,
SPOTCKPT_KEEP_LAST, SPOTCKPT_GRACE_SECONDS, SPOTCKPT_SIGNALS), then defaults. The S3
endpoint and credentials follow the AWS variables (AWS_ENDPOINT_URL_S3 for MinIO).
"""

_EXAMPLES = """\
examples:
  spotckpt run -- python train.py                    pull, supervise, flush on SIGTERM
  spotckpt spot --interrupt-at 40,95 -- python train.py
                                                     the managed-spot lifecycle, locally
  spotckpt ls                                        what is committed, local and remote
  spotckpt status --json                             how much work is not yet durable
  spotckpt verify                                    checksum everything; 1 on damage
"""

_RUN = """\
Run CMD under supervision, as the container entrypoint (safe as PID 1):

  1. pull the newest verified checkpoint and the watched dir's files from the remote into the
     local dir (a new machine starts empty);
  2. start CMD with SPOTCKPT_SUPERVISED=1: a spotckpt.Checkpointer inside it then only
     commits locally, and this process uploads each new step-*/ checkpoint and mirrors
     every other file CMD writes there (checkpoint.pth, Keras files, Transformers
     checkpoint-N/ dirs) as committed, verified file sets as soon as each is closed,
     so unmodified SageMaker-style scripts survive too;
  3. on SIGTERM/SIGINT (or --signals): forward it once to CMD's process tree (a
     Checkpointer in CMD treats each of these signals as a notice), upload what CMD saves,
     SIGKILL CMD if it would overrun the deadline (grace minus the time the final upload
     needs), give processes CMD left behind that still write into the dir the rest of the
     deadline, flush, and report what is durable.

If this process is killed (even SIGKILL), CMD gets SIGTERM from the kernel and a
Checkpointer anywhere in its tree saves locally and stops: nothing keeps training unwatched.

exit status:
  0       CMD completed (exited 0) and no notice came
  143     interrupted: a notice (SIGTERM, SIGINT, --signals) came, whatever CMD returned
  128+N   CMD was killed by signal N without a notice
  other   CMD's own exit status
  2       bad usage or configuration (one line on stderr)
  3       --no-pull on a local dir older than the remote (refused before anything
          started or was written; a pull would defer to the remote)
"""

_SPOT = """\
Emulate SageMaker Managed Spot Training around `spotckpt run`: wait for capacity, start
with an empty local dir, pull, train, get interrupted (SIGTERM, then SIGKILL after
--grace), start again... Prints each status change as SageMaker reports it (InProgress:
Starting, Downloading, Training, Interrupted, Uploading; Completed; or Stopping, then
Stopped: MaxWaitTimeExceeded / MaxRuntimeExceeded) and writes a DescribeTrainingJob-like
JSON report with training and billable seconds, savings, and the work lost per
interruption. Exit status 0 only for Completed.

Times: --max-run caps the seconds the instances run (all attempts together), --max-wait
caps the wall-clock time from job creation (capacity waits included) and must be larger
than --max-run. --interrupt-at counts seconds of training time. With --json, stdout is the
JSON report alone (status lines and the command's output go to stderr).

With --channel, --hyperparameter(s), --output-path or --sagemaker, each instance also gets
SageMaker's training-container contract: its own /opt/ml (a private mount namespace where
Linux allows one), input channels downloaded before each start, SM_* variables,
hyperparameters as --KEY VALUE, and /opt/ml/model uploaded as model.tar.gz at the end.
"""


_json_errors = False  # main() sets it when --json was given: errors are a JSON document too


def error_json(message: str, status: int) -> None:
    """With ``--json``, stdout is one JSON document even on an error (scripts parse it)."""
    if _json_errors:
        print(json.dumps({"ok": False, "error": message, "exit_status": status}, indent=1), flush=True)


class _Parser(argparse.ArgumentParser):
    """Bad usage is one line (``spotckpt run: error: ...``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        error_json(f"{self.prog}: error: {message}", EXIT_USAGE)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common(p: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    p.add_argument("--local-dir", metavar="DIR", help="local checkpoint dir (SPOTCKPT_LOCAL_DIR; default /opt/ml/checkpoints)")
    p.add_argument("--remote", metavar="URL", help="s3://bucket/prefix/, file:///path/ ... (SPOTCKPT_REMOTE)")
    if json_flag:  # not for `run`: the supervisor serves the unnamed lineage
        p.add_argument("--name", metavar="NAME", help="the lineage of Checkpointer(name=NAME): "
                       "<local-dir>/ckpt-NAME/ and <remote>ckpt-NAME/ (default: the unnamed one)")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print one JSON document (for scripts)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="spotckpt", description=_MAIN, epilog=_EXAMPLES,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"spotckpt {__version__}")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    raw = argparse.RawDescriptionHelpFormatter

    r = sub.add_parser("run", help="run a training command under supervision (pull, sync, flush on SIGTERM)",
                       description=_RUN, formatter_class=raw,
                       usage="spotckpt run [options] -- CMD [ARGS...]")
    _common(r, json_flag=False)
    r.add_argument("--keep-last", type=number(ge=1, integer=True), metavar="N",
                   help="committed checkpoints kept (default 2)")
    r.add_argument("--grace", type=number(gt=0), metavar="S", help="seconds from SIGTERM to SIGKILL "
                   "(SPOTCKPT_GRACE_SECONDS; default 30, 120 on SageMaker)")
    r.add_argument("--signals", metavar="LIST", help="extra signals that mean 'interruption coming', "
                   "e.g. SIGUSR1 (SPOTCKPT_SIGNALS)")
    r.add_argument("--signal-scope", choices=("auto", "tree", "child"), default="auto",
                   help="who gets forwarded signals: the whole tree except children of Python "
                        "processes (auto, spares DataLoader workers), the whole tree, or the child only")
    r.add_argument("--scan-interval", type=number(gt=0), default=0.5, metavar="S",
                   help="seconds between scans of the watched dir; a file goes up as soon as it is "
                        "closed, at the next scan (default 0.5)")
    r.add_argument("--stable-seconds", type=number(gt=0), dest="scan_interval", help=argparse.SUPPRESS)
    r.add_argument("--dir-checkpoint", action="append", default=[], metavar="GLOB:MARKER",
                   help="a directory matching GLOB is one checkpoint, complete once MARKER exists in "
                        "it: uploaded and pulled whole (repeatable; SPOTCKPT_DIR_CHECKPOINTS; built in: "
                        "checkpoint-*:trainer_state.json, *.ckpt:meta.pt, torch DCP dirs)")
    r.add_argument("--no-pull", action="store_true", help="do not pull from the remote before starting")
    from spotckpt._sagemaker import add_run_arguments
    add_run_arguments(r)
    r.add_argument("cmd", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    s = sub.add_parser("spot", help="emulate SageMaker Managed Spot Training around `spotckpt run`",
                       description=_SPOT, formatter_class=raw,
                       usage="spotckpt spot [options] -- CMD [ARGS...]")
    from spotckpt._spot import add_arguments
    add_arguments(s)
    s.add_argument("cmd", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    for name, text in (("ls", "list committed checkpoints and files, local and remote (step, size, age, durable)"),
                       ("status", "last durable step, work not yet durable, upload throughput, the every='auto' "
                                  "schedule and why"),
                       ("verify", "check sizes and checksums, local and remote; exit 1 on damage"),
                       ("pull", "download the newest verified checkpoint and the watched dir's files"),
                       ("push", "upload the newest local checkpoint and the watched dir's files "
                                "(refused with exit status 3 when the remote is newer)")):
        c = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        _common(c)
        if name == "verify":
            c.add_argument("--quick", action="store_true", help="remote: compare sizes only (no download)")
            where = c.add_mutually_exclusive_group()
            where.add_argument("--local-only", action="store_true")
            where.add_argument("--remote-only", action="store_true")
    return p


def _setup_logging(quiet: bool) -> None:
    log = logging.getLogger("spotckpt")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
        log.propagate = False
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def _command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    cmd = list(args.cmd or [])
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        parser.error(f"{args.command}: no command given; usage: spotckpt {args.command} [options] -- CMD [ARGS...]")
    return cmd


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from spotckpt._config import _UNSET, Config
    from spotckpt._sagemaker import contract_from_args
    from spotckpt._supervisor import Supervisor
    from spotckpt._watch import rules_from_env

    cmd = _command(args, parser)
    contract = contract_from_args(args)
    local_dir = args.local_dir
    if contract is not None and not local_dir and not os.environ.get("SPOTCKPT_LOCAL_DIR"):
        local_dir = contract.ml_root / "checkpoints"   # SageMaker's checkpoint_local_path
    cfg = Config.resolve(local_dir=local_dir, remote=args.remote if args.remote else _UNSET,
                         keep_last=args.keep_last, grace_seconds=args.grace, signals=args.signals)
    sup = Supervisor(cmd, cfg, scope=args.signal_scope, scan_interval=args.scan_interval,
                     rules=rules_from_env(args.dir_checkpoint),
                     pull=not args.no_pull, contract=contract, leave_by_deadline=True)
    sup.prepare()
    status = sup.run()
    if sup.deadline is not None:
        # Interrupted: gone by the deadline (Docker's SIGKILL would turn 143 into 137). The
        # interpreter's normal exit (joins of threads still uploading, module teardown) is
        # stretched by load; atexit handlers still run, then os._exit(status).
        _exit.arm(sup.deadline, status, clock=sup.clock)
        raise _exit.Leaving(status)
    return status


def main(argv: list[str] | None = None) -> int:
    global _json_errors
    argv = sys.argv[1:] if argv is None else list(argv)
    ours = argv[:argv.index("--")] if "--" in argv else argv  # not the command's own --json
    command = next((a for a in ours if not a.startswith("-")), None)
    _json_errors = "--json" in ours and command in ("ls", "status", "verify", "pull", "push", "spot")
    parser = build_parser()
    args = parser.parse_args(argv)
    _json_errors = bool(getattr(args, "json", False))
    if args.command is None:
        parser.print_help()
        return 0
    _setup_logging(args.quiet)
    try:
        if args.command == "run":
            return _run(args, parser)
        if args.command == "spot":
            from spotckpt._spot import run_spot
            return run_spot(args, _command(args, parser))
        from . import _inspect as _cli_inspect, _move as _cli_move, _status as _cli_status
        module = {"pull": _cli_move, "push": _cli_move, "status": _cli_status}.get(args.command, _cli_inspect)
        handler: Any = getattr(module, f"cmd_{args.command}")
        return handler(args)
    except SpotckptError as e:
        # Configuration, local dir, lock and remote errors: one line, exit status 2; a local
        # dir older than the remote (push, run --no-pull): 3 (with --json, also as the JSON
        # document on stdout).
        line = str(e).splitlines()[0] if str(e) else type(e).__name__
        status = EXIT_STALE if isinstance(e, StaleLocalError) else EXIT_USAGE
        error_json(line, status)
        print(line, file=sys.stderr)
        return status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
