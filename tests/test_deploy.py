"""The deployment recipes (examples/deploy/) stay true to the command: every
`dbnode` command in them parses with the command's own parser, nodes listen
beyond loopback only with a secret, and the shell script is valid bash."""

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from dbnode.cli.main import build_parser

DEPLOY = Path(__file__).resolve().parents[1] / "examples" / "deploy"


def commands() -> list[tuple[str, list[str]]]:
    """(file, argv after "dbnode") of every dbnode command in the recipes."""
    found = []
    unit = (DEPLOY / "dbnode-node.service").read_text()
    for line in unit.splitlines():
        if line.startswith("ExecStart="):
            found.append(("service", shlex.split(line.partition("=")[2])))
    script = (DEPLOY / "slurm.sbatch").read_text().replace("\\\n", " ")
    for line in script.splitlines():
        words = line.split("#")[0].strip()
        if re.search(r"(^|\s)dbnode\s", words):
            # Shell variables stand for values: any placeholder parses.
            command = re.split(r"\s(?:&&|\|\||;|\||\d?>)", words.rstrip("&").strip())[0]
            plain = re.sub(r"\$\{[^}]*\}|\$[A-Za-z_]\w*", "1", command)
            found.append(("sbatch", shlex.split(plain)))
    for line in (DEPLOY / "kubernetes.yaml").read_text().splitlines():
        if line.strip().startswith("command:"):
            found.append(("kubernetes", json.loads(line.partition(":")[2])))
    out = []
    for where, argv in found:
        start = next(i for i, w in enumerate(argv) if w.endswith("dbnode"))
        out.append((where, argv[start + 1 :]))
    return out


def test_every_recipe_is_found():
    assert {w for w, _ in commands()} == {"service", "sbatch", "kubernetes"}
    assert sum(argv[0] == "serve" for _, argv in commands()) == 3


@pytest.mark.parametrize("where,argv", commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_dbnode_command_in_the_recipes_parses(where, argv):
    args = build_parser().parse_args(argv)  # exits (a test failure) on an unknown flag
    if args.command == "serve":
        assert not args.listen.startswith("127."), "a cluster node listens beyond loopback"
        assert args.secret_file, "and then needs the secret"
    if args.command == "train":
        assert args.hosts and args.secret_file


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_slurm_script_is_valid_bash():
    out = subprocess.run(["bash", "-n", str(DEPLOY / "slurm.sbatch")], capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
