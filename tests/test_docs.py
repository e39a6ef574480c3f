"""Every command the documentation shows runs, as written, on a tiny workload: a doc example that breaks fails CI.

Sources: README.md, benchmarks/README.md and docs/*.md: the lines of ``sh``/``console``/untagged code blocks, and
inline code spans, that start (after ``VAR=value`` prefixes) with ``edgetrain``, ``.venv/bin/edgetrain``,
``python -m edgetrain``, ``python benchmarks/...`` or ``make demo``. Each block runs in order in a fresh workspace
(a temporary directory with the repository's ``benchmarks/`` configs and scripts linked in, an empty
``benchmarks/results/`` holding copies of the results files the commands read, and the files the docs refer to:
``recipe.yaml``, ``plan.json``, the usage guide's ``mynets.py`` and ``mine.yaml``), so nothing is written into the
repository. ``EDGETRAIN_SMOKE=1`` (:mod:`edgetrain.smoke`) shrinks steps, samples, image size and batch; threads
are set to 1.

Checks: exit status 0; for verbs with ``--json`` the command also runs in its other form (text and ``--json``) and
the JSON must parse strictly (no NaN); ``train``'s summary line and every ``.json`` file written parse strictly;
console blocks' shown output matches (lines after ``...`` are matched anywhere). Inline spans that name a verb
rather than give a command are listed in ``MENTIONS``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import runpy
import shlex
import shutil
import textwrap
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
JSON_VERBS = {"ls", "measure", "estimate", "plan", "inspect"}  # verbs with a --json form
#: inline spans that name a verb (or elide its arguments) rather than give a command to run
MENTIONS = {"edgetrain bench", "edgetrain inspect", "edgetrain estimate", "edgetrain plan", "edgetrain measure",
            "edgetrain train", "edgetrain inspect --model ...", ".venv/bin/edgetrain", "edgetrain export",
            "edgetrain export --run DIR --out DIR", "edgetrain plan -o", "edgetrain federated",
            "edgetrain federated --config FED.yaml --out DIR"}
#: placeholders the docs use for a file named nearby
PLACEHOLDERS = {"<that file>": "benchmarks/results/gradient_filter-speed-2026-11-27.json"}
#: per-script arguments that make a benchmark tiny (its other arguments stay as written)
SCRIPT_ARGS = {
    "benchmarks/approx/speed.py": ["--batch", "2", "--repeats", "1", "--ref-products", "50"],
    "benchmarks/approx/step_time.py": ["--batch-size", "2", "--repeats", "1"],
    "benchmarks/compress/bnn_t2.py": ["--repeats", "1", "--batch-size", "32"],
    "benchmarks/compress/step_time.py": ["--rounds", "1"],
    "benchmarks/gradient_filter/speed.py": ["--reps", "1"],
    "benchmarks/approx/train_t2.py": ["--eval-subset", "32", "--models", "lenet5", "--multipliers", "fp32,mbm"],
    "benchmarks/zoo/run.py": ["--models", "audio", "functional"],
}
#: commands broken by a change outside this test's files, by the start of their argv (after the rewriting below):
#: each must still fail (when it passes, its entry must go), the rest of its block still runs, and the block is
#: reported as an expected failure naming the reason
KNOWN_BROKEN: dict[str, str] = {}
#: blocks that take minutes even on the tiny workload (run with `make test-slow`)
SLOW = {"benchmarks/gradient_filter/speed.py", "benchmarks/zoo/run.py", "benchmarks/plan/t1_budgets.py",
        "benchmarks/compress/t1_compress.yaml", "benchmarks/plan/int8_plans.py",
        "benchmarks/gradient_filter/t1_gf.yaml", "benchmarks/adapters/peft_compare.py", "benchmarks/distill/bdkd.py",
        "benchmarks/federated/federated.py", "benchmarks/export/equivalence.py",
        "benchmarks/lowp/t1_lightnorm.yaml"}
#: commands the docs show failing on purpose: (exit status, a fragment of the one-line error)
EXPECTED_ERRORS = {"edgetrain plan --budget 2KB": (2, "is infeasible: the smallest"),
                   "edgetrain plan --device mcu": (2, "is infeasible: the smallest"),
                   "edgetrain train --model small_cnn --data digits --image-size 8 --channels 1 --lr 1e6": (
                       2, "became inf at step")}
#: commands that are tiny already and whose point needs their whole schedule: run without smoke mode
FULL = ("edgetrain train --model small_cnn --data digits --image-size 8 --channels 1 --lr 1e6",)
#: verbs whose output no later command reads: an identical command already run elsewhere is not run again
STATELESS = {"ls", "measure", "estimate", "inspect", "bench"}


@dataclass
class Command:
    text: str
    line: int
    output: list[str] = field(default_factory=list)  # console blocks: the output shown under it


@dataclass
class Block:
    doc: str
    line: int
    commands: list[Command]

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


PREFIX = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(edgetrain|\.venv/bin/edgetrain|python -m edgetrain|"
                    r"(?:\.venv/bin/)?python benchmarks/\S+\.py|make demo)(?:\s|$)")
FENCE = re.compile(r"^[ \t]*```(\w*)\s*\n(.*?)^[ \t]*```", re.S | re.M)  # also fenced inside list items


def _join_continuations(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for n, text in lines:
        if out and out[-1][1].endswith("\\"):
            out[-1] = (out[-1][0], out[-1][1][:-1].rstrip() + " " + text.strip())
        else:
            out.append((n, text))
    return out


def extract(path: Path) -> list[Block]:
    text = path.read_text()
    doc = str(path.relative_to(ROOT))
    blocks: list[Block] = []
    for m in FENCE.finditer(text):
        lang, body = m.group(1), textwrap.dedent(m.group(2))
        if lang not in ("", "sh", "bash", "shell", "console"):
            continue
        first = text[: m.start(2)].count("\n") + 1
        lines = _join_continuations([(first + i, ln) for i, ln in enumerate(body.splitlines())])
        cmds: list[Command] = []
        for n, ln in lines:
            if lang == "console":
                if ln.startswith("$ "):
                    cmd = ln[2:].strip()
                    cmds.append(Command(cmd, n) if PREFIX.match(cmd) else Command("", n))
                elif cmds:
                    cmds[-1].output.append(ln.rstrip())
            elif PREFIX.match(ln.strip()):
                cmds.append(Command(ln.strip(), n))
        cmds = [c for c in cmds if c.text]
        if cmds:
            blocks.append(Block(doc, cmds[0].line, cmds))
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # keep line numbers
    for m in re.finditer(r"`([^`]+)`", prose):
        span = " ".join(m.group(1).split())
        if PREFIX.match(span) and span not in MENTIONS and len(span.split()) > 1:  # a bare name is a mention
            blocks.append(Block(doc, prose[: m.start()].count("\n") + 1, [Command(span, 0)]))
    return blocks


def _unique(blocks: list[Block]) -> list[Block]:
    """One run of each command: a single-command block whose command an earlier block already runs is dropped."""
    seen: set[str] = set()
    out = []
    for b in blocks:
        texts = [" ".join(shlex.split(c.text, comments=True)) for c in b.commands]
        if len(texts) == 1 and texts[0] in seen:
            continue
        seen.update(texts)
        out.append(b)
    return out


BLOCKS = _unique([b for p in DOCS for b in extract(p)])


def _slow(block: Block) -> bool:
    return any(s in c.text for c in block.commands for s in SLOW)


# --------------------------------------------------------------------------------------------- the workspace
RECIPE_YAML = "name: recipe\ntechniques:\n  - type: freeze\n    last_k_blocks: 2\n"
PLAN_JSON = json.dumps({"name": "plan", "targets": None, "techniques": [{"type": "sparse_update", "bias_last_k": 4}]})


def _usage_files() -> dict[str, str]:
    """``mynets.py`` and ``mytables.py`` (the usage guide's python blocks defining ``small_net`` and ``table_net``)
    and ``mine.yaml`` (its ``cat``)."""
    usage = (ROOT / "docs" / "usage.md").read_text()
    files = {}
    for m in FENCE.finditer(usage):
        if m.group(1) == "python" and "def small_net" in m.group(2):
            files["mynets.py"] = m.group(2)
        if m.group(1) == "python" and "def table_net" in m.group(2):
            files["mytables.py"] = m.group(2)
        if m.group(1) == "console" and "$ cat mine.yaml" in m.group(2):
            body = m.group(2).split("$ cat mine.yaml\n", 1)[1]
            files["mine.yaml"] = body.split("\n$ ", 1)[0] + "\n"
    return files


def workspace(tmp: Path, block: Block) -> Path:
    ws = tmp / "ws"
    bench = ws / "benchmarks"
    (bench / "results").mkdir(parents=True)
    for entry in (ROOT / "benchmarks").iterdir():
        if entry.name != "results":
            (bench / entry.name).symlink_to(entry)
    (ws / "recipe.yaml").write_text(RECIPE_YAML)
    (ws / "plan.json").write_text(PLAN_JSON)
    for name, text in _usage_files().items():
        (ws / name).write_text(text)
    for cmd in block.commands:  # results files the commands read (not those they write)
        tokens = _tokens(cmd.text)
        for i, tok in enumerate(tokens):
            src = ROOT / tok
            if tok.startswith("benchmarks/results/") and src.is_file() and (i == 0 or tokens[i - 1] != "--out"):
                shutil.copy(src, ws / tok)
    return ws


# --------------------------------------------------------------------------------------------- running
def _tokens(text: str) -> list[str]:
    for k, v in PLACEHOLDERS.items():
        text = text.replace(k, v)
    return shlex.split(text, comments=True)


def _make_demo() -> list[str]:
    """The ``demo`` recipe of the Makefile as an edgetrain argv."""
    make = (ROOT / "Makefile").read_text()
    line = re.search(r"^demo:.*\n\t(.+)$", make, re.M).group(1)
    line = line.replace("$(PY) -m edgetrain", "edgetrain").replace("$(THREADS)", "1")
    return _tokens(line)


@dataclass
class Result:
    argv: list[str]
    code: int
    out: str
    err: str


def run(argv: list[str]) -> Result:
    """One command in this process (edgetrain's main, or a benchmark script via runpy)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if argv[0] == "edgetrain":
                from edgetrain.cli import main

                code = main(argv[1:])
            else:
                script = ROOT / argv[0]
                saved_argv, saved_path = sys.argv, list(sys.path)
                sys.argv, sys.path[0:0] = [str(script), *argv[1:]], [str(script.parent)]
                try:
                    runpy.run_path(str(script), run_name="__main__")
                finally:
                    sys.argv, sys.path[:] = saved_argv, saved_path
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # noqa: BLE001  (a script that raises ends with a traceback and exit status 1)
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            torch.set_num_threads(1)
    return Result(argv, code or 0, out.getvalue(), err.getvalue())


def argvs(cmd: Command, previous: dict[str, list[str]]) -> list[list[str]]:
    """The argv(s) a command line runs: ``&&`` chains split, env prefixes dropped, the interpreter and paths
    normalised, ``...`` expanded to the previous command of that verb, threads set to 1."""
    out = []
    text = cmd.text
    for part in text.split("&&"):
        tokens = _tokens(part)
        while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):
            tokens = tokens[1:]
        if tokens[:2] == ["make", "demo"]:
            tokens = _make_demo()
        if tokens[0] in (".venv/bin/edgetrain",):
            tokens = ["edgetrain", *tokens[1:]]
        if tokens[:3] == ["python", "-m", "edgetrain"]:
            tokens = ["edgetrain", *tokens[3:]]
        if tokens[0] in ("python", ".venv/bin/python"):
            tokens = tokens[1:]
        if "..." in tokens:  # `edgetrain train ... --out runs/t1 --resume`: the previous train's arguments
            verb = tokens[1]
            prev = previous[verb]
            keep = [t for i, t in enumerate(prev[2:]) if t != "--out" and (i == 0 or prev[2:][i - 1] != "--out")]
            i = tokens.index("...")
            tokens = tokens[:i] + keep + tokens[i + 1:]
        threads = ("--threads" in (ROOT / tokens[0]).read_text() if tokens[0] != "edgetrain" else
                   len(tokens) > 1 and tokens[1] != "ls")
        tokens = [t for i, t in enumerate(tokens) if t != "--threads" and (i == 0 or tokens[i - 1] != "--threads")]
        if tokens[0] == "edgetrain":
            previous[tokens[1]] = tokens
        else:
            tokens += SCRIPT_ARGS.get(tokens[0], [])
        tokens += ["--threads", "1"] if threads else []
        out.append(tokens)
    return out


def strict_json(text: str, what: str) -> object:
    def refuse(c: str) -> None:
        raise AssertionError(f"{what}: {c} in JSON (write null)")

    return json.loads(text, parse_constant=refuse)


def other_form(argv: list[str]) -> list[str] | None:
    if argv[0] != "edgetrain" or argv[1] not in JSON_VERBS:
        return None
    return [a for a in argv if a != "--json"] if "--json" in argv else [*argv, "--json"]


def check(res: Result, shown: list[str], expected: tuple[int, str] | None = None) -> None:
    tail = (res.out[-1500:] + "\n--- stderr ---\n" + res.err[-2500:]).strip()
    if expected is not None:
        code, fragment = expected
        last = res.err.strip().splitlines()[-1] if res.err.strip() else ""
        assert res.code == code and last.startswith("edgetrain: error:") and fragment in last, tail
        errs = [ln.rstrip() for ln in res.err.splitlines()]
        assert all(ln in errs for ln in shown if ln != "..."), f"shown error differs:\n{tail}"
        return
    assert res.code == 0, f"{' '.join(res.argv)} exited {res.code}:\n{tail}"
    assert "Traceback" not in res.err, tail
    if res.argv[0] == "edgetrain" and "--json" in res.argv:
        strict_json(res.out, " ".join(res.argv))
    if res.argv[:2] == ["edgetrain", "train"]:
        strict_json(res.out.strip().splitlines()[-1], "train summary")
    if shown:
        got = [ln.rstrip() for ln in res.out.splitlines()]
        if "..." in shown:
            missing = [ln for ln in shown if ln != "..." and ln not in got]
        else:
            missing = [] if got == shown else [f"expected {len(shown)} lines, got:\n" + "\n".join(got)]
        assert not missing, f"{' '.join(res.argv)}: shown output differs: {missing}"


_RAN: set[str] = set()  # commands that ran and passed (see STATELESS)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("edgetrain-cache")


def test_the_docs_show_commands():
    assert len(BLOCKS) >= 20
    docs = {b.doc for b in BLOCKS}
    assert {"README.md", "docs/usage.md", "docs/planner.md"} <= docs


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id, marks=[pytest.mark.slow] if _slow(b) else [])
                                   for b in BLOCKS])
def test_doc_block_runs(block, tmp_path, monkeypatch, cache):
    ws = workspace(tmp_path, block)
    monkeypatch.chdir(ws)
    monkeypatch.syspath_prepend(str(ws))  # PYTHONPATH=. in the docs: mynets.py
    monkeypatch.setenv("EDGETRAIN_SMOKE", "1")
    monkeypatch.setenv("EDGETRAIN_CACHE", str(cache))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    if any(t in c.text for c in block.commands for t in ("benchmarks/approx/", "approx_multiply")):
        pytest.importorskip("ninja")
    previous: dict[str, list[str]] = {}
    broken: list[str] = []
    for cmd in block.commands:
        for argv in argvs(cmd, previous):
            key = " ".join(argv)
            if argv[0] == "edgetrain" and argv[1] in STATELESS and key in _RAN and not cmd.output:
                continue
            why = next((v for k, v in KNOWN_BROKEN.items() if key.startswith(k)), None)
            if why is not None:
                res = run(argv)
                assert res.code != 0, f"{key} runs now: remove it from KNOWN_BROKEN"
                broken.append(f"{key.split(' --threads')[0]}: {why}")
                continue
            expected = next((v for k, v in EXPECTED_ERRORS.items() if key.startswith(k)), None)
            with monkeypatch.context() as m:
                if key.startswith(FULL):
                    m.delenv("EDGETRAIN_SMOKE")
                check(run(argv), cmd.output, expected)
            _RAN.add(key)
            alt = other_form(argv)
            if alt is not None:
                check(run(alt), [], expected)
    for f in [*ws.rglob("*.json")]:
        if f.is_file() and not f.is_symlink() and "benchmarks/" not in str(f.relative_to(ws)).replace(
                "benchmarks/results/", ""):
            strict_json(f.read_text(), str(f.relative_to(ws)))
    for f in (ws / "benchmarks" / "results").iterdir():
        if f.suffix == ".json":
            strict_json(f.read_text(), str(f.relative_to(ws)))
    assert not list((ROOT / "benchmarks" / "results").glob("*smoke*"))
    if broken:
        pytest.xfail("; ".join(dict.fromkeys(broken)))
