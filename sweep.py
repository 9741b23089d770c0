"""run.sh's Python half: the quick check of train_local.py options (no torch: an unknown option fails in
well under a second), and resumable sweeps: a group folder's plan of runs (arms x seeds) in
GROUP/sweep.json, the state of each run folder, what to do next, and the loop that trains what is missing.

    python sweep.py check [--cwd DIR] -- TRAIN_OPTIONS...     checked options, paths made absolute (NUL-separated)
    python sweep.py plan GROUP --command NAME --models M[,M] --losses L[,L]|all --mode MODE
                         [--seeds K] [--seed N] [--ranking] -- TRAIN_OPTIONS...
    python sweep.py status GROUP [--count runs|arms] [--complete]
    python sweep.py next GROUP                                 the next run to train: INDEX ACTION RUN_NAME
    python sweep.py args GROUP INDEX                           its train_local.py arguments (NUL-separated)
    python sweep.py run GROUP [--arm K | --index I] [--node-rank R] [-- LAUNCHER...]

A sweep file lists every run once: index, arm, model, loss, seed, run name (MODEL-LOSS-sSEED) and the full
train_local.py arguments of a new run (`--out-dir GROUP --run-name NAME`). A run's state is read from its
folder: missing (start it), folder without a readable results.json (moved aside to NAME.aborted-TIME, then
started), results.json 'running' or 'failed' (`--resume`: from last.pt, or from epoch 1 in place when no epoch
was saved), 'completed' (skipped). `run` decides every action before it starts the first run, so that the
nodes of a multi-node sweep launch the same commands; it tries each run at most once per call, logs each
start and end in GROUP/sweep.log, and writes the report (visualize_results.py GROUP --out GROUP/report) when
the whole sweep is complete (through `run.sh report`). The launcher is `run.sh train` (torchrun over the visible GPUs, or one CPU
process) unless given after `--`. A SLURM job array takes one run (`--index $SLURM_ARRAY_TASK_ID`) or one arm
(`--arm`) per task.

Bad input: one `error:` line naming the option or file and the fix, exit status 2.
"""
from __future__ import annotations

import argparse
import datetime as dt
import difflib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import config_shenron as C

REPO = Path(__file__).resolve().parent
SWEEP_FILE = "sweep.json"
LOG_FILE = "sweep.log"
FORMAT = 1
# train_local.py options that take a path: made absolute against the caller's directory; what must exist.
PATH_OPTIONS = {"--data-root": "folder", "--datasplit": "file", "--out-dir": None, "--resume": "run folder"}
# Options a sweep sets for each run itself.
SWEEP_SETS = ("--model", "--loss", "--seed", "--out-dir", "--run-name", "--resume")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class InputError(Exception):
    """Bad input: printed as one `error:` line, exit status 2."""


# ----------------------------------------------------------------------------------------------------
# The quick options check
# ----------------------------------------------------------------------------------------------------
def check_options(argv: list[str], cwd: Path) -> tuple[list[str], list[str]]:
    """(train_local.py arguments in a canonical order with absolute paths, one note per path option given).
    InputError for an unknown or abbreviated option, a bad value, or a path that must exist and does not;
    argparse's own one-line error (exit 2) for a bad choice or number."""
    parser = C.build_parser("train_local.py")
    parser.prog = "train_local.py"
    parser.allow_abbrev = False  # `--epoch 3` must not silently mean `--epochs 3`
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise InputError(unknown_message(unknown))
    out, notes = [], []
    for o in C.OPTIONS:
        value = getattr(args, o.dest)
        if o.repeatable:
            out += [part for v in value for part in (o.flag, v)]
            continue
        if value is None:
            continue
        if o.flag in PATH_OPTIONS:
            value = absolute(value, cwd)
            check_exists(o.flag, value, PATH_OPTIONS[o.flag], cwd)
            notes.append(f"{o.flag} {value}")
        elif o.rule and not o.to_config and not rule_holds(o.rule[0], value):
            raise InputError(f"{o.flag} {value} is out of range: must be {o.rule[1]}")
        out += [o.flag, str(value)]
    return out, notes


def rule_holds(rule, value) -> bool:
    """The options table's range rule on a given value; a rule that cannot judge the value is left to
    train_local.py (it resolves every option before checking)."""
    try:
        return bool(rule(value))
    except (TypeError, ValueError):
        return True


def unknown_message(unknown: list[str]) -> str:
    flag = next((u for u in unknown if u.startswith("-")), None)
    if flag is None:
        return f"unexpected argument {unknown[0]!r} (train_local.py takes only --options; see train_local.py --help)"
    name = flag.split("=", 1)[0]
    close = difflib.get_close_matches(name, [o.flag for o in C.OPTIONS], n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown option {name}{hint}; train_local.py --help lists the options"


def absolute(path: str, cwd: Path) -> str:
    """`path` made absolute against `cwd` (the caller's directory), `~` expanded, without resolving links."""
    return os.path.normpath(os.path.join(cwd, os.path.expanduser(path)))


def check_exists(flag: str, path: str, kind: str | None, cwd: Path) -> None:
    where = f" (relative paths are taken from {cwd}, where run.sh was called)"
    if kind == "folder" and not Path(path).is_dir():
        raise InputError(f"{flag} {path}: no such folder{where}")
    if kind == "file" and not Path(path).is_file():
        raise InputError(f"{flag} {path}: no such file{where}")
    if kind == "run folder" and not (Path(path) / "results.json").is_file():
        raise InputError(f"{flag} {path}: not a run folder (no results.json there){where}")


def option_value(argv: list[str], flag: str) -> str | None:
    """The last value of `flag` in a canonical argument list (None when absent)."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]
    return values[-1] if values else None


# ----------------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedRun:
    index: int
    arm: int
    model: str
    loss: str
    seed: int
    run_name: str
    args: tuple[str, ...]   # train_local.py arguments of a new run

    def to_dict(self) -> dict:
        return {**self.__dict__, "args": list(self.args)}


def loss_names() -> list[str]:
    from losses import LOSS_CONFIGS  # imports torch (seconds): only planning needs the names

    return list(LOSS_CONFIGS)


def make_plan(group: Path, command: str, models: list[str], losses: list[str], mode: str, seeds: list[int],
              options: list[str], ranking: bool = False) -> dict:
    """The sweep file's content: every (model, loss) arm with every seed, arm by arm. `options` are checked
    train_local.py arguments the runs share; a `--mode` among them replaces the command's."""
    for flag in SWEEP_SETS:
        if flag in options:
            raise InputError(f"{flag} is set by the sweep for each run; {sweep_set_hint(flag)}")
    unknown = [m for m in models if m not in C.MODELS]
    if unknown:
        raise InputError(f"unknown model {unknown[0]!r}; valid: {', '.join(C.MODELS)}")
    known = loss_names()
    losses = known if losses == ["all"] else losses
    unknown = [name for name in losses if name not in known]
    if unknown:
        raise InputError(f"unknown loss {unknown[0]!r}; valid: {', '.join(known)} (python losses.py lists them)")
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise InputError(f"seeds {seeds} must be distinct and >= 0")
    shared = options if "--mode" in options else ["--mode", mode, *options]
    runs, arms = [], [(m, name) for m in models for name in losses]
    for arm, (model, loss) in enumerate(arms):
        for seed in seeds:
            name = f"{model}-{loss}-s{seed}"
            args = ("--model", model, "--loss", loss, "--seed", str(seed), *shared, "--out-dir", str(group),
                    "--run-name", name)
            runs.append(PlannedRun(len(runs), arm, model, loss, seed, name, args))
    return {"format": FORMAT, "command": command, "group": str(group), "ranking": ranking,
            "arms": [{"arm": i, "model": m, "loss": name} for i, (m, name) in enumerate(arms)],
            "seeds": seeds, "options": shared, "runs": [r.to_dict() for r in runs]}


def sweep_set_hint(flag: str) -> str:
    return {"--model": "compare-models trains unet_2d and unet_25d; give the model as the command's argument",
            "--loss": "compare trains every loss; choose some with --losses a,b",
            "--seed": "give the first seed to run.sh (--seed N --seeds K: seeds N..N+K-1)",
            "--out-dir": "run.sh's --out-dir is the parent of the group folder",
            "--run-name": "run names are MODEL-LOSS-sSEED inside the group",
            "--resume": "continue a sweep with ./run.sh sweep GROUP"}[flag]


PLAN_KEYS = ("format", "command", "group", "ranking", "arms", "seeds", "options", "runs")


def write_plan(group: Path, plan: dict, node_rank: int = 0) -> str:
    """Write GROUP/sweep.json, or check that the one there holds the same plan. Returns 'new' or 'same';
    InputError naming the first difference when the stored plan differs. Other nodes wait for node 0's."""
    path = group / SWEEP_FILE
    if node_rank != 0:
        wait_for(path.is_file, 120, f"{path} (written by node 0)")
    if path.is_file():
        read_plan(group)  # a readable sweep file of this format
        stored = json.loads(path.read_text())
        for key in PLAN_KEYS:
            if without_free(stored.get(key)) != without_free(plan.get(key)):
                raise InputError(f"{path} holds another plan ({key}: {describe_change(stored.get(key), plan.get(key))}); "
                                 f"continue it as it is with ./run.sh sweep {group}, or choose another --group")
        if stored != {**plan, "created": stored.get("created")}:
            print(f"run.sh: options a resume may change ({', '.join(FREE_FLAGS)}) differ from {path}; the sweep "
                  f"file's are used", file=sys.stderr)
        return "same"
    group.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{SWEEP_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**plan, "created": dt.datetime.now().isoformat(timespec="seconds")}, indent=1))
    os.replace(tmp, path)
    return "new"


# Options a resume may change (config_shenron: on_resume "free"): a sweep continued with other values is the same.
FREE_FLAGS = tuple(o.flag for o in C.OPTIONS if o.on_resume == "free")


def without_free(value):
    """A plan value with the free options' values taken out of every argument list in it."""
    if isinstance(value, dict):
        return {k: without_free(v) for k, v in value.items()}
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        drop = {i + 1 for i, v in enumerate(value[:-1]) if v in FREE_FLAGS}
        return [v for i, v in enumerate(value) if i not in drop and v not in FREE_FLAGS]
    if isinstance(value, list):
        return [without_free(v) for v in value]
    return value


def describe_change(old, new) -> str:
    """The first difference between two plan values, e.g. `--epochs 2` vs `--epochs 3` in the runs' options."""
    if isinstance(old, list) and isinstance(new, list) and old and isinstance(old[0], dict):
        pairs = [(a, b) for a, b in zip(old, new) if without_free(a) != without_free(b)]
        if pairs and "args" in pairs[0][0] and "args" in pairs[0][1]:
            old, new = pairs[0][0]["args"], pairs[0][1]["args"]
    if isinstance(old, list) and isinstance(new, list) and all(isinstance(v, str) for v in old + new):
        ops = difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes()
        tag, i1, i2, j1, j2 = next(op for op in ops if op[0] != "equal")
        flag = lambda seq, i: [seq[i - 1]] if i > 0 and seq[i - 1].startswith("--") and not seq[i].startswith("--") else []
        return (f"stored {' '.join(flag(old, i1) + old[i1:i2]) or '(nothing)'}, this command "
                f"{' '.join(flag(new, j1) + new[j1:j2]) or '(nothing)'}")
    text = lambda v: json.dumps(v)[:200]
    return f"stored {text(old)}, this command {text(new)}"


def read_plan(group: Path) -> dict:
    path = group / SWEEP_FILE
    if not path.is_file():
        raise InputError(f"{path} not found: {group} is not a sweep folder (plan one with ./run.sh compare "
                         f"--group {group}, compare-models or --seeds N)")
    try:
        plan = json.loads(path.read_text())
        plan["runs"] = [PlannedRun(**{**r, "args": tuple(r["args"])}) for r in plan["runs"]]
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path} is not a sweep file of this toolkit ({err}); plan a new --group") from None
    if plan.get("format") != FORMAT:
        raise InputError(f"{path} has format {plan.get('format')!r}, this toolkit writes {FORMAT}; plan a new --group")
    return plan


def wait_for(ready, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not ready():
        if time.time() > deadline:
            raise InputError(f"waited {seconds:.0f} s for {what}; is node 0 running, on the same file system?")
        time.sleep(1)


# ----------------------------------------------------------------------------------------------------
# Run states and actions
# ----------------------------------------------------------------------------------------------------
ACTIONS = {"missing": "new", "aborted": "restart", "running": "resume", "failed": "resume", "completed": "skip"}


def run_state(group: Path, run: PlannedRun) -> tuple[str, str]:
    """(state, detail) of a planned run's folder: missing, aborted (no readable results.json), running,
    failed or completed (results.json's status)."""
    folder = group / run.run_name
    if not folder.exists():
        return "missing", "not started"
    try:
        results = json.loads((folder / "results.json").read_text())
        status, history = results["status"], results.get("history") or []
        epochs = (results.get("config") or {}).get("epochs", "?")
    except (OSError, ValueError, KeyError, TypeError):
        return "aborted", "folder without a readable results.json"
    if status not in ACTIONS:
        return "aborted", f"unknown status {status!r}"
    detail = f"{len(history)}/{epochs} epochs" + ("" if (folder / "last.pt").is_file() else ", no last.pt")
    if status == "failed":
        detail += f": {str(results.get('failure'))[:100]}"
    return status, detail


def run_args(group: Path, run: PlannedRun, action: str) -> list[str]:
    """train_local.py arguments for `action`: a new run's, or those plus `--resume` (the resume check then
    confirms that the folder holds this very run)."""
    return list(run.args) + (["--resume", str(group / run.run_name)] if action == "resume" else [])


def select(plan: dict, arm: int | None = None, index: int | None = None) -> list[PlannedRun]:
    runs = plan["runs"]
    if index is not None:
        if not 0 <= index < len(runs):
            raise InputError(f"--index {index}: the sweep has runs 0..{len(runs) - 1}")
        return [runs[index]]
    if arm is not None:
        arms = len(plan["arms"])
        if not 0 <= arm < arms:
            raise InputError(f"--arm {arm}: the sweep has arms 0..{arms - 1}")
        return [r for r in runs if r.arm == arm]
    return runs


def move_aside(folder: Path) -> Path:
    """Rename an aborted run folder to NAME.aborted-TIME (nothing is deleted)."""
    target = folder.with_name(f"{folder.name}.aborted-{dt.datetime.now():%Y%m%d-%H%M%S}")
    n = 1
    while target.exists():
        n += 1
        target = target.with_name(f"{folder.name}.aborted-{dt.datetime.now():%Y%m%d-%H%M%S}-{n}")
    folder.rename(target)
    return target


def log_line(group: Path, text: str) -> None:
    with open(group / LOG_FILE, "a") as f:
        f.write(f"{dt.datetime.now().isoformat(timespec='seconds')} {text} host={socket.gethostname()} "
                f"pid={os.getpid()}\n")


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------
class Stopper:
    """Forwards SIGTERM/SIGINT/SIGUSR1 to the current child as SIGTERM (train_local.py then records the stop
    after its last completed epoch) and stops the loop after it."""

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.signal: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        self.signal = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)


def run_sweep(group: Path, arm: int | None = None, index: int | None = None, launcher: list[str] | None = None,
              node_rank: int = 0) -> int:
    """Train every selected run that is not completed, each at most once; then the report when the whole
    sweep is complete (node 0). 0: all selected runs completed; 1: some failed; 128 + signal: stopped."""
    plan = read_plan(group)
    launcher = launcher or [str(REPO / "run.sh"), "train"]
    todo = [(run, ACTIONS[run_state(group, run)[0]]) for run in select(plan, arm, index)]
    todo = [(run, action) for run, action in todo if action != "skip"]
    print(f"sweep {group}: {len(todo)} run(s) to train of {len(select(plan, arm, index))} selected "
          f"({len(plan['runs'])} in the sweep)", flush=True)
    stopper = Stopper()
    for run, action in todo:
        if stopper.signal is not None:
            break
        folder = group / run.run_name
        if action == "restart":
            if node_rank == 0:
                print(f"sweep: {run.run_name}: folder without results.json moved to {move_aside(folder).name}")
            else:
                wait_for(lambda: not folder.exists(), 120, f"node 0 to move {folder} aside")
        if node_rank == 0:
            log_line(group, f"start {run.index} {run.run_name} {action}")
        print(f"sweep: run {run.index + 1}/{len(plan['runs'])} {run.run_name} ({action})", flush=True)
        stopper.child = subprocess.Popen([*launcher, *run_args(group, run, action)], cwd=REPO)
        rc = stopper.child.wait()
        if node_rank == 0:
            log_line(group, f"end {run.index} {run.run_name} rc={rc} state={run_state(group, run)[0]}")
    if stopper.signal is not None:
        print(f"sweep: stopped by signal {stopper.signal}; rerun the same command to continue", flush=True)
        return 128 + stopper.signal
    states = {run.run_name: run_state(group, run) for run in select(plan, arm, index)}
    unfinished = {name: s for name, s in states.items() if s[0] != "completed"}
    for name, (state, detail) in unfinished.items():
        print(f"sweep: {name} is {state} ({detail})")
    if node_rank == 0 and all(run_state(group, r)[0] == "completed" for r in plan["runs"]):
        return write_report(group, plan) or (1 if unfinished else 0)
    if not unfinished:
        print(f"sweep: the selected runs are complete; the report comes when every run of {group} is")
    return 1 if unfinished else 0


def write_report(group: Path, plan: dict) -> int:
    """`run.sh report GROUP --out GROUP/report` (visualize_results.py in the toolkit's venv); one writer at a
    time (a lock file: the last array tasks may finish together)."""
    import fcntl

    with open(group / ".report.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print("sweep: another process is writing the report")
            return 0
        report = [str(REPO / "run.sh"), "report", str(group), "--out", str(group / "report")]
        return subprocess.call(report + (["--ranking"] if plan.get("ranking") else []), cwd=REPO)


def status_lines(group: Path) -> list[str]:
    plan = read_plan(group)
    lines = [f"sweep {group} ({plan['command']}): {len(plan['arms'])} arm(s) x {len(plan['seeds'])} seed(s)"]
    counts: dict[str, int] = {}
    for run in plan["runs"]:
        state, detail = run_state(group, run)
        counts[state] = counts.get(state, 0) + 1
        lines.append(f"  {run.index:3d}  arm {run.arm:2d}  {run.run_name:45s} {state:9s} {detail}")
    lines.append("  " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return lines


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------
def split_dashdash(argv: list[str]) -> tuple[list[str], list[str]]:
    return (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    mine, rest = split_dashdash(argv)
    p = C.OneLineErrorParser(prog="sweep.py", description="Resumable sweeps and run.sh's quick options check "
                             "(see the module docstring).")
    sub = p.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="check train_local.py options quickly")
    check.add_argument("--cwd", default=os.getcwd(), help="directory relative paths are taken from")
    plan = sub.add_parser("plan", help="write (or confirm) GROUP/sweep.json")
    plan.add_argument("group")
    plan.add_argument("--command", dest="label", default="sweep", help="the run.sh command (for messages)")
    plan.add_argument("--models", required=True)
    plan.add_argument("--losses", required=True)
    plan.add_argument("--mode", required=True, choices=tuple(C.MODES))
    plan.add_argument("--seeds", type=int, default=1)
    plan.add_argument("--seed", type=int, default=0)
    plan.add_argument("--ranking", action="store_true")
    plan.add_argument("--node-rank", type=int, default=0)
    plan.add_argument("--cwd", default=os.getcwd())
    status = sub.add_parser("status", help="the state of every run")
    status.add_argument("group")
    status.add_argument("--count", choices=("runs", "arms"), help="print only the number of runs or arms")
    status.add_argument("--complete", action="store_true", help="exit 0 when every run is completed, else 1")
    nxt = sub.add_parser("next", help="the next run to train")
    nxt.add_argument("group")
    args_ = sub.add_parser("args", help="train_local.py arguments of one run")
    args_.add_argument("group")
    args_.add_argument("index", type=int)
    run = sub.add_parser("run", help="train what is missing")
    run.add_argument("group")
    which = run.add_mutually_exclusive_group()
    which.add_argument("--arm", type=int)
    which.add_argument("--index", type=int)
    run.add_argument("--node-rank", type=int, default=0)
    for s in (plan, status, nxt, args_, run):
        s.error = lambda message, s=s: s.exit(2, f"error: {message} (see {s.prog} --help)\n")
    return p.parse_args(mine), rest


def write_nul(parts: list[str]) -> None:
    sys.stdout.write("".join(f"{part}\0" for part in parts))


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.command == "check":
            checked, notes = check_options(rest, Path(args.cwd))
            for note in notes:
                print(f"run.sh: {note}", file=sys.stderr)
            write_nul(checked)
            return 0
        group = Path(absolute(args.group, Path(getattr(args, "cwd", None) or os.getcwd())))
        if args.command == "plan":
            if args.seeds < 1:
                raise InputError(f"--seeds {args.seeds} must be a positive integer")
            options, _ = check_options(rest, Path(args.cwd))
            plan = make_plan(group, args.label, args.models.split(","), args.losses.split(","), args.mode,
                             list(range(args.seed, args.seed + args.seeds)), options, args.ranking)
            return plan_command(group, plan, args.node_rank)
        if args.command == "status":
            plan = read_plan(group)
            if args.count:
                print(len(plan["runs"]) if args.count == "runs" else len(plan["arms"]))
            elif not args.complete:
                print("\n".join(status_lines(group)))
            return 0 if not args.complete or all(run_state(group, r)[0] == "completed" for r in plan["runs"]) else 1
        if args.command == "next":
            for run in read_plan(group)["runs"]:
                action = ACTIONS[run_state(group, run)[0]]
                if action != "skip":
                    print(run.index, action, run.run_name)
                    return 0
            print("nothing left: every run is completed")
            return 1
        if args.command == "args":
            run = select(read_plan(group), index=args.index)[0]
            write_nul(run_args(group, run, ACTIONS[run_state(group, run)[0]]))
            return 0
        return run_sweep(group, args.arm, args.index, rest or None, args.node_rank)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def plan_command(group: Path, plan: dict, node_rank: int) -> int:
    outcome = write_plan(group, plan, node_rank)
    runs = [PlannedRun(**{**r, "args": tuple(r["args"])}) for r in plan["runs"]]
    states = [run_state(group, r)[0] for r in runs]
    done = states.count("completed")
    verb = "planned" if outcome == "new" else "continuing"
    print(f"run.sh: {verb} sweep {group}: {len(plan['arms'])} arm(s) x {len(plan['seeds'])} seed(s) "
          f"(seeds {', '.join(map(str, plan['seeds']))}) = {len(runs)} run(s), {done} completed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
