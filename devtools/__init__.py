"""Dev-only tools, never needed on a GPU host: the process harness (tests, bench, `make run`) and `make run`."""
