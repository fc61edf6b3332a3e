"""results.tsv appends and the state file."""

import multiprocessing as mp
import os

from memact.research.results import (
    RESULTS_HEADER,
    ResultRow,
    append_result,
    append_row,
    read_json,
    read_results,
    read_rows,
    repair_tsv,
    write_json,
)


def _writer(path: str, worker: int, n: int) -> None:
    for i in range(n):
        # Long rows (~2 KB) make interleaving likely if appends were not atomic.
        append_row(path, RESULTS_HEADER, (f"w{worker}", f"{i}", "0.1", "keep", f"{worker}-{i}-" + "x" * 2000))


def test_concurrent_appends_give_whole_lines(tmp_path):
    path = str(tmp_path / "results.tsv")
    workers, per_worker = 4, 50
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, w, per_worker)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    with open(path) as f:
        lines = f.read().split("\n")
    assert lines[-1] == ""  # ends with a newline
    assert lines[0] == "\t".join(RESULTS_HEADER)  # exactly one header, first
    body = lines[1:-1]
    assert len(body) == workers * per_worker
    for line in body:
        fields = line.split("\t")
        assert len(fields) == 5 and fields[4].endswith("x" * 2000), line[:80]
    seen = {tuple(line.split("\t")[:2]) for line in body}
    assert len(seen) == workers * per_worker


def test_fields_with_tabs_and_newlines_stay_on_one_row(tmp_path):
    path = str(tmp_path / "results.tsv")
    append_result(path, ResultRow("abc1234", 2.5, 0.25, "crash", "bad\tpatch\nsecond line"))
    (row,) = read_results(path)
    assert row.description == "bad patch second line"
    assert row.val_bpb == 2.5 and row.memory_gb == 0.25


def test_partial_last_line_is_ignored_and_repaired(tmp_path):
    path = str(tmp_path / "results.tsv")
    append_result(path, ResultRow("abc1234", 2.5, None, "keep", "baseline run 1/2"))
    with open(path, "a") as f:
        f.write("def5678\t2.4")  # what a torn write would leave
    assert len(read_rows(path)) == 1
    assert repair_tsv(path)
    with open(path) as f:
        assert f.read().endswith("baseline run 1/2\n")
    assert not repair_tsv(path)


def test_state_write_is_atomic_rename(tmp_path):
    path = str(tmp_path / "state.json")
    write_json(path, {"a": 1})
    write_json(path, {"a": 2})
    assert read_json(path) == {"a": 2}
    assert os.listdir(tmp_path) == ["state.json"]  # no temporary file left behind
