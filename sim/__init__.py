"""A fake Ollama server for `make run`, end-to-end tests and the latency benchmark.

It speaks Ollama's documented `/api/chat`, `/api/generate`, `/api/tags` and
`/api/version` (and OpenAI's `/v1/models` and `/v1/chat/completions`, see
sim/openai.py). A request's `options` may override timing (`sim_tokens`,
`sim_first_token_ms`, `sim_interval_ms`, `sim_jitter_ms`, `sim_seed`) and inject
faults (`sim_error_after`, `sim_drop_after`, `sim_status`); Ollama's own
`num_predict` and `seed` are honoured. Simulator-only: `GET /sim/log` lists what
was emitted, `POST /sim/reset` forgets it, answers carry `X-Sim-Request`, and a
string `options.sim_tag` is copied into the request's `start` record, so a
client that reaches the simulator through other processes can find its records.
"""
