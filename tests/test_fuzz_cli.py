"""Fuzzing the commands (``python -m rnnfuse ...``): random and bad flag values, bad and
damaged files, tiny datasets. Every run either succeeds (status 0, its result line printed)
or fails with status 2 and exactly one line ``rnnfuse <command>: error: ...`` on stderr:
never a traceback, a hang or a file left half-written.

main() runs in-process (fast) with tiny sizes; a few cases go through a real
``python -m rnnfuse``. The default run uses a few examples per test; the long run
(tools/fuzz_long.sh) sets RNNFUSE_FUZZ_EXAMPLES.
"""
import contextlib
import importlib.util
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rnnfuse
from rnnfuse import load_checkpoint
from rnnfuse.__main__ import main
from rnnfuse.train import TrainingError, fit

FUZZ_EXAMPLES = int(os.environ.get("RNNFUSE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None,
                derandomize="RNNFUSE_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
RUN_LIMIT_S = 60  # a tiny run takes well under a second: longer is a hang
# extreme data (1e300, NaN) warns in NumPy; the status and the message are what is tested
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

TEXT = "def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 60

RESULT_LINE = {"charlm": "held-out bits/char:", "forecast": "held-out RMSE:",
               "classify": "test accuracy:", "memory": "held-out MSE at length",
               "autoencode": "held-out greedy reconstruction:"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Input files shared by every example (read, never written)."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "text.txt").write_text(TEXT, encoding="utf-8")
    rng = np.random.default_rng(0)
    np.savez(d / "seqs.npz", x=rng.standard_normal((20, 3, 2)), y=np.arange(20) % 2)
    return d


def base_argv(cmd, files):
    """A valid, tiny run of each command (one optimizer step)."""
    tiny = ["--hidden", "4", "--steps", "1", "--quiet"]
    return {
        "charlm": ["charlm", "--text", str(files / "text.txt"), "--embed", "4", "--batch", "2",
                   "--bptt", "4", "--sample", "3"],
        "forecast": ["forecast", "--length", "40", "--window", "4", "--batch", "8"],
        "classify": ["classify", "--npz", str(files / "seqs.npz"), "--batch", "4"],
        "memory": ["memory", "--cell", "gru", "--length", "4", "--batch", "4", "--train-size",
                   "8", "--heldout-size", "4"],
        "autoencode": ["autoencode", "--length", "3", "--vocab", "3", "--batch", "4",
                       "--train-size", "8", "--heldout-size", "4"],
    }[cmd] + tiny


class Hang(BaseException):  # not an OSError, as TimeoutError is: main() must not catch it
    pass


@contextlib.contextmanager
def time_limit(seconds):
    def hang(signum, frame):
        raise Hang(f"the command ran past {seconds} s")
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run(argv):
    """(status, stdout, stderr) of main(argv) in-process; any exception is a test failure."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), time_limit(RUN_LIMIT_S):
        try:
            status = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's errors
            status = e.code
    return status, out.getvalue(), err.getvalue()


def assert_one_line_error(cmd, status, err, *needles):
    assert status == 2, f"status {status}, stderr {err!r}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"rnnfuse {cmd}: error: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


def assert_success(cmd, status, out, err):
    assert status == 0, f"status {status}, stderr {err!r}"
    assert RESULT_LINE[cmd] in out, out
    assert "Traceback" not in err


def listing(d):
    return sorted(os.listdir(d))


# ---------------------------------------------------------------- flag values

INT_VALUES = ["-1", "0", "1", "2", "3", "-0", " 2", "abc", "", "1.5", "1e3", "nan", "0x10",
              str(2**31), "1" + "0" * 30]
FLOAT_VALUES = ["-1", "0", "0.5", "1e-3", "3", "nan", "inf", "-inf", "1e400", "abc", "", "1,5"]
CELL_VALUES = ["lstm", "gru", "rnn", "LSTM", "tanh", ""]
MAX_INT = 2**31 - 1


def int_flag(minimum=1, context=False, cap=True):
    def judge(raw):
        try:
            v = int(raw)  # what argparse's type=int accepts
        except ValueError:
            return "error"
        if v < minimum or (cap and v > MAX_INT):
            return "error"
        return "maybe" if context else "ok"
    return INT_VALUES, judge


def float_flag(ok, context=False):
    def judge(raw):
        try:
            v = float(raw)
        except ValueError:
            return "error"
        return ("maybe" if context else "ok") if ok(v) else "error"
    return FLOAT_VALUES, judge


def cell_flag():
    return CELL_VALUES, lambda raw: "ok" if raw in ("lstm", "gru", "rnn") else "error"


SHARED = {
    "hidden": int_flag(), "layers": int_flag(), "epochs": int_flag(), "threads": int_flag(),
    "steps": int_flag(), "patience": int_flag(), "eval-every": int_flag(),
    "seed": (INT_VALUES + ["4294967296"], int_flag(0, cap=False)[1]),
    "lr": float_flag(lambda v: 0 <= v < math.inf),
    "clip": float_flag(lambda v: 0 <= v < math.inf),
    "max-minutes": float_flag(lambda v: not math.isnan(v)),  # <= 0: no limit
    "cell": cell_flag(),
}
FLAGS = {
    "charlm": dict(SHARED, bptt=int_flag(), batch=int_flag(), embed=int_flag(),
                   **{"max-chars": int_flag(), "sample": int_flag(0),
                      "heldout": float_flag(lambda v: 0 < v < 0.5),
                      "temperature": float_flag(lambda v: v >= 0),
                      "prime": (["", "x", "\u2603\x00", "\n" * 3, "ab" * 300], lambda raw: "ok")}),
    "forecast": dict(SHARED, batch=int_flag(), length=int_flag(context=True),
                     window=int_flag(context=True),
                     heldout=float_flag(lambda v: 0 < v < 1, context=True),
                     column=(["v", "", "x"], lambda raw: "error")),  # --column needs --csv
    "classify": dict(SHARED, batch=int_flag(), test=float_flag(lambda v: 0 < v < 1, context=True)),
    "memory": dict(SHARED, batch=int_flag(), length=int_flag(2),
                   **{"train-size": int_flag(context=True), "heldout-size": int_flag()}),
    "autoencode": dict(SHARED, batch=int_flag(), length=int_flag(), vocab=int_flag(2),
                       **{"train-size": int_flag(context=True), "heldout-size": int_flag()}),
}


@FUZZ
@given(cmd=st.sampled_from(sorted(FLAGS)), data_=st.data())
def test_fuzz_flag_values(files, tmp_path_factory, cmd, data_):
    """One or two flags set to random values (negative, zero, huge, NaN, inf, non-numeric,
    unknown cells): the run succeeds exactly when every value is valid."""
    names = data_.draw(st.lists(st.sampled_from(sorted(FLAGS[cmd])), min_size=1, max_size=2,
                                unique=True))
    argv, verdicts = base_argv(cmd, files), []
    for name in names:
        values, judge = FLAGS[cmd][name]
        raw = data_.draw(st.sampled_from(values))
        argv.append(f"--{name}={raw}")  # '=': a value like -1 is not taken for a flag
        verdicts.append(judge(raw))
    switches = ["--json"] + (["--bidirectional"] if cmd == "classify" else [])
    argv += data_.draw(st.lists(st.sampled_from(switches), unique=True))
    out_dir = tmp_path_factory.mktemp("out")
    status, out, err = run(argv + ["--metrics", out_dir / "m.jsonl"])
    if "error" in verdicts:
        assert_one_line_error(cmd, status, err)
        assert listing(out_dir) == [], "an error must leave no file"
    elif "maybe" not in verdicts:
        assert_success(cmd, status, out, err)
    elif status != 0:  # depends on the other flags (e.g. --length 3 is too short to split)
        assert_one_line_error(cmd, status, err)
    if status == 0:
        lines = (out_dir / "m.jsonl").read_text().splitlines()
        assert lines and all(json.loads(line)["step"] >= 1 for line in lines)
        if "--json" in argv:
            assert json.loads(out.strip().splitlines()[-1])["command"] == cmd
    shutil.rmtree(out_dir)


def test_unknown_and_malformed_arguments(files):
    for cmd in sorted(FLAGS):
        argv = base_argv(cmd, files)
        assert_one_line_error(cmd, *run(argv + ["--bogus"])[::2], "unrecognized arguments")
        assert_one_line_error(cmd, *run(argv + ["--hidden"])[::2], "expected one argument")
        assert_one_line_error(cmd, *run(argv + ["--hidden", "x"])[::2], "invalid int value")
    status, _, err = run(["config", "--bogus"])
    assert_one_line_error("config", status, err, "unrecognized arguments")
    status, _, err = run(["nonsense"])
    assert status == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_charlm_default_corpus_too_small():
    status, out, err = run(["charlm", "--max-chars", "1", "--hidden", "4", "--quiet"])
    assert_one_line_error("charlm", status, err, "too short")


@pytest.mark.parametrize("argv", [["bench", "--bogus"], ["bench", "--threads", "0"],
                                  ["bench", "--cells", "lstm,foo"], ["bench", "--shapes", "999"],
                                  ["bench", "--budget", "abc"]])
def test_bench_refuses_bad_flags_before_running(argv):
    # bench.py has its own parser (usage block first): status 2 and an error line, no traceback
    status, out, err = run(argv)
    assert status == 2 and "Traceback" not in err
    assert "error:" in err.strip().splitlines()[-1]


# ---------------------------------------------------------------- files

@pytest.fixture(scope="module")
def checkpoints(files, tmp_path_factory):
    """A checkpoint of each command, and of other cells and sizes, for --resume."""
    d = tmp_path_factory.mktemp("checkpoints")
    made = {}
    for cmd in sorted(FLAGS):
        for extra in ([], ["--cell", "rnn"], ["--hidden", "5"]):
            name = f"{cmd}{''.join(extra).replace('--', '-')}.rnnf"
            status, out, err = run(base_argv(cmd, files) + extra + ["--save", d / name])
            assert status == 0, err
            made[(cmd, tuple(extra))] = d / name
    return made


def damaged(blob, rng):
    """The file's bytes with a random kind of damage."""
    how = rng.integers(4)
    if how == 0:  # flipped bytes
        b = bytearray(blob)
        for i in rng.integers(0, len(b), rng.integers(1, 4)):
            b[i] ^= int(rng.integers(1, 256))
        return bytes(b)
    if how == 1:
        return blob[:rng.integers(0, len(blob))]
    if how == 2:
        return blob + bytes(rng.integers(0, 256, rng.integers(1, 9), dtype=np.uint8))
    return bytes(rng.integers(0, 256, rng.integers(0, 100), dtype=np.uint8))


@FUZZ
@given(cmd=st.sampled_from(sorted(FLAGS)), source=st.sampled_from(sorted(FLAGS)),
       variant=st.sampled_from([(), ("--cell", "rnn"), ("--hidden", "5")]),
       damage=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_fuzz_resume_from_foreign_or_damaged_checkpoints(files, checkpoints, tmp_path_factory,
                                                         cmd, source, variant, damage, seed):
    """--resume with a checkpoint of another command, cell or size, or a damaged one: a
    one-line error, and the file given to --save is left as it was."""
    d = tmp_path_factory.mktemp("resume")
    ck = d / "ck.rnnf"
    blob = checkpoints[(source, variant)].read_bytes()
    if damage:
        blob = damaged(blob, np.random.default_rng(seed))
    ck.write_bytes(blob)
    status, out, err = run(base_argv(cmd, files) + list(variant)
                           + ["--steps", "2", "--resume", ck, "--save", ck])
    if source == cmd and not damage:  # its own checkpoint: the run goes on
        assert_success(cmd, status, out, err)
        assert load_checkpoint(ck)["step"] == 2
    else:
        assert_one_line_error(cmd, status, err)
        assert ck.read_bytes() == blob and listing(d) == ["ck.rnnf"]
    shutil.rmtree(d)


HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
PATH_FLAGS = {"charlm": ["text"], "forecast": ["csv"], "classify": ["npz"], "memory": [],
              "autoencode": []}


@FUZZ
@given(cmd=st.sampled_from(sorted(FLAGS)), data_=st.data())
def test_fuzz_bad_paths(files, tmp_path_factory, cmd, data_):
    """Missing files, directories, paths through a file, empty and binary files, a
    non-existent directory for outputs: one-line errors and no file written."""
    d = tmp_path_factory.mktemp("paths")
    (d / "empty").write_bytes(b"")
    (d / "garbage").write_bytes(bytes(range(256)) * 3)
    (d / "sub").mkdir()
    # without matplotlib --plot is skipped with a note, whatever its path
    outputs = ["save", "metrics"] + (["plot"] if HAVE_MATPLOTLIB else [])
    flag = data_.draw(st.sampled_from(PATH_FLAGS[cmd] + ["resume"] + outputs))
    bad = {"missing": d / "nope", "directory": d / "sub", "through a file": d / "empty" / "x",
           "in a missing directory": d / "nodir" / "x", "empty": d / "empty",
           "binary": d / "garbage", "too long": d / ("x" * 300)}
    if flag in ("save", "metrics", "plot"):  # outputs: only a bad place is an error
        bad = {k: v for k, v in bad.items() if k in ("directory", "through a file",
                                                     "in a missing directory", "too long")}
    what = data_.draw(st.sampled_from(sorted(bad)))
    before = {p: p.read_bytes() for p in d.iterdir() if p.is_file()}
    status, out, err = run(base_argv(cmd, files) + [f"--{flag}", bad[what]])
    assert_one_line_error(cmd, status, err)
    assert {p: p.read_bytes() for p in d.iterdir() if p.is_file()} == before
    assert listing(d / "sub") == []
    shutil.rmtree(d)


def test_outputs_are_complete_files(files, tmp_path):
    """A run with every output: the checkpoint loads, each metrics line is JSON, and no
    temporary file is left (matplotlib may be absent: then a note and no plot)."""
    for cmd in sorted(FLAGS):
        out_dir = tmp_path / cmd
        out_dir.mkdir()
        status, out, err = run(base_argv(cmd, files)
                               + ["--save", out_dir / "ck", "--metrics", out_dir / "m.jsonl",
                                  "--plot", out_dir / "p.png", "--eval-every", "1"])
        assert_success(cmd, status, out, err)
        names = listing(out_dir)
        assert names in (["ck", "m.jsonl", "p.png"], ["ck", "m.jsonl"]), names
        assert load_checkpoint(out_dir / "ck")["step"] == 1
        for line in (out_dir / "m.jsonl").read_text().splitlines():
            json.loads(line)


# ---------------------------------------------------------------- tiny and odd datasets

@FUZZ
@given(data_=st.data(), cmd=st.sampled_from(["charlm", "forecast", "classify"]))
def test_fuzz_tiny_and_odd_datasets(files, tmp_path_factory, data_, cmd):
    """Random tiny inputs: a few characters of text (or bytes that are not UTF-8), CSVs of
    a few rows with odd cells, .npz files of any shape and dtype. Trained on, or refused
    in one line."""
    d = tmp_path_factory.mktemp("data")
    path = d / "input"
    if cmd == "charlm":
        if data_.draw(st.booleans()):
            path.write_text(data_.draw(st.text(max_size=40)), encoding="utf-8")
        else:
            path.write_bytes(data_.draw(st.binary(max_size=40)))
        argv = base_argv(cmd, files)[:1] + ["--text", path] + base_argv(cmd, files)[3:]
        argv += ["--heldout", data_.draw(st.sampled_from(["0.05", "0.3", "0.49"]))]
    elif cmd == "forecast":
        cells = st.sampled_from(["1", "-2.5", "1e300", "nan", "inf", "", "x", " 3 ", "0"])
        cols = data_.draw(st.integers(1, 3))
        rows = data_.draw(st.lists(st.lists(cells, min_size=cols, max_size=cols), max_size=40))
        header = data_.draw(st.sampled_from(["v", "a,b", "a,b,c", "", "v,v"]))
        path.write_text("\n".join([header] + [",".join(r) for r in rows]))
        argv = base_argv(cmd, files) + ["--csv", path]
        if data_.draw(st.booleans()):
            argv += ["--column", data_.draw(st.sampled_from(["v", "a", "b", "zz"]))]
    else:
        n, T, F = (data_.draw(st.integers(0, 6)) for _ in range(3))
        dtype = data_.draw(st.sampled_from(["float32", "float64", "int8", "bool", "complex64",
                                            "uint16"]))
        x = np.random.default_rng(n).standard_normal((n, T, F)) * 3
        x = x.astype(dtype)
        y = np.random.default_rng(T).integers(-1 if data_.draw(st.booleans()) else 0, 3, n)
        y = y.astype(data_.draw(st.sampled_from(["int64", "uint8", "float64", "bool"])))
        arrays = {"x": x, "y": y}
        if data_.draw(st.booleans()):
            arrays.pop(data_.draw(st.sampled_from(["x", "y"])))
        if data_.draw(st.integers(0, 5)) == 0 and x.size:
            x.flat[0] = np.nan if x.dtype.kind == "f" else x.flat[0]
        with open(path, "wb") as f:
            np.savez(f, **arrays)
        if data_.draw(st.integers(0, 3)) == 0:  # a damaged archive
            blob = path.read_bytes()
            path.write_bytes(damaged(blob, np.random.default_rng(len(blob))))
        argv = base_argv(cmd, files)[:1] + ["--npz", path] + base_argv(cmd, files)[3:]
    status, out, err = run(argv)
    if status == 0:
        assert_success(cmd, status, out, err)
    else:
        assert_one_line_error(cmd, status, err)
    assert listing(d) == ["input"]
    shutil.rmtree(d)


# ---------------------------------------------------------------- regressions

@pytest.mark.parametrize("flag, value, needle", [
    ("--lr", "-1", "--lr"), ("--lr", "nan", "--lr"), ("--clip", "-1", "--clip"),
    ("--seed", "-1", "--seed"), ("--temperature", "nan", "--temperature"),
    ("--max-minutes", "nan", "--max-minutes"), ("--hidden", str(10**12), "--hidden"),
    ("--sample", "-1", "--sample"),
])
def test_bad_numbers_that_used_to_escape_as_tracebacks(files, flag, value, needle):
    # regression: these reached Adam, clip_grad_norm, default_rng or rng.choice and
    # ended in a ValueError traceback
    assert_one_line_error("charlm", *run(base_argv("charlm", files) + [f"{flag}={value}"])[::2],
                          needle)


def test_tiny_temperature_samples_greedily(files):
    # regression: logits / 1e-320 overflowed to inf, and rng.choice got NaN probabilities
    status, out, err = run(base_argv("charlm", files) + ["--temperature", "1e-320"])
    assert_success("charlm", status, out, err)


def test_npz_that_is_not_an_archive_or_is_empty(files, tmp_path):
    # regression: BadZipFile, EOFError (an empty file), a .npy file and zero-size
    # dimensions ended in tracebacks
    (tmp_path / "zip.npz").write_bytes(b"PK\x03\x04" + b"\0" * 40)
    (tmp_path / "empty.npz").write_bytes(b"")
    np.save(tmp_path / "one.npy", np.zeros(3))
    for name, x, y in [("n0", np.zeros((0, 3, 2)), np.zeros(0, int)),
                       ("t0", np.zeros((4, 0, 2)), np.arange(4) % 2),
                       ("f0", np.zeros((4, 3, 0)), np.arange(4) % 2)]:
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
    for name in ("zip.npz", "empty.npz", "one.npy", "n0.npz", "t0.npz", "f0.npz"):
        argv = ["classify", "--npz", tmp_path / name, "--hidden", "4", "--steps", "1", "--quiet"]
        assert_one_line_error("classify", *run(argv)[::2], name)


def test_forecast_with_an_exact_linear_baseline(tmp_path):
    # regression: the report divided by the linear baseline's RMSE, here 0
    (tmp_path / "s.csv").write_text("v\n1\n1\n1\n1\n1e300\n1\n0\n")
    status, out, err = run(["forecast", "--csv", tmp_path / "s.csv", "--window", "4",
                            "--hidden", "4", "--steps", "1", "--quiet"])
    assert_success("forecast", status, out, err)
    assert "the linear baseline is exact" in out


def test_output_path_that_is_a_directory_is_refused_before_training(files, tmp_path):
    # regression: --save/--metrics/--plot on a directory failed only after training (and
    # --plot left '<dir>.tmp.png' behind); memory's per-cell suffix hid the directory
    for flag in ("--save", "--metrics", "--plot"):
        status, out, err = run(base_argv("charlm", files) + [flag, tmp_path])
        assert_one_line_error("charlm", status, err, "is a directory")
        assert "held-out" not in out
    memory = base_argv("memory", files)
    memory[memory.index("--cell"):memory.index("--cell") + 2] = []  # all three cells
    assert_one_line_error("memory", *run(memory + ["--save", tmp_path])[::2], "is a directory")
    assert listing(tmp_path) == []
    assert [n for n in listing(tmp_path.parent) if n.startswith(tmp_path.name)] == [tmp_path.name]


def test_diverged_model_is_an_error_not_a_nan_result():
    # a diverged model's held-out loss is NaN: an error, as a NaN training loss is (it was
    # reported as the result, and charlm's sampler then failed on NaN probabilities)
    class Task:
        model = rnnfuse.Linear(2, 1, seed=0)
        data = [None]  # one batch per epoch

        def train_step(self, batch):
            return 1.0, 1

        def evaluate(self):
            return {"loss": float("nan")}

    with pytest.raises(TrainingError, match="held-out loss became nan at step 1"):
        fit(Task(), rnnfuse.SGD(Task.model.named_parameters()), progress=False)


# ---------------------------------------------------------------- a real process

@pytest.mark.parametrize("args, needle", [
    (["charlm", "--hidden", "abc"], "invalid int value"),
    (["forecast", "--lr=-1"], "--lr"),
    (["memory", "--resume", "/nonexistent/ck.rnnf"], "No such file"),  # (classify needs sklearn)
])
def test_python_m_rnnfuse_errors_are_one_line(args, needle, tmp_path):
    r = subprocess.run([sys.executable, "-m", "rnnfuse", *args, "--quiet"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert_one_line_error(args[0], r.returncode, r.stderr, needle)
    assert listing(tmp_path) == []
