"""The simulator's model routes: `/api/show`, `/api/ps`, `/api/embed` and `/api/embeddings` (see sim/features.py).

Mixed into `SimulatorHandler`, like the OpenAI routes.  A model counts as
loaded (`/api/ps`) from its first request, for Ollama's default keep-alive.
"""
from __future__ import annotations

import time

from protocol.models import canonical_model
from sim import features
from sim.plan import SimError
from sim.wire import dumps, model_entry, rfc3339

KEEP_ALIVE_SECONDS = 300  # Ollama's default: a model stays loaded 5 minutes after its last request


class ModelRoutes:
    """Handler methods for Ollama's model and embedding routes."""

    def _known_model(self, body: dict, key: str = "model") -> str:
        model = body.get(key) or body.get("name")
        if not isinstance(model, str) or not model:
            raise SimError(400, "model is required")
        if canonical_model(model) not in self.server.models:
            raise SimError(404, f"model '{model}' not found")
        return canonical_model(model)

    def _show(self) -> None:
        name = self._known_model(self._json_body())
        entry = model_entry(name, self.server.modified_at)
        self._send(200, dumps({
            "modelfile": f"# Modelfile of the simulator\nFROM {name}\n", "parameters": "temperature 0.8",
            "template": "{{ .Prompt }}", "details": entry["details"], "modified_at": entry["modified_at"],
            "model_info": {"general.architecture": "sim", "general.parameter_count": 7_000_000_000,
                           "sim.context_length": 8192, "sim.embedding_length": features.EMBED_DIMENSIONS},
            "capabilities": features.capabilities(name)}))

    def _ps(self) -> None:
        now = time.time()
        loaded = []
        for name in self.server.loaded():
            entry = model_entry(name, self.server.modified_at)
            loaded.append({**{k: entry[k] for k in ("name", "model", "size", "digest", "details")},
                           "expires_at": rfc3339(int((now + KEEP_ALIVE_SECONDS) * 1e9)),
                           "size_vram": entry["size"], "context_length": 8192})
        self._send(200, dumps({"models": loaded}))

    def _embed(self) -> None:
        body = self._json_body()
        name = self._known_model(body)
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(inputs, list) or not all(isinstance(text, str) for text in inputs):
            raise SimError(400, "invalid input type")
        dimensions = body.get("dimensions")
        started = time.perf_counter_ns()
        self.server.ready_at(name, time.monotonic())
        vectors = [features.embedding(name, text, dimensions) for text in inputs]
        self._send(200, dumps({"model": body["model"], "embeddings": vectors,
                               "total_duration": time.perf_counter_ns() - started, "load_duration": 0,
                               "prompt_eval_count": sum(len(text.split()) for text in inputs)}))

    def _embeddings(self) -> None:
        body = self._json_body()
        name = self._known_model(body)
        prompt = body.get("prompt") or ""
        self.server.ready_at(name, time.monotonic())
        self._send(200, dumps({"embedding": features.embedding(name, prompt) if prompt else []}))
