"""Run the README's shell examples as written, against what `make demo` left (CI runs this after the demo).

    make demo && python scripts/check_readme.py            # every ```bash block of README.md, in order

Each block runs in one ``bash -e`` process in the repository root with ``.venv/bin`` first on PATH (what
`. .venv/bin/activate` does), so a command that fails stops its block and the check fails. Lines that set
the project up (`make …`, `pip install …`) are not run again. Lines that need a collection built at set-up
(``data/br35h``, ``data/cases``: `make data`) are skipped, and said so, when it is not there. Background
jobs a block starts (the quality gate) are stopped when the block ends. Prints one line per block.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUP = re.compile(r"^\s*(make\b|pip install\b|python -m pip install\b)")
BUILT = re.compile(r"\bdata/(br35h|cases)\b")


def shell_blocks(readme: Path) -> list[str]:
    """The ```bash blocks of a Markdown file, in order."""
    return re.findall(r"^```bash\n(.*?)^```", readme.read_text(encoding="utf-8"), flags=re.M | re.S)


def commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comment-only lines dropped."""
    out, cur = [], ""
    for line in block.splitlines():
        cur += line
        if cur.rstrip().endswith("\\"):
            cur = cur.rstrip()[:-1] + " "
            continue
        if cur.strip() and not cur.lstrip().startswith("#"):
            out.append(cur)
        cur = ""
    return out


def runnable(cmds: list[str], root: Path) -> tuple[list[str], list[str]]:
    """Split into (to run, skipped with the reason)."""
    run, skipped = [], []
    for c in cmds:
        if SETUP.match(c):
            skipped.append(f"{c.strip()}  (set-up)")
        elif (m := BUILT.search(c)) and not (root / "data" / m.group(1) / "manifest.csv").is_file():
            skipped.append(f"{c.strip()}  (needs `make data`)")
        else:
            run.append(c)
    return run, skipped


def run_block(cmds: list[str], root: Path, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PATH"] = f"{root / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(root / ".venv")
    script = "set -e\n" + "\n".join(cmds) + "\n"
    # output to a file, not a pipe: a background job of the block (the quality gate) keeps its stdout open, and
    # reading a pipe to its end would wait for that job instead of for the block
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(["bash", "-c", script], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = 124
        finally:
            try:  # background jobs of the block (a server) end with it
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        log.seek(0)
        out = log.read()
    return subprocess.CompletedProcess(proc.args, code, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per block")
    args = p.parse_args(argv)
    root = args.readme.resolve().parent
    if not (root / "runs" / "demo" / "latest").is_dir():
        print("runs/demo/latest is missing: run `make demo` first", file=sys.stderr)
        return 2
    failed = 0
    for i, block in enumerate(shell_blocks(args.readme), 1):
        run, skipped = runnable(commands(block), root)
        for s in skipped:
            print(f"block {i}: skipped {s}")
        if not run:
            continue
        t0 = time.perf_counter()
        res = run_block(run, root, args.timeout)
        status = "ok" if res.returncode == 0 else f"FAILED (exit {res.returncode})"
        print(f"block {i}: {status} in {time.perf_counter() - t0:.0f} s: {len(run)} commands", flush=True)
        if res.returncode != 0:
            failed += 1
            print("\n".join("    " + line for line in res.stdout.splitlines()[-40:]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
