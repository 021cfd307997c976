#!/usr/bin/env python3
"""Write a new service from this repository, renamed throughout: `make new-service`.

Usage: tools/new_service.py --name orders --resource Order [--plural Orders] [--dest ../orders]

This repository stays the runnable reference: it carries no template placeholders. The
generator copies the files git knows of (tracked, or new and not ignored) that the manifest
tools/template.toml selects, squashes each folder of numbered migrations into one
0001_init.sql, renames contents, file names and directory names by the rules in
`rename_rules`, regenerates the stubs, records the template commit and the answers in
.template.json (what `make update-from-template` starts from) and makes the first commit.
Rules are whole identifier parts, so `CreateUser`, `user_id`, `USER_ROLE_ADMIN` and `users`
all follow, while words that merely contain the resource name (`runAsUser`, `useradd`, a
`USER` directive) are kept.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

OLD_NAME = "userservice"  # package, console script, error domain, metric and k8s labels
OLD_SERVICE = "UserService"
OLD_RESOURCE = "User"
OLD_PLURAL = "Users"
OLD_PROTO_PACKAGE = "user"  # proto package user.v1 in proto/user/v1, generated into src/user
OLD_LOCK_KEY = "usersvc1"  # PostgreSQL migration advisory lock: 8 ASCII bytes
# Words that contain the resource name but belong to someone else.
PROTECTED = ("runAsUser", "useradd", "userinfo")
NAME_RE = re.compile(r"^[a-z][a-z0-9]*$")
RESOURCE_RE = re.compile(r"^[A-Z][a-z0-9]+$")
MANIFEST = Path("tools/template.toml")
ANSWERS = ".template.json"

Rule = Callable[[str], str]


def _lock_key(name: str) -> str:
    """Return the 8-byte advisory-lock tag of a service: its name, padded, then `1`."""
    return f"{name[:7]:_<7}1"


def _hex_literal(tag: str) -> str:
    """Return a tag as the grouped hex literal the source spells it with (0x7573_6572_…)."""
    digits = tag.encode().hex()
    return "0x" + "_".join(digits[i : i + 4] for i in range(0, len(digits), 4))


def rename_rules(name: str, resource: str, plural: str) -> list[tuple[re.Pattern[str], str]]:
    """Return (pattern, replacement) pairs, most specific first."""
    old_lower, old_plural_lower = OLD_RESOURCE.lower(), OLD_PLURAL.lower()
    lower, plural_lower = resource.lower(), plural.lower()
    pairs: list[tuple[str, str]] = [
        # The service as a whole.
        (re.escape(_hex_literal(OLD_LOCK_KEY)), _hex_literal(_lock_key(name))),
        (re.escape(OLD_LOCK_KEY), _lock_key(name)),
        (OLD_NAME.upper(), name.upper()),
        (OLD_NAME, name),
        # Alert names in the PrometheusRule (UserserviceErrorRatioHigh).
        (OLD_NAME.capitalize(), name.capitalize()),
        (OLD_SERVICE, f"{resource}Service"),
        # The proto package (user.v1, user/v1, src/user) becomes the service's name.
        (rf"\b{OLD_PROTO_PACKAGE}(?=[./]v1\b)", name),
        (rf"(?<=src/){OLD_PROTO_PACKAGE}\b", name),
        # The resource, as an identifier part: User, Users, user, users, USER_, _USERS.
        (rf"{OLD_PLURAL}(?![a-z])", plural),
        (rf"{OLD_RESOURCE}(?![a-z])", resource),
        (rf"(?<![a-z]){old_plural_lower}(?![a-z])", plural_lower),
        (rf"(?<![a-z]){old_lower}(?![a-z])", lower),
        (rf"(?<![A-Za-z]){OLD_PLURAL.upper()}(?=_)|(?<=_){OLD_PLURAL.upper()}(?![A-Za-z])",
         plural.upper()),
        (rf"(?<![A-Za-z]){OLD_RESOURCE.upper()}(?=_)|(?<=_){OLD_RESOURCE.upper()}(?![A-Za-z])",
         resource.upper()),
    ]  # fmt: skip
    return [(re.compile(pattern), replacement) for pattern, replacement in pairs]


def renamer(name: str, resource: str, plural: str) -> Rule:
    """Return a function applying every rule in one pass (no rule sees another's output)."""
    rules = rename_rules(name, resource, plural)
    # Protected words come first in the alternation, so they match (and stay) as a whole.
    alternatives = [f"(?P<keep>{'|'.join(re.escape(word) for word in PROTECTED)})"]
    alternatives += [f"(?P<r{index}>{pattern.pattern})" for index, (pattern, _) in enumerate(rules)]
    everything = re.compile("|".join(alternatives))

    def one(match: re.Match[str]) -> str:
        group = match.lastgroup or "keep"
        return match.group(0) if group == "keep" else rules[int(group[1:])][1]

    return lambda text: everything.sub(one, text)


def source_files(root: Path) -> list[Path]:
    """Return every file git tracks, or would track (new and not ignored), under root."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root, check=True, capture_output=True,
    ).stdout.decode()  # fmt: skip
    return sorted({Path(p) for p in listed.split("\0") if p and (root / p).is_file()})


@dataclass(frozen=True)
class Manifest:
    """What a new service gets: tools/template.toml."""

    include: tuple[str, ...]
    exclude: tuple[str, ...]
    minimal_exclude: tuple[str, ...]
    minimal_make_targets: tuple[str, ...]
    squash_migrations: str

    @classmethod
    def load(cls, path: Path) -> Manifest:
        """Read a manifest file."""
        data = tomllib.loads(path.read_text())
        return cls(
            tuple(data["include"]),
            tuple(data["exclude"]),
            tuple(data["minimal_exclude"]),
            tuple(data["minimal_make_targets"]),
            data["squash_migrations"],
        )

    def selects(self, path: Path, minimal: bool) -> bool:
        """Whether a new service (a minimal one, if asked) gets this file."""
        name = path.as_posix()
        excluded = self.exclude + (self.minimal_exclude if minimal else ())
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.include) and not any(
            fnmatch.fnmatchcase(name, pattern) for pattern in excluded
        )


def squashed(root: Path, files: list[Path], pattern: str) -> dict[Path, bytes]:
    """Read files; each folder of numbered migrations becomes its own single 0001_init.sql."""
    contents: dict[Path, bytes] = {}
    folders: dict[Path, list[Path]] = {}
    for relative in files:
        if fnmatch.fnmatchcase(relative.as_posix(), pattern):
            folders.setdefault(relative.parent, []).append(relative)
        else:
            contents[relative] = (root / relative).read_bytes()
    for folder, migrations in folders.items():
        parts = [b"-- The schema a new service starts from: the template's migrations, in order.\n"]
        for migration in sorted(migrations):
            body = (root / migration).read_bytes().strip()
            parts.append(f"\n-- {migration.stem}\n".encode() + body + b"\n")
        contents[folder / "0001_init.sql"] = b"".join(parts)
    return contents


def without_rows_naming(text: str, dropped: list[Path]) -> str:
    """Drop the Markdown table rows that name a file left out (docs/reliability.md's proofs)."""
    # The tables name tests as `test_x.py::test_y`, by file name, wherever the file lives.
    names = [path.as_posix() for path in dropped]
    names += [f"{path.name}::" for path in dropped if path.name.startswith("test_")]
    return "".join(
        line
        for line in text.splitlines(keepends=True)
        if not (line.startswith("|") and any(name in line for name in names))
    )


def without_make_targets(makefile: str, targets: tuple[str, ...]) -> str:
    """Drop the paragraphs defining targets, the variables only they used, and their .PHONY."""
    paragraphs = makefile.split("\n\n")
    kept = [p for p in paragraphs if not any(p.startswith(f"{t}:") or f"\n{t}:" in p
                                             for t in targets)]  # fmt: skip
    assignment = re.compile(r"^([A-Z_]+) \??:?=", re.MULTILINE)

    def unused(paragraph: str) -> bool:
        names = assignment.findall(paragraph)
        rest = "\n\n".join(other for other in kept if other is not paragraph)
        lines = [line for line in paragraph.splitlines() if not line.startswith("#")]
        return (
            bool(names)
            and len(names) == len(lines)
            and all(f"$({name})" not in rest for name in names)
        )

    kept = [paragraph for paragraph in kept if not unused(paragraph)]
    text = "\n\n".join(kept)
    return re.sub(
        r"^(\.PHONY:.*)$",
        lambda m: " ".join(w for w in m.group(1).split(" ") if w not in targets),
        text,
        flags=re.MULTILINE,
    )


def _merge(existing: bytes, incoming: bytes) -> bytes:
    """Two files renamed onto one path (src/user/__init__.py, src/userservice/…): keep content."""
    if not existing.strip():
        return incoming
    if not incoming.strip() or incoming == existing:
        return existing
    raise SystemExit(f"two different files rename to the same path:\n{existing!r}\n{incoming!r}")


def copy_renamed(
    source: Path, dest: Path, contents: Mapping[Path, bytes], rename: Rule
) -> list[Path]:
    """Write every file under dest with renamed path and (text) content; return dest paths."""
    written: list[Path] = []
    for relative, original in sorted(contents.items()):
        target = dest / rename(relative.as_posix())
        data = original
        with contextlib.suppress(UnicodeDecodeError):  # binary: copied as it is
            data = rename(data.decode("utf-8")).encode("utf-8")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            data = _merge(target.read_bytes(), data)
        target.write_bytes(data)
        if (source / relative).exists():
            shutil.copymode(source / relative, target)
        written.append(target)
    return written


def leftovers(dest: Path, stale_stubs: bool = False) -> list[str]:
    """Return `path:line` for every remaining old name (userservice, UserService, user.v1).

    With stale_stubs, the *_pb2.py not yet regenerated (their serialized descriptors keep
    the old names) are not looked at.
    """
    skip = ["--exclude=*_pb2.py"] if stale_stubs else []
    found = subprocess.run(
        ["grep", "-rnIi", "-e", OLD_NAME, "-e", f"{OLD_PROTO_PACKAGE}.v1", "-e", OLD_SERVICE,
         "--exclude-dir=.git", "--exclude-dir=.venv", "--exclude-dir=node_modules", *skip, "."],
        cwd=dest, capture_output=True, text=True, check=False,
    )  # fmt: skip
    return found.stdout.splitlines()


def _run(command: list[str], cwd: Path) -> None:
    print("+", " ".join(command), file=sys.stderr)
    subprocess.run(command, cwd=cwd, check=True)


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else ""


def main(argv: list[str] | None = None) -> int:
    """Generate the service; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="service and package name, e.g. orders")
    parser.add_argument("--resource", required=True, help="resource message, e.g. Order")
    parser.add_argument("--plural", default="", help="plural of the resource (default: +s)")
    parser.add_argument("--dest", default="", help="new repository (default: ../NAME)")
    parser.add_argument("--minimal", action="store_true", help="leave out soak, fuzz and bench")
    parser.add_argument("--skip-generate", action="store_true", help="do not run make generate")
    parser.add_argument("--ruff", default="", help="ruff to settle the renamed code with")
    parser.add_argument("--no-git", action="store_true", help="write the files only, no commit")
    parser.add_argument("--template-source", default="", help="where updates come from")
    arguments = parser.parse_args(argv)
    if not NAME_RE.match(arguments.name):
        parser.error("--name: lowercase letters and digits, starting with a letter")
    if not RESOURCE_RE.match(arguments.resource):
        parser.error("--resource: one capitalised word, e.g. Order")
    plural = arguments.plural or arguments.resource + "s"
    source = Path(__file__).resolve().parent.parent
    dest = Path(arguments.dest or source.parent / arguments.name).resolve()
    if dest.exists() and any(dest.iterdir()):
        parser.error(f"{dest} exists and is not empty")
    manifest = Manifest.load(source / MANIFEST)
    every = source_files(source)
    chosen = [path for path in every if manifest.selects(path, arguments.minimal)]
    dropped = [path for path in every if path not in set(chosen)]
    contents = squashed(source, chosen, manifest.squash_migrations)
    for relative, data in contents.items():
        if relative.suffix == ".md":
            contents[relative] = without_rows_naming(data.decode(), dropped).encode()
    if arguments.minimal and Path("Makefile") in contents:
        makefile = contents[Path("Makefile")].decode()
        contents[Path("Makefile")] = without_make_targets(
            makefile, manifest.minimal_make_targets
        ).encode()
    rename = renamer(arguments.name, arguments.resource, plural)
    written = copy_renamed(source, dest, contents, rename)
    print(f"wrote {len(written)} files to {dest}", file=sys.stderr)
    ruff = str(Path(arguments.ruff).resolve()) if arguments.ruff else ""
    if not arguments.skip_generate:
        # The renamed *_pb2.py embed serialized descriptors: only regeneration makes them right.
        _run(["make", "--no-print-directory", "generate"], dest)
        ruff = ruff or str(dest / ".venv" / "bin" / "ruff")
    if ruff:
        # Longer names change line lengths and import order: let the project's ruff settle them.
        _run([ruff, "check", "--quiet", "--fix", "--select", "I,RUF022", "."], dest)
        _run([ruff, "format", "--quiet", "."], dest)
    remaining = leftovers(dest, stale_stubs=arguments.skip_generate)
    if remaining:
        print("old names remain:\n" + "\n".join(remaining), file=sys.stderr)
        return 1
    if _git(source, "status", "--porcelain"):
        # The copy has them, the recorded commit does not: an update would miss them.
        print("warning: the template has uncommitted changes; .template.json records HEAD",
              file=sys.stderr)  # fmt: skip
    answers = {
        "template": arguments.template_source or _git(source, "remote", "get-url", "origin")
        or str(source),
        "commit": _git(source, "rev-parse", "HEAD"),
        "name": arguments.name,
        "resource": arguments.resource,
        "plural": plural,
        "minimal": arguments.minimal,
    }  # fmt: skip
    (dest / ANSWERS).write_text(json.dumps(answers, indent=2) + "\n")
    if arguments.no_git:
        return 0
    _run(["git", "init", "--quiet", "--initial-branch=main"], dest)
    _run(["git", "add", "--all"], dest)
    _run(
        ["git", "-c", "user.name=new-service", "-c", "user.email=new-service@localhost",
         "commit", "--quiet", "-m",
         f"{arguments.name}: generated from {OLD_NAME} {answers['commit'][:12]}"],
        dest,
    )  # fmt: skip
    print(f"{dest}: ready; run `make test` there", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
