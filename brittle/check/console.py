"""The text the command prints: one table per model and a side-by-side summary."""

from __future__ import annotations

from typing import Any

from brittle.calibrate.jsonfloat import load_float
from brittle.calibrate.report import percent

__all__ = [
    "ADAPTIVE_NAMES",
    "model_table",
    "side_by_side",
    "timings_text",
    "fmt",
    "flag_text",
    "robust_accuracy_text",
    "per_class_text",
]

# How the console and the HTML page name the attacks of ``brittle.attacks.adaptive``.
ADAPTIVE_NAMES = {"pgd": "PGD", "adaptive_pgd": "adaptive PGD", "cw": "Carlini-Wagner L2"}


def fmt(value: Any, spec: str = ".3f") -> str:
    """``value`` formatted with ``spec``, ``-`` for ``None`` (NaN in a ``report.json``).

    Examples:
        >>> from brittle.check.console import fmt
        >>> fmt(0.12345), fmt(None), fmt(0.5, ".0%"), fmt("Infinity", ".4g")
        ('0.123', '-', '50%', 'inf')

    """
    if value is None:
        return "-"
    if isinstance(value, str):  # an infinity in a report.json
        value = load_float(value)
    return format(value, spec)


def flag_text(payload: dict[str, Any]) -> str:
    """The flag's rates with exact intervals, and which samples they come from.

    Examples:
        >>> from brittle.check.console import flag_text
        >>> text = flag_text({"threshold": 0.25, "tpr": 0.95, "tpr_ci": [0.83, 0.99],
        ...     "fpr": 0.1, "fpr_ci": [0.05, 0.17], "n_calibration": 140, "n_choice": 60,
        ...     "target_tpr": 0.9})
        >>> import textwrap
        >>> print(textwrap.fill(text, 88))
        score <= 0.25: TPR 95.0% [83.0%, 99.0%], FPR 10.0% [5.0%, 17.0%] on the 140
        calibration samples (exact 95% intervals; the score was chosen on 60 other samples);
        guarantee: expected TPR on new exchangeable samples >= 90%
    """
    low, high = payload.get("tpr_ci") or (None, None)
    f_low, f_high = payload.get("fpr_ci") or (None, None)
    n_cal, n_choice = payload.get("n_calibration"), payload.get("n_choice") or 0
    # A saved monitor evaluated as saved: its threshold came from elsewhere, these
    # samples calibrated nothing, and they test its fit's guarantee rather than carry one.
    evaluated = bool((payload.get("settings") or {}).get("evaluated"))
    kind = "evaluated" if evaluated else "calibration"
    where = f"the {n_cal} {kind} samples" if n_cal is not None else f"the {kind} samples"
    source = f"; the score was chosen on {n_choice} other samples" if n_choice else ""
    text = (
        f"score <= {payload['threshold']:.4g}: TPR {fmt(payload['tpr'], '.1%')} "
        f"[{fmt(low, '.1%')}, {fmt(high, '.1%')}], FPR {fmt(payload['fpr'], '.1%')} "
        f"[{fmt(f_low, '.1%')}, {fmt(f_high, '.1%')}] on {where} (exact 95% intervals"
        f"{source})"
    )
    if evaluated:
        return f"{text}; nothing recalibrated"
    return (
        f"{text}; guarantee: expected TPR on new exchangeable samples >= "
        f"{percent(payload['target_tpr'])}"
    )


def _interval(values: Any) -> str:
    low, high = values or (None, None)
    return f"[{fmt(low, '.1%')}, {fmt(high, '.1%')}]"


def robust_accuracy_text(ra: dict[str, Any]) -> str:
    """The robust-accuracy estimate, judged on attacked samples outside its subset.

    Examples:
        >>> from brittle.check.console import robust_accuracy_text
        >>> text = robust_accuracy_text({"quantity": "robust accuracy", "estimate": 0.6,
        ...     "n_estimated": 1000, "subset_size": 50, "attacked_subset": 0.62,
        ...     "attacked_subset_ci": [0.47, 0.75], "n_held_out": 150,
        ...     "estimate_held_out": 0.58, "attacked_held_out": 0.6,
        ...     "attacked_held_out_ci": [0.52, 0.68]})
        >>> import textwrap
        >>> print(textwrap.fill(text, 88))
        robust accuracy at eps: estimate 60.0% on all 1000 samples from 50 attacked (62.0%
        [47.0%, 75.0%] on them); on 150 other attacked samples: estimated 58.0%, attacked
        60.0% [52.0%, 68.0%]
    """
    text = (
        f"{ra['quantity']} at eps: estimate {fmt(ra['estimate'], '.1%')} on all "
        f"{ra['n_estimated']} samples from {ra['subset_size']} attacked "
        f"({fmt(ra['attacked_subset'], '.1%')} {_interval(ra.get('attacked_subset_ci'))} on them)"
    )
    if not ra.get("n_held_out"):
        return text + "; no attacked sample outside the subset to judge it on"
    return text + (
        f"; on {ra['n_held_out']} other attacked samples: estimated "
        f"{fmt(ra['estimate_held_out'], '.1%')}, attacked {fmt(ra['attacked_held_out'], '.1%')} "
        f"{_interval(ra.get('attacked_held_out_ci'))}"
    )


def per_class_text(pc: dict[str, Any]) -> str:
    """Per-class robustness: a bias only when the chi-square test finds one.

    Examples:
        >>> from brittle.check.console import per_class_text
        >>> row = {"class": 3, "nonrobust_by_margin": 0.4, "nonrobust_ci": [0.28, 0.54],
        ...     "nonrobust_by_flag": 0.42, "tau": 0.61}
        >>> text = per_class_text({"by": "label", "classes": [row], "most_brittle_class": 3,
        ...     "spread": 0.2, "p_value": 0.31, "significant": False, "level": 0.05})
        >>> import textwrap
        >>> print(textwrap.fill(text, 88))
        per class (label): no significant difference in the non-robust share (chi-square
        p=0.31, spread 20.0%)
    """
    p_value = fmt(pc.get("p_value"), ".2g")
    if not pc.get("significant"):
        return (
            f"per class ({pc['by']}): no significant difference in the non-robust share "
            f"(chi-square p={p_value}, spread {fmt(pc['spread'], '.1%')})"
        )
    worst = next(r for r in pc["classes"] if r["class"] == pc["most_brittle_class"])
    return (
        f"per class ({pc['by']}): robustness bias (chi-square p={p_value}); most brittle "
        f"class {worst['class']}: {fmt(worst['nonrobust_by_margin'], '.1%')} "
        f"{_interval(worst.get('nonrobust_ci'))} by margin, "
        f"{fmt(worst['nonrobust_by_flag'], '.1%')} flagged, tau {fmt(worst['tau'], '.2f')}"
    )


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
        f"{'FPR@' + percent(payload['target_tpr']):>9}{'threshold':>11}",
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
        f"  flag = {flag_text(payload)}",
    ]
    lines.append(f"  {robust_accuracy_text(payload['robust_accuracy_estimate'])}")
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
    lines.append(f"  {per_class_text(payload['per_class'])}")
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
        f"FPR@{percent(payloads[0]['target_tpr'])}TPR (chosen)",
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
