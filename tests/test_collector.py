"""The garbage collector's scopes during writes and loads, in a fresh interpreter (the gc state is process-wide)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCENARIO = textwrap.dedent("""
    import gc, threading
    from indexer import collector

    assert gc.get_freeze_count() == 0 and gc.isenabled()
    with collector.frozen():  # a write
        frozen = gc.get_freeze_count()
        assert frozen > 0
        with collector.paused():  # its model load
            assert not gc.isenabled()
            loaded = [[i] for i in range(10_000)]
        assert gc.isenabled() and gc.get_freeze_count() >= frozen + len(loaded) // 2
        with collector.frozen():  # the write's own ingest
            pass
        assert gc.get_freeze_count() >= frozen + len(loaded) // 2
    assert gc.get_freeze_count() == 0
    with collector.paused():  # a load outside any write (a search process): what it makes is collected as ever
        loaded = [[i] for i in range(10_000)]
    assert gc.isenabled() and gc.get_freeze_count() == 0

    # Loads in two threads that overlap: collection is back on once both are done, not before.
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    def first():
        with collector.paused():
            first_in.set(); second_in.wait()
        first_out.set()
    thread = threading.Thread(target=first); thread.start()
    first_in.wait()
    with collector.paused():
        second_in.set(); first_out.wait()
        assert not gc.isenabled()
    thread.join()
    assert gc.isenabled()

    # A load where the caller had turned collection off leaves it off.
    gc.disable()
    with collector.paused():
        pass
    assert not gc.isenabled()
    print("ok")
""")


def test_writes_and_loads_leave_what_they_hold_out_of_collection_and_restore_it_after():
    result = subprocess.run([sys.executable, "-c", SCENARIO], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
