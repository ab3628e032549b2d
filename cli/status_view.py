"""``dbnode status`` as people read it: a table per node, its runs, their
partitions and shard, with rates from two looks ``interval`` seconds apart."""

from __future__ import annotations

from typing import Any


def size(n: float) -> str:
    """``1536`` -> ``1.5 KB``: bytes as people read them."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def _rate(now: float, before: float | None, interval: float) -> str:
    return "-" if before is None or interval <= 0 else f"{max(0.0, now - before) / interval:,.1f}/s"


def _staleness(report: dict[str, Any] | None) -> str:
    """`` staleness mean 2.1 max 7`` (and pushes refused past the bound)."""
    if not report or not report["histogram"]:
        return ""
    pushes = sum(report["histogram"].values())
    text = f"  staleness mean {report['total'] / pushes:.1f} max {report['max']}"
    return text + (f" refused {report['refused']}" if report["refused"] else "")


def _pipeline(p: dict[str, Any], was: dict[str, Any], interval: float) -> str:
    """`` idle 31% stashed 1``: the share of the interval a partition waited
    for its neighbours, and the weight versions it keeps for minibatches in
    flight (pipelined replicas, docs/pipeline.md)."""
    text = ""
    if was and interval > 0 and "idle" in p and "idle" in was:
        text += f"  idle {min(1.0, max(0.0, (p['idle'] - was['idle']) / interval)):.0%}"
    return text + (f"  stashed {p['stashed']}" if p.get("stashed") else "")


def render(first: list[dict[str, Any]], second: list[dict[str, Any]], interval: float) -> str:
    """The table: per node its identity and memory; per run its name, lease
    and shard (size, pushes/s, how stale they were); per partition its step, steps/s, examples/s,
    the share of the time it waited for its neighbours, and bytes/s it sends to each peer.

    Args:
        first: :func:`dbnode.driver.status` answers, the earlier look.
        second: the later look (the figures shown).
        interval: seconds between the two.

    Returns:
        The text, lines joined.
    """
    before = {e["address"]: e for e in first}
    lines = []
    for entry in second:
        if "error" in entry:
            lines.append(f"{entry['address']}  UNREACHABLE  {entry['error']}")
            continue
        node = entry["node"]
        lines.append(
            f"{entry['address']}  {node['name']}  dbnode {node['version']}  pid {node['pid']}  "
            f"threads {node['threads']}/{node['cores']}  memory {size(node['memory'])} of "
            f"{size(node['max_memory'])}  runs {node['runs']}"
        )
        old_runs = before.get(entry["address"], {}).get("runs", {})
        for run_id, run in sorted(entry["runs"].items(), key=lambda kv: kv[1]["name"]):
            old = old_runs.get(run_id, {})
            lines.append(
                f"  run {run['name']} ({run_id})  lease {run['lease_left']:.1f}s  "
                f"shard map epoch {run['epoch']}"
            )
            if run["keys"]:
                lines.append(
                    f"    shard       {run['keys']} tensors  {size(run['bytes'])}  "
                    f"pushes {run['pushes']}  {_rate(run['pushes'], old.get('pushes'), interval)}"
                    + _staleness(run.get("staleness"))
                )
            old_parts = old.get("partitions", {})
            for uid, p in sorted(run["partitions"].items(), key=lambda kv: int(kv[0])):
                was = old_parts.get(uid, {})
                state = "done" if p["done"] else ("FAILED: " + p["error"] if p["error"] else "")
                links = "  ".join(
                    f"-> {peer} " + (
                        f"{size((sent - was['sent'].get(peer, 0)) / interval)}/s" if was else "-"
                    )
                    for peer, sent in sorted(p["sent"].items())
                )  # fmt: skip
                lines.append(
                    f"    partition {uid:>3}  step {p['step']}/{p['steps']}  "
                    f"{_rate(p['step'], was.get('step'), interval)} steps  "
                    f"{_rate(p['examples'], was.get('examples'), interval)} examples"
                    + _pipeline(p, was, interval)
                    + (f"  {links}" if links else "")
                    + (f"  {state}" if state else "")
                )
        if not entry["runs"]:
            lines.append("  (no runs)")
    return "\n".join(lines)
