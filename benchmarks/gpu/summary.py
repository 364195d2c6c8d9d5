"""summary.md of a device call, from its results.jsonl lines alone (benchmarks/gpu/call.py
writes both): the steps, the smoke test, the checks and what they measured, every
configuration of every mode, and the issue's targets, each met or not.

    python -m benchmarks.gpu.summary benchmarks/gpu/results/<date>-<device>/results.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GiB = 2**30

# (mode, what, test on the mode's lines) -> the targets a call is measured against.
NF4_GIB, INT8_GIB = 12.0, 20.0
WITHIN = 0.03  # selection and after-prune speed, relative to plain peft
PLAN_WITHIN = 0.10  # the planner against the reserved peak
COMPILED_OVER_PLAIN = 1.2  # compiled / fused (c) over eager plain peft on the same K


def render(lines: list[dict], steps: list[dict], standin: bool) -> str:
    env = next((x for x in lines if x.get("kind") == "env"), {})
    device = env.get("gpu") or ("CPU stand-in" if standin else "unknown")
    used = sum(s["seconds"] for s in steps)
    out = [f"# Device call: {device}", ""]
    if standin:
        out += [
            "CPU stand-in (WLORA_GPU_STANDIN=1): the steps and files of a device call; no number means anything.",
            "",
        ]
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "cuda", "transformers", "peft", "bitsandbytes") if k in env)
    if versions:
        out += [versions, ""]
    out += _steps(steps, used)
    not_run = [s["name"] for s in steps if s["outcome"].startswith("not run")]
    if not_run:
        command = "    bash benchmarks/gpu/run.sh env smoke " + " ".join(not_run)
        out += ["", "Not run (the budget ended): a second call runs them:", "", command]
    out += _smoke(lines)
    out += _checks(lines)
    out += _configurations(lines)
    out += _targets(lines)
    return "\n".join(out) + "\n"


def _steps(steps: list[dict], used: float) -> list[str]:
    rows = ["## Steps", "", "| step | outcome | seconds |", "|---|---|---|"]
    rows += [f"| {s['name']} | {s['outcome']} | {s['seconds']:.0f} |" for s in steps]
    return [*rows, "", f"{used:.0f} s in all."]


def _smoke(lines: list[dict]) -> list[str]:
    smoke = [x for x in lines if x.get("kind") == "smoke"]
    if not smoke:
        return []
    rows = ["", "## Smoke test", "", "| item | ok | what |", "|---|---|---|"]
    for x in smoke:
        what = x.get("error") or ", ".join(
            f"{k} {_num(v)}" for k, v in x.items() if k not in ("kind", "name", "ok", "seconds")
        )
        rows.append(f"| {x['name']} | {'yes' if x['ok'] else '**no**'} | {what} |")
    return rows


def _checks(lines: list[dict]) -> list[str]:
    checks = [x for x in lines if x.get("kind") == "check"]
    measured = [x for x in lines if x.get("kind") == "measured"]
    rows = []
    if checks:
        rows += [
            "",
            "## Checks (tests/test_gpu.py)",
            "",
            "| check | outcome | seconds | message |",
            "|---|---|---|---|",
        ]
        for x in checks:
            outcome = x["outcome"] if x["outcome"] == "passed" else f"**{x['outcome']}**"
            rows.append(f"| {x['name']} | {outcome} | {x['seconds']:.1f} | {x.get('message', '')[:200]} |")
    if measured:
        rows += ["", "What they measured:", ""]
        for x in measured:
            values = {k: v for k, v in x.items() if k not in ("kind", "check")}
            rows.append(f"- {x['check']}: {_short(values)}")
    return rows


def _configurations(lines: list[dict]) -> list[str]:
    configs = [x for x in lines if x.get("kind") == "configuration"]
    if not configs:
        return []
    rows = [
        "",
        "## Modes (benchmarks/compare.py)",
        "",
        "| step | config | adapters | tokens/s per GPU | spread | vs (a) | MFU | peak GiB | reserved GiB | "
        "planned GiB | planned / reserved |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in configs:
        if "error" in x:
            rows.append(f"| {x['step']} | ({x['config']}) | failed: {x['error'].splitlines()[0][:150]} |" + " |" * 8)
            continue
        base = _find(configs, _mode(x), "a")
        vs_a = x["tokens_per_s"] / base["tokens_per_s"] if base else None
        held = _held_peak(x)
        rows.append(
            f"| {x['step']} | ({x['config']}) | {x['adapters']} | {x['tokens_per_s_per_gpu']:,.0f} | "
            f"{x['spread']:.1%} | {_x(vs_a)} | {_pct(_mfu(x, lines))} | {x['peak_bytes'] / GiB:.3g} | "
            f"{_gib(x.get('reserved_peak_bytes'))} | {_gib(x.get('planned_peak_bytes'))} | "
            f"{_x(x['planned_peak_bytes'] / held if held and x.get('planned_peak_bytes') else None)} |"
        )
    scopes = {x["scope"] for x in configs if "scope" in x}
    if "one rank, compute only" in scopes:
        rows += ["", "Modes at world size 8 ran rank 0 alone (fake process group): one rank, compute only."]
    return rows


def _targets(lines: list[dict]) -> list[str]:
    configs = [x for x in lines if x.get("kind") == "configuration" and "error" not in x]
    checks: list[tuple[str, str, bool | None]] = []  # (target, measured, met)

    def at(mode: str, which: str) -> dict | None:
        return _find(configs, mode, which)

    a, b, c, d = (at("8b", w) for w in "abcd")
    if a and b:
        over = a["tokens_per_s"] / b["tokens_per_s"] - 1
        checks.append(("8b: selection (b) within 3% of plain peft on all n (a)", f"{over:+.1%}", over <= WITHIN))
    if c and d:
        gap = c["tokens_per_s"] / d["tokens_per_s"] - 1
        checks.append(("8b: after the prune event (c) within 3% of plain peft on the same K (d)", f"{gap:+.1%}",
                       gap >= -WITHIN))  # fmt: skip
    if c and c.get("prune_layout_seconds") is not None:
        checks.append(("8b: the layout change at the prune event", f"{c['prune_layout_seconds']:.3f} s", None))
    for step, limit in (
        ("1b-nf4", NF4_GIB),
        ("70b-nf4-ws8", NF4_GIB),
        ("1b-int8", INT8_GIB),
        ("70b-int8-ws8", INT8_GIB),
    ):
        x = at(step, "c")
        if x:
            held = _held_peak(x) / GiB
            checks.append((f"{step}: per-rank peak after the prune event <= {limit:g} GiB", f"{held:.2f} GiB",
                           held <= limit))  # fmt: skip
    for x in configs:
        if "+" in _mode(x) and x["config"] == "c" and d:
            ratio = x["tokens_per_s"] / d["tokens_per_s"]
            checks.append((f"{x['step']}: (c) >= 1.2x eager plain peft on the same K (8b's d)", f"{ratio:.2f}x",
                           ratio >= COMPILED_OVER_PLAIN))  # fmt: skip
    worst = max(
        (abs(x["planned_peak_bytes"] / _held_peak(x) - 1), x["step"], x["config"])
        for x in configs
        if x.get("planned_peak_bytes") and _held_peak(x)
    ) if configs else None  # fmt: skip
    if worst:
        what = "reserved" if any(x.get("reserved_peak_bytes") for x in configs) else "counted"
        checks.append((f"the planner within 10% of the {what} peak, every configuration",
                       f"worst {worst[0]:.1%} ({worst[1]} ({worst[2]}))", worst[0] <= PLAN_WITHIN))  # fmt: skip
    if not checks:
        return []
    rows = ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    rows += [f"| {t} | {m} | {'-' if ok is None else ('yes' if ok else '**no**')} |" for t, m, ok in checks]
    return rows


def _find(configs: list[dict], mode: str, which: str) -> dict | None:
    """Configuration ``which`` of mode ``mode`` (whichever step ran it: "8b" or "8b:ac")."""
    return next((x for x in configs if _mode(x) == mode and x["config"] == which and "error" not in x), None)


def _mode(x: dict) -> str:
    return x.get("mode") or x["step"].partition(":")[0]


def _held_peak(x: dict) -> int:
    """The peak a rank must hold: the allocator's reserved peak on a GPU (out-of-memory
    happens there), else the counted one."""
    return x.get("reserved_peak_bytes") or x["peak_bytes"]


def _mfu(x: dict, lines: list[dict]) -> float | None:
    peak = next((y["tflops"] for y in lines if y.get("name") == "matmul_peak" and y.get("ok")), None)
    return x["flops_per_token"] * x["tokens_per_s_per_gpu"] / (peak * 1e12) if peak else None


def _num(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _short(values: dict) -> str:
    text = json.dumps(values, default=str)
    for_float = json.loads(text, parse_float=lambda s: float(f"{float(s):.4g}"))
    text = json.dumps(for_float)
    return text if len(text) <= 400 else text[:400] + " ..."


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def _gib(v: int | None) -> str:
    return "-" if not v else f"{v / GiB:.3g}"


def main(argv: list[str] | None = None) -> int:
    path = Path((argv or sys.argv[1:])[0])
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    steps = [{"name": x["name"], "outcome": x["outcome"], "seconds": x["seconds"]} for x in lines
             if x.get("kind") == "step"]  # fmt: skip
    standin = any(x.get("kind") == "env" and x.get("standin") for x in lines)
    print(render(lines, steps, standin))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
