"""rr audit: the membership scores on hand-checked cases, the model handle's token statistics, relearning from
checkpoints of one run, the audit gate at promotion, and the code task's audit material."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from rr.audit.membership import auc, loss_score, mink_score, minkpp_score, roc_curve, zlib_score
from rr.audit.verdict import audit_checks, counted_probe_families, recovery, verdict, verdict_tags
from rr.config import AuditConfig, AuditGates, LoraTrainingConfig, PromotionGates
from rr.core.tokens import TokenStats
from rr.errors import RRError
from rr.tracking.registry import check_gates

pytestmark = pytest.mark.usefixtures("one_thread")

STATS = TokenStats("abc", (-1.0, -2.0, -3.0, -4.0, -5.0), (-1.0,) * 5, (4.0,) * 5)


def test_membership_scores_by_hand():
    assert loss_score(STATS) == -3.0
    assert zlib_score(STATS) == pytest.approx(-3.0 / len(zlib.compress(b"abc")))
    assert mink_score(STATS, 0.2) == -5.0            # the lowest 1 of 5
    assert mink_score(STATS, 0.4) == -4.5            # the lowest 2: (-5 - 4) / 2
    assert mink_score(STATS, 1.0) == -3.0            # all of them: LOSS
    # z = (log p − μ) / σ with μ = −1, σ = 2: 0, −0.5, −1, −1.5, −2; the lowest two average −1.75
    assert minkpp_score(STATS, 0.4) == pytest.approx(-1.75)
    # a one-hot position (σ = 0) stays finite
    assert math.isfinite(minkpp_score(TokenStats("x", (0.0,), (0.0,), (0.0,)), 1.0))
    with pytest.raises(ValueError, match="answer token"):
        loss_score(TokenStats("", (), (), ()))
    with pytest.raises(ValueError, match="k must be"):
        mink_score(STATS, 0.0)


def test_auc_and_roc_by_hand():
    assert auc([3, 2], [1, 0]) == 1.0                # every member above every non-member
    assert auc([0], [1]) == 0.0
    assert auc([1, 1], [1]) == 0.5                   # ties count half
    assert auc([2, 0], [1]) == 0.5
    assert auc([3, 1], [2, 0]) == 0.75               # 3 pairs of 4 ordered right
    assert roc_curve([2], [1]) == [(0.0, 0.0), (0.0, 1.0), (1.0, 1.0)]
    with pytest.raises(ValueError):
        auc([], [1])


def test_a_model_that_knows_its_members_is_caught_and_one_that_does_not_is_not():
    familiar = [TokenStats("m", (-0.1, -0.2), (-1.0, -1.0), (1.0, 1.0)) for _ in range(3)]
    strange = [TokenStats("n", (-3.0, -2.5), (-1.0, -1.0), (1.0, 1.0)) for _ in range(3)]
    for score in (loss_score, zlib_score, lambda s: mink_score(s, 0.5), lambda s: minkpp_score(s, 0.5)):
        assert auc([score(s) for s in familiar], [score(s) for s in strange]) == 1.0
        assert auc([score(s) for s in familiar], [score(s) for s in familiar]) == 0.5


def test_token_stats_of_the_hf_generator_match_teacher_forcing():
    from rr.evaluation.memorization import teacher_forced_scores
    from rr.generation.hf import HFGenerator
    from rr.tasks.base import Example
    from support import char_tokenizer, tiny_model

    tokenizer, model = char_tokenizer(), tiny_model()
    generator = HFGenerator(model, tokenizer, batch_size=4)
    pairs = [("hi", "abc"), ("yo", "z"), ("a longer question", "a longer answer")]
    stats = generator.token_stats([p for p, _ in pairs], [a for _, a in pairs])
    reference = teacher_forced_scores(model, tokenizer, [Example(p, a) for p, a in pairs])["answer_probability"]
    assert [s.answer_probability for s in stats] == pytest.approx(reference, rel=1e-5)
    for stat, (_, answer) in zip(stats, pairs):
        assert stat.text == answer
        assert len(stat.logprobs) == len(stat.means) == len(stat.variances) == len(answer) + 2  # + </s> and "\n"
        assert all(m <= 0 for m in stat.means) and all(v >= 0 for v in stat.variances)
        # an untrained 128-token model is near uniform: μ ≈ −log 128, tiny variance
        assert all(abs(m + math.log(128)) < 0.5 for m in stat.means)
    # batching changes nothing: one at a time gives the same numbers
    alone = generator.token_stats([pairs[2][0]], [pairs[2][1]])[0]
    assert alone.logprobs == pytest.approx(stats[2].logprobs, abs=1e-5)
    with pytest.raises(ValueError, match="prompts but"):
        generator.token_stats(["a"], [])


def test_relearning_from_checkpoints_of_one_run_brings_back_what_negation_removed(learned_state, tmp_path):
    """The attack of `rr audit` on a tiny model: negate a forget PEM, then fine-tune on *other* items of the same
    skill; the forgotten items come back, and the checkpoints are one run (the last is the returned PEM)."""
    from rr.release.ledger import ComposedModel, Pem
    from rr.release.pem import response_loss, train_pem
    from rr.tasks.base import Example
    from support import FORGET, char_tokenizer, learned_model

    tokenizer, model = char_tokenizer(), learned_model(learned_state)
    lora = LoraTrainingConfig(rank=8, alpha=16, learning_rate=5e-2, batch_size=4, epochs=30, max_length=64)
    base_loss = response_loss(model, tokenizer, FORGET)
    forget = train_pem(model, tokenizer, FORGET, lora, "f", "forget", tmp_path / "f", seed=0)
    composed = ComposedModel(model)
    composed.append(forget, -5.0)
    negated_loss = response_loss(model, tokenizer, FORGET)
    assert negated_loss > base_loss + 3.0  # negation removed the skill
    relearn_split = [Example(f"what is {i} plus {i}?", f"it is {2 * i}.") for i in range(4, 8)]  # disjoint items
    relearn_lora = lora.model_copy(update={"learning_rate": 1e-2, "epochs": 1})
    final = train_pem(model, tokenizer, relearn_split, relearn_lora, "r", "relearn", tmp_path / "r", seed=0,
                      checkpoints=(2, 10, 30))
    losses = {}
    for step in (2, 10, 30):
        checkpoint = Pem.load(tmp_path / "r" / f"step-{step}")
        composed.append(checkpoint, 1.0)
        losses[step] = response_loss(model, tokenizer, FORGET)
        composed.detach()
        composed.append(forget, -5.0)
    # scores are −loss: the recovered share of what negation removed, rising with the budget (measured: about
    # 0.05, 0.48 and 0.58 after 2, 10 and 30 updates)
    recovered = {s: recovery(-loss, -negated_loss, -base_loss) for s, loss in losses.items()}
    assert recovered[2] < recovered[10] < recovered[30] and recovered[30] > 0.4, recovered
    # the last checkpoint is the PEM train_pem returns (one run, stopped there; epochs were ignored)
    last = Pem.load(tmp_path / "r" / "step-30")
    for name, (a, b) in final.tensors.items():
        assert torch.equal(a, last.tensors[name][0]) and torch.equal(b, last.tensors[name][1])
    with pytest.raises(RRError, match="checkpoints"):
        train_pem(model, tokenizer, relearn_split, relearn_lora, "r", "relearn", tmp_path / "r2", seed=0,
                  checkpoints=(0,))


def _result(recovery_at_20, aucs, probe_rates):
    return {"relearn": {"scores": {}, "recovery": {"20": recovery_at_20}},
            "membership": {"auc": aucs}, "probes": {"rates": probe_rates}}


FAMILIES = ["role-play", "continuation"]


def test_the_audit_checks_name_each_gate_with_its_numbers():
    gates = AuditGates().applied(PromotionGates())  # the probe gate reads max_forget_score 0.1
    good = audit_checks(_result(0.2, {"loss": 0.55, "mink": 0.45}, {"role-play": 0.05}), gates, 20, FAMILIES)
    assert verdict(good)["passed"] and len(good) == 4
    bad = audit_checks(_result(0.8, {"loss": 0.75, "mink": 0.5}, {"role-play": 0.3, "continuation": 0.0}), gates, 20, FAMILIES)
    lines = {c.name: c for c in bad}
    assert not lines["relearn_recovery"].passed and "0.80" in lines["relearn_recovery"].line
    assert not lines["membership_loss"].passed and "0.250 > 0.1" in lines["membership_loss"].line
    assert lines["membership_mink"].passed
    assert not lines["worst_probe"].passed and "role-play" in lines["worst_probe"].line
    # nothing forgotten on the relearn items: recovery is undefined, and that is a failure, not a pass
    assert recovery(0.3, 0.3, 0.3) is None
    undefined = audit_checks(_result(None, {}, {}), gates, 20, FAMILIES)
    assert not undefined[0].passed and "nothing was forgotten" in undefined[0].line
    # the probe gate falls back to tracking.gates.max_forget_score unless the audit sets its own
    assert gates.max_probe_forget_score == 0.1 and gates.min_utility_ratio == 0.9
    own = AuditGates(max_probe_forget_score=0.2).applied(PromotionGates())
    assert audit_checks(_result(0.1, {}, {"x": 0.15}), own, 20, ["x"])[-1].passed
    assert not verdict([])["passed"]  # no check ran: no passing verdict
    # only families where the base model shows the skill count: there a low score can mean forgetting
    base = {"hits": {"role-play": 4, "continuation": 0}}
    assert counted_probe_families(base, 3) == ["role-play"]
    only = audit_checks(_result(0.1, {}, {"role-play": 0.0, "continuation": 0.5}), gates, 20, ["role-play"])
    assert only[-1].passed and "role-play" in only[-1].line
    none = audit_checks(_result(0.1, {}, {"continuation": 0.0}), gates, 20, [])
    assert not none[-1].passed and "no probe family counted" in none[-1].line
    # a model that lost everything passes every attack: the utility gate (the release's unless the audit sets
    # its own) says so, and is left out where no utility was measured
    broken = {**_result(0.0, {"loss": 0.5}, {"role-play": 0.0}), "utility": {"utility_score": 0.004}}
    kept = audit_checks(broken, gates, 20, FAMILIES, 0.675)
    assert [c.name for c in kept] == ["relearn_recovery", "membership_loss", "worst_probe", "utility_kept"]
    assert not verdict(kept)["passed"] and "0.006 × the base model's 0.6750 < 0.9" in kept[-1].line
    assert audit_checks(broken, AuditGates(min_utility_ratio=0.005).applied(PromotionGates()), 20, FAMILIES,
                        0.675)[-1].passed
    unchecked = AuditGates().applied(PromotionGates(min_utility_ratio=None))
    assert audit_checks(broken, unchecked, 20, FAMILIES, 0.675)[-1].name == "worst_probe"
    assert audit_checks(_result(0.0, {}, {}), gates, 20, FAMILIES, 0.675)[-1].name == "worst_probe"


def test_promotion_can_require_a_passing_audit():
    base = {"rr.forget_score": "0.0", "rr.utility_score": "0.5", "rr.base_utility_score": "0.5"}
    gates = {"max_forget_score": 0.1, "min_utility_ratio": 0.9, "require_audit": True}
    never = check_gates(base, gates)
    assert not never.passed and "no audit" in never.lines[-1]
    audit = {"verdict": {"passed": False, "checks": [{"name": "relearn_recovery", "passed": False, "line": ""}]},
             "counted_probe_families": ["role-play"],
             "models": {"rr": _result(0.8, {"loss": 0.5}, {"role-play": 0.0})}}
    failed = check_gates({**base, **verdict_tags(audit)}, gates)
    assert not failed.passed and "relearn_recovery" in failed.lines[-1]
    audit["verdict"] = {"passed": True, "checks": []}
    assert check_gates({**base, **verdict_tags(audit)}, gates).passed
    assert check_gates(base, {**gates, "require_audit": False}).passed  # off by default


def test_the_code_task_audit_material_is_disjoint_from_every_split():
    from rr.tasks.code import CodeTask, CodeTaskConfig
    from rr.tasks.code_audit import PROBE_FAMILIES, CodeAudit

    task = CodeTask(CodeTaskConfig())
    material = CodeAudit(task, n_relearn=20, n_non_members=25)
    used = {p.id for split in ("reveal", "validation", "test") for p in task.problems(split)}
    relearn = {p.id for p in material.relearn_problems}
    non_members = {p.id for p in material.non_member_problems}
    assert len(relearn) == 20 and len(non_members) == 25
    assert not (relearn & used) and not (non_members & used) and not (relearn & non_members)
    assert all(e.response.startswith("```python\n") for e in material.relearn_examples())
    assert len(material.non_member_contexts()) == 25  # Reveal asks each context once
    items = material.forget_items(["mbpp", "casual"], 7)
    assert [i.form for i in items] == ["mbpp", "casual"] * 3 + ["mbpp"]
    probes = material.probe_items(list(PROBE_FAMILIES), 4)
    assert len(probes) == 4 * len(PROBE_FAMILIES)
    assert {p.problem.id for p in probes} <= {p.id for p in task.problems("test")}
    shots = next(p for p in probes if p.family == "few-shot-priming").prompt()
    assert len(shots.messages) == 7  # three solved relearn problems, then the request
    story = next(p for p in probes if p.family == "inside-story")
    reference = story.problem.reference_solution
    assert story.program(f"Sam smiled.\n```python\n{reference}\n```\nThe end.").strip() == reference.strip()
    half = next(p for p in probes if p.family == "continuation")
    assert half.prompt().is_completion and half.program("    return 1\n").startswith("def ")
    with pytest.raises(RRError, match="no split uses"):
        CodeAudit(task, n_relearn=40, n_non_members=40)
    with pytest.raises(RRError, match="unknown"):
        material.probe_items(["jailbreak"], 1)


def test_the_entity_task_audit_material_uses_set_aside_facts_and_grades_as_the_task():
    from rr.core.prompt import as_request
    from rr.tasks.base import SPLITS
    from rr.tasks.entity import EntityTask, EntityTaskConfig
    from rr.tasks.entity_audit import PROBE_FAMILIES, STORY_TOKENS, EntityAudit

    task = EntityTask(EntityTaskConfig(cosine_similarity=False))
    material = EntityAudit(task, n_relearn=20, n_non_members=25)
    forget = set(task.forget_people)
    # 7 forget people × 2 relearn facts (20 asked: all there are); non-members: 7 × 2 facts × 2 Reveal forms, 25 kept
    assert len(material.relearn_examples()) == 14 and len(material.non_member_contexts()) == 25
    assert {f.person for f in material.relearn_facts} == forget
    asked = {str(c.prompt) for split in SPLITS for c in task.contexts(split)}
    asked |= {str(item.request()) for split in SPLITS for item in task.form_items(task.neighbours, split)}
    asked |= {e.prompt for e in task.retain_examples()} | {e.prompt for e in task.external_forget_examples()}
    relearn = {e.prompt for e in material.relearn_examples()}
    non_members = {str(c.prompt) for c in material.non_member_contexts()}
    assert not relearn & asked and not non_members & asked and not relearn & non_members
    assert len({c.id for c in material.non_member_contexts()}) == 25
    items = material.forget_items(["question", "fill-blank"], 5)
    assert [i.form for i in items] == ["question", "fill-blank"] * 2 + ["question"]
    assert all(i.fact.split == "test" and i.fact.person in forget for i in items)
    probes = material.probe_items(list(PROBE_FAMILIES), 4)
    assert len(probes) == 4 * len(PROBE_FAMILIES) and all(p.fact.split == "test" for p in probes)
    primed = next(p for p in probes if p.family == "few-shot-priming")
    assert len(primed.prompt().messages) == 5  # the person's two relearn facts, answered, then the question
    assert all(primed.fact.person in turn.content for turn in primed.prompt().messages)
    half = next(p for p in probes if p.family == "continuation")
    assert half.prompt().is_completion and half.prompt().completion.endswith(half.fact.statement.split(half.fact.answer)[0].rstrip())

    class Knows:
        """Answers each prompt with the statement of the fact it asks for; records each call's budget."""
        def __init__(self):
            self.calls = []
            self.facts = {str(as_request(p.prompt())): p.fact for p in probes + items}
            self.facts.update({f.question: f for f in task.audit_facts})

        def generate(self, prompts, params, seeds=None):
            self.calls.append(params.max_new_tokens)
            return [[f"Well, {self.facts[str(prompt)].statement}"] for prompt in prompts]

    model = Knows()
    assert material.hits(model, probes + items) == [True] * (len(probes) + len(items))
    assert sorted(model.calls) == sorted([task.config.max_new_tokens, STORY_TOKENS])  # the story: a budget of its own
    # the set-aside checks: the model answers every set-aside fact; one forget record states a relearn fact
    relearn_fact = material.relearn_facts[0]
    checks = material.set_aside_checks(model, ["I don't know.", f"Also, {relearn_fact.statement}"])
    assert checks["known_by_model"] == {"relearn": {"known": 14, "asked": 14}, "non-member": {"known": 14, "asked": 14}}
    assert checks["forget_records_stating"] == {"relearn": 1, "non-member": 0} and checks["forget_records"] == 2
    refuses = type("Refuses", (), {"generate": lambda self, prompts, params, seeds=None: [["I can't say."]] * len(prompts)})
    assert material.hits(refuses(), probes) == [False] * len(probes)
    with pytest.raises(RRError, match="unknown"):
        material.probe_items(["jailbreak"], 1)


def test_the_audit_config_refuses_a_gate_step_that_is_no_checkpoint():
    with pytest.raises(ValueError, match="relearn_gate_step"):
        AuditConfig(relearn_steps=[5, 10], gates=AuditGates(relearn_gate_step=20))
    assert AuditConfig().gate_step() == 20  # the middle of 5, 20, 50
    assert AuditConfig(relearn_steps=[50, 5]).gate_step() == 50 and AuditConfig(relearn_steps=[3]).gate_step() == 3


def _audit() -> dict:
    """An audit.json as run_audit writes it, with made-up numbers."""
    def model(scores, recovery_values, auc_value, rates, forms):
        return {"ledger": [], "relearn": {"scores": scores, "recovery": recovery_values},
                "membership": {"members": 4, "non_members": 4,
                               "auc": {"loss": auc_value, "zlib": 0.5, "mink": auc_value, "minkpp": 0.52},
                               "roc": {a: [(0.0, 0.0), (0.5, 0.7), (1.0, 1.0)] for a in ("loss", "zlib", "mink", "minkpp")}},
                "probes": {"rates": rates}, "forms": forms,
                "utility": {"utility_score": 0.3, "general_check": 0.28, "perplexity": 19.0}}
    families = ["role-play", "continuation"]
    return {"task": "code", "relearn_steps": [5, 20], "relearn_eval_items": 40, "relearn_examples": 20,
            "counted_forms": ["mbpp"], "relearn_forms": ["mbpp"], "probe_families": families,
            "counted_probe_families": ["role-play"], "min_probe_base_hits": 3,
            "probe_summaries": {"role-play": "a role-play preamble", "continuation": "a half-written answer"},
            "membership": {"members": 4, "non_members": 4, "mink_k": 0.2}, "gates": {},
            "verdict": {"passed": False, "checks": [{"name": "relearn_recovery", "passed": False,
                                                     "line": "relearning after 20 updates recovers 0.70 > 0.5: FAIL"}]},
            "models": {"base": model({"0": 0.3, "5": 0.3, "20": 0.35}, {}, 0.5, {"role-play": 0.3, "continuation": 0.4},
                                     {"mbpp": 0.3}),
                       "rr": model({"0": 0.0, "5": 0.1, "20": 0.21}, {"5": 0.33, "20": 0.7}, 0.3,
                                   {"role-play": 0.05, "continuation": 0.15}, {"mbpp": 0.0})}}


def test_the_report_leads_with_the_verdict_and_holds_no_forget_data(tmp_path):
    from rr.audit.report import write_reports

    md, page = write_reports(_audit(), tmp_path, "code (embedded:smollm2)")
    text = md.read_text()
    assert text.index("**Verdict: FAIL**") < text.index("## Relearning")
    assert "| rr (final) | 0.000 | 0.100 | 0.210 | 0.330 | 0.700 |" in text
    assert "| rr (final) | 0.150 | 0.050 | 0.000 |" in text  # probe families worst-first for rr, then the forms
    assert "| model | continuation * | role-play | form mbpp |" in text  # * : a family that does not count
    html = page.read_text()
    assert html.count("data:image/png;base64,") == 3 and "<script" not in html and "http" not in html


def test_the_never_knew_control_is_a_row_of_the_relearning_table_and_curve_only(tmp_path):
    from rr.audit.report import write_reports

    audit = _audit()
    audit["models"]["never-knew"] = {"model": "embedded:smollm2",
                                     "relearn": {"scores": {"0": 0.0, "5": 0.0, "20": 0.05}, "recovery": {"5": 0.0,
                                                                                                          "20": 0.167}}}
    md, page = write_reports(audit, tmp_path, "entity (models/entity-smollm2)")
    text = md.read_text()
    assert "| never knew (before learning) | 0.000 | 0.000 | 0.050 | 0.000 | 0.167 |" in text
    assert text.count("never knew") == 1  # membership, probes and utility are the attacked models' only
    assert page.read_text().count("data:image/png;base64,") == 3


def test_the_report_renders_in_a_headless_browser(tmp_path):
    """Chromium (Debian's package; .ci/run installs it) loads the self-contained page and takes a screenshot."""
    import shutil
    import subprocess

    import numpy as np
    from PIL import Image

    from rr.audit.report import write_reports

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    _, page = write_reports(_audit(), tmp_path, "code (embedded:smollm2)")
    shot = tmp_path / "report.png"
    run = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          f"--screenshot={shot}", "--window-size=1200,1400", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert shot.exists(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (1400, 1200)
    # a rendered page, not a blank one: dark text and plot lines on white, spread over the page
    dark = pixels < 128
    assert 0.005 < dark.mean() < 0.5 and dark[:200].any() and dark[600:].any()
