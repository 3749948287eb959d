"""The dashboard's Live table in a real browser, with K evaluations listed, beside 10.

The goal (the dashboard issue): "the live evaluations table ... updates without reloading,
staying smooth with 1,000 evaluations listed".

The platform runs on a private local Ray cluster (`ray.cluster_utils.Cluster`, its own
temporary folder and ports): the control plane with the SIMULATED sandbox runtime (a TEST
DOUBLE, `cluster/runtimes/simulated.py`: the runner protocol spoken inside the
supervisors, no sandbox process), and the API as `proctor up` deploys it (Ray Serve, one
replica). One researcher submits K evaluations (--evals, default 1,000), each of --samples
one-sample shards (`shard_size: 1`): the first --samples - 1 end one after another,
--sim-seconds apart (plus an offset spread over the evaluations, so that endings are
steady in time), the last runs for hours. An evaluation's progress (`done_units`) moves
when one of its shards ends, so the evaluations stay `running` through the run while rows
keep advancing: about K / --sim-seconds row changes a second at the defaults. Ten of them
are named `baseline-*`, the others `live-*`.

The dashboard is its own process (`python -m ui --port P --api URL`, as `proctor up` runs
it), opened in Debian's headless Chromium through Playwright, signed in with the
researcher's token. Two phases, each on a fresh page of the same browser, against the
same platform:

  K listed      the Live table as it opens: all K rows (waited for), and until at least
                90% of the evaluations run (or --ramp-timeout);
  10 listed     the baseline: the table's search box set to `baseline`, so that it lists
                the 10 evaluations named so (the same refresh, the same API, 10 rows).

In each phase, for --seconds (passive, then --scroll-seconds of scripted scrolling), in the
page:
  update interval  a MutationObserver on the table's block: the time between successive
                   changes of `#pr-live` (the dashboard's timer asks every 2 s; Gradio skips
                   a tick while the previous one is still pending);
  tick -> DOM      from the `queue/join` request of a `refresh_live` event (the page's
                   `fetch` is wrapped before Gradio loads) to the table's next change: the
                   queue, the server's refresh (API list pages + HTML), the stream back and
                   the page applying it; "-> painted" adds the next frame's style and layout;
  long tasks       PerformanceObserver `longtask` (tasks over 50 ms): count, ms per minute, max;
  frames           requestAnimationFrame deltas, passive and while scrolling the table's box
                   by 40 px a frame (down and back): p50, p99, frames over 50 ms; and how
                   often a refresh replaced the scrolled box or moved its position;
  renderer         the CPU seconds of Chromium's renderer main thread (where the page's
                   script, style, layout and paint run) per table update, and the share of
                   the time it was runnable but waiting for a CPU (/proc schedstat): on two
                   cores the platform competes with the browser, which a user's browser
                   does not (--browser-cpus pins Chromium apart);
  memory, size     the JS heap (`performance.memory`, precise, after a forced GC) at start
                   and end, the DOM's element count, and `#pr-live`'s outerHTML length;
  CPU              CPU seconds of each group of processes during the phase (the dashboard,
                   Chromium's renderer and the rest of Chromium, Serve, the control plane and
                   Ray), as a share of one core, and the host's busy share.
After the measured window, the same scroll again with the refreshes held (the page's
`queue/join` requests wait until released): what the table's size costs a frame alone. Then
--trace-seconds of a Chromium trace, summed as self CPU time per event on the renderer's
main thread (script, layout, HTML parsing, ...).

Then, in this process, the server's side of one refresh, as `refresh_live` does it: the
API's list pages (`Client.list_page(limit=500)`, at most 1,000 rows) and `live_table()`,
timed --repeats times for each listing. With --py-spy, py-spy samples the dashboard and the
API replica during the K phase and the hottest functions are printed. --extra-css adds CSS
to both phases' pages, to try a fix without changing ui/.

Prints a table of the figures of both phases and their ratios (K / 10). Never asserts.

    .venv/bin/python benchmarks/dashboard_live.py [--evals 1000] [--seconds 60] [--scroll-seconds 10]
        [--samples 4] [--sim-seconds 60] [--ramp-timeout 300] [--settle 6] [--repeats 5]
        [--trace-seconds 10] [--browser-cpus 1] [--extra-css CSS] [--py-spy]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from procstat import cpu_seconds
from pyspy import hottest, py_spy

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
USER = "bench"
BASELINE = 10
SHARD_CPUS = 0.001
SHARD_MEMORY = 64 * 1024**2
HOLD_S = 4 * 3600  # the last sample of every evaluation: running until the end of the run
UPDATE_GAP_MS = 30  # mutation callbacks closer than this belong to one update

INIT_JS = """
(() => {
  const pr = window.__pr = {joins: [], long: [], hold: false, held: []};
  const fetch0 = window.fetch;
  window.fetch = function (input, init) {
    let join = false;
    try {
      const url = typeof input === 'string' ? input : (input && input.url) || String(input);
      join = url.includes('/queue/join');
      if (join && init && typeof init.body === 'string')
        pr.joins.push([performance.now(), JSON.parse(init.body).fn_index]);
    } catch (e) {}
    if (join && pr.hold)  // sent when released: Gradio skips the timer's ticks meanwhile
      return new Promise((resolve) => pr.held.push(() => resolve(fetch0.apply(this, [input, init]))));
    return fetch0.apply(this, arguments);
  };
  try {
    new PerformanceObserver((list) => {
      for (const e of list.getEntries()) pr.long.push([e.startTime, e.duration]);
    }).observe({type: 'longtask', buffered: true});
  } catch (e) {}
})();
"""

START_JS = """
() => {
  const pr = window.__pr;
  Object.assign(pr, {updates: [], other: 0, painted: [], frames: [], framing: true});
  const touches = (r) => {
    const t = r.target.nodeType === 1 ? r.target : r.target.parentElement;
    if (t && t.closest && t.closest('#pr-live')) return true;
    for (const n of r.addedNodes)
      if (n.nodeType === 1 && (n.id === 'pr-live' || (n.querySelector && n.querySelector('#pr-live')))) return true;
    return false;
  };
  pr.mo = new MutationObserver((records) => {
    const t = performance.now();
    if (!records.some(touches)) { pr.other++; return; }
    pr.updates.push(t);
    requestAnimationFrame(() => {
      const ch = new MessageChannel();
      ch.port1.onmessage = () => pr.painted.push([t, performance.now()]);
      ch.port2.postMessage(0);
    });
  });
  pr.mo.observe(document.querySelector('#pr-live-html'),
                {childList: true, subtree: true, characterData: true, attributes: true});
  let last = null;
  const loop = (ts) => {
    if (!pr.framing) return;
    if (last !== null) pr.frames.push(ts - last);
    last = ts;
    requestAnimationFrame(loop);
  };
  requestAnimationFrame(loop);
  if (window.gc) window.gc();
  pr.t0 = performance.now();
  return {t0: pr.t0, heap: performance.memory ? performance.memory.usedJSHeapSize : null,
          nodes: document.getElementsByTagName('*').length};
}
"""

SCROLL_JS = """
async (ms) => {
  window.__pr.framing = false;
  const box = () => document.querySelector('#pr-live-html .pr-scroll');
  const out = {frames: [], replaced: 0, jumped: 0, steps: 0, range: 0};
  let el = box(), dir = 1, expect = null, last = null;
  const start = performance.now();
  await new Promise((resolve) => {
    const step = (ts) => {
      if (last !== null) out.frames.push(ts - last);
      last = ts;
      const cur = box();
      if (cur !== el) { out.replaced++; el = cur; }
      if (el) {
        if (expect !== null && Math.abs(el.scrollTop - expect) > 2) out.jumped++;
        const max = el.scrollHeight - el.clientHeight;
        out.range = Math.max(out.range, max);
        if (max > 0) {
          let next = el.scrollTop + dir * 40;
          if (next >= max) { next = max; dir = -1; }
          if (next <= 0) { next = 0; dir = 1; }
          el.scrollTop = next;
          expect = el.scrollTop;
          out.steps++;
        } else expect = null;
      }
      if (ts - start < ms) requestAnimationFrame(step); else resolve();
    };
    requestAnimationFrame(step);
  });
  return out;
}
"""

HOLD_JS = "() => { window.__pr.hold = true; }"
RELEASE_JS = "() => { const pr = window.__pr; pr.hold = false; pr.held.splice(0).forEach((send) => send()); }"

END_JS = """
() => {
  const pr = window.__pr;
  pr.mo.disconnect();
  pr.framing = false;
  if (window.gc) window.gc();
  const table = document.querySelector('#pr-live');
  return {t1: performance.now(), t0: pr.t0, updates: pr.updates, other: pr.other, painted: pr.painted,
          frames: pr.frames, joins: pr.joins, long: pr.long,
          heap: performance.memory ? performance.memory.usedJSHeapSize : null,
          nodes: document.getElementsByTagName('*').length,
          html: table ? table.outerHTML.length : 0,
          rows: document.querySelectorAll('#pr-live tbody tr[data-id]').length};
}
"""

ROWS_JS = "() => document.querySelectorAll('#pr-live tbody tr[data-id]').length"


def log(msg: str) -> None:
    print(msg, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def q(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def spec_doc(i: int, k: int, samples: int, step: float) -> dict[str, Any]:
    """Evaluation i of k: `samples` one-sample shards; shard j < samples - 1 ends after
    (j + 1) * step plus an offset spread over the k evaluations, the last one is held."""
    offset = step * i / k
    sims = [step * (j + 1) + offset for j in range(samples - 1)] + [HOLD_S]
    name = f"baseline-{i:04d}" if i % max(1, k // BASELINE) == 0 and i // max(1, k // BASELINE) < BASELINE \
        else f"live-{i:04d}"
    return {"name": name, "model": {"adapter": "reference"}, "shard_size": 1,
            "dataset": {"samples": [{"id": f"s{j}", "input": "q", "target": "a", "metadata": {"sim_seconds": s}}
                                    for j, s in enumerate(sims)]},
            "scorers": [{"type": "exact"}],
            # "kubernetes" runs in the simulated double here (SimulateRemoteRuntimes)
            "sandbox": {"runtime": "kubernetes", "cpus": SHARD_CPUS, "memory": "64Mi", "timeout_s": HOLD_S + 600}}


# ---------------------------------------------------------------- processes and CPU


def process_tree(root: int) -> list[int]:
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(c for c, p in parent.items() if p == pid)
    return out


def role(pid: int, dashboard: int) -> str | None:
    if pid == dashboard:
        return "dashboard"
    if pid == os.getpid():
        return "driver"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    if "py-spy" in cmd:
        return None
    if "chromium" in cmd:
        return "chromium renderer" if "--type=renderer" in cmd else "chromium other"
    if "ray::Serve" in cmd or "ray::ProxyActor" in cmd:
        return "serve"
    if "ray::" in cmd:
        return "control plane + ray workers"
    if "gcs_server" in cmd or "raylet" in cmd or "ray/" in cmd or "ray." in cmd:
        return "ray core"
    return "playwright + other"


def cpu_by_role(dashboard: int) -> dict[str, float]:
    out: Counter[str] = Counter()
    for pid in process_tree(os.getpid()):
        r = role(pid, dashboard)
        if r:
            out[r] += cpu_seconds(pid)
    return dict(out)


def renderer_main(dashboard: int) -> tuple[float, float]:
    """(CPU seconds, seconds spent runnable but waiting for a CPU) of the Chromium renderers'
    main threads, where the page's JavaScript, style, layout and paint run (the thread whose
    id is the process's; /proc/.../schedstat)."""
    cpu = wait = 0.0
    for pid in process_tree(os.getpid()):
        if role(pid, dashboard) == "chromium renderer":
            try:
                on, queued, _ = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
            except (OSError, ValueError):
                continue
            cpu += int(on) / 1e9
            wait += int(queued) / 1e9
    return cpu, wait


def host_busy() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values) - values[3] - values[4], sum(values)


def serve_replica_pid() -> int | None:
    import ray

    for a in ray._private.state.state.actor_table(None, actor_state_name="ALIVE").values():
        if (a.get("ActorClassName") or "").startswith("ServeReplica") or (a.get("Name") or "").startswith("SERVE_REPLICA"):
            return a["Pid"]
    return None


# ---------------------------------------------------------------- the platform


class Platform:
    """A private Ray cluster, the control plane (simulated sandboxes), Serve's API, the
    researcher's token, the dashboard process; `close()` stops all of it."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.home = Path(tempfile.mkdtemp(prefix="pdl-"))  # short: Ray's socket paths live under it
        self.cluster: Any = None
        self.settings: Any = None
        self.dashboard: subprocess.Popen | None = None
        self.dashboard_err = self.home / "dashboard.stderr"

    def start(self) -> None:
        import ray
        from ray import serve
        from ray.cluster_utils import Cluster

        from cluster.localray import address_file_in
        from cluster.runtimes.simulated import SimulateRemoteRuntimes
        from eval_actors import control_plane
        from proctor.settings import Settings
        from serve_app.deployment import APP_NAME, deployment

        a = self.args
        shards = a.evals * a.samples
        self.settings = Settings(home=self.home, results_uri=(self.home / "results").as_uri(),
                                 state_url=f"sqlite:///{self.home}/state.db", ray_namespace="proctor-bench-dash",
                                 rate_limit_per_s=0)
        node = {"num_cpus": math.ceil(shards * SHARD_CPUS) + 2, "memory": shards * SHARD_MEMORY + 2 * 1024**3,
                "object_store_memory": 256 * 1024**2, "include_dashboard": False,
                "temp_dir": str(self.home / "ray")}
        with address_file_in(str(self.home / "ray")):
            self.cluster = Cluster(initialize_head=True, head_node_args=node)
        ray.init(address=self.cluster.address, namespace=self.settings.ray_namespace, logging_level="ERROR",
                 log_to_driver=False)
        self.plane = control_plane.start(self.settings, runtime_factory=SimulateRemoteRuntimes())
        store = self.plane.store()
        store.create_user(USER, "researcher")
        self.token, _ = store.create_token(USER, "bench")
        store.close()
        self.api_port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.api_port})
        serve.run(deployment(self.settings), name=APP_NAME, route_prefix="/")
        self.api = f"http://127.0.0.1:{self.api_port}"
        self._wait_http(f"{self.api}/api/v1/health", "the API")

    def submit(self) -> None:
        import ray

        scheduler = self.plane.scheduler
        a, t = self.args, time.monotonic()
        for start in range(0, a.evals, 100):
            ray.get([scheduler.submit.remote(spec_doc(i, a.evals, a.samples, a.sim_seconds), USER)
                     for i in range(start, min(a.evals, start + 100))])
        log(f"  submitted {a.evals} evaluations ({a.evals * a.samples} shards) in {time.monotonic() - t:.1f} s")

    def start_dashboard(self) -> str:
        port = free_port()
        env = {**os.environ, "PROCTOR_HOME": str(self.home), "PROCTOR_CONFIG_DIR": str(self.home / "config"),
               "GRADIO_ANALYTICS_ENABLED": "False"}
        with open(self.dashboard_err, "wb") as err:
            self.dashboard = subprocess.Popen([sys.executable, "-m", "ui", "--port", str(port), "--api", self.api],
                                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        url = f"http://127.0.0.1:{port}"
        self._wait_http(url, "the dashboard", self.dashboard)
        return url

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        store = self.plane.store()
        try:
            return store.counts_by_status("evaluation"), store.counts_by_status("shard")
        finally:
            store.close()

    def _wait_http(self, url: str, what: str, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if proc is not None and proc.poll() is not None:
                raise SystemExit(f"{what} exited: {self.dashboard_err.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{what} did not answer at {url} in {timeout:.0f} s")
            time.sleep(0.3)

    def close(self) -> None:
        import ray

        if self.dashboard is not None:
            self.dashboard.terminate()
            try:
                self.dashboard.wait(15)
            except subprocess.TimeoutExpired:
                self.dashboard.kill()
                self.dashboard.wait(5)
        if self.cluster is not None:
            from ray import serve

            from eval_actors import control_plane

            try:
                serve.shutdown()
            except Exception:  # noqa: BLE001 - Serve never started
                pass
            control_plane.stop(self.settings)
            ray.shutdown()
            self.cluster.shutdown()
        shutil.rmtree(self.home, ignore_errors=True)


# ---------------------------------------------------------------- one phase in the browser


def live_fn_indices(url: str) -> set[int]:
    """The dependencies (events) whose outputs include the Live table's HTML block."""
    import httpx

    config = httpx.get(f"{url}/config", timeout=10).json()
    block = {c["id"] for c in config["components"] if (c.get("props") or {}).get("elem_id") == "pr-live-html"}
    return {i for i, d in enumerate(config["dependencies"]) if block & set(d["outputs"])}


TRACE_CATEGORIES = ["devtools.timeline", "v8.execute", "blink", "disabled-by-default-devtools.timeline"]


def main_thread_time(trace: bytes, seconds: float) -> list[tuple[str, float]]:
    """Self CPU time (the events' thread time) per trace event name on the busiest renderer
    main thread, ms per second of trace."""
    doc = json.loads(trace)
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    mains = {(e["pid"], e["tid"]) for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name" and e["args"].get("name") == "CrRendererMain"}
    by_thread: dict[tuple[int, int], list[tuple[float, float, str, float | None]]] = {}
    for e in events:
        if e.get("ph") == "X" and (e["pid"], e["tid"]) in mains and "dur" in e:
            by_thread.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["dur"], e["name"], e.get("tdur")))
    if not by_thread:
        return []
    spans = max(by_thread.values(), key=len)
    spans.sort(key=lambda x: (x[0], -x[1]))
    own: Counter[str] = Counter()
    stack: list[list[Any]] = []  # [end, name, self CPU]: the thread's CPU time (tdur), not the wall's
    for ts, dur, name, tdur in spans:
        cpu = dur if tdur is None else tdur
        while stack and stack[-1][0] <= ts:
            end, n, self_ = stack.pop()
            own[n] += self_
        if stack:
            stack[-1][2] -= cpu
        stack.append([ts + dur, name, cpu])
    for end, n, self_ in stack:
        own[n] += self_
    return [(n, v / 1000 / seconds) for n, v in own.most_common(12)]


def phase(browser: Any, plat: Platform, url: str, live_fns: set[int], search: str | None, expect: int,
          args: argparse.Namespace, profile: bool) -> dict[str, Any]:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.add_init_script(INIT_JS)
    page.goto(url)
    page.locator("#pr-token input, #pr-token textarea").first.fill(plat.token)
    page.locator("#pr-login").click()
    page.wait_for_selector("#pr-who >> text=Signed in as", timeout=60_000)
    if args.extra_css:
        page.add_style_tag(content=args.extra_css)
    if search:
        box = page.locator("#pr-search input, #pr-search textarea").first
        box.fill(search)
        box.press("Enter")
        page.wait_for_function("([n, s]) => { const r = [...document.querySelectorAll('#pr-live tbody tr[data-id]')];"
                               " return r.length === n && r.every(x => x.innerText.includes(s)); }",
                               arg=[expect, search], timeout=120_000, polling=250)
    else:
        # the table sends one page of rows; the line above it counts every evaluation listed
        page.wait_for_function("n => (document.querySelector('#pr-live-count')?.dataset.total | 0) >= n",
                               arg=expect, timeout=300_000, polling=500)
    page.wait_for_timeout(args.settle * 1000)  # a few refreshes before measuring
    evals0, shards0 = plat.counts()
    cpu0, busy0, wall0 = cpu_by_role(plat.dashboard.pid), host_busy(), time.monotonic()
    main0, load0 = renderer_main(plat.dashboard.pid), os.getloadavg()[0]
    spies = []
    if profile:
        for name, pid in (("dashboard", plat.dashboard.pid), ("serve replica", serve_replica_pid())):
            path = plat.home / f"{name.replace(' ', '-')}.txt"
            if pid:
                spies.append((name, path, py_spy(pid, args.seconds, path)))
    start = page.evaluate(START_JS)
    page.wait_for_timeout(args.seconds * 1000)
    scroll = page.evaluate(SCROLL_JS, args.scroll_seconds * 1000)
    end = page.evaluate(END_JS)
    wall = time.monotonic() - wall0
    cpu1, busy1 = cpu_by_role(plat.dashboard.pid), host_busy()
    main1, load1 = renderer_main(plat.dashboard.pid), os.getloadavg()[0]
    evals1, shards1 = plat.counts()
    # the same scroll with no refresh: what the table's size costs alone (the requests the
    # timer makes meanwhile wait in the page; the tick in flight is let finish first)
    page.evaluate(HOLD_JS)
    page.wait_for_timeout(4000)
    still = page.evaluate(SCROLL_JS, args.scroll_seconds * 1000)
    page.evaluate(RELEASE_JS)
    trace = []
    if args.trace_seconds:  # after the measured window: tracing costs the page
        browser.start_tracing(page=page, categories=TRACE_CATEGORIES)
        page.wait_for_timeout(args.trace_seconds * 1000)
        trace = main_thread_time(browser.stop_tracing(), args.trace_seconds)
    page.close()
    profiles = {}
    for name, path, proc in spies:
        if proc is not None:
            proc.wait(60)
            if path.exists():
                profiles[name] = hottest(path)
    ended = lambda shards: shards["succeeded"] + shards["failed"]  # noqa: E731
    return summarise(start, end, scroll, live_fns) | {
        "still_frames_ms": still["frames"], "listed": expect, "wall_s": wall, "profiles": profiles, "trace": trace,
        "cpu_share": {k: (cpu1.get(k, 0.0) - cpu0.get(k, 0.0)) / wall for k in cpu1},
        "host_busy": (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]), "load": (load0, load1),
        "main_cpu_s": main1[0] - main0[0], "main_wait_s": main1[1] - main0[1],
        "running": (evals0["running"], evals1["running"]), "shards_ended": ended(shards1) - ended(shards0)}


def summarise(start: dict[str, Any], end: dict[str, Any], scroll: dict[str, Any], live_fns: set[int]) -> dict[str, Any]:
    t0, t1 = end["t0"], end["t1"]
    minutes = (t1 - t0) / 60000
    updates: list[float] = []
    for t in end["updates"]:
        if not updates or t - updates[-1] > UPDATE_GAP_MS:
            updates.append(t)
    joins = sorted(t for t, fn in end["joins"] if fn in live_fns)
    lat = []
    for u in updates:
        before = [j for j in joins if j < u]
        if before and u - before[-1] < 30_000:
            lat.append(u - before[-1])
    painted = dict(end["painted"])
    paint = []
    for u in updates:
        before = [j for j in joins if j < u]
        if before and u in painted and u - before[-1] < 30_000:
            paint.append(painted[u] - before[-1])
    long = [(s, d) for s, d in end["long"] if s + d >= t0 and s <= t1]
    frames, sframes = end["frames"], scroll["frames"]
    mb = lambda b: b / 2**20 if b is not None else float("nan")  # noqa: E731
    return {
        "updates": len(updates), "updates_per_min": len(updates) / minutes,
        "interval_ms": [b - a for a, b in zip(updates, updates[1:])],
        "joins": len([j for j in joins if j >= t0]), "tick_to_dom_ms": lat, "tick_to_paint_ms": paint,
        "long_n": len(long), "long_ms_per_min": sum(d for _, d in long) / minutes,
        "long_max_ms": max((d for _, d in long), default=0.0), "long_ms": [d for _, d in long],
        "frames_ms": frames, "scroll_frames_ms": sframes, "scroll_replaced": scroll["replaced"],
        "scroll_jumped": scroll["jumped"], "scroll_range_px": scroll["range"], "scroll_steps": scroll["steps"],
        "heap_start_mb": mb(start["heap"]), "heap_end_mb": mb(end["heap"]),
        "nodes_start": start["nodes"], "nodes_end": end["nodes"], "html_bytes": end["html"], "rows": end["rows"],
        "other_mutations": end["other"],
    }


# ---------------------------------------------------------------- the server's side, in this process


def server_side(api: str, token: str, search: str | None, repeats: int) -> dict[str, Any]:
    """`refresh_live` as the dashboard runs it (its page size and cap), timed in parts."""
    from proctor.client import Client
    from ui.dashboard import MAX_LISTED
    from ui.views import live_table

    client = Client(api, token=token, timeout=60)
    pages, lists, renders, size = [], [], [], 0
    for _ in range(repeats):
        t = time.perf_counter()
        found, cursor = [], None
        while True:
            p0 = time.perf_counter()
            items, cursor = client.list_page(text=search, limit=500, cursor=cursor)
            pages.append(time.perf_counter() - p0)
            found.extend(items)
            if not cursor or len(found) >= MAX_LISTED:
                break
        found = found[:MAX_LISTED]
        lists.append(time.perf_counter() - t)
        t = time.perf_counter()
        html = live_table(found)  # its first page, as the dashboard sends it
        _ = [(f"{ev.name} · {ev.id}", ev.id) for ev in found[:500]]
        renders.append(time.perf_counter() - t)
        size = len(html)
    return {"list_ms": [x * 1000 for x in lists], "page_ms": [x * 1000 for x in pages],
            "render_ms": [x * 1000 for x in renders], "html_bytes": size, "rows": len(found)}


# ---------------------------------------------------------------- the report


def report(args: argparse.Namespace, big: dict[str, Any], base: dict[str, Any], srv: dict[str, dict[str, Any]],
           took: float, load: tuple[float, float]) -> None:
    k, b = big["listed"], base["listed"]
    print()
    print(f"Dashboard Live table, {k} listed vs {b} listed: SIMULATED sandboxes (a TEST DOUBLE), "
          f"{args.evals} evaluations x {args.samples} one-sample shards, a shard ending every ~{args.sim_seconds:g} s "
          f"per evaluation; headless Chromium (Playwright); {os.cpu_count()} CPUs, "
          f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 1024**3:.0f} GB; "
          f"load average {load[0]:.1f} before, {load[1]:.1f} after; run {took / 60:.1f} min; "
          + (f"Chromium pinned to CPU(s) {args.browser_cpus}, the platform and the dashboard server to the others"
             if args.browser_cpus else "Chromium, the platform and the dashboard server share all CPUs")
          + (f"; extra CSS: {args.extra_css}" if args.extra_css else ""))
    print(f"each phase: {args.seconds:g} s passive + {args.scroll_seconds:g} s scrolling; "
          f"evaluations running at start/end: {k} listed {big['running'][0]}/{big['running'][1]}, "
          f"{b} listed {base['running'][0]}/{base['running'][1]}; shards ended during the phase: "
          f"{big['shards_ended']} / {base['shards_ended']}")
    rows: list[tuple[str, float, float, str]] = []

    def add(name: str, x: float, y: float, fmt: str = "{:.1f}") -> None:
        rows.append((name, x, y, fmt))

    for d in (big, base):
        d["i50"], d["i90"], d["imax"] = (q(d["interval_ms"], p) for p in (0.5, 0.9, 1.0))
    add("table updates per minute (timer: 30)", big["updates_per_min"], base["updates_per_min"])
    add("  refresh_live requests (joins)", big["joins"], base["joins"], "{:.0f}")
    add("update interval p50 ms", big["i50"], base["i50"], "{:.0f}")
    add("update interval p90 ms", big["i90"], base["i90"], "{:.0f}")
    add("update interval max ms", big["imax"], base["imax"], "{:.0f}")
    for name, key in (("tick -> DOM", "tick_to_dom_ms"), ("tick -> painted", "tick_to_paint_ms")):
        for p in (0.5, 0.9):
            add(f"{name} p{int(p * 100)} ms", q(big[key], p), q(base[key], p), "{:.0f}")
    add("renderer main thread CPU (% of a core)", 100 * big["main_cpu_s"] / big["wall_s"],
        100 * base["main_cpu_s"] / base["wall_s"], "{:.0f}")
    add("  ms of it per table update", 1000 * big["main_cpu_s"] / max(1, big["updates"]),
        1000 * base["main_cpu_s"] / max(1, base["updates"]), "{:.0f}")
    add("  waiting for a CPU (% of the time)", 100 * big["main_wait_s"] / big["wall_s"],
        100 * base["main_wait_s"] / base["wall_s"], "{:.0f}")
    add("long tasks (>50 ms) count", big["long_n"], base["long_n"], "{:.0f}")
    add("long tasks ms per minute", big["long_ms_per_min"], base["long_ms_per_min"], "{:.0f}")
    add("long task p50 ms", q(big["long_ms"], 0.5), q(base["long_ms"], 0.5), "{:.0f}")
    add("long task max ms", big["long_max_ms"], base["long_max_ms"], "{:.0f}")
    for name, key in (("frames, passive", "frames_ms"), ("frames, scrolling", "scroll_frames_ms"),
                      ("frames, scrolling, refreshes held", "still_frames_ms")):
        add(f"{name}: count", len(big[key]), len(base[key]), "{:.0f}")
        add(f"{name}: p50 ms", q(big[key], 0.5), q(base[key], 0.5))
        add(f"{name}: p99 ms", q(big[key], 0.99), q(base[key], 0.99))
        add(f"{name}: > 50 ms", sum(f > 50 for f in big[key]), sum(f > 50 for f in base[key]), "{:.0f}")
    add("scroll range px (0: nothing to scroll)", big["scroll_range_px"], base["scroll_range_px"], "{:.0f}")
    add("scrolled box replaced by a refresh", big["scroll_replaced"], base["scroll_replaced"], "{:.0f}")
    add("scroll position moved by a refresh", big["scroll_jumped"], base["scroll_jumped"], "{:.0f}")
    add("JS heap at start MiB (after GC)", big["heap_start_mb"], base["heap_start_mb"])
    add("JS heap at end MiB (after GC)", big["heap_end_mb"], base["heap_end_mb"])
    add("DOM elements at end", big["nodes_end"], base["nodes_end"], "{:.0f}")
    add("#pr-live outerHTML bytes", big["html_bytes"], base["html_bytes"], "{:.0f}")
    sk, sb = srv["big"], srv["base"]
    add("server: API list pages, total p50 ms", q(sk["list_ms"], 0.5), q(sb["list_ms"], 0.5))
    add("server: API list pages, total max ms", q(sk["list_ms"], 1.0), q(sb["list_ms"], 1.0))
    add("server: one page (<= 500) p50 ms", q(sk["page_ms"], 0.5), q(sb["page_ms"], 0.5))
    add("server: live_table() + choices p50 ms", q(sk["render_ms"], 0.5), q(sb["render_ms"], 0.5))
    for role_ in sorted(set(big["cpu_share"]) | set(base["cpu_share"])):
        add(f"CPU, {role_} (% of a core)", 100 * big["cpu_share"].get(role_, 0.0),
            100 * base["cpu_share"].get(role_, 0.0), "{:.0f}")
    add("host busy (% of all CPUs)", 100 * big["host_busy"], 100 * base["host_busy"], "{:.0f}")
    add("load average at the phase's end", big["load"][1], base["load"][1])

    w = max(len(r[0]) for r in rows)
    print(f"{'figure':{w}s}  {f'{k} listed':>12s}  {f'{b} listed':>12s}  {'ratio':>7s}")
    for name, x, y, fmt in rows:
        ratio = f"{x / y:7.2f}" if y and y == y and x == x else "      -"
        print(f"{name:{w}s}  {fmt.format(x):>12s}  {fmt.format(y):>12s}  {ratio}")
    for d in (big, base):
        if d["trace"]:
            print(f"renderer main thread, {d['listed']} listed, {args.trace_seconds:g} s traced after the measurement "
                  f"(self CPU time, ms per second): " + ", ".join(f"{n} {v:.0f}" for n, v in d["trace"]))
    for name, prof in big["profiles"].items():
        print(f"py-spy, {name}, {k} listed, {prof['samples'][0][1]:.0f} samples at 50 Hz:")
        for kind in ("self", "project, inclusive"):
            print(f"  {kind}: " + "; ".join(f"{fn} {share:.1%}" for fn, share in prof[kind]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--evals", type=int, default=1000, help="evaluations listed (K)")
    ap.add_argument("--seconds", type=float, default=60.0, help="passive measurement per phase")
    ap.add_argument("--scroll-seconds", type=float, default=10.0, help="scripted scrolling per phase, after it")
    ap.add_argument("--samples", type=int, default=4, help="one-sample shards per evaluation (the last is held)")
    ap.add_argument("--sim-seconds", type=float, default=60.0, help="seconds between an evaluation's shard endings")
    ap.add_argument("--ramp-timeout", type=float, default=300.0,
                    help="seconds to wait for 90%% of the evaluations to run before measuring")
    ap.add_argument("--settle", type=float, default=6.0, help="seconds after the table is ready, before measuring")
    ap.add_argument("--repeats", type=int, default=5, help="server-side refreshes timed in this process")
    ap.add_argument("--trace-seconds", type=float, default=10.0,
                    help="after each phase, trace the page this long and print its main thread's time (0: no trace)")
    ap.add_argument("--browser-cpus", default="",
                    help="e.g. 1: Chromium on these CPUs, what this run starts on the others (a user's browser "
                         "does not share the cluster's CPUs); default: all share all")
    ap.add_argument("--extra-css", default="", help="CSS added to both phases' pages: to try a fix without ui/")
    ap.add_argument("--py-spy", action="store_true", help="profile the dashboard and the API replica (K phase)")
    args = ap.parse_args()
    if args.evals < BASELINE or args.samples < 2:
        ap.error(f"--evals must be at least {BASELINE} and --samples at least 2")
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    t_start, load0 = time.monotonic(), os.getloadavg()[0]
    pinned = None
    if args.browser_cpus:
        cpus = os.sched_getaffinity(0)
        browser_cpus = {int(c) for c in args.browser_cpus.split(",")}
        if not browser_cpus < cpus:
            ap.error(f"--browser-cpus {args.browser_cpus}: leave some of {sorted(cpus)} to the platform")
        pinned = (cpus - browser_cpus, browser_cpus)
        os.sched_setaffinity(0, pinned[0])  # the cluster, the API and the dashboard inherit it
        log(f"browser pinned to CPUs {sorted(browser_cpus)}, everything else started here to {sorted(pinned[0])}")
    log("SIMULATED sandboxes (a TEST DOUBLE: no sandbox processes; the protocol is spoken inside the supervisors)")
    plat = Platform(args)
    try:
        plat.start()
        plat.submit()
        url = plat.start_dashboard()
        live_fns = live_fn_indices(url)
        deadline = time.monotonic() + args.ramp_timeout
        last = 0.0
        while True:
            evals, shards = plat.counts()
            if evals["running"] >= 0.9 * args.evals or time.monotonic() > deadline:
                break
            if time.monotonic() - last > 10:
                last = time.monotonic()
                log(f"  evaluations running {evals['running']}/{args.evals}, shards running {shards['running']}, "
                    f"queued {shards['queued']}")
            time.sleep(1)
        log(f"  {evals['running']} evaluations running ({shards['running']} shards); measuring")
        from playwright.sync_api import sync_playwright

        if pinned:
            os.sched_setaffinity(0, pinned[1])  # Playwright's driver and Chromium inherit it
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--enable-precise-memory-info", "--js-flags=--expose-gc"])
            if pinned:
                os.sched_setaffinity(0, pinned[0])
            log(f"  phase: {args.evals} listed")
            big = phase(browser, plat, url, live_fns, None, args.evals, args, args.py_spy)
            log(f"  phase: {BASELINE} listed (search 'baseline')")
            base = phase(browser, plat, url, live_fns, "baseline", BASELINE, args, False)
            browser.close()
        log("  server side, in this process")
        srv = {"big": server_side(plat.api, plat.token, None, args.repeats),
               "base": server_side(plat.api, plat.token, "baseline", args.repeats)}
    finally:
        plat.close()
    report(args, big, base, srv, time.monotonic() - t_start, (load0, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
