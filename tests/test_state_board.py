"""scheduler/state_board.py: capacity carried on responses, laid over older polled reports only."""

from zipserve.scheduler import state_board


def setup_function():
    state_board.clear()


def test_newer_capacity_overlays_the_report_and_older_is_ignored():
    report = {"free_pages": 90, "running": 1, "waiting": 0, "timestamp": 10.0, "cached": ["ab"], "total_pages": 100}
    assert state_board.overlay("w1", report) is report  # nothing posted
    assert state_board.post("w1", {"free_pages": 40, "running": 6, "waiting": 2, "timestamp": 11.0})
    assert state_board.overlay("w1", report) == dict(report, free_pages=40, running=6, waiting=2, timestamp=11.0)
    assert not state_board.post("w1", {"free_pages": 99, "running": 0, "waiting": 0, "timestamp": 10.5})  # stale
    assert state_board.overlay("w1", report)["free_pages"] == 40
    newer_report = dict(report, timestamp=12.0)
    assert state_board.overlay("w1", newer_report) is newer_report  # the poll is fresher now
    assert state_board.overlay("w2", report) is report and state_board.overlay("w1", None) is None
    state_board.forget("w1")
    assert state_board.overlay("w1", report) is report


def test_capacity_of_drops_the_page_hashes():
    st = {"free_pages": 1, "running": 2, "waiting": 3, "timestamp": 4.0, "cached": ["x"] * 1000, "block_size": 16}
    assert state_board.capacity_of(st) == {"free_pages": 1, "running": 2, "waiting": 3, "timestamp": 4.0}
