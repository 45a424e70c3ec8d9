"""``python -m rnnfuse bench --markdown``: the performance document, on a tiny grid."""
import pathlib
import re
import time

import numpy as np
import pytest
import scipy
from threadpoolctl import threadpool_info

from rnnfuse import _kernels, bench
from rnnfuse._config import config

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--quick", "--cells", "rnn", "--impls", "rnnfuse,reference", "--budget", "0.01"]


def table_rows(text, header_start):
    """The rows of the markdown table whose header line starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    assert re.fullmatch(r"\|(---:?\|)+", lines[start + 1]), lines[start + 1]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


@pytest.fixture(scope="module")
def document(tmp_path_factory):
    path = tmp_path_factory.mktemp("perf") / "performance.md"
    assert bench.main(TINY + ["--markdown", str(path)]) == 0
    return path.read_text()


def test_markdown_stamps_date_cpu_versions_and_command(document):
    assert document.startswith("# rnnfuse performance\n")
    assert f"Generated {time.strftime('%Y-%m-%d', time.gmtime())}" in document
    assert "python -m rnnfuse bench " + " ".join(TINY) in document
    stamp = dict(row[:2] for row in table_rows(document, "| | |"))
    assert stamp["CPU"] and "logical CPUs" in stamp["CPU"]
    assert stamp["rnnfuse"].startswith(config()["rnnfuse"])
    assert _kernels.compile_args() in stamp["rnnfuse"]
    assert stamp["NumPy, SciPy, threadpoolctl"].startswith(
        f"{np.__version__}, {scipy.__version__}, ")
    blas = [p for p in threadpool_info() if p["user_api"] == "blas"]
    assert blas and all(f"{p['version']}, kernel {p['architecture']}" in
                        stamp["BLAS (threadpoolctl)"] for p in blas)
    assert stamp["vectorized path"].startswith(_kernels.simd_path())
    assert "A reduced grid" in document  # --quick is not the full grid, and says so


def test_markdown_has_the_benchmark_threads_and_memory_tables(document):
    shapes = [s.label for s in bench.QUICK_GRID]
    want = [["rnn", mode, "float32", s] for s in shapes for mode in bench.MODES]
    grid = table_rows(document, "| cell | mode | dtype | shape | rnnfuse ms | ref ms |")
    assert [r[:4] for r in grid] == want
    for r in grid:
        rnnfuse_ms, ref_ms, ref_x = float(r[4]), float(r[5]), float(r[8])
        assert rnnfuse_ms > 0 and ref_x == pytest.approx(ref_ms / rnnfuse_ms, rel=0.2, abs=0.02)
    threads = table_rows(document, "| cell | mode | dtype | shape | 1 thread(s) ms | 2 threads")
    assert [r[:4] for r in threads] == want and all(float(r[6]) > 0 for r in threads)
    memory = table_rows(document, "| cell | mode | dtype | shape | rnnfuse MiB | reference MiB")
    assert [r[:4] for r in memory] == want and all(float(r[4]) > 0 for r in memory)
    assert "## How it is fast" in document and "$" not in document


def test_markdown_dash_writes_the_document_to_stdout(capsys):
    argv = TINY + ["--modes", "inference", "--shapes", "0", "--vs-threads", "0"]
    assert bench.main(argv + ["--markdown", "-"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("# rnnfuse performance\n") and "No threads table" in out
    assert "rnnfuse bench: 1 thread(s)" in err  # the progress table goes to stderr


def test_markdown_to_a_missing_directory_is_refused_before_running(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(TINY + ["--markdown", str(tmp_path / "no" / "perf.md")])
    assert e.value.code == 2 and "no such directory" in capsys.readouterr().err


def test_committed_performance_doc_is_generated():
    doc = ROOT / "docs" / "performance.md"
    if not doc.exists():
        pytest.skip("docs/performance.md is not beside the tests (installed copy)")
    text = doc.read_text()
    assert text.startswith("# rnnfuse performance\n")
    assert re.search(r"^Generated \d{4}-\d\d-\d\d \d\d:\d\d UTC by$", text, re.M)
    assert re.search(r"^    python -m rnnfuse bench .*--markdown", text, re.M)
