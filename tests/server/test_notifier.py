"""The in-process notifier that wakes chat streams and parked long polls."""
from __future__ import annotations

import threading

from devtools.processes import wait_until
from server.notifier import ANY_MODEL_KEY, Notifier, queue_key
from server.storage import jobs
from server.storage.sqlite import SQLiteStorage

PARK = 10.0   # long enough never to be reached: every test wakes its waiters


class Parked:
    """A thread blocked in ``notifier.wait_any``; ``result`` is set when it returns."""

    def __init__(self, notifier: Notifier, after: dict[str, int], timeout: float = PARK) -> None:
        self.result: dict[str, int] | None = None
        self._thread = threading.Thread(target=self._run, args=(notifier, after, timeout), daemon=True)
        self._thread.start()

    def _run(self, notifier, after, timeout):
        self.result = notifier.wait_any(after, timeout)

    @property
    def returned(self) -> bool:
        return not self._thread.is_alive()

    def join(self) -> dict[str, int]:
        self._thread.join(PARK)
        assert not self._thread.is_alive()
        return self.result


def park(notifier: Notifier, key: str, **kw) -> Parked:
    before = notifier.waiting(key)
    parked = Parked(notifier, {key: notifier.version(key)}, **kw)
    wait_until(lambda: notifier.waiting(key) > before, message=f"a waiter on {key}")
    return parked


def test_notify_bumps_the_version_of_its_key_only():
    notifier = Notifier()
    assert notifier.notify("req:a") == 1
    assert notifier.notify("req:a") == 2
    assert (notifier.version("req:a"), notifier.version("req:b")) == (2, 0)


def test_wait_returns_at_once_when_a_notify_came_after_the_version_was_read():
    notifier = Notifier()
    seen = notifier.version("req:a")
    notifier.notify("req:a")
    assert notifier.wait_for("req:a", seen, timeout=PARK) == 1


def test_wait_times_out_with_the_version_unchanged():
    notifier = Notifier()
    assert notifier.wait_for("req:a", 0, timeout=0.01) == 0
    assert notifier.waiting("req:a") == 0


def test_notify_wakes_a_parked_waiter():
    notifier = Notifier()
    parked = park(notifier, "req:a")
    notifier.notify("req:a")
    assert parked.join() == {"req:a": 1}
    assert notifier.waiting("req:a") == 0


def test_wake_one_wakes_the_longest_waiter_and_leaves_the_others_parked():
    notifier = Notifier()
    first, second = park(notifier, "jobs:m"), park(notifier, "jobs:m")
    notifier.notify("jobs:m", wake=1)
    first.join()
    assert not second.returned and notifier.waiting("jobs:m") == 1
    notifier.notify("jobs:m", wake=1)
    assert second.join() == {"jobs:m": 2}


def test_wait_any_wakes_on_any_of_its_keys():
    notifier = Notifier()
    parked = Parked(notifier, {"jobs:a": 0, "jobs:b": 0})
    wait_until(lambda: notifier.waiting("jobs:b") == 1)
    notifier.notify("jobs:b", wake=1)
    assert parked.join() == {"jobs:a": 0, "jobs:b": 1}
    assert notifier.waiting("jobs:a") == 0


def test_close_wakes_every_waiter_and_later_waits_return_at_once():
    notifier = Notifier()
    parked = [park(notifier, "req:a"), park(notifier, "jobs:m")]
    notifier.close()
    for p in parked:
        p.join()
    assert notifier.wait_for("req:b", 0, timeout=PARK) == 0


def test_prune_drops_idle_keys_but_not_keys_someone_waits_on():
    notifier = Notifier()
    notifier.notify("req:idle")
    notifier.notify("req:busy")
    parked = park(notifier, "req:busy")
    assert notifier.prune(idle_seconds=0) == 1
    assert notifier.version("req:busy") == 1 and notifier.version("req:idle") == 0
    notifier.notify("req:busy")
    parked.join()


def test_a_pruned_key_counts_as_changed_for_a_waiter_that_saw_a_version():
    notifier = Notifier()
    seen = notifier.notify("req:a")
    notifier.notify("req:a")
    notifier.prune(idle_seconds=0)
    assert notifier.wait_for("req:a", seen, timeout=PARK) == 0


def test_announce_wakes_one_poll_for_the_model_and_one_catch_all_poll():
    notifier = Notifier()
    for_model = [park(notifier, queue_key("llama")), park(notifier, queue_key("llama"))]
    catch_all = [park(notifier, ANY_MODEL_KEY), park(notifier, ANY_MODEL_KEY)]
    other_model = park(notifier, queue_key("qwen"))
    conn = SQLiteStorage(":memory:", notifier).connect()
    jobs.announce(conn, "llama")
    conn.close()
    for_model[0].join()
    catch_all[0].join()
    assert not (for_model[1].returned or catch_all[1].returned or other_model.returned)
    notifier.close()
