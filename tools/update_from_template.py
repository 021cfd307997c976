#!/usr/bin/env python3
"""Bring a generated service up to a newer template commit: `make update-from-template`.

Usage: tools/update_from_template.py [--template URL_OR_PATH] [--to REF]

.template.json (written by the template's `make new-service`) records where the service came
from: the template, its commit and the rename answers. This regenerates the service from that
commit and from the new one, with the same answers, into temporary folders, and merges the
difference between the two into this working tree file by file with `git merge-file`, as
`copier update` does: the service's own edits stay, the template's changes come in, and a
change of both to the same lines is left with conflict markers for a person to resolve. The
generated stubs are not merged: `make update-from-template` regenerates them afterwards.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ANSWERS = ".template.json"
STUBS = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _run(command: list[str], cwd: Path) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done.stdout.strip()


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under root but .git, by its path relative to root."""
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file() and ".git" not in path.relative_to(root).parts
    }


def generate(template: Path, commit: str, answers: dict[str, object], dest: Path) -> None:
    """Write the service the template at `commit` generates with `answers` into dest."""
    _run(["git", "checkout", "--quiet", "--force", commit], template)
    _run(["git", "clean", "--quiet", "-fdx"], template)
    argv = [sys.executable, str(template / "tools" / "new_service.py")]
    argv += ["--name", str(answers["name"]), "--resource", str(answers["resource"])]
    argv += ["--plural", str(answers["plural"]), "--dest", str(dest), "--no-git"]
    # The stubs are regenerated afterwards; this service's ruff settles both trees the same.
    argv += ["--skip-generate", "--ruff", str(Path(sys.executable).parent / "ruff")]
    argv += ["--template-source", str(answers["template"])]
    if answers.get("minimal"):
        argv.append("--minimal")
    _run(argv, template)


def merge(service: Path, old: dict[str, bytes], new: dict[str, bytes]) -> list[str]:
    """Apply the old -> new template difference to service; return the paths in conflict."""
    conflicts: list[str] = []
    for name in sorted(old.keys() | new.keys()):
        before, after = old.get(name), new.get(name)
        if before == after or name.endswith(STUBS) or name == ANSWERS:
            continue
        target = service / name
        if after is None:  # the template removed it: so does the service, unless it edited it
            if target.exists() and target.read_bytes() != before:
                conflicts.append(f"{name}: removed by the template, edited here")
            else:
                target.unlink(missing_ok=True)
            continue
        if not target.exists():
            if before is None:  # new in the template
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(after)
            else:
                conflicts.append(f"{name}: changed by the template, removed here")
            continue
        if target.read_bytes() == before:
            target.write_bytes(after)
            continue
        with tempfile.TemporaryDirectory() as scratch:
            base, theirs = Path(scratch) / "base", Path(scratch) / "theirs"
            base.write_bytes(before or b"")
            theirs.write_bytes(after)
            labels = ["-L", "this service", "-L", "template before", "-L", "template after"]
            done = subprocess.run(
                ["git", "merge-file", *labels, str(target), str(base), str(theirs)],
                capture_output=True, check=False,
            )  # fmt: skip
        if done.returncode != 0:
            conflicts.append(f"{name}: both changed the same lines (conflict markers written)")
    return conflicts


def main(argv: list[str] | None = None) -> int:
    """Update the service in the current directory; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", default="", help="template repository (default: recorded)")
    parser.add_argument("--to", default="HEAD", help="template commit or branch to update to")
    arguments = parser.parse_args(argv)
    service = Path.cwd()
    if not (service / ANSWERS).is_file():
        parser.error(f"no {ANSWERS} here: run this in a service `make new-service` wrote")
    answers = json.loads((service / ANSWERS).read_text())
    if arguments.template:
        answers["template"] = arguments.template
    if _run(["git", "status", "--porcelain"], service):
        parser.error("the working tree has uncommitted changes: commit or stash them first")
    with tempfile.TemporaryDirectory(prefix="update-from-template-") as scratch:
        work = Path(scratch)
        template = work / "template"
        _run(["git", "clone", "--quiet", str(answers["template"]), str(template)], work)
        target = _run(["git", "rev-parse", "--verify", f"{arguments.to}^{{commit}}"], template)
        if target == answers["commit"]:
            print(f"already at the template's {target[:12]}")
            return 0
        generate(template, str(answers["commit"]), answers, work / "old")
        generate(template, target, answers, work / "new")
        conflicts = merge(service, _tree(work / "old"), _tree(work / "new"))
    (service / ANSWERS).write_text(json.dumps({**answers, "commit": target}, indent=2) + "\n")
    print(f"updated from the template's {str(answers['commit'])[:12]} to {target[:12]}")
    if conflicts:
        print("resolve, then commit:\n  " + "\n  ".join(conflicts), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
