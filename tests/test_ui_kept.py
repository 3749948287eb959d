"""What the dashboard keeps between refreshes (`ui/kept.py`): bounded, shared by Gradio's
handler threads."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import gradio as gr
import pandas as pd

from ui.kept import Recent, Sent


def test_recent_keeps_the_newest_and_hands_out_the_oldest() -> None:
    dropped: list[str] = []
    kept: Recent[str, str] = Recent(2, dropped=dropped.append)
    assert kept.put("a", "A") is None and kept.put("b", "B") is None
    assert kept.take("a", lambda old: (old or "") + "!") == ("A", "A!")  # "a" is now the newest
    kept.put("c", "C")
    assert dropped == ["B"] and kept.get("b") is None and kept.get("a") == "A!" and len(kept) == 2
    kept.drop_where(lambda key: key != "a")
    assert kept.get("a") is None and kept.get("c") == "C"


def test_recent_is_safe_from_several_threads() -> None:
    dropped: list[int] = []
    kept: Recent[int, int] = Recent(50, dropped=dropped.append)
    errors: list[BaseException] = []

    def work(start: int) -> None:
        try:
            for i in range(start, start + 5000):
                kept.take(i % 400, lambda old: (old or 0) + 1)
                kept.get((i * 7) % 400)
                if i % 50 == 0:
                    kept.drop_where(lambda key: key % 97 != 0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n * 5000,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(kept) <= 50 and dropped


def test_a_tab_is_sent_only_what_changed_and_everything_now_and_then() -> None:
    sent = Sent(most=10, full_every=4)
    tab, other = SimpleNamespace(session_hash="a"), SimpleNamespace(session_hash="b")
    frame = pd.DataFrame({"x": [1, 2]})
    first = ("<p>1</p>", frame, gr.update(visible=True), None)
    assert sent.changed("detail", tab, first) == first  # a tab's first answer goes whole
    same = ("<p>1</p>", frame.copy(), gr.update(visible=True), None)
    assert sent.changed("detail", tab, same) == (gr.skip(),) * 4
    assert sent.changed("detail", other, same) == same  # per tab
    moved = ("<p>2</p>", pd.DataFrame({"x": [1, 3]}), gr.update(visible=True), None)
    got = sent.changed("detail", tab, moved)
    assert got[0] == "<p>2</p>" and got[1] is moved[1] and got[2:] == (gr.skip(), gr.skip())
    assert sent.changed("detail", tab, moved) == moved  # the 4th answer: whole, whatever changed
    sent.forget(tab)  # another handler changed what the tab shows
    assert sent.changed("detail", tab, moved) == moved
    assert sent.changed("live", SimpleNamespace(), moved) == moved  # no tab known: always whole
