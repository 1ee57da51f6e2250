"""run(): every way a main() can end maps onto the contract's exit codes.

Each case runs a tiny algorithm script in a fresh interpreter, because run() exits the
process and because that is how the spoke sees an algorithm.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sdk_testutil import run_python

PRELUDE = "from tributary_algorithm import *\nimport sys\n"


@pytest.mark.parametrize(
    ("body", "code", "stderr_part"),
    [
        ("def main(ctx):\n    return {'ok': True, 'case': ctx.case_id}\n", 0, ""),
        (
            "def main(ctx):\n    ctx.write_output({'ok': True})\n",
            0,
            "",
        ),
        (
            "def main(ctx):\n    raise InvalidArguments('min_diameter_mm must be > 0')\n",
            2,
            "invalid arguments: min_diameter_mm must be > 0",
        ),
        (
            "def main(ctx):\n    raise UnsuitableInput('no CT series')\n",
            3,
            "unsuitable input: no CT series",
        ),
        (
            "def main(ctx):\n    raise AlgorithmError('custom', code=42)\n",
            42,
            "error (exit 42): custom",
        ),
        (
            "def main(ctx):\n    ctx.fail('not a chest', ExitCode.UNSUITABLE_INPUT)\n",
            3,
            "unsuitable input: not a chest",
        ),
        ("def main(ctx):\n    sys.exit(5)\n", 5, ""),
        (
            "def main(ctx):\n    return [1, 2]\n",
            1,
            "main must return a dict",
        ),
        (
            "def main(ctx):\n    return None\n",
            1,
            "wrote no output",
        ),
        (
            "def main(ctx):\n    return {'nan': float('nan')}\n",
            1,
            "not JSON-serialisable",
        ),
    ],
)
def test_exit_code_mapping(make_case, tmp_path: Path, body, code, stderr_part) -> None:
    script = PRELUDE + body + "run(main)\n"
    result = run_python(script, {"ALGO_ARG": make_case()}, tmp_path)
    assert result.returncode == code, result.stderr
    assert stderr_part in result.stderr
    output = tmp_path / "output" / "output.json"
    assert output.exists() == (code == 0 and "sys.exit" not in body)


def test_unexpected_exception_gives_a_concise_traceback(make_case, tmp_path: Path) -> None:
    script = PRELUDE + (
        "def deep(n):\n"
        "    if n == 0:\n"
        "        raise ZeroDivisionError('boom')\n"
        "    return deep(n - 1)\n"
        "def main(ctx):\n"
        "    return deep(50)\n"
        "run(main)\n"
    )
    result = run_python(script, {"ALGO_ARG": make_case()}, tmp_path)
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert "error: unexpected ZeroDivisionError: boom" in result.stderr
    assert result.stderr.count('File "') <= 6  # the innermost frames only
    assert not (tmp_path / "output" / "output.json").exists()


def test_decorator_form(make_case, tmp_path: Path) -> None:
    script = PRELUDE + "@run\ndef main(ctx):\n    return {'decorated': True}\n"
    result = run_python(script, {"ALGO_ARG": make_case()}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "output" / "output.json").read_text()) == {"decorated": True}


@pytest.mark.parametrize(
    ("env", "stderr_part"),
    [
        ({}, "ALGO_ARG is not set"),
        ({"ALGO_ARG": "{broken"}, "ALGO_ARG is not valid JSON"),
        ({"ALGO_ARG": '{"participant": "/no/such/file.json"}'}, "cannot be read"),
    ],
)
def test_bad_hand_over_exits_1_with_a_message(tmp_path: Path, env, stderr_part) -> None:
    script = PRELUDE + "def main(ctx):\n    return {}\nrun(main)\n"
    result = run_python(script, env, tmp_path)
    assert result.returncode == 1
    assert stderr_part in result.stderr
    assert "Traceback" not in result.stderr


def test_arguments_not_an_object_exit_2(make_case, tmp_path: Path) -> None:
    algo_arg = json.loads(make_case())
    algo_arg["arguments"] = "min_diameter_mm=4"
    script = PRELUDE + "def main(ctx):\n    return {}\nrun(main)\n"
    result = run_python(script, {"ALGO_ARG": json.dumps(algo_arg)}, tmp_path)
    assert result.returncode == 2
    assert "arguments must be a JSON object" in result.stderr


def test_execute_returns_the_code_without_exiting(make_case) -> None:
    from tributary_algorithm import UnsuitableInput, execute, load_context

    ctx = load_context(make_case())

    def main(_ctx):
        raise UnsuitableInput("nothing to do")

    assert execute(main, ctx) == 3
    assert execute(lambda c: {"fine": 1}, ctx) == 0
