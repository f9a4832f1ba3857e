"""The text the command prints: one table per model and a side-by-side summary."""

from __future__ import annotations

from typing import Any

__all__ = ["ADAPTIVE_NAMES", "model_table", "side_by_side", "timings_text", "fmt"]

# How the console and the HTML page name the attacks of ``brittle.attacks.adaptive``.
ADAPTIVE_NAMES = {"pgd": "PGD", "adaptive_pgd": "adaptive PGD", "cw": "Carlini-Wagner L2"}


def fmt(value: Any, spec: str = ".3f") -> str:
    """``value`` formatted with ``spec``, ``-`` for ``None``.

    Examples:
        >>> from brittle.check.console import fmt
        >>> fmt(0.12345), fmt(None), fmt(0.5, ".0%")
        ('0.123', '-', '50%')

    """
    if value is None:
        return "-"
    return format(value, spec)


def _row(name: str, m: dict[str, Any], threshold: Any, mark: str) -> str:
    lo, hi = m["tau_ci"]
    ci = f"[{fmt(lo, '.2f')}, {fmt(hi, '.2f')}]"
    return (
        f"  {name:<10}{fmt(m['tau']):>7} {ci:<14}{fmt(m['auroc']):>7}{fmt(m['aupr']):>7}"
        f"{fmt(m['fpr_at_tpr']):>9}{fmt(threshold, '.4g'):>11}{mark}"
    )


def model_table(payload: dict[str, Any]) -> str:
    """Format the readable report of one model from its ``report.json`` payload."""
    acc = fmt(payload["accuracy"], ".1%")
    lines = [
        f"== {payload['title']}",
        f"  n={payload['n']} attacked of {payload['n_data']}, {payload['norm']} eps="
        f"{payload['eps']:.4g}, accuracy {acc}, non-robust {payload['nonrobust_fraction']:.1%}, "
        f"no adversarial found {payload['censored']}",
        "",
        f"  {'score':<10}{'tau':>7} {'95% CI':<14}{'AUROC':>7}{'AUPR':>7}"
        f"{'FPR@' + format(payload['target_tpr'], '.0%'):>9}{'threshold':>11}",
    ]
    for name, m in payload["metrics"].items():
        mark = "  <- chosen" if name == payload["chosen"] else ""
        lines.append(_row(name, m, payload["score_thresholds"].get(name), mark))
    lines.append("  baselines")
    for name, m in payload["baselines"].items():
        lines.append(_row(name, m, m.get("threshold"), ""))
    lines += [
        "",
        f"  chosen: {payload['chosen']} ({payload['reason']})",
        f"  flag = score <= {payload['threshold']:.4g}: TPR {fmt(payload['tpr'], '.1%')}, "
        f"FPR {fmt(payload['fpr'], '.1%')} on the calibration samples "
        f"(target TPR {payload['target_tpr']:.0%})",
    ]
    ra = payload["robust_accuracy_estimate"]
    lines.append(
        f"  {ra['quantity']} at eps: estimate {fmt(ra['estimate'], '.1%')} on all "
        f"{ra['n_estimated']} samples from {ra['subset_size']} attacked "
        f"({fmt(ra['attacked_subset'], '.1%')} on that subset; on all {ra['n_attacked']} "
        f"attacked: {fmt(ra['attacked_all'], '.1%')}, "
        f"estimated {fmt(ra['estimate_on_attacked'], '.1%')})"
    )
    adv = payload["adversarial"]
    if "skipped" in adv:
        lines.append(f"  adversarial examples: {adv['skipped']}")
    else:
        parts = [
            f"{name.upper()} {fmt(adv[name]['flagged_of_successful'], '.1%')} of "
            f"{adv[name]['n_successful']} successful"
            for name in ("pgd", "fgsm")
            if name in adv
        ]
        lines.append(
            f"  adversarial examples at eps flagged: {', '.join(parts)} "
            f"(clean inputs flagged {fmt(adv['clean_flagged'], '.1%')})"
        )
    lines.extend(_adaptive_lines(payload.get("adaptive")))
    pc = payload["per_class"]
    worst = next(r for r in pc["classes"] if r["class"] == pc["most_brittle_class"])
    lines.append(
        f"  per class ({pc['by']}): non-robust share spread {fmt(pc['spread'], '.1%')}; most "
        f"brittle class {worst['class']}: {fmt(worst['nonrobust_by_margin'], '.1%')} by margin, "
        f"{fmt(worst['nonrobust_by_flag'], '.1%')} flagged, tau {fmt(worst['tau'], '.2f')}"
    )
    gate = payload.get("gate")
    if gate:
        verdict = "passed" if gate["passed"] else "FAILED"
        lines.append(
            f"  gate {verdict}: {gate['score']} tau {fmt(gate['tau'])} "
            f"vs --min-tau {gate['min_tau']}"
        )
    lines.append("  timings: " + timings_text(payload))
    return "\n".join(lines)


def timings_text(payload: dict[str, Any]) -> str:
    """``fit 23.2s (attack 18.0s, metrics 5.2s), analyses 9.8s, ...``: where the time went."""
    parts = []
    for name, seconds in payload["check_timings"].items():
        text = f"{name} {seconds:.1f}s"
        if name == "fit" and payload["timings"]:
            inner = ", ".join(f"{k} {v:.1f}s" for k, v in payload["timings"].items())
            text += f" ({inner})"
        parts.append(text)
    return ", ".join(parts)


def side_by_side(payloads: list[dict[str, Any]]) -> str:
    """Format a compact comparison table, one column per model (the demo's summary)."""
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, values: list[str]) -> None:
        rows.append((label, values))

    add("accuracy", [fmt(p["accuracy"], ".1%") for p in payloads])
    add("non-robust at eps", [fmt(p["nonrobust_fraction"], ".1%") for p in payloads])
    add("chosen score", [p["chosen"] for p in payloads])
    add("tau (chosen)", [fmt(p["metrics"][p["chosen"]]["tau"]) for p in payloads])
    add("AUROC (chosen)", [fmt(p["metrics"][p["chosen"]]["auroc"]) for p in payloads])
    add(
        f"FPR@{payloads[0]['target_tpr']:.0%}TPR (chosen)",
        [fmt(p["metrics"][p["chosen"]]["fpr_at_tpr"]) for p in payloads],
    )
    add("best baseline AUROC", [_best_baseline(p) for p in payloads])
    add(
        "robust acc. attacked",
        [fmt(p["robust_accuracy_estimate"]["attacked_all"], ".1%") for p in payloads],
    )
    add(
        "robust acc. estimate",
        [fmt(p["robust_accuracy_estimate"]["estimate"], ".1%") for p in payloads],
    )
    for attack in ("pgd", "fgsm"):
        add(
            f"{attack.upper()} examples flagged",
            [
                fmt(p["adversarial"].get(attack, {}).get("flagged_of_successful"), ".1%")
                for p in payloads
            ],
        )
    for attack in ("adaptive_pgd", "cw"):
        add(
            f"{ADAPTIVE_NAMES[attack]} flagged",
            [
                fmt(
                    (p.get("adaptive") or {})
                    .get("attacks", {})
                    .get(attack, {})
                    .get("flagged_of_successful"),
                    ".1%",
                )
                for p in payloads
            ],
        )
    add("time", [f"{sum(p['check_timings'].values()):.0f}s" for p in payloads])
    width = max(len(label) for label, _ in rows) + 2
    header = " " * width + "".join(f"{p['name']:>16}" for p in payloads)
    body = [f"{label:<{width}}" + "".join(f"{v:>16}" for v in values) for label, values in rows]
    return "\n".join([header, *body])


def _best_baseline(payload: dict[str, Any]) -> str:
    scored = [(m["auroc"], k) for k, m in payload["baselines"].items() if m["auroc"] is not None]
    if not scored:
        return "-"
    auroc, name = max(scored)
    return f"{auroc:.3f} {name}"


def _adaptive_lines(adaptive: dict[str, Any] | None) -> list[str]:
    """One line on what an attacker who knows the monitor achieves."""
    if not adaptive:
        return []
    if "skipped" in adaptive:
        return [f"  adaptive attacks: {adaptive['skipped']}"]
    parts = [
        f"{ADAPTIVE_NAMES[name]} {fmt(outcome['flagged_of_successful'], '.1%')} of "
        f"{outcome['n_successful']} successful"
        for name, outcome in adaptive["attacks"].items()
        if name in ADAPTIVE_NAMES
    ]
    return [f"  attacks that know the monitor, flagged: {', '.join(parts)} (docs/security.md)"]
