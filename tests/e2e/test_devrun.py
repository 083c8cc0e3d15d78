"""`make run`: server, simulator and agent come up, the printed curl line streams an answer, Ctrl-C stops all."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading

import requests

from agent.config import SETTINGS
from devtools.processes import ROOT, free_port, wait_until


def test_devrun_prints_a_curl_line_that_streams_an_answer_and_ctrl_c_stops_everything(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in {s.name for s in SETTINGS} | {"OLLAMA_HOST", "ORCH_API_KEYS", "ORCH_DATABASE"}}
    proc = subprocess.Popen([sys.executable, "-m", "devtools.devrun", "--port", str(port), "--var", str(tmp_path)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)  # drains the agent's log too
    reader.start()
    try:
        line = wait_until(lambda: next((x for x in output if x.startswith("curl -N")), None) or proc.poll(), 60,
                          0.05, "the curl line")
        assert isinstance(line, str), "".join(output)
        argv = shlex.split(line)
        assert argv[2] == f"http://127.0.0.1:{port}/api/v1/chat/stream"
        if shutil.which("curl"):
            body = subprocess.run([*argv, "--silent", "--max-time", "60"], capture_output=True, text=True,
                                  timeout=90).stdout
        else:
            body = requests.post(argv[2], data=argv[argv.index("-d") + 1], timeout=60,
                                 headers={"Content-Type": "application/json"}).text
        assert body.startswith("id: 0\ndata: {\"delta\": ") and body.endswith("data: [DONE]\n\n"), body

        # The printed CLI line lists make run's own database: its agent, online, with 4 slots.
        inspect = next(x for x in output if x.startswith("Inspect the agents: ")).split(": ", 1)[1]
        assert f"--db {tmp_path / 'orchestrator.db'}" in inspect
        listed = subprocess.run([*shlex.split(inspect), "--json"], cwd=ROOT, capture_output=True, text=True,
                                timeout=60)
        assert listed.returncode == 0, listed.stderr
        local = json.loads(listed.stdout)[0]
        assert (local["name"], local["state"], local["slots"]) == ("local", "online", 4)

        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            # After a failed assertion: Ctrl-C lets the launcher stop its children; SIGKILL alone orphaned them.
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    reader.join(10)
    log = "".join(output)
    assert "warm stop" in log and "Traceback" not in log
    try:
        requests.get(f"http://127.0.0.1:{port}/", timeout=2)
        raise AssertionError("the server still answers after Ctrl-C")
    except requests.ConnectionError:
        pass
