"""`make new-service`: the renaming rules, and a generated service whose own suite passes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools.new_service import leftovers, renamer, source_files

ROOT = Path(__file__).resolve().parents[2]

RENAME = renamer("orders", "Order", "Orders")


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("from user.v1 import user_pb2, user_service_pb2_grpc",
         "from orders.v1 import order_pb2, order_service_pb2_grpc"),
        ("proto/user/v1/user_service.proto", "proto/orders/v1/order_service.proto"),
        ("src/user/__init__.py", "src/orders/__init__.py"),
        ("src/userservice/storage/postgres/repository.py",
         "src/orders/storage/postgres/repository.py"),
        ("USERSERVICE_DATABASE_URL", "ORDERS_DATABASE_URL"),
        ("/user.v1.UserService/CreateUser", "/orders.v1.OrderService/CreateOrder"),
        ("ListUsersRequest BatchGetUsers", "ListOrdersRequest BatchGetOrders"),
        ("USER_ROLE_ADMIN _COUNT_USERS NOT_A_USER_ID",
         "ORDER_ROLE_ADMIN _COUNT_ORDERS NOT_A_ORDER_ID"),
        ("users.read user_id users_email_key", "orders.read order_id orders_email_key"),
        ('ERROR_DOMAIN = "userservice"', 'ERROR_DOMAIN = "orders"'),
        ('prefix: str = "userservice:ratelimit:"', 'prefix: str = "orders:ratelimit:"'),
        ("userservice_rpc_total app.kubernetes.io/name: userservice",
         "orders_rpc_total app.kubernetes.io/name: orders"),
        ("alert: UserserviceErrorRatioHigh", "alert: OrdersErrorRatioHigh"),
        # The migration advisory lock: a different 64-bit key per service.
        ("0x7573_6572_7376_6331  # usersvc1", "0x6f72_6465_7273_5f31  # orders_1"),
        # Words that only contain the resource name stay.
        ("USER 10001:10001 useradd runAsUser: 10001 userinfo postgresql://USER:PASSWORD@",
         "USER 10001:10001 useradd runAsUser: 10001 userinfo postgresql://USER:PASSWORD@"),
    ],
)  # fmt: skip
def test_rename_rules(old: str, new: str) -> None:
    assert RENAME(old) == new


def test_a_name_containing_the_old_one_is_renamed_once() -> None:
    users = renamer("users", "Account", "Accounts")
    assert users("userservice UserService user.v1 User") == "users AccountService users.v1 Account"


@pytest.mark.parametrize("walkthrough", ["adding-an-rpc", "adding-a-field"])
def test_the_walkthrough_patches_apply_to_this_tree(walkthrough: str) -> None:
    patches = sorted((ROOT / "docs" / walkthrough).glob("*.patch"))
    assert len(patches) >= 5
    checked = subprocess.run(
        ["git", "apply", "--check", *map(str, patches)],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args],
        cwd=cwd, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.strip()


def _template_repository(dest: Path) -> str:
    """Commit this tree's files (as the generator would copy them) to a new repository."""
    for relative in source_files(ROOT):
        (dest / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, dest / relative)
    _git(dest, "init", "--quiet", "--initial-branch=main")
    _git(dest, "add", "--all")
    _git(dest, "commit", "--quiet", "-m", "template")
    return _git(dest, "rev-parse", "HEAD")


def _generate(template: Path, dest: Path, *extra: str) -> None:
    argv = [sys.executable, str(template / "tools/new_service.py"), "--name", "orders"]
    argv += ["--resource", "Order", "--dest", str(dest), "--skip-generate", *extra]
    argv += ["--ruff", str(Path(sys.executable).parent / "ruff")]
    done = subprocess.run(argv, cwd=template, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-4000:]


def test_a_new_service_gets_the_manifest_with_one_migration_per_store(tmp_path: Path) -> None:
    dest = tmp_path / "orders"
    _generate(ROOT, dest, "--no-git")
    answers = json.loads((dest / ".template.json").read_text())
    assert answers["commit"] == _git(ROOT, "rev-parse", "HEAD")
    assert [answers[key] for key in ("name", "resource", "plural")] == ["orders", "Order", "Orders"]
    for store in ("sqlite", "postgres"):
        sql = sorted(path.name for path in (dest / f"src/orders/storage/{store}/sql").iterdir())
        assert sql == ["0001_init.sql"], store
        assert (
            "ALTER TABLE orders ADD COLUMN subject"
            in (dest / f"src/orders/storage/{store}/sql/0001_init.sql").read_text()
        )
    assert not list(dest.rglob("test_new_service.py"))
    assert not (dest / "tools/new_service.py").exists()
    assert (dest / "tools/update_from_template.py").is_file()
    assert list(dest.rglob("test_fuzz.py"))
    minimal = tmp_path / "minimal"
    _generate(ROOT, minimal, "--no-git", "--minimal")
    assert not list(minimal.rglob("*fuzz*"))
    assert not list(minimal.rglob("*soak*"))
    assert not (minimal / "benchmarks").exists()
    assert "test_soak.py" not in (minimal / "docs/reliability.md").read_text()
    assert json.loads((minimal / ".template.json").read_text())["minimal"] is True
    makefile = (minimal / "Makefile").read_text()
    assert "\nfuzz:" not in makefile
    assert "\nbench:" not in makefile
    assert "SOAK_MINUTES" not in makefile
    assert "\nci:" in makefile
    assert "\nbench:" in (dest / "Makefile").read_text()


def test_update_from_template_keeps_the_services_edits_and_gains_the_templates(
    tmp_path: Path,
) -> None:
    template, service = tmp_path / "template", tmp_path / "orders"
    template.mkdir()
    first = _template_repository(template)
    _generate(template, service)
    assert json.loads((service / ".template.json").read_text())["commit"] == first
    # The service's own edit, at the top of a file the template then changes at the bottom.
    ignore = (service / ".gitignore").read_text()
    (service / ".gitignore").write_text("service-notes/\n" + ignore)
    _git(service, "commit", "--quiet", "--all", "-m", "own edit")
    with (template / ".gitignore").open("a") as file:
        file.write("template-scratch/\n")
    (template / "docs" / "new-page.md").write_text("# A page the User template added\n")
    _git(template, "add", "--all")
    _git(template, "commit", "--quiet", "-m", "template change")
    second = _git(template, "rev-parse", "HEAD")
    updated = subprocess.run(
        [sys.executable, "tools/update_from_template.py"],
        cwd=service, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert updated.returncode == 0, updated.stdout + updated.stderr
    merged = (service / ".gitignore").read_text()
    assert merged.startswith("service-notes/\n")
    assert merged.endswith("template-scratch/\n")
    assert (service / "docs/new-page.md").read_text() == "# A page the Order template added\n"
    assert json.loads((service / ".template.json").read_text())["commit"] == second
    changed = _git(service, "status", "--porcelain").splitlines()
    assert sorted(line.split()[-1] for line in changed) == [
        ".gitignore",
        ".template.json",
        "docs/new-page.md",
    ]


@pytest.mark.slow
# Setup, its CI, and its suite again after the walkthroughs: each step has its own subprocess
# timeout (25 min at most; about 30 min together on a 2-core machine).
@pytest.mark.timeout(4600)
def test_generated_service_is_renamed_throughout_and_its_suite_passes(tmp_path: Path) -> None:
    dest = tmp_path / "orders"
    env = {key: value for key, value in os.environ.items() if not key.startswith("USERSERVICE_")}
    # Services the parent run must reach, the child must reach too (and fail, never skip).
    if os.environ.get("USERSERVICE_REQUIRE_SERVICES"):
        env["ORDERS_REQUIRE_SERVICES"] = os.environ["USERSERVICE_REQUIRE_SERVICES"]
    generated = subprocess.run(
        ["make", "--no-print-directory", "new-service", "NAME=orders", "RESOURCE=Order",
         f"DEST={dest}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert generated.returncode == 0, generated.stdout[-4000:] + generated.stderr[-4000:]
    assert leftovers(dest) == []
    assert (dest / "proto/orders/v1/order_service.proto").is_file()
    assert (dest / "src/orders/v1/order_service_pb2_grpc.py").is_file()
    assert (dest / "src/orders/server/__init__.py").is_file()
    assert not (dest / "src/userservice").exists()
    log = subprocess.run(
        ["git", "log", "--oneline"], cwd=dest, capture_output=True, text=True, check=True
    )
    assert len(log.stdout.splitlines()) == 1
    assert subprocess.run(["git", "status", "--porcelain"], cwd=dest, capture_output=True,
                          text=True, check=True).stdout == ""  # fmt: skip
    # Its own checks and its whole suite (it has no generator test of its own to recurse into).
    assert not list(dest.rglob("test_new_service.py"))
    child = _make(dest, {**env, "PYTEST_ADDOPTS": "-q -p no:cacheprovider"}, "ci")
    assert " passed" in child
    assert " failed" not in child
    # The walkthroughs, renamed with the rest, applied to the new service: adding an RPC
    # (docs/adding-an-rpc.md) and then a field (docs/adding-a-field.md).
    for walkthrough in ("adding-an-rpc", "adding-a-field"):
        patches = sorted(str(path) for path in (dest / "docs" / walkthrough).glob("*.patch"))
        assert patches, walkthrough
        applied = subprocess.run(["git", "apply", *patches], cwd=dest, capture_output=True,
                                 text=True, check=False)  # fmt: skip
        assert applied.returncode == 0, walkthrough + ": " + applied.stderr
    _make(dest, {**env, "PYTEST_ADDOPTS": "-q -p no:cacheprovider"}, "generate", "lint",
          "typecheck", "buf-lint")  # fmt: skip
    assert "GetOrderByEmail" in (dest / "proto/orders/v1/order_service.proto").read_text()
    assert "phone" in (dest / "proto/orders/v1/order.proto").read_text()
    # Its whole suite again, with the new RPC, the new field and their tests.
    after = _make(dest, {**env, "PYTEST_ADDOPTS": "-q -p no:cacheprovider"}, "test")
    assert " failed" not in after


def _make(cwd: Path, env: dict[str, str], *targets: str) -> str:
    """Run make targets in cwd (25 min at most); return stdout, failing with its tail."""
    done = subprocess.run(
        ["make", "--no-print-directory", *targets],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=1500, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    return done.stdout
