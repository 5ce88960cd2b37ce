"""Summaries of a list of RequestRecords: latency percentiles, throughput, goodput, and the
routing view (remote-prefill fraction, prefix-cache hit rate), overall and per kind."""

from __future__ import annotations

from collections import Counter

import numpy as np

from loadtest.request import SLO, RequestRecord

PERCENTILES = (50, 90, 99)


def distribution_ms(values_s: list[float]) -> dict[str, float | None]:
    """Mean and p50/p90/p99 in milliseconds (linear interpolation); None when empty."""
    if not values_s:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    ms = np.asarray(values_s, dtype=float) * 1e3
    return {"mean": round(float(ms.mean()), 3),
            **{f"p{p}": round(float(np.percentile(ms, p)), 3) for p in PERCENTILES}}


def latencies(records: list[RequestRecord]) -> dict[str, list[float]]:
    """Per metric, the values (seconds) of the completed requests; ITL pools every gap."""
    ok = [r for r in records if r.ok]
    return {
        "ttft": [r.ttft_s for r in ok if r.ttft_s is not None],
        "tpot": [r.tpot_s for r in ok if r.tpot_s is not None],
        "itl": [gap for r in ok for gap in r.itl_s],
        "e2e": [r.e2e_s for r in ok],
    }


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 4) if den else None


def _routing(records: list[RequestRecord]) -> dict[str, float | int | None]:
    """How requests were served: the fraction prefilled remotely, decode's prefix-cache hit
    rate (prompt tokens decode already held, over all prompt tokens: what cache-aware routing
    raises), prefill's hit rate over the prompts it prefilled, and the KV shipping: bytes, GB/s
    (bytes over transfer time, summed over the remote prefills that report a transfer time) and
    the transfer time per remote prefill. The transfer time runs from decode's call to prefill
    to the last block in decode's cache, so it includes prefill's compute: GB/s is a floor on the
    wire's bandwidth, and what a request sees."""
    ok = [r for r in records if r.ok]
    remote = [r for r in ok if r.remote_prefill]
    timed = [r for r in remote if r.kv_transfer_ms > 0]
    transfer_s = sum(r.kv_transfer_ms for r in timed) / 1e3
    gbps = round(sum(r.kv_bytes_shipped for r in timed) / 1e9 / transfer_s, 6) if timed else None
    return {
        "remote_prefill_fraction": _ratio(len(remote), len(ok)),
        "decode_hit_rate": _ratio(sum(r.decode_cached_tokens for r in ok), sum(r.prompt_tokens for r in ok)),
        "prefill_hit_rate": _ratio(sum(r.prefill_cached_tokens for r in remote), sum(r.prompt_tokens for r in remote)),
        "kv_bytes_shipped": sum(r.kv_bytes_shipped for r in ok),
        "kv_transfer_gbps": gbps,
        "kv_transfer_ms": distribution_ms([r.kv_transfer_ms / 1e3 for r in timed]),
        "kv_transports": dict(sorted(Counter(r.kv_transport for r in remote if r.kv_transport).items())),
    }


def summarize(records: list[RequestRecord], elapsed_s: float, slo: SLO = SLO()) -> dict:
    """Throughputs are over `elapsed_s` (first arrival -> last request done); goodput counts
    requests that meet both SLO bounds, and is None when no SLO is set."""
    if elapsed_s <= 0:
        raise ValueError(f"elapsed_s must be > 0, got {elapsed_s}")
    ok = [r for r in records if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    good = sum(r.meets(slo) for r in ok)
    summary = {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": dict(Counter(r.error for r in records if r.error)),
        "elapsed_s": round(elapsed_s, 3),
        "input_tokens": sum(r.prompt_tokens for r in ok),
        "output_tokens": output_tokens,
        "request_throughput": round(len(ok) / elapsed_s, 4),
        "output_throughput": round(output_tokens / elapsed_s, 3),
        "goodput": round(good / elapsed_s, 4) if slo.is_set else None,
        "slo_attainment": round(good / len(records), 4) if slo.is_set and records else None,
        **{f"{name}_ms": distribution_ms(values) for name, values in latencies(records).items()},
        **_routing(records),
    }
    kinds = sorted({r.kind for r in records})
    summary["by_kind"] = {kind: _kind_summary([r for r in records if r.kind == kind]) for kind in kinds}
    return summary


def _kind_summary(records: list[RequestRecord]) -> dict:
    values = latencies(records)
    return {
        "requests": len(records),
        "completed": sum(r.ok for r in records),
        "ttft_ms": distribution_ms(values["ttft"]),
        "tpot_ms": distribution_ms(values["tpot"]),
        "e2e_ms": distribution_ms(values["e2e"]),
        **_routing(records),
    }


def table_row(summary: dict, label: str | None = None, kinds: tuple[str, ...] = ()) -> dict:
    """One printable row of a rate's summary (milliseconds, rounded; a closed loop's rate reads
    c=CONCURRENCY); `kinds` adds a TTFT p90 column per request kind."""
    def ms(d: dict, p: str) -> float | str:
        return "-" if d[p] is None else round(d[p], 1)

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.0%}"

    row = {"system": label} if label is not None else {}
    row |= {
        "rate": f"c={summary['concurrency']}" if "concurrency" in summary else f"{summary['rate']:g}", "done": summary["completed"], "failed": summary["failed"],
        "req/s": round(summary["request_throughput"], 3),
        "goodput": "-" if summary["goodput"] is None else round(summary["goodput"], 3),
        "out tok/s": round(summary["output_throughput"], 1),
    }
    for metric, ps in (("ttft", ("p50", "p90", "p99")), ("tpot", ("p50", "p90", "p99")),
                       ("itl", ("p50", "p99")), ("e2e", ("p50", "p99"))):
        row |= {f"{metric.upper()} {p}": ms(summary[f"{metric}_ms"], p) for p in ps}
    for kind in kinds:
        row[f"TTFT p90 {kind}"] = ms(summary["by_kind"][kind]["ttft_ms"], "p90") if kind in summary["by_kind"] else "-"
    row |= {"remote": pct(summary["remote_prefill_fraction"]), "decode hits": pct(summary["decode_hit_rate"])}
    # Summaries written before KV transfer times were recorded have neither key.
    gbps, transfer = summary.get("kv_transfer_gbps"), summary.get("kv_transfer_ms") or {"p50": None}
    row |= {"KV GB/s": "-" if gbps is None else float(f"{gbps:.3g}"), "KV ms p50": ms(transfer, "p50")}
    return row


def tokens_before(records: list[RequestRecord], until_s: float) -> float:
    """Output tokens that arrived within `until_s` of the level's start. A record keeps its
    send time (arrival_s), TTFT and the gaps between its token-carrying messages, which gives
    each message's time; its tokens are spread evenly over its messages (one each today)."""
    total = 0.0
    for r in records:
        if r.ttft_s is None or not r.output_tokens:
            continue
        per_message = r.output_tokens / (len(r.itl_s) + 1)
        at = r.arrival_s + r.ttft_s
        total += per_message * (at <= until_s)
        for gap in r.itl_s:
            at += gap
            total += per_message * (at <= until_s)
    return total
