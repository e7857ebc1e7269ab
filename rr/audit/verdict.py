"""The audit's gates, pure: recovery under relearning, membership-inference gaps, the worst probe family and the
utility kept of rr's model, each a named check with its numbers (the verdict at the top of the report)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rr.tracking.registry import utility_ratio


@dataclass(frozen=True)
class AuditCheck:
    name: str
    passed: bool
    line: str


def recovery(relearned: float, unlearned: float, base: float) -> float | None:
    """(s_relearned − s_unlearned) / (s_base − s_unlearned): the share of the forgotten score relearning brings
    back (1: all of it). None when the model forgot nothing on these items (s_base ≤ s_unlearned)."""
    if base <= unlearned:
        return None
    return (relearned - unlearned) / (base - unlearned)


def counted_probe_families(base_probes: dict | None, min_base_hits: int) -> list[str]:
    """The probe families where the base model shows the skill (≥ min_base_hits passed): only there can a low
    score of the unlearned model mean it forgot. Every family counts when the base model was not probed."""
    if base_probes is None:
        return []
    return [f for f, hits in base_probes["hits"].items() if hits >= min_base_hits]


def audit_checks(result: dict, gates, gate_step: int, counted_families: list[str],
                 base_utility: float | None = None) -> list[AuditCheck]:
    """The checks of rr's model (`result`: its audit part: relearn, membership, probes, utility) against `gates`
    as applied (AuditGates.applied); `gate_step`: the relearning checkpoint the recovery gate reads
    (AuditConfig.gate_step()); the probe gate reads `counted_families` only; the utility gate compares rr's
    utility score with `base_utility`: without it, a model that lost everything passes every attack."""
    checks = []
    if gates.max_relearn_recovery is not None and "relearn" in result:
        step = str(gate_step)
        value = result["relearn"]["recovery"].get(step)
        if value is None:
            checks.append(AuditCheck("relearn_recovery", False, f"relearning after {step} updates: rr's model scores "
                                     "no lower than the base model on the relearn evaluation items, so nothing was "
                                     "forgotten there to recover: FAIL"))
        else:
            ok = value <= gates.max_relearn_recovery
            checks.append(AuditCheck("relearn_recovery", ok, f"relearning after {step} updates recovers {value:.2f} of "
                                     f"the forgotten forget score {'≤' if ok else '>'} {gates.max_relearn_recovery:g}: "
                                     f"{'pass' if ok else 'FAIL'}"))
    if gates.max_auc_gap is not None and "membership" in result:
        for attack, value in result["membership"]["auc"].items():
            gap = abs(value - 0.5)
            ok = gap <= gates.max_auc_gap
            checks.append(AuditCheck(f"membership_{attack}", ok, f"membership inference ({attack}): |AUC − 0.5| = "
                                     f"{gap:.3f} {'≤' if ok else '>'} {gates.max_auc_gap:g}: {'pass' if ok else 'FAIL'}"))
    limit = gates.max_probe_forget_score
    if limit is not None and "probes" in result:
        rates = {f: r for f, r in result["probes"]["rates"].items() if f in counted_families}
        if not rates:
            checks.append(AuditCheck("worst_probe", False, "no probe family counted (the base model passed too few "
                                     "of every family's items), so the probes show nothing: FAIL"))
        else:
            family, rate = max(rates.items(), key=lambda kv: kv[1])
            ok = rate <= limit
            checks.append(AuditCheck("worst_probe", ok, f"worst counted probe family {family}: forget score {rate:.3f} "
                                     f"{'≤' if ok else '>'} {limit:g}: {'pass' if ok else 'FAIL'}"))
    ratio_limit = gates.min_utility_ratio
    utility = (result.get("utility") or {}).get("utility_score")
    if ratio_limit is not None and utility is not None and base_utility is not None:
        ratio = utility_ratio(utility, base_utility)
        ok = ratio >= ratio_limit
        checks.append(AuditCheck("utility_kept", ok, f"utility kept: rr's utility score {utility:.4f} = {ratio:.3f} × "
                                 f"the base model's {base_utility:.4f} {'≥' if ok else '<'} {ratio_limit:g}: "
                                 f"{'pass' if ok else 'FAIL'}"))
    return checks


def verdict(checks: list[AuditCheck]) -> dict:
    return {"passed": bool(checks) and all(c.passed for c in checks), "checks": [asdict(c) for c in checks]}


def verdict_tags(result: dict) -> dict:
    """The registry tags of a verdict (read by tracking.gates.require_audit)."""
    from rr.tracking.registry import AUDIT_FAILED_GATES, AUDIT_PASSED

    failed = [c["name"] for c in result["verdict"]["checks"] if not c["passed"]]
    tags = {AUDIT_PASSED: "true" if result["verdict"]["passed"] else "false",
            AUDIT_FAILED_GATES: ", ".join(failed) or "none"}
    rr = result["models"].get("rr", {})
    for step, value in rr.get("relearn", {}).get("recovery", {}).items():
        tags[f"audit.relearn_recovery_step{step}"] = "n/a" if value is None else f"{value:.4f}"
    if "membership" in rr:
        tags["audit.membership_max_auc_gap"] = f"{max(abs(v - 0.5) for v in rr['membership']['auc'].values()):.4f}"
    counted = {f: r for f, r in rr.get("probes", {}).get("rates", {}).items()
               if f in result.get("counted_probe_families", [])}
    if counted:
        family, rate = max(counted.items(), key=lambda kv: kv[1])
        tags.update({"audit.worst_probe_family": family, "audit.worst_probe_forget_score": f"{rate:.4f}"})
    return tags
