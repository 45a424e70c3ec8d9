"""python -m rnnfuse: the charlm command, its bad-input errors, config and bench --variants."""
import json
import os
import subprocess
import sys

import pytest

TEXT = "def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 60
TINY = ["--hidden", "16", "--embed", "8", "--batch", "4", "--bptt", "16", "--quiet",
        "--sample", "40"]


def cli(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "rnnfuse", *map(str, args)],
                          capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


@pytest.fixture
def tiny(tmp_path):
    p = tmp_path / "tiny.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def test_charlm_trains_and_reports(tiny, tmp_path):
    metrics = tmp_path / "m.jsonl"
    r = cli("charlm", "--text", tiny, "--epochs", "1", *TINY, "--json", "--metrics", metrics)
    assert r.returncode == 0, r.stderr
    assert "held-out bits/char" in r.stdout and "unigram baseline" in r.stdout
    assert "--- sample" in r.stdout
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["command"] == "charlm" and last["epochs"] == 1
    assert 0 < last["bpc"] < last["unigram_bpc"] + 1
    assert len(metrics.read_text().splitlines()) == 1


def test_charlm_save_and_resume(tiny, tmp_path):
    ck = tmp_path / "ck.rnnf"
    r1 = cli("charlm", "--text", tiny, "--epochs", "2", *TINY, "--json", "--save", ck)
    r2 = cli("charlm", "--text", tiny, "--epochs", "1", *TINY, "--save", ck)
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    r3 = cli("charlm", "--text", tiny, "--epochs", "2", *TINY, "--json", "--resume", ck)
    assert r3.returncode == 0, r3.stderr
    a, b = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (r1, r3))
    assert a["bpc"] == b["bpc"] and a["steps"] == b["steps"]


def one_line_error(r, *needles):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and lines[0].startswith("rnnfuse charlm: error:")
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_text(tmp_path):
    one_line_error(cli("charlm", "--text", tmp_path / "nope.txt", *TINY), "not found")


def test_empty_text(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_bytes(b"")
    one_line_error(cli("charlm", "--text", p, *TINY), "empty")


def test_non_utf8_text(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\u00e9 ".encode("latin-1") * 100)
    one_line_error(cli("charlm", "--text", p, *TINY), "UTF-8")


def test_resume_from_another_model(tiny, tmp_path):
    ck = tmp_path / "ck.rnnf"
    assert cli("charlm", "--text", tiny, "--epochs", "1", *TINY, "--save", ck).returncode == 0
    before = ck.read_bytes()
    other = [a if a != "16" else "24" for a in TINY]  # --hidden 24
    r = cli("charlm", "--text", tiny, "--epochs", "2", *other, "--save", ck, "--resume", ck)
    one_line_error(r, "does not match")
    assert ck.read_bytes() == before                  # the checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.rnnf", "tiny.txt"]


def test_resume_not_a_checkpoint(tiny, tmp_path):
    r = cli("charlm", "--text", tiny, *TINY, "--resume", tiny)
    one_line_error(r, "not an rnnfuse checkpoint")


def test_bad_flag_value(tiny):
    one_line_error(cli("charlm", "--text", tiny, *TINY, "--hidden", "0"), "--hidden")


def test_config_still_works():
    r = cli("config")
    assert r.returncode == 0 and r.stdout.strip()
    r = cli("config", "--bogus")
    assert r.returncode == 2


@pytest.mark.parametrize("command", ["charlm", "forecast", "classify", "memory", "autoencode"])
def test_bad_flag_is_one_line_error_under_python_m(command, tmp_path):
    # Under `python -m rnnfuse` the command modules see a second copy of rnnfuse.__main__:
    # its errors must still be caught as input errors, not escape as tracebacks.
    out = subprocess.run([sys.executable, "-m", "rnnfuse", command, "--hidden", "0"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == f"rnnfuse {command}: error: --hidden must be >= 1, got 0"


def test_error_lines_survive_exceptions_without_a_message():
    """An EOFError from a truncated .npz member has no message: the one-line error names
    its type instead of failing on an empty first line (found by tools/fuzz_long.sh)."""
    from rnnfuse._checks import first_line
    assert first_line(EOFError()) == "EOFError"
    assert first_line(ValueError("bad\nmore")) == "bad"


def test_bench_variants_under_python_m():
    assert "--variants" in cli("bench", "--help").stdout
    r = cli("bench", "--variants", "--quick", "--impls", "rnnfuse", "--budget", "0.01")
    assert r.returncode == 0, r.stderr
    plain = next(line.split() for line in r.stdout.splitlines() if line.startswith("plain"))
    assert float(plain[1]) > 0 and plain[2] == "1.000"  # ms, vs plain
    assert "training step (forward + backward)" in r.stdout
