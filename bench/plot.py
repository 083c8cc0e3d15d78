"""The run's PNG (matplotlib, the optional `bench` extra): token arrivals and added-latency distributions."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench.metrics import ChatResult


def write_png(path: Path, chats: Sequence[ChatResult], networks: Sequence[str]) -> bool:
    """One row per network: a median chat's token arrivals per configuration, and the CDF of added latency.

    False (and no file) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sequential = [c for c in chats if c.case == "sequential" and c.arrived_ms]
    fig, axes = plt.subplots(len(networks), 2, figsize=(14, 4.8 * len(networks)), squeeze=False)
    for row, network in enumerate(networks):
        here = [c for c in sequential if c.network in (network, "any")]
        configs = list(dict.fromkeys(c.config for c in here))
        timeline, spread = axes[row]
        for config in configs:
            mine = sorted((c for c in here if c.config == config), key=lambda c: c.total_ms)
            median = mine[len(mine) // 2]
            timeline.step([t / 1000 for t in median.arrived_ms], range(1, len(median.arrived_ms) + 1),
                          where="post", label=f"{config} ({median.total_ms / 1000:.2f} s)")
            added = sorted(a for c in mine for a in c.added_ms)
            spread.plot(added, [(i + 1) / len(added) for i in range(len(added))], label=config)
        timeline.set(title=f"Token arrivals at the client, median chat per configuration ({network})",
                     xlabel="seconds since the request", ylabel="tokens received")
        spread.set(title=f"Added latency per token: arrival minus Ollama's emission ({network})",
                   xlabel="ms (log scale)", ylabel="fraction of tokens")
        spread.set_xscale("symlog", linthresh=1)
        for ax in (timeline, spread):
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
