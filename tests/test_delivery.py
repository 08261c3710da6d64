"""The forms `broker sandbox-endpoint` prints its variables in: KEY=value lines that a real
shell evals back to exactly the values (whatever they hold), and one JSON object on one line."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from broker.delivery import json_line, shell_assignments

BASH = shutil.which("bash") or "/bin/bash"
AWKWARD = {
    "PLAIN": "http://127.0.0.1:8080/credentials",
    "SPACES": "a b  c",
    "QUOTES": 'it\'s "quoted"',
    "SHELL": "$(touch pwned) `id` $HOME; rm -rf / & | > <",
    "EMPTY": "",
    "NEWLINE": "line one\nline two",
    "UNICODE": "région-é",
}


@pytest.mark.parametrize("name", sorted(AWKWARD))
def test_a_shell_evals_each_value_back_exactly(name: str) -> None:
    printed = shell_assignments({name: AWKWARD[name]})
    done = subprocess.run(
        [BASH, "-c", 'set -a; eval "$0"; set +a; printf %s "${!1}"', printed, name],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
        env={"PATH": "", "LANG": "C.UTF-8"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == AWKWARD[name]
    assert done.stderr == ""


def test_plain_values_are_printed_bare() -> None:
    assert shell_assignments({"A": "http://127.0.0.1:1/x", "B": "tok-_en"}) == (
        "A=http://127.0.0.1:1/x\nB=tok-_en\n"
    )


def test_json_is_one_object_on_one_line() -> None:
    line = json_line(AWKWARD)
    assert line.endswith("\n")
    assert line.count("\n") == 1
    assert json.loads(line) == AWKWARD
