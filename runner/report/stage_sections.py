"""The report's section for each stage's own report file (data stats, training metrics, the export and quantize gates,
smoke-serve): the fields a person looks for, formatted by name; any other field the stage adds follows them through
runner.report.formatting.generic, so nothing is hidden and nothing is shown twice."""

from __future__ import annotations

from collections import Counter
from typing import Any

from runner.report.formatting import generic, label, metric, num, pct, plural, seconds, size, text
from runner.report.render import Block, Callout, Cell, Table

Rows = list[list[str | Cell]]


def _kv(rows: Rows) -> Table:
    return Table(["figure", "value"], rows, compact=True)


def _passed(value: Any) -> Cell:
    return Cell("passed", "ok") if value else Cell("FAILED", "bad")


def data(stats: dict[str, Any]) -> list[Block]:
    rows: Rows = []
    split = stats.get("rows") or {}
    if split:
        rows.append(["rows", ", ".join(f"{num(n)} {name}" for name, n in split.items())])
    if "max_length" in stats:
        rows.append(["longest tokenized example allowed", f"{num(stats['max_length'])} tokens (data.max_length)"])
    if lengths := stats.get("token_length"):
        rows.append(["tokens per example", ", ".join(f"{k} {num(v)}" for k, v in lengths.items())])
    if "truncated_rows" in stats:
        rows.append(["truncated at max_length", f"{num(stats['truncated_rows'])} rows ({pct(stats.get('truncated_share'))})"])
    if "majority_share" in stats:
        rows.append(["most common label's share", pct(stats["majority_share"])])
    if "rows_without_answer_tokens" in stats:
        rows.append(["rows with no answer token left to learn", num(stats["rows_without_answer_tokens"])])
    known = {"rows", "max_length", "token_length", "truncated_rows", "truncated_share", "majority_share",
             "rows_without_answer_tokens", "label_balance", "warnings"}
    more, tables = generic(stats, known, "data")
    blocks: list[Block] = [_kv(rows + more)]
    if balance := stats.get("label_balance"):
        splits = list(balance)
        names = list(dict.fromkeys(name for counts in balance.values() for name in counts))
        blocks.append(Table(["label", *splits], [[name, *(num(balance[s].get(name, 0)) for s in splits)] for name in names],
                            caption="rows per label"))
    if stats.get("warnings"):
        blocks.append(Callout("data warnings", "\n".join(f"- {w}" for w in stats["warnings"]), "warn"))
    return blocks + tables


def train(metrics: dict[str, Any]) -> list[Block]:
    m = metrics
    methods = {"full": "full fine-tune (every weight)", "lora": "LoRA adapters", "qlora": "QLoRA adapters over a quantized base"}
    rows: Rows = [["method", methods.get(str(m.get("method")), text(m.get("method")))]]
    if "steps" in m:
        rows.append(["optimizer steps", f"{num(m['steps'])} ({plural(m.get('epochs'), 'epoch')})"])
    if "batch_size" in m:
        rows.append(["batch", f"{num(m['batch_size'])} per device × {num(m.get('gradient_accumulation', 1))} accumulated × "
                              f"{plural(m.get('world_size', 1), 'process', 'processes')} = "
                              f"{num(m.get('effective_batch_size'))}"])
    if m.get("trainable_params") and m.get("total_params"):
        rows.append(["parameters trained", f"{num(m['trainable_params'])} of {num(m['total_params'])} "
                                           f"({pct(m['trainable_params'] / m['total_params'], 2)})"])
    for name in ("loss", "accuracy", "perplexity", "f1"):
        if f"eval_{name}" in m:
            score = metric if name in ("accuracy", "f1") else num
            before = m.get(f"eval_{name}_before")
            rows.append([f"eval {name} (before → after)",
                         score(m[f"eval_{name}"]) if before is None else f"{score(before)} → {score(m[f'eval_{name}'])}"])
    if "train_loss" in m:
        rows.append(["train loss (mean over the run, last logged)", f"{num(m['train_loss'])}, {num(m.get('train_loss_last'))}"])
    if "train_runtime_s" in m:
        rows.append(["time", f"{seconds(m['train_runtime_s'])} training, {seconds(m.get('wall_time_s'))} in all"])
    if m.get("oom_retries"):
        rows.append([Cell("out-of-memory retries", "bad"), num(m["oom_retries"])])
    if m.get("resumed_from_step") is not None:
        rows.append(["resumed from checkpoint at step", num(m["resumed_from_step"])])
    for key in ("adapter_bytes", "model_bytes"):
        if key in m:
            rows.append([label(key.removesuffix("_bytes")) + " size", size(m[key])])
    known = {"method", "steps", "epochs", "batch_size", "gradient_accumulation", "world_size", "effective_batch_size",
             "trainable_params", "total_params", "train_loss", "train_loss_last", "train_runtime_s", "wall_time_s",
             "oom_retries", "resumed_from_step", "adapter_bytes", "model_bytes"}
    known |= {f"eval_{n}{s}" for n in ("loss", "accuracy", "perplexity", "f1") for s in ("", "_before")}
    more, tables = generic(m, known, "train")
    return [_kv(rows + more), *tables]


def _comparison(c: dict[str, Any], reference: str, candidate: str) -> Rows:
    rows: Rows = []
    if "metric" in c:
        rows.append([f"eval {c['metric']} on {num(c.get('samples'))} rows",
                     f"{metric(c.get('metric_reference'), c['metric'])} ({reference}) → "
                     f"{metric(c.get('metric_candidate'), c['metric'])} ({candidate})"])
    if "max_abs_diff" in c:
        bound = f", tolerance {num(c['tolerance'])}" if "tolerance" in c else ""
        rows.append(["largest output difference", f"{num(c['max_abs_diff'])} (output scale {num(c.get('reference_scale'))}"
                                                  f"{bound})"])
    if "top1_agreement" in c:
        rows.append(["same top-1 prediction", pct(c["top1_agreement"], 2)])
    return rows


def _greedy(rows: list[dict[str, Any]]) -> str:
    same = sum(bool(r.get("identical")) for r in rows)
    return f"{same} of {len(rows)} prompts give identical greedy tokens"


def export(report: dict[str, Any]) -> list[Block]:
    r = report
    how = ", ".join(str(r[k]) for k in ("format", "exporter", "precision", "execution_provider") if r.get(k))
    rows: Rows = [["exported as", how]] if how else []
    if "size_bytes" in r:
        rows.append(["size", size(r["size_bytes"])])
    if merge := r.get("merge"):
        check = (f": largest difference {num(merge.get('merge_max_abs_diff'))} (tolerance {num(merge.get('tolerance'))}), "
                 f"adapter's own effect {num(merge.get('adapter_effect_max_abs'))}" if "merge_max_abs_diff" in merge else "")
        rows.append(["adapter merge", ("merged" if merge.get("merged") else "not merged") + check])
    if r.get("merged_dir"):
        rows.append(["merged checkpoint",
                     f"{r['merged_dir']}/ ({size(r.get('merged_size_bytes'))}, {r.get('merged_dtype', '')})"])
    validation = r.get("validation") or {}
    rows += _comparison(validation, "PyTorch", "ONNX")
    if "metric_diff" in validation:
        rows.append(["metric difference", num(validation["metric_diff"])])
    if validation.get("greedy"):
        rows.append(["greedy decoding", _greedy(validation["greedy"])])
    if "passed" in validation:
        rows.append(["gate", _passed(validation["passed"])])
    known = {"format", "exporter", "precision", "execution_provider", "size_bytes", "merge", "merged_dir",
             "merged_size_bytes", "merged_dtype", "validation", "task"}
    more, tables = generic(r, known, "export")
    vmore, vtables = generic(validation, {"metric", "samples", "metric_reference", "metric_candidate", "max_abs_diff",
                                          "tolerance", "reference_scale", "top1_agreement", "metric_diff", "greedy",
                                          "passed"}, "validation")
    return [_kv(rows + more + [[f"validation {k}", v] for k, v in vmore]), *tables, *vtables]


def quantize(report: dict[str, Any]) -> list[Block]:
    r = report
    settings = {k: r[k] for k in ("bits", "algorithm", "block_size", "accuracy_level", "weights") if r.get(k) is not None}
    rows: Rows = [["method", str(r.get("method")) + (f" ({text(settings)})" if settings else "")]]
    if "size_after_bytes" in r:
        rows.append(["size", f"{size(r.get('size_before_bytes'))} → {size(r['size_after_bytes'])} "
                             f"({pct(r.get('size_ratio'), 0)} of the export)"])
    comparison = r.get("comparison") or {}
    rows += _comparison(comparison, "export", "quantized")
    if "metric_drop" in r:  # metric_before/after repeat the comparison's reference and candidate
        if r.get("metric") == "accuracy":
            rows.append(["accuracy drop", f"{num(r['metric_drop'])} ({num(100 * r['metric_drop'], 3)} points)"])
        else:  # a loss: the quantize stage gates its relative increase
            rows.append([f"{r.get('metric', 'loss')} increase", pct(r["metric_drop"], 2)])
    if greedy := r.get("greedy"):
        rows.append(["greedy decoding", f"{num(greedy.get('agreed'))} of {num(greedy.get('prompts'))} prompts agree "
                                        f"({pct(greedy.get('agreement'))})"])
    if "passed" in r:
        rows.append(["gate", _passed(r["passed"])])
    known = {"method", "bits", "algorithm", "block_size", "accuracy_level", "weights", "size_before_bytes",
             "size_after_bytes", "size_ratio", "comparison", "greedy", "passed", "task", "metric", "metric_before",
             "metric_after", "metric_drop"}
    more, tables = generic(r, known, "quantize")
    cmore, ctables = generic(comparison, {"metric", "samples", "metric_reference", "metric_candidate", "max_abs_diff",
                                          "tolerance", "reference_scale", "top1_agreement", "metric_drop"}, "comparison")
    return [_kv(rows + more + [[f"comparison {k}", v] for k, v in cmore]), *tables, *ctables]


def serve(report: dict[str, Any]) -> list[Block]:
    r = report
    blocks: list[Block] = []  # its failures are the step's error, shown at the top of the report
    rows: Rows = [["served artifact", f"{'quantized' if r.get('quantized') else 'ONNX export'}, sha256 "
                                      f"{str(r.get('sha256', ''))[:16]}…"]]
    if server := r.get("server"):
        rows.append(["server", f"ready in {seconds(server.get('startup_s'))}, stopped with exit code "
                               f"{num(server.get('exit_code'))}; log {server.get('log', '')}"])
    if "auth_required" in r:
        rows.append(["API key required", _yes(r["auth_required"])])
    if latency := r.get("latency"):
        rows.append(["latency, one request at a time",
                     f"p50 {num(latency.get('p50_ms'))} ms, p95 {num(latency.get('p95_ms'))} ms, "
                     f"mean {num(latency.get('mean_ms'))} ms over {num(latency.get('requests'))} requests"])
        rows.append(["throughput", f"{num(latency.get('throughput_rps'))} requests/s at concurrency "
                                   f"{num(latency.get('throughput_concurrency'))}; {num(latency.get('errors'))} errors"])
    if concurrency := r.get("concurrency"):
        rows.append(["concurrent requests", f"{num(concurrency.get('requests'))} identical at once: "
                     f"{'identical answers' if concurrency.get('identical') else 'answers DIFFER'}; mixed: "
                     f"{'match offline' if concurrency.get('mixed_match_offline') else 'DIFFER from offline'} "
                     f"(largest score difference {num(concurrency.get('mixed_max_score_diff'))})"])
    if inv := r.get("invariance"):
        rows.append(["batch invariance", f"{num(inv.get('texts'))} texts alone vs among {num(inv.get('concurrent_others'))} "
                     f"concurrent others, {plural(inv.get('rounds'), 'round')}: {plural(inv.get('label_flips'), 'label flip')}, "
                     f"largest score drift {num(inv.get('max_score_drift'))} (allowed {num(inv.get('max_allowed_drift'))})"])
    if served := r.get("served_eval"):
        rows.append(["served accuracy", f"{metric(served.get('accuracy'))} on {num(served.get('samples'))} test rows"])
    if same := r.get("served_vs_offline"):
        rows.append(["served accuracy vs offline", f"served {metric(same.get('served'))}, in-process "
                     f"{metric(same.get('offline_in_process'))}, recorded {metric(same.get('recorded'))} in "
                     f"{same.get('recorded_in', '')} ({num(same.get('samples'))} rows): "
                     + ("equal" if same.get("passed") else "NOT EQUAL")])
    if bad := r.get("bad_inputs"):
        statuses = Counter(b.get("status") for b in bad)
        wrong = [b["name"] for b in bad if not 400 <= int(b.get("status") or 0) < 500]
        rows.append(["bad requests", f"{len(bad) - len(wrong)} of {len(bad)} answered 4xx ("
                     + ", ".join(f"{s} ×{n}" for s, n in sorted(statuses.items())) + ")"
                     + (f"; not 4xx: {', '.join(wrong)}" if wrong else "")])
    if "metrics_ok" in r:
        rows.append(["/metrics exposes request counters", _yes(r["metrics_ok"])])
    if "passed" in r:
        rows.append(["gate", _passed(r["passed"])])
    known = {"artifact", "task", "sha256", "quantized", "failures", "server", "auth_required", "latency", "concurrency",
             "served_eval", "bad_inputs", "metrics_ok", "passed", "probes", "invariance", "served_vs_offline"}
    more, tables = generic(r, known, "serve")
    blocks.append(_kv(rows + more))
    if probes := r.get("probes"):
        blocks.append(Table(["probe", "answer", "as expected", "same as offline"], [
            [str(p.get("input", "")), str(p.get("answer", p.get("status", ""))),
             _passed(p.get("passed")) if p.get("passed") else Cell(f"no: {p.get('problem') or 'failed'}", "bad"),
             _yes(p.get("matches_offline"))] for p in probes], caption="probes"))
    return blocks + tables


def _yes(value: Any) -> Cell:
    return Cell("yes", "ok") if value else Cell("no", "bad")


def other(details: dict[str, Any]) -> list[Block]:
    """A stage this module has no formatter for: its figures, readably."""
    rows, tables = generic(details)
    return ([_kv(rows)] if rows else []) + tables


SECTIONS = {"data": data, "train": train, "export": export, "quantize": quantize, "serve": serve}
