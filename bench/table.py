"""The README's benchmark table, generated from a ``bench/run_all.py`` results file.

    python bench/table.py bench/results.json                 # print the table
    python bench/table.py bench/results.json --write README.md
    python bench/table.py bench/results.json --check README.md  # exit 1 if it differs

The table goes between ``<!-- bench-table:begin -->`` and ``<!-- bench-table:end -->``.
Each row is one figure with the reference it is compared to, measured in the same run
on the same machine (these machines are shared and noisy: the ratio is the figure to
compare across commits, not the absolute time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

BEGIN = "<!-- bench-table:begin -->"
END = "<!-- bench-table:end -->"
Row = tuple[str, str, str, str, str]
"""Benchmark, what is measured, edgefl, the reference in the same run, ratio."""


def _n(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def _x(value: float) -> str:
    return f"{value:.2f}x"


def schemas(r: dict[str, Any]) -> list[Row]:
    t, c = r["device_telemetry_validation"], r["codec_1m_float32"]
    return [
        ("schemas", "telemetry messages validated per s (strict pydantic, size cap)",
         _n(t["decode_message_objects_per_s_median"]),
         f"{_n(t['model_validate_json_objects_per_s_median'])} bare `model_validate_json`",
         _x(t["decode_message_objects_per_s_median"]
            / t["model_validate_json_objects_per_s_median"])),
        ("schemas", "1M-float update decoded (safetensors + envelope), MB/s",
         _n(c["decode_MB_per_s_median"]), f"{_n(c['memcpy_reference_MB_per_s_median'])} memcpy",
         _x(c["decode_MB_per_s_median"] / c["memcpy_reference_MB_per_s_median"])),
    ]


def inference(r: dict[str, Any]) -> list[Row]:
    us = r["median_us_per_call"]
    return [("inference", "agent inference call, digits MLP, µs",
             _n(us["agent_inference_service"], 2),
             f"{_n(us['onnxruntime_direct'], 2)} onnxruntime direct",
             _x(r["ratio_agent_service_over_direct"]))]


def aggregation(r: dict[str, Any]) -> list[Row]:
    ours, ratios = r["ours"], r["ratios"]
    rows = [("aggregation", f"FedAvg of {r['updates']} updates of {r['parameters']:,} "
             "parameters, ms per update", _n(ours["ms_per_update_median"], 2),
             f"{_n(r['fused_torch_add_']['ms_per_update_median'], 2)} fused `torch.add_`",
             _x(ratios["ours_over_fused"]))]
    flower = r.get("flower", {}).get("aggregate")
    if flower:
        less = flower["peak_extra_model_multiple"] / ours["peak_extra_model_multiple"]
        rows.append(("aggregation", "the same, against Flower's `aggregate`, ms per update",
                     _n(ours["ms_per_update_median"], 2),
                     f"{_n(flower['total_ms_per_update'], 2)} Flower {r['flower']['flwr']}",
                     f"{ratios['flower_over_ours']:.2f}x faster"))
        rows.append(("aggregation", "extra memory while aggregating, in models",
                     _n(ours["peak_extra_model_multiple"], 2),
                     f"{_n(flower['peak_extra_model_multiple'], 1)} Flower",
                     f"{less:.0f}x less"))
    return rows


def ingest(r: dict[str, Any]) -> list[Row]:
    m = r["median_messages_per_s"]
    rows = [("ingest", "telemetry stored in SQLite through the cloud, messages/s",
             _n(m["sqlite"]), f"{_n(m['bare'])} bare paho subscriber",
             _x(r["ratio_sqlite_over_bare"]))]
    if r.get("ratio_sqlite_during_fl_over_sqlite") is not None:
        rows.append(("ingest", "the same while a 1M-parameter task trains, messages/s",
                     _n(m["sqlite_during_fl"]), f"{_n(m['sqlite'])} without the task",
                     _x(r["ratio_sqlite_during_fl_over_sqlite"])))
    return rows


def fleet(r: dict[str, Any]) -> list[Row]:
    best = max((x for x in r["results"] if x["sustained"]), key=lambda x: x["agents"])
    return [("fleet", "simulated agents at 1 telemetry/s on one core, all delivered",
             f"{best['agents']:,} ({best['fleet_cpu_percent_of_one_core']:.0f} % of a core, "
             f"{best['rss_mib_per_agent']:.1f} MiB each)",
             f"{best['telemetry_per_s']:,.0f} messages/s offered", "")]


def fl(r: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for key in ("fedavg_alpha0.5", "fedavg_alpha0.1"):
        q = r.get("quality", {}).get(key)
        if q:
            rows.append(("fl", f"FedAvg, 10 devices, Dirichlet alpha {key[-3:]}, accuracy "
                         f"after {r['rounds']} rounds", f"{q['final_accuracy']:.3f}",
                         f"{q['centralized_baseline']:.3f} centralized",
                         _x(q["final_over_baseline"])))
    comp = r.get("compression", {})
    if "fp32" in comp and "topk10_int8" in comp:
        rows.append(("fl", "bytes per update, top-k 10 % + int8",
                     _n(comp["topk10_int8"]["bytes_per_update"]),
                     f"{_n(comp['fp32']['bytes_per_update'])} fp32",
                     _x(comp["topk10_int8"]["bytes_per_update"]
                        / comp["fp32"]["bytes_per_update"])))
    over = r.get("round_overhead")
    if over:
        rows.append(("fl", f"round overhead, {over['devices']} devices, "
                     f"{over['parameters']:,} parameters, s", _n(over["overhead_s_median"], 3),
                     f"{_n(over['slowest_client_s_median'], 3)} slowest client's training",
                     _x(over["overhead_s_median"] / over["slowest_client_s_median"])))
    rob = r.get("robustness", {})
    if rob:
        clean = rob["fedavg/clean"]["final_accuracy"]
        absent = rob["fedavg/absent_2of10"]["final_accuracy"]
        robust = [s for s in ("median", "trimmed_mean", "krum", "multikrum")
                  if f"{s}/sign_flip4_2of10" in rob]
        for attack, what in (("sign_flip4", "sign-flipping"), ("scale10", "scaling by 10")):
            scores = {s: float(rob[f"{s}/{attack}_2of10"]["final_accuracy"]) for s in robust}
            best = max(scores, key=scores.__getitem__)
            value = scores[best]
            rows.append(("fl", f"accuracy with 2 of 10 devices {what}, best robust: {best}",
                         f"{value:.3f}",
                         f"{absent:.3f} FedAvg of the 8 honest devices alone; {clean:.3f} all "
                         f"10 honest; FedAvg attacked "
                         f"{rob[f'fedavg/{attack}_2of10']['final_accuracy']:.3f}",
                         _x(value / absent)))
    priv = r.get("privacy", {})
    if "no_dp" in priv and "central_eps8" in priv:
        rows.append(("fl", "accuracy with central DP at epsilon 8 (delta 1e-5)",
                     f"{priv['central_eps8']['final_accuracy']:.3f}",
                     f"{priv['no_dp']['final_accuracy']:.3f} without DP",
                     _x(priv["central_eps8"]["final_accuracy"]
                        / priv["no_dp"]["final_accuracy"])))
    return rows


def models(r: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    mlp = r["models"]["mlp"]
    for name, label in (("onnx-int8-dynamic", "ONNX int8 (dynamic)"),
                        ("tflite", "TFLite (LiteRT)"), ("torchscript", "TorchScript")):
        m = mlp.get(name)
        if m:
            rows.append(("models", f"digits MLP as {label}: size, p50 latency, accuracy",
                         f"{m['size_bytes']:,} B, {m['latency_ms_p50'] * 1000:.1f} µs, "
                         f"{m['accuracy']:.3f}",
                         f"{mlp['onnx']['size_bytes']:,} B, "
                         f"{mlp['onnx']['latency_ms_p50'] * 1000:.1f} µs, "
                         f"{mlp['onnx']['accuracy']:.3f} ONNX fp32",
                         f"size {m['size_ratio']:.2f}x, p50 {m['p50_ratio']:.2f}x"))
    return rows


def rollout(r: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for f in r["fanout"]:
        mb = f["size_bytes"] / 1e6
        rows.append(("rollout", f"{mb:.0f} MB release to {r['devices']} devices: first chunk "
                     "to all installed (verified, loaded, smoke-tested), s",
                     _n(f["first_chunk_to_all_installed_s_median"], 2),
                     f"{_n(f['reference_s_median'], 3)} {r['devices']} plain subscribers "
                     "receiving the bytes", _x(f["ratio"])))
    rows.append(("rollout", "alert on a canary to rollback published, s",
                 _n(r["abort"]["median_s"], 3), "goal 2 s", ""))
    return rows


def sustained(r: dict[str, Any]) -> list[Row]:
    one = next(x for x in r["runs"] if x["instances"] == 1)
    probe = one["probe"]
    rows: list[Row] = [
        ("sustained", f"{one['devices']:,} devices x {one['rate_per_device_per_s']:g} msg/s x "
         f"{one['seconds']:.0f} s into SQLite: lost / stored twice",
         f"{one['lost']} / {one['stored_twice']} of {one['sent']:,}", "goal 0", ""),
        ("sustained", "publish to stored, p50 / p99 ms",
         f"{probe['publish_to_stored_ms_p50']:.0f} / {probe['publish_to_stored_ms_p99']:.0f}",
         "", ""),
        ("sustained", "cloud memory, start to end, MiB",
         f"{one['rss_mib_start']['cloud-0']:.1f} to {one['rss_mib_end']['cloud-0']:.1f}",
         f"broker {one['rss_mib_start']['broker']:.1f} to {one['rss_mib_end']['broker']:.1f}",
         _x(one["rss_mib_end"]["cloud-0"] / one["rss_mib_start"]["cloud-0"])),
    ]
    scale = r.get("scale_out")
    if scale:
        rows.append(("sustained", "2 cloud instances (shared subscription): CPU per 1,000 "
                     "messages, p99", f"split {scale['split'][0]:,} / {scale['split'][1]:,}, "
                     f"exactly once: {scale['stored_exactly_once']}", "1 instance",
                     f"CPU {scale['cloud_cpu_per_1000_msgs_ratio_2_to_1']:.2f}x, "
                     f"p99 {scale['p99_ratio_2_to_1']:.2f}x"))
    return rows


def _fleet_cpu(secure: dict[str, Any], plain: dict[str, Any]) -> str:
    """The fleet's CPU per round with and without secure aggregation, when measured."""
    if "fleet_cpu_s_per_round" not in secure or "fleet_cpu_s_per_round" not in plain:
        return ""
    return (f"; the fleet's CPU per round {_n(secure['fleet_cpu_s_per_round'], 2)} s "
            f"against {_n(plain['fleet_cpu_s_per_round'], 2)} s")


def secagg(r: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for size, x in sorted(r["by_devices"].items(), key=lambda kv: int(kv[0])):
        cpu = _fleet_cpu(x["secagg"], x["plain"])
        rows.append(("secagg", f"round with secure aggregation, {size} devices, "
                     f"{r['parameters']:,} parameters, s",
                     _n(x["secagg"]["round_s_median"], 2),
                     f"{_n(x['plain']['round_s_median'], 2)} without{cpu}",
                     _x(x["round_time_ratio"])))
        for variant, ratios in x.get("plus", {}).items():
            plus = x[variant]
            cpu = _fleet_cpu(plus, x["plain"])
            rows.append(("secagg", f"round with SecAgg+, threshold {ratios['threshold']:g} "
                         f"(neighbours auto: {ratios['neighbours']} of {int(size) - 1} peers), "
                         f"{size} devices, s",
                         _n(plus["round_s_median"], 2),
                         f"{_n(x['plain']['round_s_median'], 2)} without{cpu}",
                         _x(ratios["round_time_ratio"])))
    return rows


def fl_seeds(r: dict[str, Any]) -> list[Row]:
    """One row per task and strategy: mean and spread over coordinator seeds."""
    rows: list[Row] = []
    seeds = len(r["seeds"])
    for task, t in r["tasks"].items():
        base = t["centralized_baseline"]
        for strategy, s in t["strategies"].items():
            final = s["final_accuracy"]
            reached = [b["round_reaching_95pct_of_baseline"] for b in s["by_seed"]
                       if b["round_reaching_95pct_of_baseline"] is not None]
            when = f", median round {statistics.median(reached):g}" if reached else ""
            rows.append(("fl_seeds", f"{task}, {strategy}, alpha {r['alpha']:g}, "
                         f"{r['rounds']} rounds, {seeds} coordinator seeds: final accuracy "
                         "mean ± sd (min-max); seeds reaching 95 % of centralized (median "
                         "first round)",
                         f"{final['mean']:.3f} ± {final['stdev']:.3f} ({final['min']:.3f}-"
                         f"{final['max']:.3f}); {s['seeds_reaching_95pct']} of {seeds}{when}",
                         f"{base:.3f} centralized", _x(final["mean"] / base)))
    return rows


def fl_robust(r: dict[str, Any]) -> list[Row]:
    """Per attack, the best robust strategy over data seeds against clean and honest-only."""
    rows: list[Row] = []
    runs, seeds = r["runs"], len(r["seeds"])
    clean, honest = runs["fedavg/clean"], runs["fedavg/honest_only"]
    for attack, best in r["best_robust"].items():
        fedavg = runs[f"fedavg/{attack}"]
        rows.append((
            "fl_robust", f"accuracy with {r['attackers']} of {r['devices']} devices {attack}, "
            f"{seeds} data seeds, the best of 4 robust strategies on them: "
            f"{best['strategy']}; gap to all honest, points, mean (min-max)",
            f"{best['mean']:.3f} ± {best['stdev']:.3f}; gap "
            f"{best['gap_to_clean_points']['mean']:.1f} ({best['gap_to_clean_points']['min']:.1f}"
            f" to {best['gap_to_clean_points']['max']:.1f})",
            f"{clean['mean']:.3f} all {r['devices']} honest; {honest['mean']:.3f} the "
            f"{r['devices'] - r['attackers']} honest alone (gap to them "
            f"{best['gap_to_honest_only_points']['mean']:.1f}); FedAvg attacked "
            f"{fedavg['mean']:.3f}", _x(best["mean"] / clean["mean"])))
    return rows


def fl_async(r: dict[str, Any]) -> list[Row]:
    """The heterogeneous fleet race: FedBuff against synchronous FedAvg."""
    p, modes = r["profile"], r["modes"]
    return [("fl_async", f"{r['devices']} devices, {p['slow_fraction']:.0%} "
             f"{p['slow_factor']:g}x slower, {p['intermittent_fraction']:.0%} offline half of "
             f"the time: s to {r['target_accuracy']:.3f} (90 % of centralized), FedBuff, median "
             f"of {modes['async']['runs']} seeds", _n(modes["async"]["median_s"], 1),
             f"{_n(modes['sync']['median_s'], 1)} synchronous FedAvg (deadline "
             f"{r['sync_deadline_s']:g} s)", _x(r["ratio_async_over_sync"]))]


def fl_vs_flower(r: dict[str, Any]) -> list[Row]:
    """edgefl against Flower's simulation on the identical task and split."""
    final = r["final_accuracy"]
    seeds = len(r["seeds"])
    edge, same, own = final["edgefl"], final["flower_same_cohorts"], final["flower_own_sampling"]
    where = f"digits FedAvg, alpha {r['alpha']:g}, {r['rounds']} rounds, {seeds} seeds"
    return [
        ("fl_vs_flower", f"{where}, Flower given edgefl's cohorts: final accuracy mean "
         f"(largest gap in any round {r['same_cohorts_max_gap']:.4f})", f"{edge['mean']:.3f}",
         f"{same['mean']:.3f} Flower {r['flwr']}", _x(edge["mean"] / same["mean"])),
        ("fl_vs_flower", f"{where}, each sampling its own cohorts: final accuracy mean ± sd "
         "(min-max)", f"{edge['mean']:.3f} ± {edge['stdev']:.3f} ({edge['min']:.3f}-"
         f"{edge['max']:.3f})", f"{own['mean']:.3f} ± {own['stdev']:.3f} ({own['min']:.3f}-"
         f"{own['max']:.3f}) Flower", _x(edge["mean"] / own["mean"])),
        ("fl_vs_flower", "update bytes per round (5 devices), median",
         f"{r['bytes_per_round_median']['edgefl']:,.0f}",
         f"{r['bytes_per_round_median']['flower']:,.0f} Flower (ArrayRecord bytes)",
         _x(r["bytes_per_round_median"]["edgefl"] / r["bytes_per_round_median"]["flower"])),
    ]


def fl_scale(r: dict[str, Any]) -> list[Row]:
    """Round time broken down, throughput and coordinator memory at 100 and 300 devices."""
    sizes = [str(s) for s in r["sizes"]]
    first, last = r["by_size"][sizes[0]], r["by_size"][sizes[-1]]
    m, m0 = last["sync"]["median"], first["sync"]["median"]
    parts = "/".join(f"{m[p]:.3f}" for p in ("plan_s", "training_s_max", "upload_s_median",
                                             "aggregation_s", "evaluation_s", "release_s"))
    a, a0 = last["async"], first["async"]
    mem, mem0 = a["memory_mb"], a0["memory_mb"]
    return [
        ("fl_scale", f"{sizes[-1]} devices, {r['parameters']:,} parameters, 10 % per round: "
         "round s, median (plan / slowest training / upload / aggregation / evaluation / "
         "release)", f"{m['round_s']:.3f} ({parts})", f"{m0['round_s']:.3f} at {sizes[0]} "
         "devices", _x(m["round_s"] / m0["round_s"])),
        ("fl_scale", f"{sizes[-1]} devices, FedBuff for {r['async_s']:g} s: updates per s; "
         "coordinator memory start -> end, MB", f"{a['updates_per_s']:.1f}; "
         f"{mem['start']:.0f} -> {mem['end']:.0f}", f"{a0['updates_per_s']:.1f}; "
         f"{mem0['start']:.0f} -> {mem0['end']:.0f} at {sizes[0]} devices",
         _x(a["updates_per_s"] / a0["updates_per_s"])),
    ]


ROWS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "schemas": schemas, "inference": inference, "aggregation": aggregation, "ingest": ingest,
    "fleet": fleet, "fl": fl, "models": models, "rollout": rollout, "sustained": sustained,
    "secagg": secagg,
    "fl_seeds": fl_seeds, "fl_async": fl_async, "fl_vs_flower": fl_vs_flower,
    "fl_scale": fl_scale, "fl_robust": fl_robust,
}
"""The figures each benchmark contributes to the table."""


def render(report: dict[str, Any]) -> str:
    """The table (Markdown), with the machine and commits it was measured on."""
    machine = report["machine"]
    entries = report["benchmarks"]
    commits = sorted({str(e.get("commit", report["commit"]))[:7] for e in entries.values()})
    lines = [
        f"Measured by `bench/run_all.py` ({report['profile']} profile) on {machine['cpus']} "
        f"CPUs, {machine['memory_gib']:g} GiB, Python {machine['python']}, "
        f"{machine['mosquitto']}; commit {', '.join(commits)}; "
        f"results in `bench/results.json`.",
        "",
        "| benchmark | what | edgefl | reference (same run) | ratio |",
        "|---|---|---|---|---|",
    ]
    for name, rows_of in ROWS.items():
        entry = entries.get(name)
        if entry is None or not entry.get("ok"):
            why = "not run" if entry is None else (entry.get("error") or
                                                    f"exit code {entry.get('exit_code')}")
            lines.append(f"| {name} | not measured: {why} | | | |")
            continue
        for row in rows_of(entry["result"]):
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def replace_block(text: str, table: str) -> str:
    """``text`` with the table between the markers replaced.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the markers {BEGIN} and {END} are not in the text")
    return text[:start + len(BEGIN)] + "\n" + table + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, help="Replace the table in this Markdown file")
    group.add_argument("--check", type=Path, help="Exit 1 when this file's table differs")
    options = parser.parse_args(argv)
    table = render(json.loads(options.results.read_text()))
    if options.write is not None:
        options.write.write_text(replace_block(options.write.read_text(), table))
    elif options.check is not None:
        text = options.check.read_text()
        if replace_block(text, table) != text:
            print(f"{options.check}: the benchmark table is not what {options.results} "
                  f"gives: run bench/table.py {options.results} --write {options.check}",
                  file=sys.stderr)
            return 1
    else:
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
