"""Settings of the adaptation and compression stages (`adapt:` and `compress:` in params.yaml).

Kept free of torch so that loading params.yaml (every CLI command, the flow's no-op check)
stays fast; `metaloop.adapt` and `metaloop.compress` re-export the ones their callers use.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from metaloop.errors import ConfigError

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
Share = Annotated[float, Field(gt=0.0, le=1.0)]
Step = Literal["distill", "prune", "trim_vocab", "int8"]
STEPS = ("distill", "prune", "trim_vocab", "int8")


class Strict(BaseModel):
    """Unknown keys are errors; frozen (the contract of every params section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- adapt:


class AdaptParams(Strict):
    """How each target domain's classifier is adapted from the initialisation."""

    strategy: Literal["full", "top_k", "head", "lora"] = Field("full", description="Which weights train.")
    classifier: Literal["linear", "centroids"] = Field(
        "linear", description="linear: the architecture's own head (BERT: [CLS] -> pooler -> linear), a stock "
                              "AutoModelForSequenceClassification; centroids: the encoder mean-pooled and "
                              "meta-training's centroid classifier (meta.metric, scale, label_shots), its class "
                              "vectors trained with the encoder; far better from 1 to ~10 rows a label "
                              "(docs/fewshot.md), loaded by metaloop (metaloop.centroid_classifier).")
    top_k: PositiveInt = Field(2, description="Transformer layers trained when strategy=top_k.")
    lora_rank: PositiveInt = 8
    lora_alpha: PositiveFloat | None = Field(None, description="LoRA scaling numerator; default 2 * rank.")
    lora_targets: list[str] | None = Field(None, description="Module names for LoRA; default: peft's for the model.")
    shots: PositiveInt | None = Field(
        None, description="Train on this many rows per label (drawn with the seed); null = every train row."
    )
    # Tuned on CLINC150 train/val rows and the packaged corpus (docs/compression.md): the
    # classifier pools through BERT's [CLS] pooler, which the mean-pooling encoder never
    # trained, so it needs ~10 epochs at these rates; 3 epochs ends below the centroid.
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 32
    lr: PositiveFloat = Field(8e-5, description="AdamW learning rate of encoder weights (full, top_k).")
    lora_lr: PositiveFloat = Field(1e-3, description="AdamW learning rate of LoRA adapters.")
    head_lr: PositiveFloat = Field(2e-3, description="AdamW learning rate of the pooler and classifier.")
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    warmup: Fraction = Field(0.1, description="Share of steps with linear warm-up; then linear decay.")
    prototype_head: bool = Field(True, description="Initialise the classifier from class centroids.")
    learned_lrs: bool = Field(True, description="Use the init's Meta-SGD step sizes when it carries them.")
    learned_lr_scale: PositiveFloat = 1.0
    holdout_fraction: Fraction = Field(
        0.1, description="Share of train rows held out for early stopping when the domain has no val rows."
    )
    early_stopping_min_rows: PositiveInt = Field(
        30, description="Early-stop only when the held-out slice has at least this many rows."
    )
    patience: PositiveInt = Field(2, description="Epochs without held-out improvement before stopping.")
    soup: PositiveInt = Field(
        1, description="Fine-tune this many times (seeds seed, seed+1, ...) and average the weights into one "
                       "model (a uniform model soup): same size and speed, soup x the adaptation time.")
    threads: PositiveInt | None = Field(None, description="torch CPU threads while adapting (null: leave as is).")
    output_dir: Path = Path("artifacts/adapted")

    @model_validator(mode="after")
    def _check(self) -> AdaptParams:
        if self.lora_targets is not None and not self.lora_targets:
            raise ValueError("lora_targets must name at least one module, or be null for peft's default")
        if self.classifier == "centroids" and self.strategy == "lora":
            raise ValueError("adapt: classifier centroids with strategy lora is not supported; "
                             "use strategy full, top_k or head, or classifier linear")
        return self


# ---------------------------------------------------------------- compress:


class KDTraining(Strict):
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 32
    lr: PositiveFloat = 1e-4
    temperature: PositiveFloat = 2.0
    alpha: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.5, description="Weight of the distillation term; 1 - alpha weighs the labels' cross-entropy."
    )
    hidden_weight: Annotated[float, Field(ge=0.0)] = Field(
        0.0, description="Weight of the MSE between each student layer and the teacher layer it came from."
    )
    augment: Annotated[int, Field(ge=0)] = Field(
        0, description="Noisy copies (words dropped/masked) of each text per epoch, scored by the teacher."
    )
    patience: PositiveInt = 3


class DistillParams(KDTraining):
    layers: PositiveInt | list[Annotated[int, Field(ge=0)]] = Field(
        3, description="Student depth (teacher layers spread evenly, last included) or the teacher layer indices."
    )


class PruneParams(KDTraining):
    heads_keep: Share = Field(0.5, description="Share of attention heads kept.")
    ffn_keep: Share = Field(0.5, description="Share of FFN neurons kept.")
    scope: Literal["global", "layer"] = Field(
        "global", description="global: least important units anywhere (per-layer normalised); layer: same share per layer."
    )
    rounds: PositiveInt = Field(1, description="Prune in this many steps, recovering in between.")
    epochs: PositiveInt = Field(4, description="Recovery epochs after each round.")


class VocabParams(Strict):
    keep_chars: Literal["all", "ascii", "seen"] = Field(
        "ascii", description="Single-character tokens kept as fallback for unseen words."
    )
    keep_frequent: Annotated[int, Field(ge=0)] = Field(
        0, description="Also keep the vocabulary's first N ordinary tokens (BERT's are its most frequent words)."
    )
    max_positions: PositiveInt | None = Field(None, description="Also keep only this many position embeddings.")


class Int8Params(Strict):
    backend: Literal["onnx", "torch"] = Field("onnx", description="onnx: ONNX Runtime int8; torch: torch.ao dynamic.")
    per_channel: bool = True
    optimize: bool = Field(True, description="Fuse attention/LayerNorm/GELU with onnxruntime's optimizer first.")


class CompressParams(Strict):
    """Named recipes (lists of steps) and each step's settings."""

    recipes: dict[str, list[Step]] = Field(
        default_factory=lambda: {"int8": ["int8"], "small": ["distill", "prune", "trim_vocab", "int8"]},
        description="recipe name -> steps in order; `fp32` is reserved for the uncompressed model.",
    )
    distill: DistillParams = DistillParams()
    prune: PruneParams = PruneParams()
    trim_vocab: VocabParams = VocabParams()
    int8: Int8Params = Int8Params()
    agreement_min: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.0, description="Fail a recipe whose labels agree with the teacher's on less than this share of training texts."
    )
    threads: PositiveInt | None = None
    output_dir: Path = Path("artifacts/compressed")

    @field_validator("recipes")
    @classmethod
    def _recipes(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, steps in v.items():
            if name == "fp32":
                raise ValueError("recipe name 'fp32' is reserved for the uncompressed adapted model")
            if not steps:
                raise ValueError(f"recipe {name!r} has no steps")
            if "int8" in steps[:-1]:
                raise ValueError(f"recipe {name!r}: int8 changes the storage format and must be the last step")
        return v

    def steps(self, recipe: str | Sequence[str]) -> list[str]:
        if isinstance(recipe, str):
            if recipe not in self.recipes:
                raise ConfigError(f"compress: unknown recipe {recipe!r}; known: {', '.join(self.recipes)}")
            return list(self.recipes[recipe])
        steps = list(recipe)
        bad = [s for s in steps if s not in STEPS]
        if bad or "int8" in steps[:-1] or not steps:
            raise ConfigError(f"compress: steps {steps} invalid; allowed {STEPS}, int8 last")
        return steps
