"""One benchmark run: start every configuration's processes, send the chats interleaved, measure them.

Each configuration and network (a "cell") gets its own server, SQLite file,
delay proxy and agents, so per-request CPU samples of its processes are its
own. The simulator is shared. Sequential chats go round-robin over the cells
(A B C A B C ...) so machine noise hits all alike; then each cell gets one
concurrent batch, served by agents started for it.

Every chat (and every concurrent batch) to a short-polling cell is sent after
a random part of its agent's poll cycle (the poll interval plus the network's
round trip), so it arrives at a random point of that cycle. Without it the arrivals were phase-locked: an agent polls again
the moment its job ends, and the cell's next chat came a nearly fixed time
later (the other cells' chats take nearly fixed times), so with the 100 ms poll
every pickup measured 77-95 ms instead of anything from 0 to 100 ms.
"""
from __future__ import annotations

import math
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.client import Trace, stream_chat, stream_ollama
from bench.configs import Configuration, Network
from bench.logs import AccessLog, EmissionLog, FrameCounter
from bench.metrics import ChatResult, Window, measure_chat
from bench.processes import access_log_path, cpu_seconds, launch_bench_agent, launch_proxy, launch_server
from bench.workload import Profile
from devtools.postgres import Cluster
from devtools.processes import AgentProcess, LiveServer, Process, Simulator, start_simulator, wait_online

# After a chat's last byte, wait this long (plus the round trip) before the closing CPU and request samples,
# so the final POST's access-log line and the agent's bookkeeping land in the chat's window.
SETTLE_SECONDS = 0.02


@dataclass(frozen=True)
class RunOptions:
    profile: Profile
    configs: list[Configuration]
    networks: list[Network]
    requests: int = 10
    concurrent_chats: int = 20
    concurrent_agents: int = 4
    engine: str = "sqlite"        # or postgres: a throwaway cluster, one database per cell
    seed: int = 0                 # of the arrival phases: the same seed sends every chat after the same delay


@dataclass
class Cell:
    """One configuration on one network, with its own processes."""

    config: Configuration
    network: Network
    server: LiveServer | None = None
    access: AccessLog | None = None
    frames: FrameCounter | None = None
    proxy: Process | None = None  # the emulated WAN; on loopback agents talk to the server itself
    api_base: str = ""  # where the agents send their requests
    agents: list[AgentProcess] = field(default_factory=list)
    database_pid: int | None = None  # PostgreSQL's postmaster: its CPU is the server's too

    @property
    def key(self) -> str:
        return self.config.name if self.config.direct else f"{self.config.name}@{self.network.name}"

    @property
    def network_name(self) -> str:
        return "any" if self.config.direct else self.network.name

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of the server (arbiter and worker, and PostgreSQL's processes) and of the agents."""
        if self.server is None:
            return 0.0, 0.0
        server = [self.server.pid] + ([self.database_pid] if self.database_pid else [])
        return cpu_seconds(server), cpu_seconds([a.pid for a in self.agents])

    def processes(self) -> list[Process]:
        return [*self.agents, *([self.proxy] if self.proxy else []), *([self.server] if self.server else [])]


@dataclass
class RunResults:
    chats: list[ChatResult] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)


class Progress:
    """One line on stderr, rewritten in place on a terminal, one line per step otherwise."""

    def __init__(self, total: int, stream=sys.stderr) -> None:
        self.total, self.done, self.stream = total, 0, stream
        self.tty = stream.isatty()
        self.started = time.monotonic()

    def step(self, text: str) -> None:
        self.done += 1
        line = f"[{self.done}/{self.total} {time.monotonic() - self.started:5.0f} s] {text}"
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        self.stream.write(("\r\x1b[K" if self.tty else "") + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class BenchRun:
    """Starts the processes of `options`' cells in `workdir`, runs the chats, stops everything on exit."""

    def __init__(self, options: RunOptions, workdir: Path, progress: Callable[[int], Progress] = Progress) -> None:
        self.options = options
        self.workdir = workdir
        self._make_progress = progress
        self.simulator: Simulator | None = None
        self.simulator_url = ""
        self.emissions = EmissionLog(workdir / "emissions.jsonl")
        self.cluster: Cluster | None = None
        self.cells = [Cell(c, options.networks[0]) for c in options.configs if c.direct]
        self.cells += [Cell(c, n) for n in options.networks for c in options.configs if not c.direct]
        self._agent_count = 0
        self._phases = random.Random(options.seed)

    def __enter__(self) -> BenchRun:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self, progress: Progress) -> None:
        """The simulator, then every cell's server and proxy: launched together, then waited for."""
        self.simulator = start_simulator(self.workdir, "--models", "sim", emit_log=self.emissions.path)
        self.simulator_url = self.simulator.url
        served = [cell for cell in self.cells if not cell.config.direct]
        if self.options.engine == "postgres":
            self.cluster = Cluster.create()
        for cell in served:
            database = self.cluster.create_database() if self.cluster else None
            cell.server = launch_server(self.workdir, _file_name(cell.key), cell.config.server_env, database)
            cell.database_pid = self.cluster.pid if self.cluster else None
            cell.access = AccessLog(access_log_path(self.workdir, _file_name(cell.key)))
            cell.frames = FrameCounter(cell.server.url)
        for cell in served:
            cell.server.wait_ready()
            cell.api_base = cell.server.url
            if cell.network.rtt_ms > 0:
                cell.proxy = launch_proxy(self.workdir, _file_name(cell.key), cell.server.url, cell.network.rtt_ms)
        for cell in served:
            if cell.proxy is not None:
                cell.api_base = cell.proxy.read_listening_url()
        progress.note(f"started the simulator and {len(served)} servers (and WAN proxies) in {self.workdir}")

    def run(self) -> RunResults:
        """Start everything, then the sequential rounds, then one concurrent batch per cell."""
        opts = self.options
        concurrent_steps = len(self.cells) if opts.concurrent_chats else 0
        progress = self._make_progress(opts.requests * len(self.cells) + concurrent_steps)
        results = RunResults()
        try:
            self.start(progress)
            self._start_agents(self.cells, 1, max_jobs=1)
            for round_no in range(opts.requests):
                for cell in self.cells:
                    chat, window = self._sequential_chat(cell, round_no)
                    results.chats.append(chat)
                    if window is not None:
                        results.windows.append(window)
                    progress.step(f"round {round_no + 1}/{opts.requests} {cell.key:<24} " + _brief(chat))
            for cell in self.cells:
                self._stop_agents(cell)
            if opts.concurrent_chats:
                per_agent = math.ceil(opts.concurrent_chats / opts.concurrent_agents)
                for cell in self.cells:
                    self._start_agents([cell], opts.concurrent_agents, max_jobs=per_agent)
                    chats, window = self._concurrent_batch(cell)
                    self._stop_agents(cell)
                    results.chats.extend(chats)
                    if window is not None:
                        results.windows.append(window)
                    failed = sum(not c.ok for c in chats)
                    progress.step(f"concurrent {opts.concurrent_chats} chats {cell.key:<24} "
                                  f"{'all ok' if not failed else f'{failed} FAILED'}")
        finally:
            progress.close()
        return results

    def stop(self) -> None:
        for cell in self.cells:
            for process in cell.processes():
                process.stop()
        if self.simulator is not None:
            self.simulator.stop()
        if self.cluster is not None:
            self.cluster.destroy()

    # --- agents ----------------------------------------------------------

    def _start_agents(self, cells: list[Cell], count: int, max_jobs: int) -> None:
        """`count` agents for each of `cells`, launched together; returns once every one has polled."""
        started = []
        for cell in cells:
            if cell.config.direct:
                continue
            env = {**cell.config.agent_env, "MAX_JOBS": str(max_jobs)}
            for _ in range(count):
                self._agent_count += 1
                agent = launch_bench_agent(self.workdir, f"{_file_name(cell.key)}-{self._agent_count}", cell.server,
                                           cell.api_base, self.simulator_url, env, cell.config.agent_args)
                cell.agents.append(agent)
                started.append((agent, cell.server))
        for agent, server in started:
            wait_online(agent, server)

    def _stop_agents(self, cell: Cell) -> None:
        for agent in cell.agents:
            agent.stop()
        cell.agents.clear()

    # --- chats -----------------------------------------------------------

    def _settle(self, cell: Cell) -> float:
        return SETTLE_SECONDS + cell.network.rtt_ms / 1000

    def _chat(self, cell: Cell, tag: str) -> Trace:
        payload = self.options.profile.chat(tag)
        if cell.config.direct:
            return stream_ollama(self.simulator_url, payload)
        return stream_chat(cell.server.url, payload)

    def _random_phase(self, cell: Cell) -> None:
        """Wait a uniformly random part of the cell's poll cycle (see the module's docstring).

        The cycle is the poll interval plus the poll's round trip: 100 ms polls on the 40 ms WAN reach the
        server every ~140 ms, and a delay over only 100 ms of that would leave a third of the cycle unsampled.
        """
        if cell.config.poll_cycle:
            time.sleep(self._phases.uniform(0, cell.config.poll_cycle + cell.network.rtt_ms / 1000))

    def _sequential_chat(self, cell: Cell, round_no: int) -> tuple[ChatResult, Window | None]:
        tag = f"{cell.key}#{round_no}"
        self._random_phase(cell)
        cpu_before = self._open_window(cell)
        trace = self._chat(cell, tag)
        time.sleep(self._settle(cell))
        window = self._window(cell, "sequential", trace.started, time.time(), cpu_before)
        chat = self._measure(cell, "sequential", round_no, tag, trace)
        if window is not None:
            window.tokens = chat.delivered
        return chat, window

    def _concurrent_batch(self, cell: Cell) -> tuple[list[ChatResult], Window | None]:
        count = self.options.concurrent_chats
        tags = [f"{cell.key}#c{i}" for i in range(count)]
        traces: list[Trace | None] = [None] * count
        go = threading.Barrier(count + 1)

        def run(i: int) -> None:
            go.wait()
            traces[i] = self._chat(cell, tags[i])

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
        for thread in threads:
            thread.start()
        self._random_phase(cell)
        cpu_before = self._open_window(cell)
        started = time.time()
        go.wait()
        for thread in threads:
            thread.join()
        time.sleep(self._settle(cell))
        window = self._window(cell, "concurrent", started, time.time(), cpu_before)
        chats = [self._measure(cell, "concurrent", 0, tag, trace) for tag, trace in zip(tags, traces, strict=True)]
        if window is not None:
            window.tokens = sum(c.delivered for c in chats)
        return chats, window

    def _open_window(self, cell: Cell) -> tuple[float, float]:
        """Start counting a chat's (or batch's) requests; returns the CPU times to subtract at the end."""
        if cell.access is not None:
            cell.access.skip()
            cell.frames.skip()
        return cell.cpu()

    def _window(self, cell: Cell, case: str, started: float, ended: float,
                cpu_before: tuple[float, float]) -> Window | None:
        if cell.config.direct:
            return None
        server_cpu, agent_cpu = cell.cpu()
        requests, connections = cell.access.agent_requests()
        return Window(cell.config.name, cell.network_name, case, started, ended, 0, requests, connections,
                      cell.frames.agent_frames(), server_cpu - cpu_before[0], agent_cpu - cpu_before[1])

    def _measure(self, cell: Cell, case: str, round_no: int, tag: str, trace: Trace) -> ChatResult:
        result = ChatResult(cell.config.name, cell.network_name, case, round_no, tag)
        return measure_chat(result, trace, self.emissions.records(tag))


def _file_name(key: str) -> str:
    return key.replace("@", "-").replace("+", "-")


def _brief(chat: ChatResult) -> str:
    if not chat.ok:
        return f"FAILED: {chat.error or f'{chat.lost} lost, {chat.duplicated} duplicated'}"
    return f"first token {chat.ttft_ms:6.0f} ms, total {chat.total_ms:6.0f} ms"
